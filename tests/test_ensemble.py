"""The calibrated ensemble: members normalised by their own held-out OK scores, averaged;
chosen by `--model auto` only when it beats both its members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inspectd.core.errors import ConfigError
from inspectd.models import fit, load
from inspectd.models.auto import Candidate, _ensemble, choose
from inspectd.models.calibration import split_ok
from inspectd.models.datasets.mvtec import test_samples, train_samples
from inspectd.models.detector import load_images
from inspectd.models.ensemble.fit import PIXEL_STEP
from inspectd.models.ensemble.model import Z_OFFSET
from inspectd.models.metrics import auroc
from inspectd.models.settings import AutoSettings, ModelSettings

SMALL = {"preprocess": {"resize": 128}}


@pytest.fixture(scope="module")
def ensemble(synth_root: Path):
    paths = [s.path for s in train_samples(synth_root, "object")]
    s = ModelSettings(kind="ensemble", **SMALL)
    return fit(paths, s), paths, s


def test_each_member_is_normalised_on_the_held_out_ok_images(ensemble):
    det, paths, s = ensemble
    _, hold = split_ok(len(paths), s)
    images = load_images([paths[i] for i in hold])
    feats = det.image_features(images)
    zs = []
    for member, spec in zip(det.model.members, det.model.params["members"], strict=True):
        scores, maps = (t.numpy().astype(np.float64)
                        for t in det.score_model(member, feats, len(images)))
        pixels = maps[:, ::PIXEL_STEP, ::PIXEL_STEP]
        assert spec["pixel"] == pytest.approx([pixels.mean(), pixels.std()], rel=1e-4)
        mean, spread = spec["image"]
        assert mean == pytest.approx(scores.mean(), rel=1e-5)
        # Three held-out scores: their spread, pooled with two pseudo-images of the pixels'.
        assert len(scores) == 3
        assert spread == pytest.approx(np.sqrt((((scores - mean) ** 2).sum()
                                                + 2 * pixels.std() ** 2) / 4), rel=1e-4)
        zs.append((scores - mean) / spread)
    combined = det.score_features(feats, len(images))[0].numpy()
    assert np.allclose(combined, np.mean(zs, axis=0) + Z_OFFSET, atol=1e-4)
    assert det.manifest["training"]["calibration"] == "holdout"
    assert [m["kind"] for m in det.model.params["members"]] == ["patchcore", "padim"]


def test_the_ensemble_separates_defects_and_round_trips_bit_identically(ensemble, synth_root,
                                                                        tmp_path):
    det, _, _ = ensemble
    samples = test_samples(synth_root, "object")
    preds = det.predict([t.path for t in samples])
    labels = np.array([t.label for t in samples])
    images = load_images([t.path for t in samples])
    feats = det.image_features(images)
    members = [auroc(labels, det.score_model(m, feats, len(images))[0].numpy())
               for m in det.model.members]
    assert auroc(labels, np.array([p.score for p in preds])) >= min(members) > 0.5
    det.save(tmp_path / "e")
    probe = [t.path for t in samples[:4]]  # the same batches: summation order is per batch
    again = load(tmp_path / "e", precision="fp32").predict(probe)
    for a, b in zip(det.predict(probe), again, strict=True):
        assert a.score == b.score
        assert np.array_equal(a.anomaly_map, b.anomaly_map)


def test_cross_fitting_an_ensemble_falls_back_to_held_out_calibration(synth_root):
    paths = [s.path for s in train_samples(synth_root, "object")]
    det = fit(paths, ModelSettings(kind="ensemble", calibration={"mode": "crossfit"},
                                   ensemble={"members": [{"kind": "padim"},
                                                         {"kind": "orthoad"}]}, **SMALL))
    assert det.manifest["training"]["calibration"] == "holdout"


@pytest.mark.parametrize(("members", "error"), [
    ([{"kind": "padim"}], "at least two members"),
    ([{"kind": "padim"}, {"kind": "auto"}], "single model kind"),
    ([{"kind": "padim"}, {"kind": "padim", "preprocess": {"resize": 96}}], "preprocess"),
])
def test_a_bad_member_list_is_a_config_error(synth_root, members, error):
    paths = [s.path for s in train_samples(synth_root, "object")]
    with pytest.raises(ConfigError, match=error):
        fit(paths, ModelSettings(kind="ensemble", ensemble={"members": members}, **SMALL))


def _candidate(name: str, kind: str, ok: np.ndarray, bad: np.ndarray,
               outputs: dict) -> Candidate:
    c = Candidate(name, ModelSettings(kind=kind))
    labels = np.r_[np.zeros(len(ok)), np.ones(len(bad))]
    c.image_auroc = auroc(labels, np.r_[ok, bad])
    c.pixel_auroc = None
    c.choice = c.image_auroc
    c.fit_seconds = 0.1
    maps = np.zeros((len(bad), 4, 4), np.float32)
    outputs[name] = (ok, bad, maps, np.zeros(16, np.float32), np.zeros(0),
                     np.zeros_like(maps, bool))
    return c


def test_the_ensemble_wins_only_where_it_beats_both_members():
    rng = np.random.default_rng(0)
    ok_a, ok_b = rng.normal(0, 1, 30), rng.normal(50, 10, 30)
    # Complementary members: each sees half of the anomalies, on its own scale.
    bad_a = np.r_[rng.normal(6, 1, 15), rng.normal(0, 1, 15)]
    bad_b = np.r_[rng.normal(50, 10, 15), rng.normal(110, 10, 15)]
    out: dict = {}
    tried = [_candidate("patchcore", "patchcore", ok_a, bad_a, out),
             _candidate("padim", "padim", ok_b, bad_b, out)]
    ens = _ensemble(tried, out, AutoSettings(pixel_weight=0))
    assert ens is not None and ens.choice > max(c.choice for c in tried)
    assert ens.settings.kind == "ensemble"
    assert [m["kind"] for m in ens.settings.ensemble.members] == ["patchcore", "padim"]
    # One member sees every anomaly, the other none: averaging only dilutes the good one.
    out = {}
    tried = [_candidate("patchcore", "patchcore", ok_a, rng.normal(3, 1, 30), out),
             _candidate("padim", "padim", ok_b, rng.normal(50, 10, 30), out)]
    ens = _ensemble(tried, out, AutoSettings(pixel_weight=0))
    assert ens is not None and ens.choice < max(c.choice for c in tried)


def test_two_ways_to_score_one_fit_make_no_ensemble():
    rng = np.random.default_rng(1)
    out: dict = {}
    a = _candidate("patchcore", "patchcore", rng.normal(0, 1, 9), rng.normal(3, 1, 9), out)
    b = _candidate("patchcore topk", "patchcore", rng.normal(0, 1, 9), rng.normal(3, 1, 9), out)
    b.settings = ModelSettings(kind="patchcore", patchcore={"image_score": "topk"})
    assert _ensemble([a, b], out, AutoSettings()) is None


def test_auto_reports_the_ensemble_and_chooses_it_only_above_its_members(synth_root):
    paths = [s.path for s in train_samples(synth_root, "object")]
    chosen, report, _ = choose(paths, ModelSettings(
        kind="auto", **SMALL, auto={"min_validation": 4, "candidates": [
            {"name": "patchcore", "kind": "patchcore"}, {"name": "padim", "kind": "padim"}]}))
    rows = {c["name"]: c for c in report["candidates"]}
    ens = rows.pop("ensemble (patchcore + padim)", None) or rows.pop(
        "ensemble (padim + patchcore)")
    best = max(r["choice"] for r in rows.values())
    if report["chosen"].startswith("ensemble"):
        assert ens["choice"] >= best + 0.01 and chosen.kind == "ensemble"
    else:
        assert ens["choice"] < best + 0.01 and chosen.kind != "ensemble"
