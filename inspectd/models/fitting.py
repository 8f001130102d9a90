"""Fitting: OK images → a calibrated `Detector`, for every kind.

The kind's own `fit_model` (in its folder, found through `kinds`) builds the model on the
fit split; `calibration` sets the thresholds on the held-out rest; the manifest records
how. Imported only when fitting: the daemon never loads this module.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from inspectd.core.errors import DataError
from inspectd.core.imaging import read_raw
from inspectd.models.calibration import calibrate, split_ok, thresholds
from inspectd.models.datasets.mvtec import expand_image_paths
from inspectd.models.detector import Detector, ImageInput, batched
from inspectd.models.domain import Domain
from inspectd.models.features import (
    Runtime,
    backbone_spec,
    build_extractor,
    default_layers,
    file_sha256,
    resolve_weights,
)
from inspectd.models.kinds import fitter, folder, layer_rule, normaliser
from inspectd.models.preprocess import Geometry
from inspectd.models.settings import ModelSettings

log = structlog.get_logger("inspectd.fit")

Progress = Callable[[str, int, int], None]
BF16_SAMPLE = 20  # cross-fitting: training images the bf16 check scores


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


class CachedDetector(Detector):
    """A detector whose fit reads each image's backbone features once: `image_features`
    takes indices into `items` and keeps what it computed (as `dtype`), so cross-fitting's
    fold models, or model choice's candidates, cost no second backbone pass."""

    def __init__(self, items: Sequence[ImageInput], *args: Any,
                 dtype: torch.dtype = torch.float32, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.items, self.dtype = items, dtype
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def image_features(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        missing = [i for i in items if i not in self.cache]
        tiles = len(self.geometry.tiles())
        for chunk in batched(missing, self.batch_size):
            feats = self.features(self.canvases([self.items[i] for i in chunk]))
            for j, i in enumerate(chunk):
                self.cache[i] = {k: v[j * tiles:(j + 1) * tiles].to(self.dtype)
                                 for k, v in feats.items()}
        return {k: torch.cat([self.cache[i][k] for i in items]).float()
                for k in self.cache[items[0]]}

    def with_model(self, model: Any) -> CachedDetector:
        """The same backbone, geometry and cache, another model."""
        other = copy.copy(self)
        other.model = model
        return other


def model_layers(s: ModelSettings) -> list[str]:
    """The backbone layers a kind's fit reads (an ensemble: every member's)."""
    rule = layer_rule(s.kind)
    if rule is not None:
        return rule(s)
    return list(s.backbone.layers or default_layers(s.backbone.name, s.kind))


def _detector(s: ModelSettings, layers: list[str], weights: Path, items: Sequence[ImageInput],
              cached: bool) -> Detector:
    spec = backbone_spec(s.backbone.name)
    runtime = Runtime.select(s.runtime.device, False, s.runtime.channels_last)
    args = (None, build_extractor(s.backbone.name, layers, weights), runtime,
            Geometry.from_settings(s.preprocess), spec.mean, spec.std, s.scoring.sigma)
    if cached:
        return CachedDetector(items, *args, batch_size=s.runtime.batch_size)
    return Detector(*args, batch_size=s.runtime.batch_size)


def _crossfit(det: CachedDetector, n: int, layers: list[str], s: ModelSettings,
              ng: Sequence[ImageInput], progress: Progress,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Out-of-fold image scores of all n images, a sample of their map pixels, and the NG
    images' scores on the same scale: each fold scored by a model fitted on the other folds
    (features from the cache); each NG image by every fold model, averaged. A fold model
    saw fewer images than the final one and scores everything a little higher, so NG scored
    by the final model would sit too low beside out-of-fold OK scores, and an F1-optimal
    threshold would let a confirmed escape through."""
    k = min(s.calibration.folds, n)
    fold = np.random.default_rng(s.seed).permutation(n) % k
    scores = np.empty(n, np.float32)
    pixels = []
    ng_feats = [Detector.image_features(det, chunk)
                for chunk in batched(ng, det.batch_size)]
    ng_scores = np.zeros(len(ng), np.float64)
    cheap = folder(s.kind)
    if cheap is not None:
        models = cheap(det, det.model, list(range(n)), fold, layers, s)
    else:
        models = ((f, fitter(s.kind)(det, [i for i in range(n) if fold[i] != f], layers, s,
                                     _no_progress)) for f in range(k))
    for f, model in models:
        progress("cross-fitting", f, k)
        out = [i for i in range(n) if fold[i] == f]
        fold_det = det.with_model(model)
        for chunk in batched(out, det.batch_size):
            sc, maps = fold_det.score_features(det.image_features(chunk), len(chunk))
            scores[chunk] = sc.numpy()
            pixels.append(maps[:, ::2, ::2].reshape(-1).numpy())  # a quarter: enough for q
        at = 0
        for feats in ng_feats:
            m = next(iter(feats.values())).shape[0] // len(det.geometry.tiles())
            ng_scores[at:at + m] += fold_det.score_features(feats, m)[0].numpy() / k
            at += m
    progress("cross-fitting", k, k)
    return scores, np.concatenate(pixels), ng_scores if len(ng) else None


def cached_scores(det: CachedDetector, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and canvas maps of images by their index in the detector's cache."""
    scores, maps = [], []
    for chunk in batched(idx, det.batch_size):
        sc, m = det.score_features(det.image_features(chunk), len(chunk))
        scores.append(sc.numpy())
        maps.append(m.numpy())
    return np.concatenate(scores), np.concatenate(maps)


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
        chosen, report, features = choose(train, s, progress, ng)
        det = _fit(train, chosen, ng, progress, features)
        det.manifest["auto"] = report
        det.manifest["training"]["total_seconds"] = round(time.perf_counter() - t0, 2)
        return det
    return _fit(train, s, ng, progress, None)


def _fit(train: list[ImageInput], s: ModelSettings, ng: list[ImageInput], progress: Progress,
         features: dict[int, dict[str, torch.Tensor]] | None) -> Detector:
    """`fit` of one kind; `features`: every training image's backbone features by its index
    in `train`, where model choice already computed them (float32, the same backbone and
    geometry), so the backbone runs only for the bf16 check."""
    torch.manual_seed(s.seed)
    t_start = time.perf_counter()
    cal = s.calibration
    crossfit = cal.mode == "crossfit" or (cal.mode == "auto"
                                           and len(train) <= cal.crossfit_max_images)
    normalise = normaliser(s.kind)
    if crossfit and normalise is not None:
        # Its fold models would each need held-out OK images of their own to normalise on.
        log.warning("calibrating on held-out OK images: this kind cannot be cross-fitted",
                    kind=s.kind, mode=cal.mode)
        crossfit = False
    if crossfit:
        if len(train) < 2:
            raise DataError(f"need at least 2 OK images to fit and cross-fit, got {len(train)}")
        fit_items, holdout = train, []
    else:
        fit_idx, hold_idx = split_ok(len(train), s)
        fit_items = [train[i] for i in fit_idx]
        holdout = [train[i] for i in hold_idx]

    weights = resolve_weights(s.backbone.name, s.backbone.weights)
    layers = model_layers(s)
    det = _detector(s, layers, weights, train if features else fit_items,
                    cached=crossfit or bool(features))
    geometry, spec = det.geometry, backbone_spec(s.backbone.name)
    if features:
        det.cache.update(features)
    # Cached: indices into the detector's items (crossfit: every image; else the fit split).
    items: Sequence[Any] = (range(len(fit_items)) if crossfit
                            else [int(i) for i in fit_idx] if features else fit_items)
    det.model = fitter(s.kind)(det, items, layers, s, progress)
    fit_seconds = time.perf_counter() - t_start
    if crossfit:
        ok_scores, ok_pixels, ng_scores = _crossfit(det, len(fit_items), layers, s, ng,
                                                    progress)
        det.cache.clear()  # the features were for fitting only
        sample = [fit_items[i] for i in np.random.default_rng(s.seed).permutation(
            len(fit_items))[:BF16_SAMPLE]]
        calibration = thresholds(det, ok_scores, ok_pixels, ng, s, sample,
                                 f"{len(ok_scores)} cross-fitted OK scores "
                                 f"({min(cal.folds, len(fit_items))} folds)", ng_scores)
    else:
        progress("calibration", 0, 1)
        held: Sequence[Any] = [int(i) for i in hold_idx] if features else holdout
        if normalise is not None:
            normalise(det, held, s)
        ok = None
        if features:
            ok = cached_scores(det, held)
            det.cache.clear()
        calibration = calibrate(det, holdout, ng, s, ok)
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
            "images": len(train), "fit_images": len(fit_items),
            "heldout_images": len(fit_items) if crossfit else len(holdout),
            "calibration": (f"crossfit {min(cal.folds, len(fit_items))} folds" if crossfit
                            else "holdout"),
            "ng_images": len(ng), "fingerprint": fingerprint(train),
            "fit_seconds": round(fit_seconds, 2),
            "total_seconds": round(time.perf_counter() - t_start, 2),
        },
        "metrics": {},
        "settings": s.model_dump(mode="json"),
    }
    log.info("fitted", kind=s.kind, images=len(train), threshold=round(det.threshold, 4),
             calibration=det.manifest["training"]["calibration"],
             seconds=det.manifest["training"]["total_seconds"])
    return det
