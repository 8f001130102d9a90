"""Fitting: OK images → a calibrated `Detector` (gradient-free, one pass over the images).

The OK set is split: most images build the model, the held-out rest sets the thresholds
(a quantile of their scores with a margin, or F1-optimal when NG images are given).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from inspectd.core.errors import DataError
from inspectd.models.coreset import ApproximateGreedyCoreset
from inspectd.models.data import expand_image_paths
from inspectd.models.detector import Detector, batched, load_images
from inspectd.models.features import (
    Runtime,
    backbone_spec,
    build_extractor,
    default_layers,
    file_sha256,
    resolve_weights,
)
from inspectd.models.metrics import f1_max
from inspectd.models.padim import Padim, embed_positions, projection
from inspectd.models.patchcore import PatchCore, embed_patches
from inspectd.models.preprocess import Geometry
from inspectd.models.settings import ModelSettings

log = structlog.get_logger("inspectd.fit")

Progress = Callable[[str, int, int], None]
ImageInput = np.ndarray | str | Path


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


def split_ok(n: int, settings: ModelSettings) -> tuple[np.ndarray, np.ndarray]:
    cal = settings.calibration
    n_hold = max(cal.min_holdout, round(cal.holdout * n))
    if n - n_hold < 1:
        raise DataError(
            f"need more than {n_hold} OK images to fit and calibrate, got {n} "
            "(lower calibration.min_holdout to calibrate on fewer)"
        )
    perm = np.random.default_rng(settings.seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _canvases(det: Detector, items: Sequence[ImageInput]) -> list[np.ndarray]:
    return [det.geometry.image_to_canvas(img)[0] for img in load_images(items)]


def _fit_patchcore(
    det: Detector, items: Sequence[ImageInput], params: dict, s: ModelSettings, progress: Progress
) -> PatchCore:
    p = s.patchcore
    h, w = det.geometry.input_size
    probe = embed_patches(det.extractor.dry_run(h, w), params["layers"],
                          p.neighbourhood, p.target_dim)
    _, dim, ph, pw = probe.shape
    per_image = len(det.geometry.tiles()) * ph * pw
    n = len(items) * per_image
    # Patch features go to a disk-backed buffer: the page cache keeps it in RAM when it fits,
    # and a 1024² fit of hundreds of images still runs in bounded memory.
    with tempfile.TemporaryDirectory(prefix="inspectd-fit-") as tmp:
        buf = np.lib.format.open_memmap(Path(tmp) / "patches.npy", "w+", np.float32, (n, dim))
        row = 0
        for i, chunk in enumerate(batched(items, det.batch_size)):
            emb = embed_patches(det.features(_canvases(det, chunk)), params["layers"],
                                p.neighbourhood, p.target_dim)
            rows = emb.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
            buf[row : row + len(rows)] = rows
            row += len(rows)
            progress("features", min((i + 1) * det.batch_size, len(items)), len(items))
        sampler = ApproximateGreedyCoreset(
            p.coreset_ratio, proj_dim=p.coreset_proj_dim, seed=s.seed, max_size=p.coreset_max
        )
        t0 = time.perf_counter()
        idx = sampler.run(
            torch.from_numpy(buf), progress=lambda d, t: progress("coreset", d, t)
        )
        bank = torch.from_numpy(buf[np.sort(idx.numpy())].copy())
        log.info("coreset", patches=n, bank=len(bank), seconds=round(time.perf_counter() - t0, 2))
    params.update(bank_size=len(bank), patches_seen=n)
    return PatchCore(bank, params)


def _fit_padim(
    det: Detector, items: Sequence[ImageInput], params: dict, s: ModelSettings, progress: Progress
) -> Padim:
    h, w = det.geometry.input_size
    probe = embed_positions(det.extractor.dry_run(h, w), params["layers"])
    _, dim, ph, pw = probe.shape
    k = params["channels"]
    if k > dim:
        raise DataError(f"padim.channels={k} exceeds the {dim} feature channels of these layers")
    wmat = projection(params["kind"], dim, k, s.seed)
    pos = ph * pw
    s1 = torch.zeros(pos, k, dtype=torch.float64)
    s2 = torch.zeros(pos, k, k, dtype=torch.float64)
    count = 0
    for i, chunk in enumerate(batched(items, det.batch_size)):
        x = embed_positions(det.features(_canvases(det, chunk)), params["layers"])
        e = torch.einsum("bdhw,dk->bkhw", x, wmat).flatten(2).permute(2, 0, 1).double()  # P,B,k
        s1 += e.sum(1)
        s2 += torch.einsum("pbk,pbl->pkl", e, e)
        count += e.shape[1]
        progress("features", min((i + 1) * det.batch_size, len(items)), len(items))
    if count < 2:
        raise DataError("PaDiM needs at least 2 OK images (or tiles) to estimate covariances")
    mean = s1 / count
    cov = (s2 - count * torch.einsum("pk,pl->pkl", mean, mean)) / (count - 1)
    cov += s.padim.eps * torch.eye(k, dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    inv = inv.half() if s.padim.fp16 else inv.float()
    return Padim(wmat, mean.float(), inv, params)


def _model_params(s: ModelSettings, layers: list[str]) -> dict[str, Any]:
    if s.kind == "patchcore":
        return {"layers": layers, **s.patchcore.model_dump()}
    k = s.padim.channels
    if k is None:
        small = s.backbone.name in ("efficientnet_lite0", "resnet18")
        k = 100 if small else (550 if s.kind == "padim" else 300)
    return {"kind": s.kind, "layers": layers, "channels": k, "eps": s.padim.eps,
            "fp16": s.padim.fp16}


def _calibrate(
    det: Detector, holdout: Sequence[ImageInput], ng: Sequence[ImageInput], s: ModelSettings
) -> dict[str, Any]:
    cal = s.calibration
    ok_scores, ok_maps, _ = det.score_images(load_images(holdout))
    q = float(np.quantile(ok_scores, cal.quantile))
    det.threshold = q * (1.0 + cal.margin)
    method = f"quantile {cal.quantile} of {len(ok_scores)} held-out OK scores × (1 + {cal.margin})"
    ng_scores = None
    if len(ng):
        ng_scores, _, _ = det.score_images(load_images(ng))
        labels = np.r_[np.zeros(len(ok_scores)), np.ones(len(ng_scores))]
        both = np.r_[ok_scores, ng_scores]
        f1, t = f1_max(labels, both)
        # F1-max puts the threshold on the lowest NG score it keeps; halfway down to the next
        # lower score keeps the same verdicts with a margin on both sides (a bf16 run, a
        # slightly different camera frame must not flip that NG to OK).
        below = both[both < t]
        det.threshold = float((t + below.max()) / 2 if below.size else t)
        method = f"F1-optimal on {len(ok_scores)} held-out OK and {len(ng_scores)} NG (F1 {f1:.3f})"
    det.pixel_threshold = float(np.quantile(ok_maps, cal.pixel_quantile)) * (1.0 + cal.margin)

    # bf16 autocast is a large CPU speed-up (AMX); allow it only where scores barely move.
    precision = {"bf16_ok": False, "bf16_max_rel_dev": None}
    fp32_runtime = det.runtime
    det.runtime = Runtime(fp32_runtime.device, True, fp32_runtime.channels_last)
    try:
        bf_scores, _, _ = det.score_images(load_images(holdout))
        dev = float(np.max(np.abs(bf_scores - ok_scores)) / max(det.threshold, 1e-12))
        precision = {"bf16_ok": dev <= cal.bf16_tolerance, "bf16_max_rel_dev": dev}
    except RuntimeError as e:  # no bf16 kernels on this device
        log.warning("bf16 check failed", error=str(e))
    finally:
        det.runtime = fp32_runtime
    return {
        "threshold": {"image": det.threshold, "pixel": det.pixel_threshold, "method": method,
                      "quantile": cal.quantile, "margin": cal.margin,
                      "pixel_quantile": cal.pixel_quantile},
        "calibration": {
            "heldout_ok_scores": [float(v) for v in ok_scores],
            "ng_scores": None if ng_scores is None else [float(v) for v in ng_scores],
        },
        "precision": precision,
    }


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
    params = _model_params(s, layers)
    builder = _fit_patchcore if s.kind == "patchcore" else _fit_padim
    det.model = builder(det, fit_items, params, s, progress)
    fit_seconds = time.perf_counter() - t_start
    progress("calibration", 0, 1)
    calibration = _calibrate(det, holdout, ng, s)
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
