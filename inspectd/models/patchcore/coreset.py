"""PatchCore memory-bank subsampling (greedy k-center coresets).

A sampler is an object whose `run(features)` returns the selected row indices (int64, 1-D,
unique) into `features` (N x D, float32/float16, CPU); "no sampling" is just another sampler.

Why our own code rather than anomalib's / patchcore-inspection's greedy sampler: those update
the min-distances with a scan over all N rows per selection, so every step streams N x proj_dim
floats from memory (memory-bound: ~8 selections/s in anomalib, ~250/s for our fused mat-vec
version at N=200k on 2 cores). Here rows are split into cache-sized, spatially coherent cells
and each selection scans only its own cell and the two cells nearest to it, while a max over
cells keeps the greedy order: >2,500 selections/s with a covering radius within a few percent
of exact greedy (benchmarks/bench_coreset.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from inspectd.core.errors import ConfigError, DataError

Progress = Callable[[int, int], None]


def num_selected(n: int, ratio: float, max_size: int | None = None) -> int:
    """k = max(1, round(ratio * n)), capped by max_size (the result may be >= n: keep all)."""
    k = max(1, round(ratio * n))
    return min(k, max_size) if max_size is not None else k


def project_features(
    features: torch.Tensor, proj_dim: int | None, seed: int = 0, chunk: int = 65536
) -> torch.Tensor:
    """Centred float32 random Gaussian projection (Johnson-Lindenstrauss) to `proj_dim` dims.

    Projected in row chunks so float16 inputs are never copied whole to float32. No projection
    when `proj_dim` is None or >= D. Centring leaves distances unchanged but makes the
    |x|^2 - 2x.c + |c|^2 expansion used below far less prone to cancellation.
    """
    n, dim = features.shape
    weight = None
    if proj_dim is not None and proj_dim < dim:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(dim, proj_dim, generator=gen) / math.sqrt(proj_dim)
    out = torch.empty(n, weight.shape[1] if weight is not None else dim)
    for a in range(0, n, chunk):
        rows = features[a : a + chunk].to("cpu", torch.float32)
        if weight is None:
            out[a : a + chunk] = rows
        else:
            torch.matmul(rows, weight, out=out[a : a + chunk])
    mean = out.mean(0)
    if not bool(torch.isfinite(mean).all()):  # any NaN/inf row makes its column mean non-finite
        raise DataError("coreset sampling: features contain NaN or infinite values")
    return out.sub_(mean)


def covering_radius(features: torch.Tensor, indices: torch.Tensor, chunk: int = 65536) -> float:
    """Max over all rows of the Euclidean distance to the nearest selected row (exact, chunked)."""
    centres = features[indices].float()
    origin = centres.mean(0)
    centres = centres - origin
    csq = (centres * centres).sum(1)
    rows_per_chunk = max(1, min(chunk, 2**24 // max(1, len(centres))))  # <= 64 MiB of distances
    worst = 0.0
    for a in range(0, features.shape[0], rows_per_chunk):
        x = features[a : a + rows_per_chunk].float() - origin
        # The expansion finds the nearest centre; the distance is then taken directly (exact).
        nearest = torch.addmm(csq, x, centres.T, alpha=-2).argmin(1)
        worst = max(worst, float((x - centres[nearest]).pow_(2).sum(1).max()))
    return math.sqrt(worst)


class Sampler:
    """Base: `run(features, progress)` returns unique int64 row indices."""

    def __init__(self, ratio: float = 1.0, max_size: int | None = None) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"coreset ratio must be in (0, 1], got {ratio}")
        if max_size is not None and max_size < 1:
            raise ConfigError(f"coreset max_size must be >= 1, got {max_size}")
        self.ratio, self.max_size = ratio, max_size

    def run(self, features: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        n = features.shape[0]
        k = num_selected(n, self.ratio, self.max_size)
        if k >= n:
            return torch.arange(n)
        out = self._select(features, k, progress)
        if progress is not None:
            progress(k, k)
        return out

    def _select(self, features: torch.Tensor, k: int, progress: Progress | None) -> torch.Tensor:
        raise NotImplementedError  # IdentitySampler never gets here: k >= n


class IdentitySampler(Sampler):
    def __init__(self) -> None:
        super().__init__(1.0)


class RandomSampler(Sampler):
    def __init__(self, ratio: float, seed: int = 0, max_size: int | None = None) -> None:
        super().__init__(ratio, max_size)
        self.seed = seed

    def _select(self, features: torch.Tensor, k: int, progress: Progress | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(features.shape[0], generator=gen)[:k].sort().values


class _Greedy(Sampler):
    def __init__(
        self, ratio: float, proj_dim: int | None = 128, seed: int = 0, max_size: int | None = None
    ) -> None:
        super().__init__(ratio, max_size)
        self.proj_dim, self.seed = proj_dim, seed


class ExactGreedyCoreset(_Greedy):
    """Classic k-center greedy (PatchCore paper): one full scan of all rows per selection.

    The reference the approximate sampler is measured against; memory-bound, ~100-250
    selections/s at N=200k x 128 dims on 2 cores.
    """

    def _select(self, features: torch.Tensor, k: int, progress: Progress | None) -> torch.Tensor:
        x = project_features(features, self.proj_dim, self.seed)
        sq = (x * x).sum(1)
        mind = torch.full((len(x),), math.inf)
        i = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(self.seed)))
        out = torch.empty(k, dtype=torch.int64)
        out[0], every = i, max(1, k // 100)
        for step in range(1, k):
            d = torch.addmv(sq, x, x[i], alpha=-2).add_(float(sq[i]))
            torch.minimum(mind, d, out=mind)
            mind[i] = -math.inf  # selected rows are never picked again, even with duplicates
            i = out[step] = int(mind.argmax())
            if progress is not None and step % every == 0:
                progress(step, k)
        return out


class ApproximateGreedyCoreset(_Greedy):
    """Cell-local k-center greedy with a global schedule (the default sampler).

    Rows are grouped into spatially coherent cells of <= `chunk_size` by a k-means tree. Each
    selection takes the row with the largest min-distance over
    all cells (exactly as greedy would, but that distance only knows centres from nearby
    cells), then updates the min-distances of its own cell and of the `neighbour_cells` cells
    whose centroids are nearest to it. Cost per selection: a few cell scans instead of N rows.
    """

    def __init__(
        self,
        ratio: float,
        proj_dim: int | None = 128,
        seed: int = 0,
        max_size: int | None = None,
        chunk_size: int = 4096,
        neighbour_cells: int = 2,
        kmeans_iters: int = 8,
    ) -> None:
        super().__init__(ratio, proj_dim, seed, max_size)
        if chunk_size < 1 or neighbour_cells < 0:
            raise ConfigError("coreset chunk_size must be >= 1 and neighbour_cells >= 0")
        self.chunk_size, self.neighbour_cells = chunk_size, neighbour_cells
        self.kmeans_iters = kmeans_iters

    def _select(self, features: torch.Tensor, k: int, progress: Progress | None) -> torch.Tensor:
        x = project_features(features, self.proj_dim, self.seed)
        perm, offs = self._partition(x)
        x = x.index_select(0, perm)  # grouped by cell: each cell is now a contiguous view
        sq = (x * x).sum(1)
        spans = list(zip(offs[:-1], offs[1:], strict=True))
        cent = torch.stack([x[a:b].mean(0) for a, b in spans])
        cent_sq = (cent * cent).sum(1)
        first = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(self.seed)))
        # One full scan for the seeded first centre, so every cell starts from a global view.
        mind = torch.addmv(sq, x, x[first], alpha=-2).add_(float(sq[first]))
        mind[first] = -math.inf  # selected rows are never picked again, even with duplicates
        cell_max, cell_arg = np.empty(len(spans)), np.empty(len(spans), dtype=np.int64)

        def refresh(c: int) -> None:
            v, j = mind[spans[c][0] : spans[c][1]].max(0)
            cell_max[c], cell_arg[c] = float(v), spans[c][0] + int(j)

        for c in range(len(spans)):
            refresh(c)
        out = torch.empty(k, dtype=torch.int64)
        out[0] = first
        near, every = min(len(spans), self.neighbour_cells + 1), max(1, k // 100)
        for step in range(1, k):
            home = int(cell_max.argmax())  # the global greedy choice, as far as cells know
            i = out[step] = int(cell_arg[home])
            ci, ci_sq = x[i], float(sq[i])
            mind[i] = -math.inf
            dc = torch.addmv(cent_sq, cent, ci, alpha=-2)
            dc[home] = -math.inf  # own cell first, then the cells nearest to the new centre
            for c in torch.topk(dc, near, largest=False).indices.tolist():
                a, b = spans[c]
                d = torch.addmv(sq[a:b], x[a:b], ci, alpha=-2).add_(ci_sq)
                torch.minimum(mind[a:b], d, out=mind[a:b])
                refresh(c)
            if progress is not None and step % every == 0:
                progress(step, k)
        return perm[out]

    def _partition(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Row order grouping cells contiguously, and cell offsets (cells <= chunk_size rows).

        A k-means tree: split into <= 32 clusters, recurse into those still above chunk_size
        (~N x 32 x depth distances to compute rather than N x cells: 1M rows in ~1 s).
        """
        gen = torch.Generator().manual_seed(self.seed)
        cells: list[torch.Tensor] = []
        todo = [torch.arange(len(x))]
        while todo:
            idx = todo.pop()
            n = len(idx)
            if n <= self.chunk_size:
                cells.append(idx)
                continue
            m = min(32, n, math.ceil(2 * n / self.chunk_size))  # leaves ~half full
            y = x if n == len(x) else x[idx]
            sample = y[torch.randperm(n, generator=gen)[: 64 * m]]
            cent = sample[:m].clone()
            for _ in range(self.kmeans_iters):
                lab = _nearest(sample, cent)
                count = torch.bincount(lab, minlength=m)
                total = torch.zeros_like(cent).index_add_(0, lab, sample)
                cent = torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], cent)
            lab = _nearest(y, cent)
            count = torch.bincount(lab, minlength=m)
            if int(count.max()) == n:  # k-means cannot split it (all rows equal): cut by index
                todo += torch.tensor_split(idx, math.ceil(n / self.chunk_size))
            else:
                order = idx[lab.argsort(stable=True)]
                todo += [g for g in torch.split(order, count.tolist()) if len(g)]
        return torch.cat(cells), np.cumsum([0] + [len(c) for c in cells]).tolist()


def _nearest(x: torch.Tensor, cent: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    cent_sq = (cent * cent).sum(1)
    rows = [x[a : a + chunk] for a in range(0, x.shape[0], chunk)]
    return torch.cat([torch.addmm(cent_sq, r, cent.T, alpha=-2).min(1).indices for r in rows])
