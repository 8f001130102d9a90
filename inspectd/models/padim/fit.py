"""Fitting PaDiM and OrthoAD: the embedding matrix and a Gaussian per position (imported
only when fitting)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from inspectd.core.errors import DataError
from inspectd.models.detector import Detector, ImageInput, batched
from inspectd.models.fitting import Progress
from inspectd.models.padim.model import Padim, embed_positions
from inspectd.models.settings import ModelSettings


def projection(kind: str, dim: int, k: int, seed: int) -> torch.Tensor:
    """D×k embedding matrix: unit columns (padim) or a semi-orthogonal W (orthoad)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "padim":
        idx = torch.randperm(dim, generator=g)[:k].sort().values
        w = torch.zeros(dim, k)
        w[idx, torch.arange(k)] = 1.0
        return w
    q, r = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes Q unique


def _params(s: ModelSettings, layers: list[str]) -> dict[str, Any]:
    k = s.padim.channels
    if k is None:
        small = s.backbone.name in ("efficientnet_lite0", "resnet18")
        k = 100 if small else (550 if s.kind == "padim" else 300)
    return {"kind": s.kind, "layers": layers, "channels": k, "eps": s.padim.eps,
            "fp16": s.padim.fp16}


def fit_model(det: Detector, items: Sequence[ImageInput], layers: list[str], s: ModelSettings,
              progress: Progress) -> Padim:
    """One Gaussian per feature-map position, from running sums over the OK images."""
    params = _params(s, layers)
    h, w = det.geometry.input_size
    probe = embed_positions(det.extractor.dry_run(h, w), params["layers"])
    dim = probe.shape[1]
    k = params["channels"]
    if k > dim:
        raise DataError(f"padim.channels={k} exceeds the {dim} feature channels of these layers")
    wmat = projection(params["kind"], dim, k, s.seed)
    sums = _sums(det, items, params, wmat, progress)
    model = _gaussians(sums, wmat, params, s)
    model.sums = sums  # kept for cross-fitting's fold models (not saved)
    return model


def fold_models(det: Detector, model: Padim, items: Sequence[ImageInput], folds: np.ndarray,
                layers: list[str], s: ModelSettings) -> Iterator[tuple[int, Padim]]:
    """Exact fold models at a fraction of a fit each: the sums over every image, less the
    fold's own."""
    s1, s2, count = model.sums
    for f in range(int(folds.max()) + 1):
        fold = [items[i] for i in np.flatnonzero(folds == f)]
        f1, f2, fc = _sums(det, fold, model.params, model.w, lambda *_: None)
        yield f, _gaussians((s1 - f1, s2 - f2, count - fc), model.w, model.params, s)
    model.sums = None


def _sums(det: Detector, items: Sequence[ImageInput], params: dict[str, Any],
          wmat: torch.Tensor, progress: Progress) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per position: the sum of embeddings, of their outer products, and their count."""
    s1 = s2 = None
    count = 0
    for i, chunk in enumerate(batched(items, det.batch_size)):
        x = embed_positions(det.image_features(chunk), params["layers"])
        e = torch.einsum("bdhw,dk->bkhw", x, wmat).flatten(2).permute(2, 0, 1).double()  # P,B,k
        if s1 is None:
            s1 = torch.zeros(e.shape[0], e.shape[2], dtype=torch.float64)
            s2 = torch.zeros(e.shape[0], e.shape[2], e.shape[2], dtype=torch.float64)
        s1 += e.sum(1)
        s2.baddbmm_(e.transpose(1, 2), e)  # in place: s2 is P·k² doubles (330 MB at 64²)
        count += e.shape[1]
        progress("features", min((i + 1) * det.batch_size, len(items)), len(items))
    return s1, s2, count


def _gaussians(sums: tuple[torch.Tensor, torch.Tensor, int], wmat: torch.Tensor,
               params: dict[str, Any], s: ModelSettings) -> Padim:
    s1, s2, count = sums
    if count < 2:
        raise DataError("PaDiM needs at least 2 OK images (or tiles) to estimate covariances")
    mean = s1 / count
    inv = torch.empty_like(s2)

    def invert(rows: slice) -> None:
        # A share of the positions at a time (the sums stay for cross-fitting's fold models):
        # a whole P×k×k double tensor is 330 MB at 64×64 positions.
        cov = s2[rows].clone().baddbmm_(mean[rows, :, None], mean[rows, None, :], alpha=-count)
        cov.div_(count - 1).diagonal(dim1=1, dim2=2).add_(s.padim.eps)
        torch.linalg.inv(cov, out=inv[rows])

    _per_core(invert, s2.shape[0])
    inv = inv.half() if s.padim.fp16 else inv.float()
    return Padim(wmat, mean.float(), inv, params)


def _per_core(work: Callable[[slice], None], n: int) -> None:
    """`work` over shares of range(n), each single-threaded, as many at once as torch has
    threads. torch.linalg.inv hands each small (k×k) matrix of a batch to a multi-threaded
    LAPACK call: thousands of tiny parallel regions whose threads mostly wait for each other
    (covariances and inverses of 4096 matrices of 100×100: 1.5 s per fit that way, 0.7 s
    this way on an Intel Xeon with AMX, 2 cores; the same bits)."""
    threads = torch.get_num_threads()
    step = -(-n // (4 * threads))
    shares = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    if threads < 2:
        for rows in shares:
            work(rows)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, shares))
    finally:
        torch.set_num_threads(threads)
