"""PaDiM and OrthoAD inference: a Gaussian per feature-map position, Mahalanobis scores.

PaDiM (Defard et al.) reduces the concatenated layer features with a random channel subset;
OrthoAD (Kim et al., "Semi-Orthogonal Embedding for Efficient Unsupervised Anomaly
Segmentation") with a random semi-orthogonal matrix W (D×k, WᵀW = I). One code path: the
embedding is `x @ W`, and a channel subset is just a W made of unit columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def embed_positions(feats: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Layer features resized (nearest) to the finest layer and concatenated: [B, D, h, w]."""
    maps = [feats[name].float() for name in layers]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    return torch.cat(
        [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest") for m in maps],
        1,
    )


class Padim:
    smoothed_image_score = True  # PaDiM takes the max of the smoothed anomaly map
    scoring_params: tuple[str, ...] = ()

    def __init__(
        self, w: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor, params: dict[str, Any]
    ):
        self.kind = params["kind"]
        self.params = params
        # Contiguous copies: the layout decides the summation order, and reloaded tensors
        # (always contiguous) must score bit-identically to freshly fitted ones.
        self.w = w.float().contiguous()
        # A channel subset is applied as a gather: same numbers as x @ W, no matmul.
        self.subset = None
        if self.kind == "padim":
            self.subset = self.w.argmax(0)
        self.mean = mean.float().contiguous()  # [P, k]
        self.inv_cov_stored = inv_cov.contiguous()  # float16 or float32, as in the artifact
        self.inv_cov = self.inv_cov_stored.float()  # [P, k, k]

    def embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = embed_positions(feats, self.params["layers"])
        if self.subset is not None:
            return x[:, self.subset]
        return torch.einsum("bdhw,dk->bkhw", x, self.w)

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        b, k, h, w = emb.shape
        delta = emb.flatten(2).transpose(1, 2) - self.mean  # [B, P, k]
        m = torch.einsum("bpk,pkl->bpl", delta, self.inv_cov)
        return (m * delta).sum(-1).clamp_min(0).sqrt().view(b, h, w)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "mean": self.mean, "inv_cov": self.inv_cov_stored}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], params: dict[str, Any], backend: str = "auto"
    ) -> Padim:
        return cls(tensors["w"], tensors["mean"], tensors["inv_cov"], params)
