"""Promotion gates: what a refit candidate must pass before it replaces the current version.

All are reported; any failure keeps the current version:
  false rejects   candidate's rejects among the held-out gate set not significantly above
                  refit.max_false_reject, nor above the current version's on the same frames
  confirmed NG    every operator-confirmed NG frame is rejected by the candidate
  score shift     on the gate set, p95 of score/threshold may rise by ≤ refit.max_shift over
                  the current version's (both score the same images with their own threshold)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binom, ks_2samp


@dataclass(frozen=True)
class Gate:
    """One promotion gate: `passed` is None where it does not apply."""

    name: str
    passed: bool | None
    result: str  # what was measured, for the table
    limit: str  # what passes
    reason: str | None = None  # one line, when failed or not applicable
    data: dict[str, Any] = field(default_factory=dict)  # the numbers, for --json


def ratio_summary(ratios: Sequence[float]) -> dict[str, float | int]:
    r = np.asarray(ratios, dtype=np.float64)
    return {"n": len(r), "median": float(np.median(r)), "p95": float(np.quantile(r, 0.95))}


ALPHA = 0.05  # a gate fails on evidence at this level, not on a count that small sets force


def false_reject_gate(frame_ids: Sequence[str], scores: np.ndarray, threshold: float,
                      max_rate: float, current: np.ndarray | None = None,
                      current_threshold: float | None = None) -> Gate:
    """Held-out OK frames the candidate rejects. It fails only on evidence, so a small gate
    set can pass a good candidate (12 frames and a 1 % limit would otherwise demand 0):

    * its false-reject rate is significantly above `max_rate` (exact one-sided binomial
      test: P(≥ k rejects | n frames, rate max_rate) < ALPHA), or
    * with a current version, scored on the same frames: the candidate rejects
      significantly more of them (exact sign test on the frames only one of the two
      rejects: P(≥ b | b + c, ½) < ALPHA, b = only the candidate, c = only the current).

    A current version that rejects more than the limit itself does not fail the candidate."""
    cand = np.asarray(scores) >= threshold
    rejected = [f for f, r in zip(frame_ids, cand, strict=True) if r]
    n, k = len(frame_ids), len(rejected)
    rate = k / n
    p_limit = float(binom.sf(k - 1, n, max_rate)) if k else 1.0
    data: dict[str, Any] = {"rejected": k, "heldout": n, "rate": rate, "limit": max_rate,
                            "p_above_limit": p_limit, "frame_ids": rejected}
    reasons = []
    if p_limit < ALPHA:
        reasons.append(f"{k}/{n} = {rate:.1%} held-out OK frames rejected, significantly "
                       f"above {max_rate:.1%} (p = {p_limit:.2g}): {_ids(rejected)}")
    result = f"{k}/{n} = {rate:.1%}"
    if current is not None and current_threshold is not None:
        cur = np.asarray(current) >= current_threshold
        only_cand, only_cur = int((cand & ~cur).sum()), int((~cand & cur).sum())
        p_worse = float(binom.sf(only_cand - 1, only_cand + only_cur, 0.5)) if only_cand else 1.0
        data.update(current_rejected=int(cur.sum()), only_candidate=only_cand,
                    only_current=only_cur, p_worse=p_worse)
        result += f" (current {int(cur.sum())}/{n})"
        if p_worse < ALPHA:
            reasons.append(f"the candidate rejects {only_cand} held-out OK frames the current "
                           f"version passes, against {only_cur} the other way (p = "
                           f"{p_worse:.2g})")
    passed = not reasons
    return Gate("false rejects", passed, result,
                f"not significantly above {max_rate:.1%} or the current version",
                None if passed else "; ".join(reasons), data)


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
