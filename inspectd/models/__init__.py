"""The anomaly-model library: fit, save, load, predict, evaluate.

    from inspectd.models import ModelSettings, fit, load
    det = fit("bottle/train/good", ModelSettings(kind="patchcore"))
    det.save("models/bottle/v1")
    pred = load("models/bottle/v1").predict(["part.png"])[0]   # also numpy RGB arrays
    print(pred, pred.as_dict()); pred.save(Path("out"), "part")

Importing this package loads inference code only; `fit` pulls in the fitting code when
called, so the daemon's scorer never imports training modules. Layout: shared machinery
here (features, preprocess, detector, artifact, calibration, fitting, metrics, evaluate),
one folder per model kind (`patchcore/`, `padim/`, registered in `kinds`), data sets in
`datasets/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from inspectd.models.detector import Detector, Prediction
from inspectd.models.detector import load_detector as load
from inspectd.models.settings import ModelSettings

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Detector", "ModelSettings", "Prediction", "fit", "load"]


def fit(
    train: Sequence[np.ndarray | str | Path] | str | Path,
    settings: ModelSettings | None = None,
    ng: Sequence[np.ndarray | str | Path] | str | Path = (),
) -> Detector:
    """Fit and calibrate a detector on OK images: a folder, image paths or RGB arrays."""
    from inspectd.models.fitting import fit as _fit

    return _fit(train, settings, ng)
