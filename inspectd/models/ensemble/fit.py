"""Fitting an ensemble: each member fitted as its own kind on the same images (one backbone
with every member's layers), then normalised on held-out OK images (imported only when
fitting)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from inspectd.core.errors import ConfigError
from inspectd.models.detector import Detector, ImageInput, batched
from inspectd.models.ensemble.model import Ensemble, pooled_spread
from inspectd.models.fitting import Progress, model_layers
from inspectd.models.kinds import fitter
from inspectd.models.settings import ModelSettings, merged

PIXEL_STEP = 4  # every 4th map pixel per axis is enough for a mean and a spread
SHARED = ("preprocess", "scoring", "runtime")  # and the backbone, but for its layers


def members(s: ModelSettings) -> list[ModelSettings]:
    """The members' full settings (`ensemble.members`, each merged over `s`)."""
    specs = s.ensemble.members
    if len(specs) < 2:
        raise ConfigError(f"ensemble.members: an ensemble needs at least two members, got "
                          f"{len(specs)}")
    out = [merged(s, dict(m), f"ensemble.members[{i}]") for i, m in enumerate(specs)]
    for i, m in enumerate(out):
        if (m.backbone.name, m.backbone.weights) != (s.backbone.name, s.backbone.weights):
            raise ConfigError(f"ensemble.members[{i}]: members share the ensemble's backbone")
        for section in SHARED:
            if getattr(m, section) != getattr(s, section):
                raise ConfigError(f"ensemble.members[{i}]: members share the ensemble's "
                                  f"{section} settings (one backbone pass, one map)")
    return out


def layers(s: ModelSettings) -> list[str]:
    """Every member's layers, in order: the backbone runs once for all of them."""
    out: list[str] = []
    for m in members(s):
        out += [layer for layer in model_layers(m) if layer not in out]
    return out


def fit_model(det: Detector, items: Sequence[ImageInput], layers: list[str], s: ModelSettings,
              progress: Progress) -> Ensemble:
    fitted = []
    for i, m in enumerate(members(s)):
        torch.manual_seed(m.seed)
        fitted.append(fitter(m.kind)(
            det, items, model_layers(m), m,
            lambda stage, d, n, i=i, kind=m.kind: progress(f"member {i + 1} ({kind}) {stage}",
                                                           d, n)))
    return Ensemble.build(fitted)


def stats(scores: np.ndarray, pixels: np.ndarray) -> tuple[tuple[float, float],
                                                            tuple[float, float]]:
    """((mean, spread) of the image scores, (mean, std) of the map pixels) of one member on
    held-out OK images; the image spread pooled with the pixels' (`pooled_spread`)."""
    scores, pixels = scores.astype(np.float64), pixels.astype(np.float64)
    pix_mean = float(pixels.mean())
    pix_std = max(float(pixels.std()), 1e-6 * max(abs(pix_mean), 1.0))
    mean = float(scores.mean())
    spread = float(pooled_spread(float(((scores - mean) ** 2).sum()), len(scores), pix_std))
    return (mean, spread), (pix_mean, pix_std)


def normalise(det: Detector, images: Sequence[ImageInput], s: ModelSettings) -> None:
    """Each member's OK distribution, image scores and map pixels, on held-out OK images."""
    model = det.model
    scores: list[list[np.ndarray]] = [[] for _ in model.members]
    pixels: list[list[np.ndarray]] = [[] for _ in model.members]
    for chunk in batched(images, det.batch_size):
        feats = det.image_features(chunk)
        for j, m in enumerate(model.members):
            sc, maps = det.score_model(m, feats, len(chunk))
            scores[j].append(sc.numpy())
            pixels[j].append(maps[:, ::PIXEL_STEP, ::PIXEL_STEP].reshape(-1).numpy())
    model.normalise([stats(np.concatenate(sc), np.concatenate(px))
                     for sc, px in zip(scores, pixels, strict=True)])
