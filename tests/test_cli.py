"""The command line: bad input gets one line naming the problem, a non-zero exit, no traceback."""

from __future__ import annotations

import json

import pytest


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], proc.stderr


def test_fit_with_missing_data_root_names_it(run_cli, tmp_path):
    proc = run_cli("fit", "--data", str(tmp_path / "nope"), "--category", "x", "--out",
                   str(tmp_path / "a"), check=False)
    _one_line_error(proc, "nope")


def test_fit_with_unknown_category_lists_the_available_ones(run_cli, synth_root, tmp_path):
    proc = run_cli("fit", "--data", str(synth_root), "--category", "bottle", "--out",
                   str(tmp_path / "a"), check=False)
    _one_line_error(proc, "bottle", "object")


def test_unknown_override_key_is_named(run_cli, synth_root, tmp_path):
    proc = run_cli("fit", "--data", str(synth_root), "--category", "object", "--out",
                   str(tmp_path / "a"), "-o", "patchcore.coreset=0.1", check=False)
    _one_line_error(proc, "unknown key 'patchcore.coreset'")


def test_missing_backbone_weights_name_the_expected_file(run_cli, synth_root, tmp_path):
    proc = run_cli("fit", "--data", str(synth_root), "--category", "object", "--out",
                   str(tmp_path / "a"), "-o", "backbone.name=resnet18", "-o",
                   f"backbone.weights={tmp_path / 'resnet18-f37072fd.pth'}", check=False)
    _one_line_error(proc, "resnet18-f37072fd.pth", "never downloads")


def test_predict_with_missing_artifact_or_corrupt_image(run_cli, tmp_path):
    proc = run_cli("predict", "--artifact", str(tmp_path / "none"), str(tmp_path), check=False)
    _one_line_error(proc, "none")


def test_predict_on_a_corrupt_image_names_the_file(run_cli, synth_root, tmp_path):
    art = tmp_path / "art"
    run_cli("fit", "--data", str(synth_root), "--category", "object", "--model", "padim",
            "--out", str(art), "-o", "preprocess.resize=64")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    proc = run_cli("predict", "--artifact", str(art), str(bad), check=False)
    _one_line_error(proc, "broken.png", "not a readable image")


def test_data_check_json_and_exit_code(run_cli, synth_root, tmp_path):
    proc = run_cli("data", "check", str(synth_root), "--json")
    report = json.loads(proc.stdout)["categories"][0]
    assert report["ok"] and report["counts"]["train"]["good"] == 14
    broken = tmp_path / "broken"
    (broken / "c" / "train" / "good").mkdir(parents=True)
    (broken / "c" / "train" / "good" / "000.png").write_bytes(b"junk")
    proc = run_cli("data", "check", str(broken), check=False)
    assert proc.returncode == 1 and "000.png" in proc.stdout


@pytest.mark.parametrize("args", [["eval", "--help"], ["fit", "--help"], ["predict", "--help"]])
def test_help_lists_the_contract_options(run_cli, args):
    proc = run_cli(*args)
    assert "--json" in proc.stdout or "--out" in proc.stdout
