"""`kind: auto`: the model chosen per SKU from OK images alone.

A line has OK images of a new product and no defect images, and no kind wins everywhere.
So part of the OK images is held out; each held-out image gets one synthetic anomaly with
an exact mask (`anomalies`: Perlin texture, CutPaste, scratch, stain, in turn); every
candidate (`auto.candidates`: kinds and options) is fitted on the rest and scores the
held-out images untouched and anomalous. The candidate that separates them best wins:
image AUROC + `auto.pixel_weight` × pixel AUROC (how well its map finds the anomaly). The
winner is then fitted on every OK image as `inspectd fit` would, and the manifest records
the choice with every candidate's figures and time.

Cost: the backbone runs once over the OK and anomalous images for all candidates that share
it (features are kept: float32 up to FP32_CACHE_BYTES, else float16), candidates that differ
only in how they score share one fit, and the final fit reuses the float32 features (it runs
the backbone again only for float16 ones, and for the bf16 check). Imported only when
fitting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import structlog
import torch

from inspectd.core.errors import ConfigError, DataError
from inspectd.models import anomalies, metrics
from inspectd.models.detector import ImageInput, batched, load_images
from inspectd.models.ensemble.fit import PIXEL_STEP, stats
from inspectd.models.ensemble.model import pooled_spread
from inspectd.models.features import (
    Runtime,
    backbone_spec,
    build_extractor,
    resolve_weights,
)
from inspectd.models.fitting import CachedDetector, cached_scores, model_layers
from inspectd.models.kinds import KINDS, fitter
from inspectd.models.preprocess import Geometry
from inspectd.models.settings import ModelSettings, merged

log = structlog.get_logger("inspectd.auto")
Progress = Callable[[str, int, int], None]
# Backbone features of images by index: what CachedDetector keeps.
Features = dict[int, dict[str, torch.Tensor]]
FP32_CACHE_BYTES = 1 << 30
# A candidate's held-out OK scores, anomalous scores, anomalous maps, OK map pixels, NG
# scores, masks.
Outputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class Candidate:
    name: str
    settings: ModelSettings
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    ng_auroc: float | None = None  # held-out OK vs operator-confirmed NG images, if any
    choice: float | None = None  # image AUROC + pixel_weight × pixel AUROC (+ ng_weight × NG)
    fit_seconds: float | None = None
    shared_fit: str | None = None  # the candidate whose fit it reused
    skipped: str | None = None  # why it was not tried (budget, error)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("settings")
        d["kind"] = self.settings.kind
        return d


def candidates(base: ModelSettings) -> list[Candidate]:
    """The configured candidates as full settings: each merged over `base`'s sections."""
    out = []
    for i, raw in enumerate(base.auto.candidates):
        spec = dict(raw)
        name = str(spec.pop("name", spec.get("kind", f"candidate {i}")))
        out.append(Candidate(name, merged(base, spec, f"auto.candidates[{i}] ({name})")))
    if not out:
        raise ConfigError("auto.candidates: no candidates")
    return out


def _section(s: ModelSettings) -> str:
    """The settings section of the candidate's kind (OrthoAD shares PaDiM's)."""
    return "patchcore" if s.kind == "patchcore" else "padim"


def _fit_key(s: ModelSettings) -> str:
    """Settings that shape the fitted model (not how it turns patch scores into a score)."""
    d = s.model_dump(mode="json", exclude={"scoring", "calibration", "runtime", "auto"})
    for p in KINDS[s.kind].model.scoring_params:
        d[_section(s)].pop(p, None)
    return repr(d)


def _group_key(s: ModelSettings) -> str:
    """Candidates with the same backbone and geometry share one feature cache."""
    return repr((s.backbone.name, str(s.backbone.weights), s.preprocess.model_dump(mode="json"),
                 s.runtime.device, s.runtime.channels_last))


def choose(train: Sequence[ImageInput], base: ModelSettings,
           progress: Progress | None = None, ng: Sequence[ImageInput] = (),
           ) -> tuple[ModelSettings, dict[str, Any], Features | None]:
    """The winning candidate's settings, a report of every candidate (for the manifest),
    and the backbone features of every training image by its index in `train` where they
    were kept in float32 (the final fit reuses them), else None.
    NG images (operator-confirmed defects) count too: each candidate also separates the
    held-out OK images from them (`auto.ng_weight` × that AUROC)."""
    step = progress or (lambda *_: None)
    a = base.auto
    t0 = time.perf_counter()
    cands = candidates(base)
    n = len(train)
    n_val = int(np.clip(round(a.validation * n), a.min_validation, a.max_validation))
    if n - n_val < 2:
        raise DataError(f"auto needs more than {n_val + 1} OK images to fit and judge "
                        f"candidates, got {n} (choose a kind with --model)")
    perm = np.random.default_rng(base.seed).permutation(n)
    fit_items = [train[i] for i in sorted(perm[n_val:])]
    val_images = load_images([train[i] for i in sorted(perm[:n_val])])
    anomalous = anomalies.make_one_each(val_images, base.seed, a.anomalies)
    ng_images = load_images(ng)

    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(_group_key(c.settings), []).append(c)
    fitted: dict[str, tuple[str, Any]] = {}  # fit key → (candidate name, model)
    outputs: dict[str, Outputs] = {}  # candidate → its scores and maps on the validation
    # proto index → train index, for the features the final fit can reuse
    in_train = [int(i) for i in (*sorted(perm[n_val:]), *sorted(perm[:n_val]))]
    kept: dict[str, Features] = {}  # group key → its float32 features of train images
    for key, members in groups.items():
        s0 = members[0].settings
        layers = sorted({layer for c in members for layer in model_layers(c.settings)})
        weights = resolve_weights(s0.backbone.name, s0.backbone.weights)
        spec = backbone_spec(s0.backbone.name)
        geometry = Geometry.from_settings(s0.preprocess)
        runtime = Runtime.select(s0.runtime.device, False, s0.runtime.channels_last)
        extractor = build_extractor(s0.backbone.name, layers, weights)
        images = [*fit_items, *val_images, *(img for img, _, _ in anomalous), *ng_images]
        # The features of every image, for every candidate, held at once: float32 (the
        # final fit reuses them) where they fit in FP32_CACHE_BYTES, else float16.
        h, w = geometry.input_size
        per_image = 4 * len(geometry.tiles()) * sum(
            int(np.prod(shape)) for shape in extractor.shapes(h, w).values())
        fp32 = per_image * len(images) <= FP32_CACHE_BYTES
        proto = CachedDetector(images, None, extractor, runtime, geometry, spec.mean,
                               spec.std, s0.scoring.sigma, batch_size=s0.runtime.batch_size,
                               dtype=torch.float32 if fp32 else torch.float16)
        for i, chunk in enumerate(batched(range(len(images)), proto.batch_size)):
            proto.image_features(chunk)
            step("auto features", min((i + 1) * proto.batch_size, len(images)), len(images))
        n_fit = len(fit_items)
        ok_idx = list(range(n_fit, n_fit + len(val_images)))
        bad_idx = list(range(n_fit + len(val_images), n_fit + 2 * len(val_images)))
        ng_idx = list(range(n_fit + 2 * len(val_images), len(images)))
        masks = np.stack([geometry.mask_to_canvas(m) for _, m, _ in anomalous])
        for c in members:
            spent = time.perf_counter() - t0
            if a.budget_s is not None and spent > a.budget_s and any(
                    x.choice is not None for x in cands):
                c.skipped = f"budget: {spent:.0f} s of {a.budget_s:.0f} s spent"
                continue
            out = _try(c, proto, list(range(n_fit)), ok_idx, bad_idx, ng_idx, masks, fitted,
                       a, step)
            if out is not None:
                outputs[c.name] = (*out, masks)
        if fp32:
            kept[key] = {t: proto.cache[j] for j, t in enumerate(in_train)}
    tried = [c for c in cands if c.choice is not None]
    if not tried:
        raise DataError("auto: no candidate could be fitted: "
                        + "; ".join(f"{c.name}: {c.skipped}" for c in cands))
    best = max(tried, key=lambda c: c.choice)
    if a.ensemble and (ens := _ensemble(tried, outputs, a)) is not None:
        cands.append(ens)
        if ens.choice >= best.choice + a.ensemble_margin:
            best = ens
    report = {
        "chosen": best.name,
        "rule": f"image AUROC + {a.pixel_weight} × pixel AUROC on {len(val_images)} held-out "
                f"OK images and as many with synthetic anomalies ({', '.join(a.anomalies)})"
                + (f" + {a.ng_weight} × AUROC against {len(ng_images)} confirmed NG images"
                   if ng_images else "")
                + (f"; the ensemble only if it beats both its members by "
                   f"{a.ensemble_margin}" if a.ensemble else ""),
        "validation_images": len(val_images), "fit_images": len(fit_items),
        "ng_images": len(ng_images),
        "candidates": [c.row() for c in cands],
        "seconds": round(time.perf_counter() - t0, 2),
        "requested": base.model_dump(mode="json"),
    }
    log.info("auto chose", chosen=best.name, choice=round(best.choice, 4),
             seconds=report["seconds"])
    return best.settings, report, kept.get(_group_key(best.settings))


def _try(c: Candidate, proto: CachedDetector, fit_idx: list[int], ok_idx: list[int],
         bad_idx: list[int], ng_idx: list[int], masks: np.ndarray,
         fitted: dict[str, tuple[str, Any]], a: Any, step: Progress,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Fit (or reuse the fit of) candidate `c` and judge it; its scores of the held-out OK
    images, of the anomalous ones, the anomalous maps, a sample of the OK map pixels and
    the scores of the NG images."""
    s = c.settings
    t = time.perf_counter()
    det = proto.with_model(None)
    det.sigma = s.scoring.sigma
    key = _fit_key(s)
    try:
        torch.manual_seed(s.seed)
        if key in fitted:
            source, model = fitted[key]
            section = getattr(s, _section(s))
            params = {**model.params, **{p: getattr(section, p) for p in model.scoring_params}}
            det.model = type(model).from_tensors(model.tensors(), params)
            c.shared_fit = source
        else:
            det.model = fitter(s.kind)(det, fit_idx, model_layers(s), s,
                                       lambda stage, d, n: step(f"{c.name} {stage}", d, n))
            fitted[key] = (c.name, det.model)
        ok, ok_maps = cached_scores(det, ok_idx)
        bad, maps = cached_scores(det, bad_idx)
        ngs = cached_scores(det, ng_idx)[0] if ng_idx else np.zeros(0, np.float32)
    except Exception as e:  # one candidate failing must not end the choice
        log.warning("auto candidate failed", candidate=c.name, error=str(e))
        c.skipped = f"{type(e).__name__}: {e}"
        return None
    _judge(c, ok, bad, maps, masks, ngs, a)
    c.fit_seconds = round(time.perf_counter() - t, 2)
    log.info("auto candidate", candidate=c.name, image_auroc=round(c.image_auroc, 4),
             pixel_auroc=c.pixel_auroc and round(c.pixel_auroc, 4), seconds=c.fit_seconds)
    return ok, bad, maps, ok_maps[:, ::PIXEL_STEP, ::PIXEL_STEP].reshape(-1), ngs


def _judge(c: Candidate, ok: np.ndarray, bad: np.ndarray, maps: np.ndarray,
           masks: np.ndarray, ngs: np.ndarray, a: Any) -> None:
    """A candidate's figures on the validation: synthetic anomalies (image, pixel) and the
    confirmed NG images where there are some; the choice adds them up."""
    labels = np.r_[np.zeros(len(ok)), np.ones(len(bad))]
    c.image_auroc = metrics.auroc(labels, np.r_[ok, bad])
    c.pixel_auroc = metrics.pixel_auroc(masks, maps) if masks.any() else None
    c.choice = c.image_auroc + a.pixel_weight * (c.pixel_auroc or 0.0)
    if len(ngs):
        c.ng_auroc = metrics.auroc(np.r_[np.zeros(len(ok)), np.ones(len(ngs))], np.r_[ok, ngs])
        c.choice += a.ng_weight * c.ng_auroc


def _ensemble(tried: list[Candidate], outputs: dict[str, Outputs],
              a: Any) -> Candidate | None:
    """The calibrated ensemble of the best candidate and the best one with another fit on
    the same backbone and geometry (of another model family if there is one), judged on the
    same validation images: each member's scores and maps as z against its OK validation
    scores (an OK image's own score left out of the mean and spread it is measured against,
    so the ensemble is never judged on statistics of the very image it scores), averaged.
    None if there is no such pair."""
    t = time.perf_counter()
    ranked = sorted((c for c in tried if c.name in outputs), key=lambda c: -c.choice)
    if not ranked:
        return None
    first = ranked[0]
    partners = [c for c in ranked[1:]
                if _group_key(c.settings) == _group_key(first.settings)
                and _fit_key(c.settings) != _fit_key(first.settings)
                and c.settings.scoring == first.settings.scoring]
    # Rather a model of another family (PatchCore beside PaDiM/OrthoAD): members that err
    # alike gain nothing from averaging.
    model = KINDS[first.settings.kind].model
    second = next((c for c in partners if KINDS[c.settings.kind].model is not model),
                  partners[0] if partners else None)
    if second is None:
        return None
    ok = bad = maps = ngs = None
    for c in (first, second):
        o, b, m, ok_pix, n, masks = outputs[c.name]
        (mean, spread), (pix_mean, pix_std) = stats(o, ok_pix)
        zo, zb, zn = _loo_z(o, pix_std), (b - mean) / spread, (n - mean) / spread
        zm = (m - pix_mean) / pix_std
        ok, bad, ngs = (zo, zb, zn) if ok is None else (ok + zo, bad + zb, ngs + zn)
        maps = zm if maps is None else maps + zm
    members = [c.settings.model_dump(mode="json", exclude={"auto", "ensemble"})
               for c in (first, second)]
    # Backbone, geometry and runtime as its members' (their candidates may set their own).
    settings = ModelSettings(**{**first.settings.model_dump(mode="json",
                                                            exclude={"auto", "ensemble"}),
                                "kind": "ensemble", "ensemble": {"members": members}})
    c = Candidate(f"ensemble ({first.name} + {second.name})", settings,
                  shared_fit=f"{first.name} + {second.name}")
    _judge(c, ok, bad, maps, masks, ngs, a)
    # What fitting it costs: both members' fits (shared), and combining their scores.
    c.fit_seconds = round(first.fit_seconds + second.fit_seconds + time.perf_counter() - t, 2)
    log.info("auto candidate", candidate=c.name, image_auroc=round(c.image_auroc, 4),
             pixel_auroc=c.pixel_auroc and round(c.pixel_auroc, 4), seconds=c.fit_seconds)
    return c


def _loo_z(x: np.ndarray, pixel_std: float) -> np.ndarray:
    """Each value's z against the mean and (pooled) spread of the others, as an ensemble
    normalises: `ensemble.fit.stats` on the n − 1 other held-out scores."""
    x = x.astype(np.float64)
    n = len(x)
    mean = (x.sum() - x) / (n - 1)
    sq_dev = ((x ** 2).sum() - x ** 2) - (n - 1) * mean ** 2
    return (x - mean) / pooled_spread(np.clip(sq_dev, 0, None), n - 1, pixel_std)
