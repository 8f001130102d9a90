"""The model library's settings: everything `inspectd fit` needs; they travel into the
artifact's manifest. Documented defaults: `configs/models/{patchcore,padim,orthoad}.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from inspectd.core.errors import ConfigError
from inspectd.core.settings import InspectdSettings, Section
from inspectd.models.padim.settings import PadimSettings
from inspectd.models.patchcore.settings import PatchCoreSettings

# The kinds `models.kinds.KINDS` registers (a test keeps the two lists equal).
ModelKind = Literal["patchcore", "padim", "orthoad", "ensemble"]
BackboneName = Literal["efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2"]


class BackboneSettings(Section):
    name: BackboneName = Field("efficientnet_lite0", description="feature extractor")
    layers: list[str] | None = Field(
        None, description="layers to extract; null = the backbone's default for the model kind"
    )
    weights: Path | None = Field(
        None,
        description="ImageNet weights file; null = the packaged file (EfficientNet-Lite0) or "
        "torch's hub cache checkpoints dir (torchvision models). Never downloaded.",
    )


class PreprocessSettings(Section):
    resize: int | tuple[int, int] = Field(256, description="resize to S×S, or [H, W]")
    crop: int | tuple[int, int] | None = Field(None, description="centre crop after resize")
    keep_aspect: bool = Field(
        False, description="resize the longer side to `resize` and pad, keeping aspect ratio"
    )
    tile: int | None = Field(
        None, description="score the resized image as overlapping tile×tile crops, stitched"
    )
    tile_overlap: float = Field(0.25, ge=0.0, lt=0.9, description="fraction of tile overlap")


class ScoringSettings(Section):
    sigma: float = Field(4.0, ge=0.0, description="Gaussian smoothing of the anomaly map (px)")


class CalibrationSettings(Section):
    mode: Literal["auto", "crossfit", "holdout"] = Field(
        "holdout", description="holdout: `holdout` of the OK images kept out of the model to "
        "set the thresholds; crossfit: every OK image in the model, thresholds from "
        "out-of-fold scores (fold models each fitted without one fold) — fewer false rejects, "
        "more escapes (fold models saw fewer images and score higher; BENCHMARKS.md); auto: "
        "crossfit up to crossfit_max_images images, holdout above")
    folds: int = Field(5, ge=2, description="cross-fitting folds")
    crossfit_max_images: int = Field(
        300, ge=2, description="auto mode: cross-fit up to this many OK images")
    holdout: float = Field(0.1, gt=0.0, lt=0.5, description="OK images held out to calibrate")
    min_holdout: int = Field(3, ge=1, description="at least this many held-out OK images")
    quantile: float = Field(
        0.99, gt=0.0, le=1.0, description="share of new OK images the image threshold passes")
    rule: Literal["lognormal", "prediction", "quantile"] = Field(
        "lognormal", description="image threshold before the margin — lognormal: the larger of "
        "the OK scores' empirical quantile and a log-normal fit's quantile (from all the "
        "scores, where the empirical quantile of a few is only their largest); prediction: "
        "the same with a log-normal prediction bound (exact false-reject rate at any count, "
        "a high threshold at 3–5 scores); quantile: the empirical quantile alone")
    margin: float = Field(0.05, ge=0.0, description="threshold = rule's bound × (1 + margin)")
    pixel_quantile: float = Field(0.999, gt=0.0, le=1.0, description="OK pixel quantile")
    bf16_tolerance: float = Field(
        0.02, gt=0.0, description="max |score_bf16 − score_fp32| / threshold to allow bf16"
    )


class RuntimeSettings(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
    channels_last: bool = Field(True, description="channels-last memory format on CPU")
    batch_size: int = Field(8, ge=1, description="images per forward pass")


DEFAULT_CANDIDATES: list[dict[str, Any]] = [
    {"name": "patchcore", "kind": "patchcore"},
    {"name": "patchcore topk", "kind": "patchcore", "patchcore": {"image_score": "topk"}},
    {"name": "padim", "kind": "padim"},
    {"name": "orthoad", "kind": "orthoad"},
]


class EnsembleSettings(Section):
    """`kind: ensemble`: members' scores and maps, each normalised by its own held-out OK
    distribution, averaged."""

    members: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"kind": "patchcore"}, {"kind": "padim"}],
        description="the member models' settings, each merged over this file's other "
        "sections (at least two; no ensemble or auto among them)")


class AutoSettings(Section):
    """`kind: auto`: the kind (and its options) chosen per SKU from OK images alone."""

    candidates: list[dict[str, Any]] = Field(
        default_factory=lambda: [dict(c) for c in DEFAULT_CANDIDATES],
        description="settings tried, each merged over this file's other sections; an "
        "optional `name` labels it")
    validation: float = Field(
        0.2, gt=0.0, lt=0.5, description="share of the OK images held out to judge candidates")
    min_validation: int = Field(5, ge=2, description="at least this many held out")
    max_validation: int = Field(40, ge=2, description="at most this many held out")
    anomalies: list[str] = Field(
        default_factory=lambda: ["perlin", "cutpaste", "scratch", "stain"],
        description="synthetic anomaly kinds pasted into each held-out image")
    pixel_weight: float = Field(
        0.25, ge=0.0, description="choice = image AUROC + pixel_weight × pixel AUROC")
    ng_weight: float = Field(
        1.0, ge=0.0, description="with operator-confirmed NG images (`fit --ng`, refit's "
        "labelled frames): + ng_weight × AUROC of held-out OK vs those")
    budget_s: float | None = Field(
        None, gt=0, description="stop trying candidates once this long has passed (the "
        "first is always tried); null = try them all")
    ensemble: bool = Field(
        True, description="also judge a calibrated ensemble of the two best candidates "
        "(different fits); chosen only if it beats both of them by ensemble_margin")
    ensemble_margin: float = Field(
        0.01, ge=0.0, description="how much better (in choice) than its best member the "
        "ensemble must be: it costs both members' inference")


class ModelSettings(InspectdSettings):
    """Everything `inspectd fit` needs; it travels into the artifact's manifest."""

    kind: Literal[ModelKind, "auto"] = Field(
        "patchcore", description="anomaly model, or auto to choose one per SKU")
    seed: int = Field(0, description="seed for sampling, projections and the OK split")
    backbone: BackboneSettings = BackboneSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    patchcore: PatchCoreSettings = PatchCoreSettings()
    padim: PadimSettings = PadimSettings()
    scoring: ScoringSettings = ScoringSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    auto: AutoSettings = AutoSettings()

    @field_validator("kind", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


def merged(base: ModelSettings, spec: dict[str, Any], what: str) -> ModelSettings:
    """A model's full settings from a partial spec (`kind` and any sections), merged over
    `base`'s sections: an auto candidate, an ensemble member. `what` names it in errors."""
    common = base.model_dump(exclude={"kind", "auto", "ensemble"})
    try:
        s = ModelSettings(**_merge(common, spec))
    except Exception as e:
        raise ConfigError(f"{what}: {e}") from None
    if s.kind in ("auto", "ensemble"):
        raise ConfigError(f"{what}: needs a single model kind (patchcore, padim, orthoad), "
                          f"not {s.kind}")
    return s


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
