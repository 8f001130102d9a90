"""Refit: a candidate model from the OK frames the line kept, promoted only through gates.

The pool is the SKU's OK frames with images on disk, newest first, minus frames an operator
marked NG and frames that scored near the threshold (`storage.queries.refit_candidates`).
It is split three ways: the fit images build the model, `fit()` holds some of those out to
set the threshold (as `inspectd fit` does), and the gate set, never seen by the candidate,
judges it beside the current version. Confirmed NG frames make the threshold F1-optimal and
must all still be rejected.

The gates are in `gates`, the per-SKU lock in `lock`. Run it in a process that has called
`core.resources.limit_resources` first (`inspectd refit` does): this module imports torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydantic import ValidationError

from inspectd.core.config import LineSettings
from inspectd.core.errors import ArtifactError, ConfigError
from inspectd.core.settings import load_settings
from inspectd.lifecycle.gates import Gate, false_reject_gate, ng_gate, shift_gate
from inspectd.lifecycle.lock import RefitError, refit_lock
from inspectd.lifecycle.registry import (
    REFIT_RECORD,
    current_version,
    promote,
    publish,
    sku_dir,
    valid_version,
)
from inspectd.models.artifact import read_manifest
from inspectd.models.detector import Detector, batched, load_detector, load_images
from inspectd.models.fitting import fit
from inspectd.models.settings import ModelSettings
from inspectd.storage import queries
from inspectd.storage.db import safe_url

log = structlog.get_logger("inspectd.refit")

Progress = Callable[[str, int, int], None]


@dataclass
class RefitResult:
    sku: str
    dry_run: bool
    previous: str | None  # the current version when the refit started
    version: str | None  # the saved version (None on a dry run)
    promoted: bool
    settings_source: str
    pool: int
    fit_frames: int
    heldout_frames: int
    ng_frames: int
    threshold: float
    gates: list[Gate]
    seconds: float
    not_promoted: str | None = None  # why a candidate that passed is not current

    @property
    def passed(self) -> bool:
        return all(g.passed is not False for g in self.gates)

    @property
    def reason(self) -> str | None:
        failed = [g.reason or g.name for g in self.gates if g.passed is False]
        return "; ".join(failed) or self.not_promoted

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "reason": self.reason}


def _scores(det: Detector, paths: Sequence[str]) -> np.ndarray:
    """Image scores only (the maps of a large set would not fit in memory at once)."""
    out = [det.score_images(load_images(chunk))[0] for chunk in batched(paths, det.batch_size)]
    return np.concatenate(out) if out else np.zeros(0)



def split_pool(pool: Sequence[queries.AuditedFrame], holdout: float, min_holdout: int,
               seed: int) -> tuple[list[queries.AuditedFrame], list[queries.AuditedFrame]]:
    """(fit frames, held-out gate frames), a seeded random split."""
    n = len(pool)
    n_hold = max(min_holdout, round(holdout * n))
    if n_hold >= n:
        raise RefitError(f"{n} frames cannot give {n_hold} held-out frames and a fit set "
                         "(lower refit.min_holdout or collect more OK frames)")
    perm = np.random.default_rng(seed).permutation(n)
    return [pool[i] for i in sorted(perm[n_hold:])], [pool[i] for i in sorted(perm[:n_hold])]


def model_settings_for(s: LineSettings, current: Path | None) -> tuple[ModelSettings, str]:
    """The current version's own settings, else `refit.model` (a model YAML), else defaults."""
    if current is not None:
        manifest = read_manifest(current)
        # A version whose kind was chosen (kind: auto) is refitted by choosing again.
        stored = (manifest.get("auto") or {}).get("requested") or manifest.get("settings")
        if stored:
            try:
                return ModelSettings(**stored), f"current version {current.name}"
            except ValidationError as e:
                raise ConfigError(f"{current / 'manifest.json'}: settings no longer valid "
                                  f"({e.error_count()} errors: {e.errors()[0]['msg']})") from None
    if s.refit.model is not None:
        return load_settings(ModelSettings, s.refit.model), str(s.refit.model)
    return ModelSettings(), "defaults"


def refit(
    s: LineSettings,
    sku: str,
    *,
    since: datetime | None = None,
    max_images: int | None = None,
    dry_run: bool = False,
    version: str | None = None,
    progress: Progress | None = None,
) -> RefitResult:
    """Fit a candidate on the line's OK frames, gate it, and (unless a dry run) save it as a
    new version, made current only when every gate passes; a rejected candidate is kept,
    marked rejected in its refit.json, for review."""
    t0 = time.perf_counter()
    r = s.refit
    models_dir, url = s.models_dir, s.database_url()
    base = sku_dir(models_dir, sku)
    if version is not None and (base / valid_version(version)).exists():
        raise ArtifactError(f"{base / version}: version already exists (versions are immutable)")
    with refit_lock(models_dir, sku):
        for stale in base.glob(".refit-*"):  # left by a refit that was killed
            shutil.rmtree(stale, ignore_errors=True)
        try:
            previous: tuple[str, Path] | None = current_version(models_dir, sku)
        except ArtifactError:
            previous = None
        # A SKU without a model learns from the frames the line kept unjudged (ERROR: unknown
        # SKU); with one, only from frames it judged OK (or an operator labelled OK).
        # The gate frames come from every OK frame kept, whatever the current version
        # scored them, so the gates see what it gets wrong; the fit frames only from those
        # clear of its threshold (a near-threshold OK may be an unnoticed defect).
        limit = max_images or r.max_images
        kept = queries.refit_candidates(url, sku, since=since, max_images=limit,
                                        near_threshold=None, unjudged=previous is None)
        if len(kept) < r.min_images:
            when = f" since {since.isoformat()}" if since else ""
            raise RefitError(
                f"SKU {sku}: {len(kept)} usable OK frames{when} in {safe_url(url)}, refit needs "
                f"at least {r.min_images} (refit.min_images)")
        settings, source = model_settings_for(s, previous[1] if previous else None)
        _, gate_set = split_pool(kept, r.holdout, r.min_holdout, settings.seed)
        gate_ids = {f.frame_id for f in gate_set}
        pool = [f for f in queries.refit_candidates(
            url, sku, since=since, max_images=limit, near_threshold=r.near_threshold,
            unjudged=previous is None) if f.frame_id not in gate_ids]
        if len(pool) < 2:
            raise RefitError(f"SKU {sku}: {len(pool)} OK frames clear of the threshold left to "
                             "fit on after the gate frames; collect more OK frames")
        fit_set = pool
        ng = queries.confirmed_ng(url, sku)  # all of them, whatever --since: escapes stay out
        log.info("refit", sku=sku, pool=len(kept), fit=len(fit_set), heldout=len(gate_set),
                 ng=len(ng), settings=source, current=previous and previous[0])

        det = fit([f.image_path for f in fit_set], settings, ng=[f.image_path for f in ng],
                  progress=progress)
        det.manifest["training"]["data"] = {
            "source": "refit", "sku": sku, "audit": safe_url(url), "frames": len(fit_set),
            "since": since.isoformat() if since else None,
        }
        with tempfile.TemporaryDirectory(prefix=".refit-", dir=base) as tmp:
            staged = det.save(Path(tmp) / "candidate")
            del det
            # Gate what the line will run: the saved artifact, on the worker's device/precision.
            cand = load_detector(staged, s.worker.device, s.worker.precision)
            gates = _gates(s, cand, previous, gate_set, ng, progress)
            result = RefitResult(
                sku=sku, dry_run=dry_run, previous=previous and previous[0], version=None,
                promoted=False, settings_source=source, pool=len(kept), fit_frames=len(fit_set),
                heldout_frames=len(gate_set), ng_frames=len(ng), threshold=cand.threshold,
                gates=gates, seconds=0.0)
            del cand
            if not dry_run:
                record = {
                    "source": "refit", "status": "passed" if result.passed else "rejected",
                    "reason": result.reason,
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "previous": result.previous, "settings_source": source,
                    "audit": safe_url(url), "since": since.isoformat() if since else None,
                    "gates": [asdict(g) for g in gates],
                    "training": {"pool": len(kept), "fit_frame_ids": [f.frame_id for f in fit_set],
                                 "heldout_frame_ids": [f.frame_id for f in gate_set],
                                 "ng_frame_ids": [f.frame_id for f in ng]},
                }
                (staged / REFIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
                result.version = publish(staged, models_dir, sku, version, make_current=False,
                                         move=True)
                if result.passed:
                    try:
                        promote(models_dir, sku, result.version, action="refit",
                                replacing=result.previous)
                        result.promoted = True
                    except ArtifactError as e:  # promoted or rolled back during the refit
                        result.not_promoted = str(e)
    result.seconds = round(time.perf_counter() - t0, 2)
    log.info("refit done", sku=sku, version=result.version, promoted=result.promoted,
             passed=result.passed, reason=result.reason, seconds=result.seconds)
    return result


def _gates(s: LineSettings, cand: Detector, previous: tuple[str, Path] | None,
           gate_set: Sequence[queries.AuditedFrame], ng: Sequence[queries.AuditedFrame],
           progress: Progress | None) -> list[Gate]:
    step = progress or (lambda *_: None)
    step("gates", 0, 3)
    paths = [f.image_path for f in gate_set]
    ids = [f.frame_id for f in gate_set]
    cand_scores = _scores(cand, paths)
    step("gates", 1, 3)
    ng_scores = _scores(cand, [f.image_path for f in ng])
    step("gates", 2, 3)
    current_ratios = current_scores = current_threshold = None
    if previous is not None:
        cur = load_detector(previous[1], s.worker.device, s.worker.precision)
        current_scores, current_threshold = _scores(cur, paths), cur.threshold
        current_ratios = list(current_scores / current_threshold)
    step("gates", 3, 3)
    return [
        false_reject_gate(ids, cand_scores, cand.threshold, s.refit.max_false_reject,
                          current_scores, current_threshold),
        ng_gate([f.frame_id for f in ng], ng_scores, cand.threshold),
        shift_gate(list(cand_scores / cand.threshold), current_ratios, s.refit.max_shift,
                   previous and previous[0]),
    ]
