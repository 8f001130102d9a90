"""Fit → save → load → predict → eval for every model kind, on the tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from inspectd.core.imaging import read_image
from inspectd.core.settings import load_settings
from inspectd.models import fit, load
from inspectd.models.datasets.mvtec import test_samples, train_samples
from inspectd.models.metrics import f1_max
from inspectd.models.settings import ModelSettings

KINDS = ["patchcore", "padim", "orthoad", "ensemble"]
SMALL = ["preprocess.resize=128", "calibration.min_holdout=3"]


@pytest.fixture(scope="module", params=KINDS)
def fitted(request, synth_root: Path, tmp_path_factory, run_cli) -> tuple[str, Path]:
    kind = request.param
    out = tmp_path_factory.mktemp(kind) / "artifact"
    args = ["fit", "--data", str(synth_root), "--category", "object", "--model", kind,
            "--out", str(out)]
    for o in SMALL:
        args += ["-o", o]
    run_cli(*args)
    return kind, out


def test_fit_writes_an_artifact_with_manifest_and_safetensors(fitted):
    kind, art = fitted
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["kind"] == kind
    assert (art / "weights.safetensors").stat().st_size > 0
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    assert len(manifest["backbone"]["weights_sha256"]) == 64
    assert manifest["threshold"]["image"] > 0 and manifest["threshold"]["pixel"] > 0
    # 14 OK images, 10 % (at least 3) held out of the model for the thresholds
    assert len(manifest["calibration"]["heldout_ok_scores"]) == 3
    assert manifest["training"]["images"] == 14 and manifest["training"]["fit_images"] == 11
    assert manifest["training"]["calibration"] == "holdout"
    assert "held-out" in manifest["threshold"]["method"]
    assert len(manifest["training"]["fingerprint"]) == 64
    assert not list(art.glob("*.pt")) and not list(art.glob("*.pkl"))


def test_eval_json_reports_every_metric_per_category_and_mean(fitted, synth_root, run_cli):
    _, art = fitted
    proc = run_cli("eval", "--data", str(synth_root), "--category", "all", "--artifact",
                   str(art.parent), "--json", check=False)
    assert proc.returncode != 0 and "no artifact for category 'object'" in proc.stderr
    proc = run_cli("eval", "--data", str(synth_root), "--category", "object", "--artifact",
                   str(art), "--json")
    result = json.loads(proc.stdout)
    cat = result["categories"]["object"]
    for key in ("image_auroc", "pixel_auroc", "pro", "f1_max"):
        assert 0.0 <= cat[key] <= 1.0
        assert result["mean"][key] == pytest.approx(cat[key])
    # The synthetic defects are plain to see: any working model separates them.
    assert cat["image_auroc"] > 0.8 and cat["pixel_auroc"] > 0.8


def test_predict_prints_verdicts_and_saves_pictures(fitted, synth_root, tmp_path, run_cli):
    _, art = fitted
    ng = synth_root / "object" / "test" / "scratch"
    good = synth_root / "object" / "test" / "good"  # same file names as in scratch/
    proc = run_cli("predict", "--artifact", str(art), "--json", "--save-pic", str(tmp_path),
                   str(ng), str(good))
    preds = json.loads(proc.stdout)["predictions"]
    assert len(preds) == len(list(ng.glob("*.png"))) + len(list(good.glob("*.png")))
    files = [f for p in preds for f in p["files"].values()]
    assert len(set(files)) == len(files)  # no picture overwrites another
    for p in preds:
        assert p["verdict"] in ("OK", "NG") and p["threshold"] > 0
        for f in p["files"].values():
            assert Path(f).is_file()


def test_artifact_round_trip_scores_are_bit_identical(synth_root, tmp_path):
    paths = [s.path for s in train_samples(synth_root, "object")]
    probe = [s.path for s in test_samples(synth_root, "object")][:5]
    for kind in KINDS:
        det = fit(paths, load_settings(ModelSettings, None, SMALL, kind=kind))
        before = det.predict(probe)
        det.save(tmp_path / kind)
        after = load(tmp_path / kind, precision="fp32").predict(probe)
        for a, b in zip(before, after, strict=True):
            assert a.score == b.score
            assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_predict_accepts_numpy_arrays_and_grayscale(fitted, synth_root):
    _, art = fitted
    det = load(art)
    path = test_samples(synth_root, "object")[0].path
    rgb = read_image(path)
    by_path, by_array, by_gray = det.predict([path, rgb, rgb[..., 1]])
    assert by_path.score == by_array.score
    assert by_gray.anomaly_map.shape == rgb.shape[:2]


def test_fits_are_reproducible_from_the_seed(synth_root):
    paths = [s.path for s in train_samples(synth_root, "object")]
    settings = load_settings(ModelSettings, None, [*SMALL, "seed=7"])
    a, b = fit(paths, settings), fit(paths, settings)
    assert np.array_equal(a.model.bank.numpy(), b.model.bank.numpy())
    assert a.threshold == b.threshold
    assert a.manifest["training"]["fingerprint"] == b.manifest["training"]["fingerprint"]


def test_ng_images_make_the_threshold_f1_optimal(synth_root):
    paths = [s.path for s in train_samples(synth_root, "object")]
    ng = [s.path for s in test_samples(synth_root, "object") if s.label == 1]
    det = fit(paths, load_settings(ModelSettings, None, SMALL, kind="padim"), ng=ng)
    assert det.manifest["threshold"]["method"].startswith("F1-optimal")
    assert len(det.manifest["calibration"]["ng_scores"]) == len(ng)
    cal = det.manifest["calibration"]
    ok, bad = np.array(cal["heldout_ok_scores"]), np.array(cal["ng_scores"])
    labels = np.r_[np.zeros(len(ok)), np.ones(len(bad))]
    scores = np.r_[ok, bad]
    best, _ = f1_max(labels, scores)
    f1 = f1_score(labels, scores >= det.threshold)
    assert f1 == pytest.approx(best)  # the threshold reaches F1-max on the calibration set…
    assert not np.isin(det.threshold, scores).any()  # …with a margin to every score


def test_the_artifact_keeps_the_training_domain_and_checks_frames_against_it(object_artifact):
    det = load(object_artifact)
    d = det.domain
    assert d.height == (128, 128) and d.width == (128, 128) and d.bit_depth == (8,)
    assert 0 <= d.brightness[0] <= d.brightness[1] <= 255
    inside = np.full((128, 128, 3), int(sum(d.brightness) / 2), np.uint8)
    assert d.problem(inside) is None
    assert "1×1 px" in d.problem(np.zeros((1, 1, 3), np.uint8))
    assert "16-bit" in d.problem(inside[..., 0].astype(np.uint16) << 8)
    assert "brightness" in d.problem(np.full((128, 128, 3), 255, np.uint8)) or \
        d.brightness[1] > 255 - 64


def test_a_non_finite_score_is_never_ok():
    from inspectd.models.detector import Prediction

    p = Prediction(float("nan"), 1.0, 1.0, np.zeros((2, 2), np.float32))
    assert p.verdict == "NG"
