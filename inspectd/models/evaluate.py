"""Evaluation on an MVTec-layout test split: image AUROC, pixel AUROC, PRO, F1-max."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.core.errors import DataError
from inspectd.core.imaging import read_mask
from inspectd.models import metrics
from inspectd.models.datasets.mvtec import test_samples
from inspectd.models.detector import Detector, Prediction, batched, load_images


def evaluate(
    det: Detector,
    root: Path,
    category: str,
    save_pic: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    samples = test_samples(root, category)
    if not samples:
        raise DataError(f"{root / category / 'test'}: no test images")
    labels = np.array([s.label for s in samples])
    scores = np.empty(len(samples), dtype=np.float32)
    h, w = det.geometry.canvas
    maps = np.empty((len(samples), h, w), dtype=np.float32)
    masks = np.zeros((len(samples), h, w), dtype=bool)
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in samples])
    t0 = time.perf_counter()
    done = 0
    for chunk in batched(samples, det.batch_size):
        images = load_images([s.path for s in chunk])
        sc, mp, places = det.score_images(images)
        for j, (s, img, place) in enumerate(zip(chunk, images, places, strict=True)):
            i = done + j
            scores[i], maps[i] = sc[j], mp[j]
            if s.mask_path is not None:
                m = read_mask(s.mask_path)
                if m.shape != img.shape[:2]:
                    raise DataError(f"{s.mask_path}: mask size {m.shape} != image {img.shape[:2]}")
                masks[i] = det.geometry.mask_to_canvas(m)
            if save_pic is not None:
                pred = Prediction(float(sc[j]), det.threshold, det.pixel_threshold,
                                  det.geometry.map_to_image(mp[j], place), img, str(s.path))
                pred.save(save_pic / category / s.defect, s.path.stem)
        done += len(chunk)
        if progress:
            progress(done, len(samples))
    seconds = time.perf_counter() - t0

    result: dict[str, Any] = {"category": category, "images": len(samples),
                              "defects": int(labels.sum())}
    both = 0 < labels.sum() < len(labels)
    result["image_auroc"] = metrics.auroc(labels, scores) if both else None
    result["f1_max"] = metrics.f1_max(labels, scores)[0] if labels.any() else None
    pixel = masks[has_mask]
    if pixel.any() and (~pixel).any():
        result["pixel_auroc"] = metrics.pixel_auroc(pixel, maps[has_mask])
        result["pro"] = metrics.aupro(pixel, maps[has_mask])
    else:  # image-level data (no ground-truth masks)
        result["pixel_auroc"] = result["pro"] = None
    pred_ng = scores >= det.threshold
    good = labels == 0
    result["threshold"] = det.threshold
    result["false_reject_rate"] = float(pred_ng[good].mean()) if good.any() else None
    result["escape_rate"] = float((~pred_ng[~good]).mean()) if (~good).any() else None
    result["ms_per_image"] = 1000.0 * seconds / len(samples)
    return result


KEYS = ("image_auroc", "pixel_auroc", "pro", "f1_max")


def mean_metrics(results: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in KEYS:
        vals = [r[key] for r in results if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out
