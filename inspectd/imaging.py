"""Pictures of an anomaly map: colour heat map and overlay (numpy + OpenCV only, no torch)."""

from __future__ import annotations

import cv2
import numpy as np


def heatmap(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """BGR colour map; the pixel threshold sits at mid-scale so images compare."""
    scale = 2.0 * pixel_threshold if pixel_threshold > 0 else 1.0
    u8 = np.clip(amap / scale * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_JET)


def overlay(rgb: np.ndarray, amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The heat map blended over the RGB image, defect regions outlined in white (BGR)."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    over = cv2.addWeighted(bgr, 0.6, heatmap(amap, pixel_threshold), 0.4, 0)
    mask = (amap >= pixel_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(over, contours, -1, (255, 255, 255), 1)
    return over
