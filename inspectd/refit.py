"""Refit: a candidate model from the OK frames the line kept, promoted only through gates.

The pool is the SKU's OK frames with images on disk, newest first, minus frames an operator
marked NG and frames that scored near the threshold (`storage.queries.refit_candidates`).
It is split three ways: the fit images build the model, `fit()` holds some of those out to
set the threshold (as `inspectd fit` does), and the gate set, never seen by the candidate,
judges it beside the current version. Confirmed NG frames make the threshold F1-optimal and
must all still be rejected.

Gates (all reported; any failure keeps the current version):
  false rejects   candidate's rejects among the gate set ≤ refit.max_false_reject
  confirmed NG    every operator-confirmed NG frame is rejected by the candidate
  score shift     on the gate set, p95 of score/threshold may rise by ≤ refit.max_shift over
                  the current version's (both score the same images with their own threshold)

`inspectd models drift` compares the current version's recent scores with its calibration
scores, both relative to its threshold.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from pydantic import ValidationError
from scipy.stats import ks_2samp

from inspectd.core.config import LineSettings
from inspectd.core.errors import ArtifactError, ConfigError, InspectdError
from inspectd.core.settings import load_settings
from inspectd.models.settings import ModelSettings
from inspectd.storage import queries
from inspectd.storage.db import safe_url

# inspectd.models (torch) is imported inside functions: `limit_resources` must run first.
if TYPE_CHECKING:
    from inspectd.models.detector import Detector

log = structlog.get_logger("inspectd.refit")

LOCK = ".refit.lock"
DRIFT_ALPHA = 0.01  # significance a drift verdict needs, beside the KS statistic itself
Progress = Callable[[str, int, int], None]


class RefitError(InspectdError):
    """A refit cannot start or cannot go on (too few frames, another refit running)."""


@dataclass(frozen=True)
class Gate:
    """One promotion gate: `passed` is None where it does not apply."""

    name: str
    passed: bool | None
    result: str  # what was measured, for the table
    limit: str  # what passes
    reason: str | None = None  # one line, when failed or not applicable
    data: dict[str, Any] = field(default_factory=dict)  # the numbers, for --json


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


# -- resources and the lock -----------------------------------------------------------------
@contextmanager
def refit_lock(models_dir: Path, sku: str) -> Iterator[None]:
    """One refit per SKU at a time: a non-blocking flock on models/<sku>/.refit.lock holding
    the owner's pid. The kernel drops the lock when the process ends, however it ends."""
    from inspectd.models.registry import sku_dir

    base = sku_dir(models_dir, sku)
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RefitError(f"refit of SKU {sku} already running (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# -- gates ----------------------------------------------------------------------------------
def ratio_summary(ratios: Sequence[float]) -> dict[str, float | int]:
    r = np.asarray(ratios, dtype=np.float64)
    return {"n": len(r), "median": float(np.median(r)), "p95": float(np.quantile(r, 0.95))}


def false_reject_gate(frame_ids: Sequence[str], scores: np.ndarray, threshold: float,
                      max_rate: float) -> Gate:
    rejected = [f for f, s in zip(frame_ids, scores, strict=True) if s >= threshold]
    n, k = len(frame_ids), len(rejected)
    rate = k / n
    passed = rate <= max_rate
    return Gate(
        "false rejects", passed, f"{k}/{n} = {rate:.1%}", f"≤ {max_rate:.1%}",
        None if passed else f"{k}/{n} = {rate:.1%} held-out OK frames rejected "
        f"(limit {max_rate:.1%}): {_ids(rejected)}",
        {"rejected": k, "heldout": n, "rate": rate, "limit": max_rate, "frame_ids": rejected},
    )


def ng_gate(frame_ids: Sequence[str], scores: np.ndarray, threshold: float) -> Gate:
    if not frame_ids:
        return Gate("confirmed NG", None, "none confirmed", "all rejected",
                    "no operator-confirmed NG frames", {"ng": 0})
    missed = [f for f, s in zip(frame_ids, scores, strict=True) if s < threshold]
    n = len(frame_ids)
    passed = not missed
    return Gate(
        "confirmed NG", passed, f"{n - len(missed)}/{n} rejected", "all rejected",
        None if passed else f"confirmed NG frames passed as OK: {_ids(missed)}",
        {"ng": n, "missed": missed, "scores": dict(zip(frame_ids, map(float, scores),
                                                          strict=True))},
    )


def shift_gate(candidate: Sequence[float], current: Sequence[float] | None, max_shift: float,
               current_name: str | None = None) -> Gate:
    """Scores relative to each model's own threshold: a rising p95 is OK frames moving
    towards a reject, which the false-reject count only shows once they cross it."""
    if current is None:
        return Gate("score shift", None, "no current version", f"p95 rise ≤ {max_shift:.2f}",
                    "no current version to compare with", {"candidate": ratio_summary(candidate)})
    cand, cur = ratio_summary(candidate), ratio_summary(current)
    ks = ks_2samp(candidate, current)
    rise = cand["p95"] - cur["p95"]
    passed = rise <= max_shift
    return Gate(
        "score shift", passed,
        f"p95 {cur['p95']:.2f} → {cand['p95']:.2f}, median {cur['median']:.2f} → "
        f"{cand['median']:.2f}, KS {ks.statistic:.2f}",
        f"p95 rise ≤ {max_shift:.2f}",
        None if passed else f"held-out OK p95 score/threshold rose from {cur['p95']:.2f} "
        f"({current_name}) to {cand['p95']:.2f} (limit +{max_shift:.2f})",
        {"current": cur, "candidate": cand, "p95_rise": rise, "limit": max_shift,
         "ks": float(ks.statistic), "ks_pvalue": float(ks.pvalue)},
    )


def _ids(ids: Sequence[str], most: int = 10) -> str:
    return ", ".join(ids[:most]) + (f" … (+{len(ids) - most})" if len(ids) > most else "")


def _scores(det: Detector, paths: Sequence[str]) -> np.ndarray:
    """Image scores only (the maps of a large set would not fit in memory at once)."""
    from inspectd.models.detector import batched, load_images

    out = [det.score_images(load_images(chunk))[0] for chunk in batched(paths, det.batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


# -- refit ----------------------------------------------------------------------------------
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
    from inspectd.models.artifact import read_manifest

    if current is not None:
        stored = read_manifest(current).get("settings")
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
    from inspectd.models.detector import load_detector
    from inspectd.models.fitting import fit
    from inspectd.models.registry import (
        REFIT_RECORD,
        current_version,
        promote,
        publish,
        sku_dir,
        valid_version,
    )

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
        pool = queries.refit_candidates(url, sku, since=since,
                                        max_images=max_images or r.max_images,
                                        near_threshold=r.near_threshold,
                                        unjudged=previous is None)
        if len(pool) < r.min_images:
            when = f" since {since.isoformat()}" if since else ""
            raise RefitError(
                f"SKU {sku}: {len(pool)} usable OK frames{when} in {safe_url(url)}, refit needs "
                f"at least {r.min_images} (refit.min_images)")
        settings, source = model_settings_for(s, previous[1] if previous else None)
        fit_set, gate_set = split_pool(pool, r.holdout, r.min_holdout, settings.seed)
        ng = queries.confirmed_ng(url, sku)  # all of them, whatever --since: escapes stay out
        log.info("refit", sku=sku, pool=len(pool), fit=len(fit_set), heldout=len(gate_set),
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
                promoted=False, settings_source=source, pool=len(pool), fit_frames=len(fit_set),
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
                    "training": {"pool": len(pool), "fit_frame_ids": [f.frame_id for f in fit_set],
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
    from inspectd.models.detector import load_detector

    step = progress or (lambda *_: None)
    step("gates", 0, 3)
    paths = [f.image_path for f in gate_set]
    ids = [f.frame_id for f in gate_set]
    cand_scores = _scores(cand, paths)
    step("gates", 1, 3)
    ng_scores = _scores(cand, [f.image_path for f in ng])
    step("gates", 2, 3)
    current_ratios = None
    if previous is not None:
        cur = load_detector(previous[1], s.worker.device, s.worker.precision)
        current_ratios = list(_scores(cur, paths) / cur.threshold)
    step("gates", 3, 3)
    return [
        false_reject_gate(ids, cand_scores, cand.threshold, s.refit.max_false_reject),
        ng_gate([f.frame_id for f in ng], ng_scores, cand.threshold),
        shift_gate(list(cand_scores / cand.threshold), current_ratios, s.refit.max_shift,
                   previous and previous[0]),
    ]


# -- drift ----------------------------------------------------------------------------------
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
    from inspectd.models.artifact import read_manifest
    from inspectd.models.registry import current_version

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
