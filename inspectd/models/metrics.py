"""Anomaly-detection evaluation metrics (image/pixel AUROC, AUPRO, F1-max).

Computed the standard way (MVTec AD / anomalib conventions) and equal to scikit-learn's
results; numpy and scipy only, so the daemon does not need scikit-learn at runtime.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from inspectd.core.errors import DataError

__all__ = ["aupro", "auroc", "f1_max", "pixel_auroc"]


def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != bool:
        if np.any((labels != 0) & (labels != 1)):
            raise DataError(f"{name} must be binary (bool or 0/1)")
        labels = labels != 0
    return labels.ravel()


def _check_shapes(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise DataError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; equals sklearn's roc_auc_score, ties counted as half."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check_shapes(labels, scores, "labels and scores")
    lab = _as_binary(labels, "labels")
    flat = scores.ravel()
    pos, neg = np.sort(flat[lab]), np.sort(flat[~lab])  # sorts keep the input dtype (no f64 copy)
    if pos.size == 0 or neg.size == 0:
        raise DataError("AUROC needs both normal and anomalous samples; only one class is present")
    if np.isnan(pos[-1]) or np.isnan(neg[-1]):  # sort puts NaNs last
        raise DataError("scores contain NaN")
    # Mann-Whitney U: for each sample of the smaller class count the larger class below it plus
    # half of the ties. Searching the smaller sorted array into the larger one is the cheap side;
    # integer sums keep it exact.
    small, large = (pos, neg) if pos.size <= neg.size else (neg, pos)
    below = np.searchsorted(large, small, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(large, small, side="right").sum(dtype=np.int64)
    u2 = int(below) + int(below_or_tied)  # 2 * U for the smaller class
    if small is neg:
        u2 = 2 * pos.size * neg.size - u2
    return u2 / (2 * pos.size * neg.size)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC of anomaly maps (N, H, W) against ground-truth masks (N, H, W)."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_shapes(masks, maps, "masks and maps")
    return auroc(masks.ravel(), maps.ravel())


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under a (0,0)..(1,1) curve for fpr <= limit, divided by limit."""
    i = int(np.searchsorted(fpr, limit, side="right"))  # fpr[:i] <= limit < fpr[i]
    x, y = fpr[:i], pro[:i]
    if x[-1] < limit:  # close the curve exactly at the limit by linear interpolation
        t = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x = np.append(x, limit)
        y = np.append(y, pro[i - 1] + t * (pro[i] - pro[i - 1]))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0 / limit)


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    Regions are the 8-connected components of each mask. The exact curve (one point per
    distinct score) is used unless `num_thresholds` asks for that many evenly spaced ones.
    """
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_shapes(masks, maps, "masks and maps")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise DataError(f"masks and maps must be (N, H, W), got shape {masks.shape}")
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    gt = _as_binary(masks, "masks").reshape(masks.shape)
    # 8-connectivity within each image, none across images: label the whole stack at once.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, num_regions = ndimage.label(gt, structure=structure)
    regions = regions.ravel()
    neg = regions == 0
    num_neg = int(np.count_nonzero(neg))
    if num_regions == 0 or num_neg == 0:
        raise DataError("AUPRO needs at least one defect region and some defect-free pixels")
    # Each pixel of a region adds 1/(area * num_regions) to PRO; each negative 1/num_neg to FPR.
    area = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
    weight = np.zeros(num_regions + 1)
    weight[1:] = 1.0 / (area[1:] * num_regions)
    scores = maps.ravel()
    lo, hi = scores.min(), scores.max()
    if np.isnan(lo) or np.isnan(hi):
        raise DataError("maps contain NaN")

    if num_thresholds is None:
        order = np.argsort(scores)[::-1]  # descending; order within ties does not matter
        s = scores[order]
        fp = np.cumsum(neg[order], dtype=np.int64)
        pro = np.cumsum(weight[regions[order]])
        last = np.append(s[1:] != s[:-1], True)  # one point per distinct score
        fp, pro = fp[last], pro[last]
    else:
        if num_thresholds < 2:
            raise DataError("num_thresholds must be at least 2")
        thresholds = np.linspace(lo, hi, num_thresholds)
        # Bucket k holds pixels with thresholds[k] <= score < thresholds[k+1]; a pixel is
        # positive at threshold j iff its bucket is >= j, so reverse cumsums give the curve.
        bucket = np.searchsorted(thresholds, scores, side="right") - 1
        np.clip(bucket, 0, num_thresholds - 1, out=bucket)
        fp = np.cumsum(np.bincount(bucket[neg], minlength=num_thresholds)[::-1])
        pro_sums = np.bincount(bucket, weights=weight[regions], minlength=num_thresholds)
        pro = np.cumsum(pro_sums[::-1])
    fpr = np.concatenate([[0.0], fp / num_neg])
    return _area_up_to(fpr, np.concatenate([[0.0], pro]), fpr_limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds (score >= t is positive) and the lowest score `t` reaching it."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check_shapes(labels, scores, "labels and scores")
    lab = _as_binary(labels, "labels")
    flat = scores.ravel()
    num_pos = int(np.count_nonzero(lab))
    if num_pos == 0:
        raise DataError("F1 needs at least one anomalous sample")
    order = np.argsort(flat)[::-1]
    s = flat[order]
    if np.isnan(s[0]):  # argsort puts NaNs last, so first after reversing
        raise DataError("scores contain NaN")
    tp = np.cumsum(lab[order], dtype=np.int64)
    predicted = np.arange(1, s.size + 1)
    last = np.append(s[1:] != s[:-1], True)  # threshold = each distinct score
    f1 = 2.0 * tp[last] / (predicted[last] + num_pos)  # 2PR/(P+R) without 0/0 at tp == 0
    best = int(np.argmax(f1[::-1]))  # ties: lowest threshold, like anomalib's argmax
    return float(f1[::-1][best]), float(s[last][::-1][best])
