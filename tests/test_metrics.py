import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from inspectd.core.errors import DataError
from inspectd.models.metrics import aupro, auroc, f1_max, pixel_auroc


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _blob_masks_and_maps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Six 32x32 images with random defect blobs (two defect-free) and noisy maps."""
    masks = np.zeros((6, 32, 32), dtype=bool)
    for img in range(4):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(2, 28, size=2)
            h, w = rng.integers(1, 6, size=2)
            masks[img, y : y + h, x : x + w] = True
    smooth = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 2, 2))
    maps = (smooth + 0.3 * rng.random(masks.shape)).astype(np.float32)
    return masks, maps


def test_auroc_matches_sklearn_on_random_scores(rng):
    for n_pos in (1, 37, 500):
        labels = np.zeros(1000, dtype=bool)
        labels[rng.choice(1000, n_pos, replace=False)] = True
        scores = rng.normal(size=1000).astype(np.float32) + labels
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_matches_sklearn_with_ties(rng):
    labels = rng.integers(0, 2, size=5000)
    scores = rng.integers(0, 5, size=5000) + labels  # few distinct values, many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # more positives than negatives exercises the other search direction
    labels = (rng.random(5000) < 0.9).astype(np.uint8)
    scores = rng.integers(0, 3, size=5000).astype(np.float32)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_perfect_inverted_and_constant_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(labels, scores) == 1.0
    assert auroc(labels, -scores) == 0.0
    assert auroc(labels, np.zeros(5)) == 0.5


def test_auroc_rejects_single_class_and_nan():
    with pytest.raises(DataError, match="one class"):
        auroc(np.ones(4), np.arange(4.0))
    with pytest.raises(DataError, match="one class"):
        auroc(np.zeros(4, dtype=bool), np.arange(4.0))
    with pytest.raises(DataError, match="NaN"):
        auroc(np.array([0, 1, 0]), np.array([0.1, np.nan, 0.2]))


def test_pixel_auroc_matches_sklearn_on_random_maps(rng):
    masks, maps = _blob_masks_and_maps(rng)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-12)


def test_aupro_hand_computed_step_map():
    # One 1x13 image: region A = pixels 0-1 (area 2), region B = pixel 3 (area 1),
    # 10 negatives. Scores: A = (3, 1), B = 2, negative pixel 2 = 2 (tied with B), rest 0.
    mask = np.array([[[1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]], dtype=bool)
    amap = np.array([[[3, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]]], dtype=np.float32)
    # t=3: PRO = (1/2 + 0)/2 = 0.25, FPR = 0;   t=2: PRO = (1/2 + 1)/2 = 0.75, FPR = 0.1
    # t=1: PRO = 1, FPR = 0.1;                   t=0: PRO = 1, FPR = 1
    # Area to FPR 0.3: (0.1 * (0.25 + 0.75) / 2) + (0.2 * 1) = 0.25; / 0.3 = 5/6.
    assert aupro(mask, amap) == pytest.approx(5 / 6, abs=1e-12)
    # Thresholds linspace(0, 3, 4) are exactly the distinct scores, so the sweep agrees.
    assert aupro(mask, amap, num_thresholds=4) == pytest.approx(5 / 6, abs=1e-12)


def test_aupro_regions_use_8_connectivity():
    # Pixels (0,0) and (1,1) touch diagonally: one region of area 2, plus region (3,3).
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 3, 3] = True
    amap = np.zeros((1, 4, 4))
    amap[0, 0, 0] = 1.0
    # t=1: PRO = (1/2 + 0)/2 = 0.25 at FPR 0; then straight to (1, 1). At FPR 0.3 PRO = 0.475;
    # area = 0.3 * (0.25 + 0.475) / 2, normalised: 0.3625 (4-connectivity would give 0.4333).
    assert aupro(mask, amap) == pytest.approx(0.3625, abs=1e-12)


def test_aupro_perfect_map_is_one(rng):
    masks, _ = _blob_masks_and_maps(rng)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, masks.astype(np.float32), num_thresholds=10) == pytest.approx(1.0)


def test_aupro_exact_and_threshold_sweep_agree(rng):
    masks, maps = _blob_masks_and_maps(rng)
    exact = aupro(masks, maps)
    assert 0.0 < exact < 1.0
    assert aupro(masks, maps, num_thresholds=1000) == pytest.approx(exact, abs=1e-2)


def test_aupro_exact_matches_brute_force_threshold_loop(rng):
    masks, maps = _blob_masks_and_maps(rng)
    maps = np.round(maps * 20) / 20  # ties between regions and background
    labeled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, lab == k) for i, lab in enumerate(labeled) for k in range(1, lab.max() + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= 0.3
    x = np.append(fprs[keep], 0.3)
    y = np.append(pros[keep], np.interp(0.3, fprs, pros))  # fpr > 0.3 is strictly increasing
    expected = np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2 / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-10)


def test_aupro_rejects_missing_regions_or_negatives():
    with pytest.raises(DataError, match="defect region"):
        aupro(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(DataError, match="defect region"):
        aupro(np.ones((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(DataError, match="same shape"):
        aupro(np.ones((2, 4, 4)), np.ones((2, 4, 5)))


def test_f1_max_matches_sklearn_precision_recall_curve(rng):
    for scores, labels in [
        (rng.normal(size=2000), rng.random(2000) < 0.2),
        (rng.integers(0, 6, size=2000).astype(np.float32), rng.random(2000) < 0.5),
    ]:
        scores = scores + labels
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
        best, threshold = f1_max(labels, scores)
        assert best == pytest.approx(f1.max(), abs=1e-12)
        assert threshold == thresholds[np.argmax(f1[:-1])]
        assert threshold in scores


def test_f1_max_perfect_separation():
    best, threshold = f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9]))
    assert (best, threshold) == (1.0, pytest.approx(0.7))
