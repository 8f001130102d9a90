"""Fitting: OK images → a calibrated `Detector`, for every kind.

The kind's own `fit_model` (in its folder, found through `kinds`) builds the model on the
fit split; `calibration` sets the thresholds on the held-out rest; the manifest records
how. Imported only when fitting: the daemon never loads this module.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
import torch

from inspectd.core.imaging import read_raw
from inspectd.models.calibration import calibrate, split_ok
from inspectd.models.datasets.mvtec import expand_image_paths
from inspectd.models.detector import Detector, ImageInput
from inspectd.models.domain import Domain
from inspectd.models.features import (
    Runtime,
    backbone_spec,
    build_extractor,
    default_layers,
    file_sha256,
    resolve_weights,
)
from inspectd.models.kinds import fitter
from inspectd.models.preprocess import Geometry
from inspectd.models.settings import ModelSettings

log = structlog.get_logger("inspectd.fit")

Progress = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def fingerprint(items: Sequence[ImageInput]) -> str:
    """Order-independent hash of the training images' bytes."""
    digests = []
    for item in items:
        if isinstance(item, str | Path):
            digests.append(file_sha256(Path(item)))
        else:
            digests.append(hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def domain_of(items: Sequence[ImageInput]) -> Domain:
    """The training images' sizes, bit depths and brightness, as stored."""
    return Domain.of(read_raw(Path(i)) if isinstance(i, str | Path) else np.asarray(i)
                     for i in items)


def fit(
    train: Sequence[ImageInput] | str | Path,
    settings: ModelSettings | None = None,
    ng: Sequence[ImageInput] | str | Path = (),
    progress: Progress | None = None,
) -> Detector:
    """Fit a detector on OK images (a folder, paths or RGB arrays); NG images are optional."""
    s = settings or ModelSettings()
    progress = progress or _no_progress
    train = expand_image_paths([Path(train)]) if isinstance(train, str | Path) else list(train)
    ng = expand_image_paths([Path(ng)]) if isinstance(ng, str | Path) else list(ng)
    if s.kind == "auto":  # choose the kind on the OK images, then fit it like any other
        from inspectd.models.auto import choose

        t0 = time.perf_counter()
        chosen, report = choose(train, s, progress)
        det = fit(train, chosen, ng, progress)
        det.manifest["auto"] = report
        det.manifest["training"]["total_seconds"] = round(time.perf_counter() - t0, 2)
        return det
    torch.manual_seed(s.seed)
    t_start = time.perf_counter()

    fit_idx, hold_idx = split_ok(len(train), s)
    fit_items = [train[i] for i in fit_idx]
    holdout = [train[i] for i in hold_idx]

    weights = resolve_weights(s.backbone.name, s.backbone.weights)
    layers = list(s.backbone.layers or default_layers(s.backbone.name, s.kind))
    spec = backbone_spec(s.backbone.name)
    runtime = Runtime.select(s.runtime.device, False, s.runtime.channels_last)
    geometry = Geometry.from_settings(s.preprocess)
    det = Detector(
        None, build_extractor(s.backbone.name, layers, weights), runtime, geometry,
        spec.mean, spec.std, s.scoring.sigma, batch_size=s.runtime.batch_size,
    )
    det.model = fitter(s.kind)(det, fit_items, layers, s, progress)
    fit_seconds = time.perf_counter() - t_start
    progress("calibration", 0, 1)
    calibration = calibrate(det, holdout, ng, s)
    progress("calibration", 1, 1)

    h, w = geometry.input_size
    det.manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": {"name": s.backbone.name, "layers": layers, "weights_file": weights.name,
                     "weights_sha256": file_sha256(weights)},
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "geometry": geometry.as_dict(),
        "feature_shapes": {k: list(v) for k, v in det.extractor.shapes(h, w).items()},
        "scoring": {"sigma": s.scoring.sigma},
        "domain": domain_of(train).as_dict(),
        **calibration,
        "training": {
            "images": len(train), "fit_images": len(fit_items), "heldout_images": len(holdout),
            "ng_images": len(ng), "fingerprint": fingerprint(train),
            "fit_seconds": round(fit_seconds, 2),
            "total_seconds": round(time.perf_counter() - t_start, 2),
        },
        "metrics": {},
        "settings": s.model_dump(mode="json"),
    }
    log.info("fitted", kind=s.kind, images=len(train), threshold=round(det.threshold, 4),
             seconds=det.manifest["training"]["total_seconds"])
    return det
