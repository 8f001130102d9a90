"""`inspectd models list|show|promote|rollback|drift` and `inspectd fit --sku` on a line."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from inspectd.cli import app
from inspectd.core.config import LineSettings
from inspectd.core.errors import ArtifactError
from inspectd.core.settings import load_settings
from inspectd.core.wire import Verdict
from inspectd.lifecycle.registry import REFIT_RECORD, current_version, publish, read_history
from inspectd.models import load
from inspectd.models.artifact import read_manifest
from inspectd.storage.audit import AuditLog

SKU = "GM06_08"
runner = CliRunner()


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def line(tmp_path: Path) -> Path:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nrefit: {{drift_min_frames: 20}}\n")
    return cfg


def models_dir(cfg: Path) -> Path:
    return load_settings(LineSettings, cfg).models_dir


def test_promote_and_rollback_round_trip(line, object_artifact):
    md = models_dir(line)
    publish(object_artifact, md, SKU, "v1")
    publish(object_artifact, md, SKU, "v2")
    listed = json.loads(invoke("models", "list", "--sku", SKU, "-c", line, "--json").stdout)
    assert [(v["name"], v["is_current"]) for v in listed["versions"]] == [
        ("v1", False), ("v2", True)]

    assert "v1 is current (was v2)" in invoke(
        "models", "promote", "--sku", SKU, "--version", "v1", "-c", line).stdout
    assert current_version(md, SKU)[0] == "v1"
    assert "rolled back from v1 to v2" in invoke("models", "rollback", "--sku", SKU,
                                                 "-c", line).stdout
    assert "rolled back from v2 to v1" in invoke("models", "rollback", "--sku", SKU,
                                                 "-c", line).stdout
    last = invoke("models", "rollback", "--sku", SKU, "-c", line)
    assert isinstance(last.exception, ArtifactError)
    assert "no earlier version to roll back to" in str(last.exception)
    assert current_version(md, SKU)[0] == "v1"
    assert [(h["action"], h["from"], h["to"]) for h in read_history(md, SKU)] == [
        ("publish", None, "v1"), ("publish", "v1", "v2"), ("promote", "v2", "v1"),
        ("rollback", "v1", "v2"), ("rollback", "v2", "v1")]
    table = invoke("models", "list", "--sku", SKU, "-c", line).stdout
    assert "v1" in table and "v2" in table and "patchcore" in table


def test_a_refit_rejected_version_is_promoted_only_with_force(line, object_artifact, tmp_path):
    md = models_dir(line)
    publish(object_artifact, md, SKU, "v1")
    staged = shutil.copytree(object_artifact, tmp_path / "candidate")
    gates = [{"name": "confirmed NG", "passed": False, "result": "1/2 rejected",
              "limit": "all rejected", "reason": "confirmed NG frames passed as OK: f7",
              "data": {}}]
    (staged / REFIT_RECORD).write_text(json.dumps(
        {"source": "refit", "status": "rejected", "reason": gates[0]["reason"], "gates": gates,
         "previous": "v1", "time": "2024-05-01T10:00:00+00:00"}))
    publish(staged, md, SKU, "v2", make_current=False)

    refused = invoke("models", "promote", "--sku", SKU, "--version", "v2", "-c", line)
    assert isinstance(refused.exception, ArtifactError)
    assert "failed its refit gates (confirmed NG frames passed as OK: f7)" in str(
        refused.exception)
    assert current_version(md, SKU)[0] == "v1"
    shown = invoke("models", "show", "--sku", SKU, "--version", "v2", "-c", line).stdout
    assert "rejected" in shown and "FAIL" in shown and "patchcore" in shown
    forced = invoke("models", "promote", "--sku", SKU, "--version", "v2", "--force", "-c", line)
    assert forced.exit_code == 0 and current_version(md, SKU)[0] == "v2"

    info = json.loads(invoke("models", "show", "--sku", SKU, "-c", line, "--json").stdout)
    m = read_manifest(md / SKU / "v2")
    assert info["version"] == "v2" and info["kind"] == "patchcore"
    assert info["backbone"] == "efficientnet_lite0" and info["image_size"] == [128, 128]
    assert info["threshold"]["image"] == m["threshold"]["image"]
    assert info["training"]["images"] == m["training"]["images"]
    assert info["refit"]["status"] == "rejected"


def _record_scores(cfg: Path, sku: str, scores: np.ndarray, version: str, start: int) -> None:
    s = load_settings(LineSettings, cfg)
    audit = AuditLog(s.database_url(), s.spool_dir)
    t0 = time.time() - 600
    for i, score in enumerate(scores):
        audit.record(Verdict(f"{sku}-{start + i}", "OK", camera="cam1", sku=sku, line="line1",
                             capture_ts=t0 + i, score=float(score), model_version=version))
    audit.close()


def test_drift_recommends_a_refit_only_when_scores_move_up(line, object_artifact):
    md = models_dir(line)
    cal = np.array(read_manifest(object_artifact)["calibration"]["heldout_ok_scores"])
    rng = np.random.default_rng(0)
    for sku in ("steady", "drifted", "quiet"):
        publish(object_artifact, md, sku, "v1")
    _record_scores(line, "steady", rng.choice(cal, 60) * rng.uniform(0.99, 1.01, 60), "v1", 0)
    _record_scores(line, "steady", np.full(60, cal.max() * 2), "v0", 100)  # another version's
    _record_scores(line, "drifted", cal.max() * rng.uniform(1.1, 1.2, 60), "v1", 0)
    _record_scores(line, "quiet", np.full(5, cal.max() * 2), "v1", 0)

    def drift(sku: str) -> dict:
        return json.loads(invoke("models", "drift", "--sku", sku, "-c", line, "--json").stdout)

    steady, drifted, quiet = drift("steady"), drift("drifted"), drift("quiet")
    assert steady["recommended"] is False and steady["recent"]["n"] == 60
    assert drifted["recommended"] is True and drifted["ks"] == 1.0
    assert drifted["recent"]["median"] > drifted["calibration"]["median"]
    assert quiet["recommended"] is None and "too few recent frames" in quiet["reason"]
    text = invoke("models", "drift", "--sku", "drifted", "-c", line).stdout
    assert "refit recommended" in text and "KS statistic 1.000" in text


def test_fit_publishes_straight_into_the_line_registry(line, synth_root):
    res = invoke("fit", "--data", synth_root, "--category", "object", "--sku", "NEW",
                 "--line", line, "-o", "preprocess.resize=128")
    assert res.exit_code == 0, res.output
    md = models_dir(line)
    version, path = current_version(md, "NEW")
    assert load(path).threshold > 0
    assert [h["action"] for h in read_history(md, "NEW")] == ["publish"]
    assert sorted(p.name for p in (md / "NEW").iterdir()) == [
        ".registry.lock", "current", "history.jsonl", version]
    no_line = invoke("fit", "--data", synth_root, "--category", "object", "--sku", "NEW")
    assert no_line.exit_code == 2 and "--sku with --line" in no_line.output
