"""Thresholds from OK images the model did not fit on: cross-fitted (every OK image in the
model) or held out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inspectd.models import ModelSettings, fit
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
