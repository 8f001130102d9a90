"""Fitting PatchCore: the memory bank of OK patches (imported only when fitting)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from inspectd.models.detector import Detector, ImageInput, batched
from inspectd.models.fitting import Progress
from inspectd.models.patchcore.coreset import ApproximateGreedyCoreset
from inspectd.models.patchcore.model import PatchCore, embed_patches
from inspectd.models.settings import ModelSettings

log = structlog.get_logger("inspectd.fit")


def fit_model(det: Detector, items: Sequence[ImageInput], layers: list[str], s: ModelSettings,
              progress: Progress) -> PatchCore:
    """The memory bank: every OK patch feature, reduced by the approximate greedy coreset."""
    p = s.patchcore
    params: dict[str, Any] = {"layers": layers, **p.model_dump()}
    h, w = det.geometry.input_size
    probe = embed_patches(det.extractor.dry_run(h, w), params["layers"],
                          p.neighbourhood, p.target_dim, p.border)
    _, dim, ph, pw = probe.shape
    per_image = len(det.geometry.tiles()) * ph * pw
    n = len(items) * per_image
    # Patch features go to a disk-backed buffer: the page cache keeps it in RAM when it fits,
    # and a 1024² fit of hundreds of images still runs in bounded memory.
    with tempfile.TemporaryDirectory(prefix="inspectd-fit-") as tmp:
        buf = np.lib.format.open_memmap(Path(tmp) / "patches.npy", "w+", np.float32, (n, dim))
        row = 0
        for i, chunk in enumerate(batched(items, det.batch_size)):
            emb = embed_patches(det.image_features(chunk), params["layers"],
                                p.neighbourhood, p.target_dim, p.border)
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
        rows = np.sort(idx.numpy())
        bank = torch.from_numpy(buf[rows].copy())
        log.info("coreset", patches=n, bank=len(bank), seconds=round(time.perf_counter() - t0, 2))
    params.update(bank_size=len(bank), patches_seen=n)
    model = PatchCore(bank, params)
    model.sources = rows // per_image  # which of `items` each bank row came from (not saved)
    return model


def fold_models(det: Detector, model: PatchCore, items: Sequence[ImageInput],
                folds: np.ndarray, layers: list[str], s: ModelSettings,
                ) -> Iterator[tuple[int, PatchCore]]:
    """Cross-fitting without a coreset per fold: fold f is scored against the memory bank
    without the rows its own images gave. The coreset was chosen with them, so the bank
    covers the other images a little less than a fold's own coreset would: the out-of-fold
    scores err high, the threshold on the safe side."""
    for f in range(int(folds.max()) + 1):
        keep = torch.from_numpy(~np.isin(model.sources, np.flatnonzero(folds == f)))
        yield f, PatchCore(model.bank[keep], model.params)
