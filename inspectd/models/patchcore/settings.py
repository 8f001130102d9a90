"""PatchCore's settings section (`patchcore:` in a model YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from inspectd.core.settings import Section


class PatchCoreSettings(Section):
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0, description="memory bank fraction kept")
    coreset_max: int | None = Field(None, gt=0, description="cap on memory bank rows")
    coreset_proj_dim: int = Field(128, gt=0, description="random projection dim for greedy")
    target_dim: int = Field(1024, gt=0, description="feature dim (channel pooling above it)")
    neighbourhood: int = Field(3, ge=1, description="local aggregation window (patch size)")
    border: Literal["zeros", "inside"] = Field(
        "zeros", description="aggregation at the map's edge: zeros = the window averages the "
        "zero padding too (the paper's code, anomalib), inside = only the map's own cells")
    num_neighbours: int = Field(9, ge=1, description="bank neighbours for score reweighting")
    image_score: Literal["max", "topk"] = Field("max", description="patch score reduction")
    topk: int = Field(10, ge=1, description="patches averaged when image_score=topk")
