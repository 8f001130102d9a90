"""Exact nearest-neighbour search over a memory bank: faiss when installed, else torch.

Both backends compute squared L2 distances as |q|^2 + |b|^2 - 2 q.b from one matrix product
(what faiss's IndexFlatL2 does for batches), clamped at 0, so they return the same neighbours.
Thread counts are left to the caller (torch.set_num_threads / faiss.omp_set_num_threads).
Results are CPU tensors: distances float32 [Q, k] ascending, indices int64 [Q, k]. Asking for
more neighbours than the bank holds raises ConfigError rather than padding with -1 / inf.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inspectd.core.errors import ConfigError, DataError

try:
    import faiss
except ImportError:  # optional at runtime: the torch backend is exact too
    faiss = None

BACKENDS = ("auto", "faiss", "torch")
_MAX_CHUNK_ELEMENTS = 2**25  # torch backend: at most 128 MiB of distances per query chunk


def _as_matrix(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.ndim != 2:
        raise DataError(f"nearest-neighbour {what} must be 2-D [rows, dim], got {tuple(t.shape)}")
    return t.detach().to(torch.float32).contiguous()


class NearestNeighbourIndex:
    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown nearest-neighbour backend {backend!r}; use {BACKENDS}")
        if backend == "faiss" and faiss is None:
            raise ConfigError("nearest-neighbour backend 'faiss' requested but faiss is missing")
        self._backend = backend if backend != "auto" else ("faiss" if faiss else "torch")
        self._index: Any = None
        self._gpu_res: Any = None  # must outlive a GPU index
        self._bank: torch.Tensor | None = None
        self._bank_sq: torch.Tensor | None = None
        self._size = 0
        self._dim = 0

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def size(self) -> int:
        return self._size

    def fit(self, bank: torch.Tensor | np.ndarray) -> NearestNeighbourIndex:
        on_cuda = isinstance(bank, torch.Tensor) and bank.is_cuda
        b = _as_matrix(bank, "bank")
        self._size, self._dim = b.shape
        if self._backend == "faiss":
            index = faiss.IndexFlatL2(self._dim)
            gpu = hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()
            if gpu and faiss.get_num_gpus() > 0:
                self._gpu_res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            index.add(b.cpu().numpy())
            self._index = index
        else:
            self._bank = b if on_cuda else b.cpu()
            self._bank_sq = (self._bank * self._bank).sum(1)
        return self

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._size == 0:
            raise ConfigError("nearest-neighbour search before fit() (or on an empty bank)")
        if not 1 <= k <= self._size:
            raise ConfigError(f"asked for {k} nearest neighbours but the bank holds {self._size}")
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self._dim:
            raise DataError(f"query dim {q.shape[1]} does not match the bank's {self._dim}")
        if len(q) == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        if self._backend == "faiss":
            dist, idx = self._index.search(q.cpu().numpy(), k)
            return torch.from_numpy(dist), torch.from_numpy(idx).to(torch.int64)
        return self._search_torch(q, k)

    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._bank is not None and self._bank_sq is not None
        q = q.to(self._bank.device)
        step = max(1, _MAX_CHUNK_ELEMENTS // self._size)
        dists, idxs = [], []
        for a in range(0, q.shape[0], step):
            qc = q[a : a + step]
            # Same order of operations as faiss: (|q|^2 + |b|^2) - 2 q.b, negatives → 0.
            d = (qc * qc).sum(1, keepdim=True) + self._bank_sq
            d.sub_(2 * (qc @ self._bank.T)).clamp_min_(0)
            val, ind = torch.topk(d, k, dim=1, largest=False, sorted=True)
            dists.append(val.cpu())
            idxs.append(ind.cpu())
        return torch.cat(dists), torch.cat(idxs)
