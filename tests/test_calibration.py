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


def test_lognormal_bound_holds_its_quantile_at_a_few_scores():
    """4000 calibrations on 6 log-normal OK scores each: a new OK image exceeds the empirical
    0.99-quantile about 1 time in 7, the log-normal bound near 1 time in 100."""
    rng = np.random.default_rng(0)
    mu, sigma = 3.0, 0.2
    draws = rng.lognormal(mu, sigma, size=(4000, 6))
    rate = {rule: np.mean([norm.sf((np.log(ok_bound(d, 0.99, rule)) - mu) / sigma)
                           for d in draws]) for rule in ("quantile", "lognormal")}
    assert 0.10 <= rate["quantile"] <= 0.18
    assert 0.006 <= rate["lognormal"] <= 0.014


def test_ok_bound_edge_cases():
    assert ok_bound(np.array([2.0]), 0.99, "lognormal") == 2.0  # one score: no spread
    assert ok_bound(np.array([1.0, 2.0, 3.0]), 1.0, "lognormal") == 3.0  # q = 1: the largest
    assert ok_bound(np.array([1.0, 2.0, 3.0]), 0.5, "quantile") == 2.0
    z = np.array([-1.0, 0.0, 1.0])  # not all positive: a normal bound on the raw scores
    assert ok_bound(z, 0.99, "lognormal") > 1.0
    assert ok_bound(np.array([1.0, 1.1, 0.9]), 0.99, "lognormal") > 1.1


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_thresholds_from_four_held_out_images_pass_new_good_parts(texture, kind):
    """40 OK images, 4 held out: their empirical quantile rejects several of 40 new good
    parts; the log-normal bound (the default) passes them."""
    train, fresh = texture
    s = ModelSettings(kind=kind, preprocess={"resize": 96})
    det = fit(train, s)
    assert det.manifest["training"]["heldout_images"] == 4
    assert det.manifest["threshold"]["rule"] == "lognormal"
    new = np.array([p.score for p in det.predict(fresh)])
    assert (new >= det.threshold).mean() <= 0.025
    plain = fit(train, s.model_copy(update={"calibration": s.calibration.model_copy(
        update={"rule": "quantile"})}))
    assert plain.threshold < det.threshold
    assert (new >= plain.threshold).mean() >= 0.05  # what the bound avoids


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
