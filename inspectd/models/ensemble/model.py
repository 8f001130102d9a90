"""A calibrated score ensemble: several fitted models of other kinds on one backbone pass.

Each member scores the image as it would alone (its own embedding, patch scores, image
score and smoothed map); its image score and its map are then normalised by that member's
own held-out OK distribution, z = (x − mean) / spread, so a PatchCore distance and a PaDiM
Mahalanobis distance count alike, and the z values are averaged. The ensemble's thresholds
are then set on the averaged scores like any kind's. Held-out sets are small (3 images is
the default minimum), and a spread of image scores from three values can be ten times too
small, which would let one member drown the other: the image spread is pooled with
PRIOR_IMAGES pseudo-images of the spread of the member's OK map pixels (thousands of
values, on the same scale), which weighs little once there are 20 images. The members are
rebuilt through the kind registry, so this kind depends on no other kind's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Z_OFFSET = 10.0  # added to averaged z: thresholds are a positive quantile × (1 + margin)
PRIOR_IMAGES = 2.0  # pseudo-images of the OK map pixels' spread in an image-score spread


def pooled_spread(sq_dev: Any, n: Any, pixel_std: float) -> Any:
    """The spread of n image scores whose squared deviations from their mean sum to
    `sq_dev`, pooled with PRIOR_IMAGES pseudo-images of spread `pixel_std` (numbers or
    numpy arrays)."""
    return ((sq_dev + PRIOR_IMAGES * pixel_std ** 2) / (n - 1 + PRIOR_IMAGES)) ** 0.5


class Ensemble:
    kind = "ensemble"
    smoothed_image_score = False
    scoring_params: tuple[str, ...] = ()

    def __init__(self, members: Sequence[Any], params: dict[str, Any]):
        self.members = list(members)
        self.params = params

    @classmethod
    def build(cls, members: Sequence[Any]) -> Ensemble:
        """Members before normalisation (z = x until `normalise` is given their OK stats)."""
        specs = [{"kind": m.kind, "params": m.params, "image": [0.0, 1.0], "pixel": [0.0, 1.0]}
                 for m in members]
        return cls(members, {"kind": cls.kind, "members": specs, "z_offset": Z_OFFSET})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     backend: str = "auto") -> Ensemble:
        from inspectd.models.kinds import KINDS  # the registry names this class: import late

        members = []
        for i, spec in enumerate(params["members"]):
            prefix = f"m{i}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            members.append(KINDS[spec["kind"]].model.from_tensors(own, spec["params"], backend))
        return cls(members, params)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"m{i}.{k}": v for i, m in enumerate(self.members)
                for k, v in m.tensors().items()}

    def normalise(self, stats: Sequence[tuple[tuple[float, float], tuple[float, float]]]) -> None:
        """Each member's ((image mean, std), (pixel mean, std)) on held-out OK images."""
        for spec, (image, pixel) in zip(self.params["members"], stats, strict=True):
            spec["image"], spec["pixel"] = [float(v) for v in image], [float(v) for v in pixel]

    def combine(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Members' (scores [B], maps [B, H, W]) → the ensemble's, on the averaged z scale."""
        scores = maps = None
        for spec, (s, m) in zip(self.params["members"], parts, strict=True):
            zs = (s - spec["image"][0]) / spec["image"][1]
            zm = (m - spec["pixel"][0]) / spec["pixel"][1]
            scores = zs if scores is None else scores + zs
            maps = zm if maps is None else maps + zm
        n = len(parts)
        offset = self.params["z_offset"]
        return scores / n + offset, maps / n + offset
