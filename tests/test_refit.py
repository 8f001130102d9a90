"""`inspectd refit`: a candidate from the OK frames the line kept, gated before promotion."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.core.config import ImageSettings, LineSettings
from inspectd.core.resources import host_cores
from inspectd.core.settings import load_settings
from inspectd.core.wire import UNKNOWN_SKU, Verdict
from inspectd.lifecycle.gates import false_reject_gate, ng_gate, shift_gate
from inspectd.lifecycle.lock import RefitError, refit_lock
from inspectd.lifecycle.refit import refit
from inspectd.lifecycle.registry import (
    current_version,
    list_versions,
    promote,
    publish,
    read_history,
    refit_record,
)
from inspectd.models import load
from inspectd.models.datasets.synthetic import generate
from inspectd.storage import queries
from inspectd.storage.audit import AuditLog
from inspectd.storage.images import ImageStore

SKU = "GM06_08"
NEAR = 0.95  # refit.near_threshold in these lines


def read(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@dataclass
class Frames:
    ok: list[np.ndarray]
    ng: list[np.ndarray]
    ok_scores: np.ndarray  # by the current version (object_artifact)
    ng_scores: np.ndarray
    threshold: float
    pixel_threshold: float


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory, object_artifact: Path) -> Frames:
    """40 new OK frames and 6 defects of the synthetic object, scored by the current model.
    No holes: at 128 px a hole is a few pixels, which out-of-fold OK scores show no model
    here tells from OK, so a gate that demands every confirmed NG be rejected rightly fails."""
    root = generate(tmp_path_factory.mktemp("line_frames"), ("object",), n_train=40,
                    n_test_good=0, n_test_defect=8, size=128, seed=11)
    ok = [read(p) for p in sorted((root / "object" / "train" / "good").glob("*.png"))]
    ng = [read(p) for p in sorted((root / "object" / "test").glob("*/*.png"))
          if p.parent.name != "hole"]
    det = load(object_artifact, precision="fp32")
    return Frames(ok, ng, det.score_images(ok)[0], det.score_images(ng)[0], det.threshold,
                  det.pixel_threshold)


def make_line(tmp_path: Path, frames: Frames, artifact: Path | None, **refit: object) -> Path:
    """A line's data_dir as the sink leaves it: v1 current (when given), every frame judged by
    v1's scores, OK frames kept under images/ok, NG frames under images/ng, all in the audit
    log, and an operator's NG label on each real defect."""
    cfg = tmp_path / "line.yaml"
    settings = {"min_images": 20, "min_holdout": 8, "holdout": 0.3, "near_threshold": NEAR,
                **refit}
    cfg.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "refit": settings,
                               "worker": {"precision": "fp32"}}))
    s = load_settings(LineSettings, cfg)
    if artifact is not None:
        publish(artifact, s.models_dir, SKU, "v1")
    audit = AuditLog(s.database_url(), s.spool_dir)
    store = ImageStore(s.images_dir, ImageSettings())
    t0 = time.time() - 3600
    judged = [("ok", i, rgb, score) for i, (rgb, score) in
              enumerate(zip(frames.ok, frames.ok_scores, strict=True))]
    judged += [("ng", i, rgb, score) for i, (rgb, score) in
               enumerate(zip(frames.ng, frames.ng_scores, strict=True))]
    for n, (prefix, i, rgb, score) in enumerate(judged):
        kind = "NG" if score >= frames.threshold else "OK"
        v = Verdict(f"{prefix}{i:03d}", kind, camera="cam1", sku=SKU, line="line1",
                    capture_ts=t0 + n, score=float(score), threshold=frames.threshold,
                    pixel_threshold=frames.pixel_threshold, model_version="v1")
        audit.record(v, {"image": store.save_ok(v, rgb)} if kind == "OK" else store.save_ng(v, rgb))
    audit.close()
    for i in range(len(frames.ng)):
        queries.set_label(s.database_url(), f"ng{i:03d}", "NG", note="confirmed", user="qa")
    return cfg


def settings(cfg: Path) -> LineSettings:
    return load_settings(LineSettings, cfg)


def test_refit_promotes_a_loadable_version_fitted_on_line_ok_frames(
        tmp_path, frames, object_artifact, run_cli):
    cfg = make_line(tmp_path, frames, object_artifact)
    proc = run_cli("refit", "--sku", SKU, "-c", str(cfg), "--version", "v2", "--json")
    r = json.loads(proc.stdout)
    kept = frames.ok_scores < frames.threshold  # the line kept the frames v1 judged OK
    clear = frames.ok_scores < NEAR * frames.threshold
    assert r["passed"] and r["promoted"] and r["version"] == "v2" and r["previous"] == "v1"
    assert r["pool"] == int(kept.sum())
    assert r["ng_frames"] == len(frames.ng)
    assert r["settings_source"] == "current version v1"
    # beside the line: the lowest priority, on every core (it only takes what the line leaves)
    assert r["resources"] == {"threads": host_cores(), "nice": r["resources"]["nice"],
                              "policy": "idle"}
    assert r["resources"]["nice"] >= 10
    assert [(g["name"], g["passed"]) for g in r["gates"]] == [
        ("false rejects", True), ("confirmed NG", True), ("score shift", True)]

    s = settings(cfg)
    assert current_version(s.models_dir, SKU)[0] == "v2"
    det = load(s.models_dir / SKU / "v2", precision="fp32")
    ok_scores, _, _ = det.score_images(frames.ok[:8])
    ng_scores, _, _ = det.score_images(frames.ng)
    assert np.all(np.isfinite(ok_scores)) and np.median(ok_scores) < det.threshold
    assert np.all(ng_scores >= det.threshold)
    record = refit_record(s.models_dir / SKU / "v2")
    assert record["status"] == "passed" and record["previous"] == "v1"
    # gate frames from every kept OK frame, fit frames only from those clear of v1's
    # threshold, never the same frame in both
    fit_ids, gate_ids = (set(record["training"][k]) for k in ("fit_frame_ids",
                                                              "heldout_frame_ids"))
    assert len(fit_ids) == r["fit_frames"] and len(gate_ids) == r["heldout_frames"]
    assert not fit_ids & gate_ids
    assert gate_ids <= {f"ok{i:03d}" for i in np.flatnonzero(kept)}
    assert fit_ids == {f"ok{i:03d}" for i in np.flatnonzero(clear)} - gate_ids
    assert read_history(s.models_dir, SKU)[-1] | {"time": None, "user": None} == {
        "time": None, "user": None, "action": "refit", "from": "v1", "to": "v2"}


def test_failed_gate_keeps_the_current_version_and_exits_with_the_reason(
        tmp_path, frames, object_artifact, run_cli):
    cfg = make_line(tmp_path, frames, object_artifact)
    # An operator marks the most ordinary-looking OK frame NG: no model can reject it
    # without rejecting good parts, so "every confirmed NG rejected" must fail.
    plain = f"ok{int(np.argmin(frames.ok_scores)):03d}"
    queries.set_label(settings(cfg).database_url(), plain, "NG", user="qa")
    proc = run_cli("refit", "--sku", SKU, "-c", str(cfg), "--version", "v2", check=False)
    assert proc.returncode == 1
    assert "refit of GM06_08 rejected" in proc.stderr and plain in proc.stderr
    assert "FAIL" in proc.stdout and "v1 stays current" in proc.stdout

    s = settings(cfg)
    assert current_version(s.models_dir, SKU)[0] == "v1"
    kept = {v.name: v for v in list_versions(s.models_dir, SKU)}
    assert kept["v2"].status == "rejected" and not kept["v2"].is_current
    failed = [g["name"] for g in kept["v2"].gates if g["passed"] is False]
    assert "confirmed NG" in failed


def test_a_refit_does_not_undo_a_promotion_made_while_it_ran(tmp_path, frames, object_artifact):
    s = settings(make_line(tmp_path, frames, object_artifact))
    switched = []

    def engineer_promotes(stage: str, done: int, total: int) -> None:
        if not switched:  # while the candidate fits, someone makes v2 current by hand
            switched.append(publish(object_artifact, s.models_dir, SKU, "v2"))

    r = refit(s, SKU, version="v3", progress=engineer_promotes)
    assert switched and r.passed and not r.promoted and r.previous == "v1"
    assert "current is v2, not v1" in r.reason
    assert current_version(s.models_dir, SKU)[0] == "v2"
    kept = {v.name: v for v in list_versions(s.models_dir, SKU)}
    assert kept["v3"].status == "passed" and not kept["v3"].is_current
    promote(s.models_dir, SKU, "v3")  # by hand, once reviewed
    assert current_version(s.models_dir, SKU)[0] == "v3"


def test_dry_run_of_a_new_sku_publishes_nothing(tmp_path, frames):
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text("kind: patchcore\npreprocess: {resize: 128}\n")
    cfg = make_line(tmp_path, frames, None, model=str(model_yaml))
    s = settings(cfg)
    r = refit(s, SKU, dry_run=True)
    assert r.passed and not r.promoted and r.version is None and r.previous is None
    assert r.settings_source == str(model_yaml)
    assert r.gates[2].passed is None and "no current version" in r.gates[2].reason
    assert list_versions(s.models_dir, SKU) == []
    assert sorted(p.name for p in (s.models_dir / SKU).iterdir()) == [".refit.lock"]


def test_concurrent_refit_of_a_sku_is_refused(tmp_path, frames, object_artifact):
    s = settings(make_line(tmp_path, frames, object_artifact))
    with refit_lock(s.models_dir, SKU), \
            pytest.raises(RefitError, match=rf"refit of SKU {SKU} already running "
                                            rf"\(pid {os.getpid()}\)"):
        refit(s, SKU)
    with refit_lock(s.models_dir, SKU):  # released again
        pass


def test_too_few_ok_frames_is_a_clear_error(tmp_path, frames, object_artifact):
    s = settings(make_line(tmp_path, frames, object_artifact, min_images=500))
    with pytest.raises(RefitError, match=r"SKU GM06_08: \d+ usable OK frames .* at least 500"):
        refit(s, SKU)
    assert [v.name for v in list_versions(s.models_dir, SKU)] == ["v1"]


def test_gates_state_counts_and_name_frames():
    ids = [f"f{i}" for i in range(40)]
    # the gate fails on evidence: 1 reject in 12 or 40 frames is no proof of a rate above 1 %
    # (P(≥ 1 | 40, 1 %) = 0.33), 4 in 40 is (P = 0.00069)
    assert false_reject_gate(ids[:12], np.r_[np.zeros(11), 2.0], 1.0, 0.01).passed
    g = false_reject_gate(ids, np.r_[np.zeros(39), 2.0], 1.0, 0.01)
    assert g.passed and g.result == "1/40 = 2.5%" and g.data["frame_ids"] == ["f39"]
    g = false_reject_gate(ids, np.r_[np.zeros(36), np.full(4, 2.0)], 1.0, 0.01)
    assert not g.passed and g.result == "4/40 = 10.0%" and "f36, f37, f38, f39" in g.reason
    assert g.data["p_above_limit"] == pytest.approx(0.000686, abs=1e-6)
    assert false_reject_gate(ids, np.zeros(40), 1.0, 0.01).passed
    # against the current version on the same frames: a sign test on the frames only one
    # of the two rejects; 5 against 0 fails (p = 1/32), 5 against 2 does not (p = 0.23)
    cand = np.r_[np.zeros(35), np.full(5, 2.0)]
    g = false_reject_gate(ids, cand, 1.0, 0.2, current=np.zeros(40), current_threshold=1.0)
    assert not g.passed and "rejects 5 held-out OK frames the current version passes, " \
        "against 0" in g.reason and g.result == "5/40 = 12.5% (current 0/40)"
    current = np.r_[np.full(2, 2.0), np.zeros(38)]
    assert false_reject_gate(ids, cand, 1.0, 0.2, current=current, current_threshold=1.0).passed
    g = ng_gate(["a", "b"], np.array([2.0, 0.5]), 1.0)
    assert not g.passed and g.result == "1/2 rejected" and g.reason.endswith(": b")
    assert ng_gate([], np.zeros(0), 1.0).passed is None
    same = list(np.linspace(0.5, 0.8, 50))
    assert shift_gate(same, same, 0.1).passed
    g = shift_gate([x + 0.3 for x in same], same, 0.1, "v1")
    assert not g.passed and "rose from 0.79 (v1) to 1.08 (limit +0.10)" in g.reason
    assert g.data["ks"] > 0.9


def test_first_model_for_a_new_sku_learns_from_its_unjudged_frames(tmp_path, frames):
    """Before a SKU has a model, the line audits its frames ERROR (unknown SKU) and keeps a
    bounded sample of them; the first refit fits on those and makes the result current."""
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text("kind: patchcore\npreprocess: {resize: 128}\n")
    cfg = tmp_path / "line.yaml"
    cfg.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "worker": {
        "precision": "fp32"}, "refit": {"min_images": 20, "min_holdout": 8, "holdout": 0.3,
                                        "max_false_reject": 0.1, "model": str(model_yaml)}}))
    s = settings(cfg)
    audit = AuditLog(s.database_url(), s.spool_dir)
    store = ImageStore(s.images_dir, ImageSettings())
    for i, rgb in enumerate(frames.ok):
        v = Verdict(f"new{i:03d}", "ERROR", camera="cam1", sku="NEW1", line="line1",
                    capture_ts=time.time() - 100 + i,
                    reason=f"{UNKNOWN_SKU}: no model for SKU 'NEW1'")
        audit.record(v, {"image": store.save_unjudged(v, rgb)})
    audit.close()
    r = refit(s, "NEW1", version="v1")
    assert r.passed and r.promoted and r.previous is None
    assert r.fit_frames + r.heldout_frames == len(frames.ok)
    assert current_version(s.models_dir, "NEW1")[0] == "v1"
