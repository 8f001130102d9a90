"""Drift: the current version's recent scores against its calibration (held-out OK) scores,
both relative to its threshold (`inspectd models drift`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from inspectd.core.config import LineSettings
from inspectd.core.errors import ArtifactError
from inspectd.lifecycle.gates import ratio_summary
from inspectd.lifecycle.registry import current_version
from inspectd.models.artifact import read_manifest
from inspectd.storage import queries

DRIFT_ALPHA = 0.01  # significance a drift verdict needs, beside the KS statistic itself


@dataclass
class DriftResult:
    sku: str
    version: str
    threshold: float
    recent: dict[str, float | int] | None  # n, median, p95 of score/threshold
    calibration: dict[str, float | int]
    ks: float | None
    ks_pvalue: float | None
    recommended: bool | None  # None: too few recent frames to say
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def drift(s: LineSettings, sku: str, since: datetime | None = None,
          limit: int = 2000) -> DriftResult:
    """Recent scores of the current version against its calibration (held-out OK) scores,
    both relative to its threshold.

    A refit is recommended when the two distributions differ by a KS statistic of at least
    refit.drift_ks, significantly (p < DRIFT_ALPHA: a handful of calibration scores cannot
    show much), and the recent median is higher: OK parts creeping towards false rejects.
    Scores moving down (parts closer to the training set) need no refit."""
    r = s.refit
    version, path = current_version(s.models_dir, sku)
    manifest = read_manifest(path)
    threshold = float(manifest["threshold"]["image"])
    cal_scores = (manifest.get("calibration") or {}).get("heldout_ok_scores")
    if not cal_scores:
        raise ArtifactError(f"{path / 'manifest.json'}: no calibration scores to compare with")
    cal = np.asarray(cal_scores) / threshold
    recent = np.asarray(queries.recent_scores(s.database_url(), sku, since=since, limit=limit,
                                              model_version=version)) / threshold
    out = DriftResult(sku, version, threshold, ratio_summary(recent) if len(recent) else None,
                      ratio_summary(cal), None, None, None, "")
    if len(recent) < r.drift_min_frames:
        out.reason = (f"too few recent frames scored by {version}: {len(recent)} "
                      f"(need {r.drift_min_frames}, refit.drift_min_frames); no drift verdict")
        return out
    ks = ks_2samp(recent, cal)
    out.ks, out.ks_pvalue = float(ks.statistic), float(ks.pvalue)
    up = out.recent["median"] > out.calibration["median"]
    out.recommended = up and out.ks >= r.drift_ks and out.ks_pvalue < DRIFT_ALPHA
    med = (f"median {out.calibration['median']:.2f} → {out.recent['median']:.2f}, p95 "
           f"{out.calibration['p95']:.2f} → {out.recent['p95']:.2f} × threshold")
    if out.recommended:
        out.reason = (f"refit recommended: scores moved towards the threshold ({med}; KS "
                      f"{out.ks:.2f} ≥ {r.drift_ks:.2f}, p = {out.ks_pvalue:.1g})")
    else:
        out.reason = (f"no refit needed: {med}; KS {out.ks:.2f} (refit.drift_ks {r.drift_ks:.2f}), "
                      f"p = {out.ks_pvalue:.2g}")
    return out
