"""PatchCore inference (Roth et al., "Towards Total Recall in Industrial Anomaly Detection").

Patch features from two backbone layers, locally aggregated, scored by the distance to the
nearest patch in a memory bank of OK patches. Building the bank lives in `fit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from inspectd.models.patchcore.knn import NearestNeighbourIndex


def embed_patches(
    feats: dict[str, torch.Tensor], layers: Sequence[str], neighbourhood: int, target_dim: int,
    border: str,
) -> torch.Tensor:
    """Locally aware patch features [B, D, h, w] at the finest layer's resolution.

    `border` "zeros": a window at the map's edge averages the zero padding too, as the
    paper's code (unfold with zero padding) and anomalib do, so edge patches shrink towards
    zero and lie close to the bank's edge patches whatever the content. "inside" (artifacts
    fitted before the setting existed) averages only the cells inside the map; then an
    image's edge, where textures meet the crop and lighting falls off, often decides its
    max score: image AUROC on the brick texture 0.56 against 0.83 with zeros, the same
    features and coreset (BENCHMARKS.md, "Against the peer library")."""
    maps = [feats[name].float() for name in layers]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    pad = neighbourhood // 2
    out = []
    for m in maps:
        if neighbourhood > 1:
            m = F.avg_pool2d(m, neighbourhood, stride=1, padding=pad,
                             count_include_pad=border == "zeros")
        if m.shape[-2:] != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out.append(m)
    emb = torch.cat(out, 1)
    if emb.shape[1] > target_dim:
        # The paper's channel pooling: average consecutive channels down to target_dim.
        b, d, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, 1, d)
        emb = F.adaptive_avg_pool1d(flat, target_dim).view(b, h, w, target_dim).permute(0, 3, 1, 2)
    return emb.contiguous()


class PatchCore:
    kind = "patchcore"
    smoothed_image_score = False  # image score from patch scores, before smoothing
    scoring_params = ("image_score", "topk")  # used only to score: a fit serves each value

    def __init__(self, bank: torch.Tensor, params: dict[str, Any], backend: str = "auto"):
        self.params = params
        self.bank = bank.float().contiguous()
        self.index = NearestNeighbourIndex(backend)
        self.index.fit(self.bank)

    def embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.params
        # Artifacts from before `border` existed averaged inside the map only.
        return embed_patches(feats, p["layers"], p["neighbourhood"], p["target_dim"],
                             p.get("border", "inside"))

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        b, d, h, w = emb.shape
        dist, _ = self.index.search(emb.permute(0, 2, 3, 1).reshape(-1, d), 1)
        return dist[:, 0].clamp_min(0).sqrt().view(b, h, w)

    def image_scores(self, scores: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """scores [B, N] patch scores, emb [B, N, D] their features → [B] image scores."""
        p = self.params
        flat = scores.flatten(1)
        if p["image_score"] == "topk":
            base = flat.topk(min(p["topk"], flat.shape[1]), dim=1).values.mean(1)
        else:
            base = flat.max(1).values
        best = emb[torch.arange(emb.shape[0]), flat.argmax(1)]  # [B, D]
        return base * self._reweight(best)

    def _reweight(self, query: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7: discount a patch whose nearest bank patch sits in a dense region."""
        k = min(self.params["num_neighbours"], self.index.size)
        if k <= 1:
            return torch.ones(query.shape[0])
        _, nearest = self.index.search(query, 1)
        _, support = self.index.search(self.bank[nearest[:, 0]], k)  # includes m* itself
        dist = torch.linalg.vector_norm(self.bank[support] - query[:, None, :], dim=-1)
        return 1.0 - torch.softmax(dist, dim=1)[:, 0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], params: dict[str, Any], backend: str = "auto"
    ) -> PatchCore:
        return cls(tensors["bank"], params, backend)
