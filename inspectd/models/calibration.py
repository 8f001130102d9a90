"""Calibration from OK images: the held-out split, the image and pixel thresholds, and the
bf16 check. The thresholds travel inside the artifact, never in a config file.

The OK set is split: most images build the model, the held-out rest sets the thresholds
(an estimate of their upper quantile with a margin, or F1-optimal when NG images are
given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog
from scipy.special import ndtri, stdtrit

from inspectd.core.errors import DataError
from inspectd.models.detector import Detector, ImageInput, load_images
from inspectd.models.features import Runtime
from inspectd.models.metrics import f1_max
from inspectd.models.settings import CalibrationSettings, ModelSettings

log = structlog.get_logger("inspectd.fit")


def split_ok(n: int, settings: ModelSettings) -> tuple[np.ndarray, np.ndarray]:
    cal = settings.calibration
    n_hold = max(cal.min_holdout, round(cal.holdout * n))
    if n - n_hold < 1:
        raise DataError(
            f"need more than {n_hold} OK images to fit and calibrate, got {n} "
            "(lower calibration.min_holdout to calibrate on fewer)"
        )
    perm = np.random.default_rng(settings.seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def calibrate(
    det: Detector, holdout: Sequence[ImageInput], ng: Sequence[ImageInput], s: ModelSettings,
    ok: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Thresholds from OK images the model did not see (`holdout`; their scores and maps
    `ok` where the caller has them), and the bf16 check."""
    ok_scores, ok_maps = ok if ok is not None else det.score_images(load_images(holdout))[:2]
    return thresholds(det, ok_scores, ok_maps, ng, s, holdout,
                      f"{len(ok_scores)} held-out OK scores")


def ok_bound(scores: np.ndarray, q: float, rule: str) -> float:
    """The score below which a new OK image falls with probability `q`, from `scores` of OK
    images the model did not fit on.

    quantile: their empirical q-quantile. Distribution-free, but it cannot look past the
    largest of n scores, which a new OK image exceeds about once in n + 1 (once in 7 at
    n = 6), whatever q says. The other rules take the larger of that and a log-normal fit's
    q-quantile, exp(m + k · s · √(1 + 1/n)), m and s the log scores' mean and standard
    deviation, √(1 + 1/n) for the uncertainty of m:
    lognormal: k = the normal q-quantile — an estimate of the quantile from all n scores, not
    only the largest; at few scores it still sits a little low (s is uncertain too).
    prediction: k = Student's t q-quantile at n − 1 degrees of freedom — the prediction
    bound, exceeded by a new OK image of that population with probability exactly 1 − q at
    any n ≥ 2, at the price of a high threshold (more escapes) at 3–5 scores.
    The empirical quantile takes over where there are enough scores to show a tail heavier
    than log-normal. Image scores are distances, so positive; where one is not, the fit is
    normal on the raw scores."""
    scores = np.asarray(scores, np.float64)
    empirical = float(np.quantile(scores, q))
    n = len(scores)
    if rule == "quantile" or n < 2 or q >= 1.0:
        return empirical
    positive = bool((scores > 0).all())
    x = np.log(scores) if positive else scores
    k = stdtrit(n - 1, q) if rule == "prediction" else ndtri(q)
    fitted = x.mean() + k * x.std(ddof=1) * np.sqrt(1 + 1 / n)
    return max(empirical, float(np.exp(fitted) if positive else fitted))


def image_threshold(ok_scores: np.ndarray, cal: CalibrationSettings,
                    rule: str | None = None) -> float:
    """The image threshold from OK scores: `rule`'s (by default cal.rule) estimate of their
    cal.quantile, × (1 + cal.margin)."""
    return ok_bound(ok_scores, cal.quantile, rule or cal.rule) * (1.0 + cal.margin)


def thresholds(det: Detector, ok_scores: np.ndarray, ok_pixels: np.ndarray,
               ng: Sequence[ImageInput], s: ModelSettings,
               bf16_items: Sequence[ImageInput], what: str,
               ng_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Image threshold from OK scores the model did not fit on (held out, or cross-fitted),
    F1-optimal when NG images are given (scored by `det`, unless `ng_scores` gives their
    scores on the OK scores' scale); pixel threshold from those images' map pixels; and
    whether bf16 keeps the scores of `bf16_items` within calibration.bf16_tolerance."""
    cal = s.calibration
    det.threshold = image_threshold(ok_scores, cal)
    bound = {"lognormal": "the larger of the quantile and a log-normal fit's quantile",
             "prediction": "the larger of the quantile and a log-normal prediction bound",
             "quantile": "quantile"}[cal.rule]
    method = f"{bound} at {cal.quantile} of {what} × (1 + {cal.margin})"
    if len(ng) and ng_scores is None:
        ng_scores, _, _ = det.score_images(load_images(ng))
    if ng_scores is not None:
        labels = np.r_[np.zeros(len(ok_scores)), np.ones(len(ng_scores))]
        both = np.r_[ok_scores, ng_scores]
        f1, t = f1_max(labels, both)
        # F1-max puts the threshold on the lowest NG score it keeps; halfway down to the next
        # lower score keeps the same verdicts with a margin on both sides (a bf16 run, a
        # slightly different camera frame must not flip that NG to OK).
        below = both[both < t]
        det.threshold = float((t + below.max()) / 2 if below.size else t)
        method = f"F1-optimal on {what} and {len(ng_scores)} NG (F1 {f1:.3f})"
    det.pixel_threshold = float(np.quantile(ok_pixels, cal.pixel_quantile)) * (1.0 + cal.margin)
    return {
        "threshold": {"image": det.threshold, "pixel": det.pixel_threshold, "method": method,
                      "rule": cal.rule, "quantile": cal.quantile, "margin": cal.margin,
                      "pixel_quantile": cal.pixel_quantile},
        "calibration": {
            "heldout_ok_scores": [float(v) for v in ok_scores],
            "ng_scores": None if ng_scores is None else [float(v) for v in ng_scores],
        },
        "precision": bf16_check(det, bf16_items, s),
    }


def bf16_check(det: Detector, items: Sequence[ImageInput], s: ModelSettings) -> dict[str, Any]:
    """bf16 autocast is a large CPU speed-up (AMX); allow it only where scores barely move:
    max |score_bf16 − score_fp32| / threshold on `items` ≤ calibration.bf16_tolerance."""
    precision: dict[str, Any] = {"bf16_ok": False, "bf16_max_rel_dev": None}
    images = load_images(items)
    fp32_runtime = det.runtime
    fp32_scores, _, _ = det.score_images(images)
    det.runtime = Runtime(fp32_runtime.device, True, fp32_runtime.channels_last)
    try:
        bf_scores, _, _ = det.score_images(images)
        dev = float(np.max(np.abs(bf_scores - fp32_scores)) / max(det.threshold, 1e-12))
        precision = {"bf16_ok": dev <= s.calibration.bf16_tolerance, "bf16_max_rel_dev": dev}
    except RuntimeError as e:  # no bf16 kernels on this device
        log.warning("bf16 check failed", error=str(e))
    finally:
        det.runtime = fp32_runtime
    return precision
