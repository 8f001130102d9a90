"""The model kinds, one line each: its inference class and the module that fits it.

A kind is one folder (`patchcore/`, `padim/`): `model.py` scores (`from_tensors`, `embed`,
`patch_scores`, `tensors`, and `scoring_params`: the params only scoring reads, so model
choice fits once for every value of them), `fit.py` has `fit_model(detector, images,
layers, settings, progress)`, reading images' features only through
`detector.image_features`, and optionally `fold_models(...)`, cheaper fold models for
cross-fitting than a fit per fold, and `normalise(...)`, what the model learns from
held-out OK images before its thresholds are set. `ensemble/` composes fitted models of the
other kinds, through this registry only. The fit module is named, not imported, so loading
and scoring a model (the daemon's worker) never imports fitting code. Adding a kind: its
folder, its line here, its name in `settings.ModelKind` and its settings section in
`settings.ModelSettings`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inspectd.models.ensemble.model import Ensemble
from inspectd.models.padim.model import Padim
from inspectd.models.patchcore.model import PatchCore


@dataclass(frozen=True)
class Kind:
    model: type  # inference: from_tensors(tensors, params, backend) rebuilds a fitted model
    fit: str  # module with fit_model(), imported only when fitting


KINDS: dict[str, Kind] = {
    "patchcore": Kind(PatchCore, "inspectd.models.patchcore.fit"),
    "padim": Kind(Padim, "inspectd.models.padim.fit"),
    "orthoad": Kind(Padim, "inspectd.models.padim.fit"),
    "ensemble": Kind(Ensemble, "inspectd.models.ensemble.fit"),
}


def fitter(kind: str) -> Callable[..., Any]:
    """The kind's `fit_model`."""
    return importlib.import_module(KINDS[kind].fit).fit_model


def folder(kind: str) -> Callable[..., Any] | None:
    """The kind's `fold_models` (cheap models for cross-fitting), if it has one; else
    cross-fitting fits one model per fold."""
    return getattr(importlib.import_module(KINDS[kind].fit), "fold_models", None)


def layer_rule(kind: str) -> Callable[..., Any] | None:
    """The kind's `layers(settings)`, if it has one: the backbone layers its fit reads
    when they are not one kind's defaults (an ensemble: every member's)."""
    return getattr(importlib.import_module(KINDS[kind].fit), "layers", None)


def normaliser(kind: str) -> Callable[..., Any] | None:
    """The kind's `normalise(detector, images, settings)`, if it has one: what it must learn
    from held-out OK images before its thresholds are set (an ensemble: each member's OK
    score distribution)."""
    return getattr(importlib.import_module(KINDS[kind].fit), "normalise", None)
