"""PaDiM's and OrthoAD's settings section (`padim:` in a model YAML)."""

from __future__ import annotations

from pydantic import Field

from inspectd.core.settings import Section


class PadimSettings(Section):
    channels: int | None = Field(
        None, gt=0, description="embedding dim d (random subset for padim, k of W for orthoad); "
        "null = 100 for efficientnet_lite0/resnet18, 550 padim / 300 orthoad for larger nets"
    )
    eps: float = Field(0.01, gt=0.0, description="covariance regularisation (× identity)")
    fp16: bool = Field(True, description="store inverse covariances as float16")
