"""Thresholds from OK images the model did not fit on: cross-fitted (every OK image in the
model) or held out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from inspectd.models import ModelSettings, fit
from inspectd.models.calibration import ok_bound
from inspectd.models.datasets.synthetic import generate


@pytest.fixture(scope="module")
def texture(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("cf"), ("texture",), n_train=40, n_test_good=40,
                    n_test_defect=1, size=96, seed=5)
    return (sorted((root / "texture" / "train" / "good").glob("*.png")),
            sorted((root / "texture" / "test" / "good").glob("*.png")))


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_cross_fitted_thresholds_hold_on_ok_parts_the_model_never_saw(texture, kind):
    """Scores of the training images themselves would give a threshold that rejects many new
    good parts (about half here); out-of-fold scores give one near its quantile."""
    train, fresh = texture
    det = fit(train, ModelSettings(kind=kind, preprocess={"resize": 96},
                                   calibration={"mode": "crossfit"}))
    assert det.manifest["training"]["fit_images"] == 40  # nothing held out of the model
    new = np.array([p.score for p in det.predict(fresh)])
    in_sample = np.array([p.score for p in det.predict(train)])
    naive = np.quantile(in_sample, 0.99) * 1.05
    assert (new >= det.threshold).mean() <= 0.05
    assert (new >= naive).mean() >= 0.3  # what cross-fitting avoids


def test_log_normal_rules_hold_their_quantile_far_better_at_a_few_scores():
    """4000 calibrations on 6 log-normal OK scores each: a new OK image exceeds the empirical
    0.99-quantile about 1 time in 7, the log-normal fit's quantile about 1 in 30, the
    prediction bound 1 in 100."""
    rng = np.random.default_rng(0)
    mu, sigma = 3.0, 0.2
    draws = rng.lognormal(mu, sigma, size=(4000, 6))
    rate = {rule: np.mean([norm.sf((np.log(ok_bound(d, 0.99, rule)) - mu) / sigma)
                           for d in draws]) for rule in ("quantile", "lognormal", "prediction")}
    assert 0.10 <= rate["quantile"] <= 0.18
    assert 0.02 <= rate["lognormal"] <= 0.05
    assert 0.006 <= rate["prediction"] <= 0.014


def test_ok_bound_edge_cases():
    assert ok_bound(np.array([2.0]), 0.99, "lognormal") == 2.0  # one score: no spread
    assert ok_bound(np.array([1.0, 2.0, 3.0]), 1.0, "lognormal") == 3.0  # q = 1: the largest
    assert ok_bound(np.array([1.0, 2.0, 3.0]), 0.5, "quantile") == 2.0
    z = np.array([-1.0, 0.0, 1.0])  # not all positive: a normal bound on the raw scores
    assert ok_bound(z, 0.99, "lognormal") > 1.0
    assert ok_bound(np.array([1.0, 1.1, 0.9]), 0.99, "lognormal") > 1.1


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_thresholds_from_four_held_out_images(texture, kind):
    """40 OK images, 4 held out, 40 new good parts: the empirical quantile of the four
    rejects several; the prediction bound none (or one); the default log-normal fit's
    quantile lies between the two."""
    train, fresh = texture
    s = ModelSettings(kind=kind, preprocess={"resize": 96})
    assert s.calibration.rule == "lognormal"
    dets = {rule: fit(train, s.model_copy(update={"calibration": s.calibration.model_copy(
        update={"rule": rule})})) for rule in ("quantile", "lognormal", "prediction")}
    assert {d.manifest["training"]["heldout_images"] for d in dets.values()} == {4}
    assert dets["lognormal"].manifest["threshold"]["rule"] == "lognormal"
    t = {rule: d.threshold for rule, d in dets.items()}
    assert t["quantile"] <= t["lognormal"] <= t["prediction"]
    new = np.array([p.score for p in dets["lognormal"].predict(fresh)])
    assert (new >= t["prediction"]).mean() <= 0.025
    assert (new >= t["quantile"]).mean() >= 0.05


def test_holdout_mode_keeps_a_share_out_of_the_model(texture, tmp_path):
    train, _ = texture
    det = fit(train, ModelSettings(kind="padim", preprocess={"resize": 96},
                                   calibration={"mode": "holdout"}))
    t = det.manifest["training"]
    assert (t["fit_images"], t["heldout_images"], t["calibration"]) == (36, 4, "holdout")
    det.save(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert len(m["calibration"]["heldout_ok_scores"]) == 4


def test_auto_mode_cross_fits_small_sets_only(texture):
    train, _ = texture
    s = ModelSettings(kind="padim", preprocess={"resize": 96},
                      calibration={"mode": "auto", "crossfit_max_images": 20})
    assert fit(train, s).manifest["training"]["calibration"] == "holdout"
    s = s.model_copy(update={"calibration": s.calibration.model_copy(
        update={"crossfit_max_images": 40})})
    assert fit(train, s).manifest["training"]["calibration"] == "crossfit 5 folds"
