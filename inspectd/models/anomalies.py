"""Synthetic anomalies made from OK images, with exact masks.

A line has OK images of a new product and no defect images, yet a model kind must be chosen
and judged. These anomalies stand in for the defects nobody has: they are pasted into
held-out OK images, and a candidate model that separates them from the untouched images
(image level) and finds them (pixel level) is the one to pick. Four kinds, different enough
that no single model trick catches them all:

* perlin: a Perlin-noise-shaped region filled with foreign texture (another image of the
  set, flipped and colour-shifted), as DRAEM does;
* cutpaste: a patch of the image, colour-jittered, pasted elsewhere (CutPaste);
* scratch: a thin curved line, darker or brighter than what it crosses;
* stain: a smooth blob whose colour shifts the part's.

The mask is exact: a pixel is in it if and only if the anomaly changed it. Locations favour
where the image has structure (an object rather than its empty background), so defects
land where a line's defects would. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

KINDS = ("perlin", "cutpaste", "scratch", "stain")
MIN_AREA, MAX_AREA = 0.003, 0.08  # anomaly size as a fraction of the image
_TRIES = 20


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise, about in [-1, 1], with `cells` lattice cells per axis."""
    h, w = shape
    ch, cw = cells
    angles = rng.uniform(0, 2 * np.pi, (ch + 1, cw + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, ch, h, endpoint=False)
    x = np.linspace(0, cw, w, endpoint=False)
    yi, xi = y.astype(int), x.astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grad[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(xf), fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def _structure(img: np.ndarray) -> np.ndarray:
    """Where the image has structure (gradient magnitude, smoothed), as sampling weights."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mag = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    k = max(3, (min(img.shape[:2]) // 8) | 1)
    return cv2.GaussianBlur(mag, (k, k), 0) + 1e-3


def _center(img: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A point, half the time where the image has structure, else anywhere."""
    h, w = img.shape[:2]
    if rng.random() < 0.5:
        weights = _structure(img).ravel()
        i = rng.choice(weights.size, p=weights / weights.sum())
        return int(i // w), int(i % w)
    return int(rng.integers(h)), int(rng.integers(w))


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and colour shifted enough to be a different material."""
    out = img.astype(np.float32)
    out = (out - out.mean()) * rng.uniform(0.6, 1.5) + out.mean() + rng.uniform(-50, 50)
    out += rng.uniform(-30, 30, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def _perlin(img: np.ndarray, rng: np.random.Generator, foreign: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    cells = (int(2 ** rng.integers(1, 5)), int(2 ** rng.integers(1, 5)))
    region = perlin_noise((h, w), cells, rng) > rng.uniform(0.3, 0.6)
    n, labels = cv2.connectedComponents(region.astype(np.uint8))
    if n < 2:
        return img
    # One blob of the noise, the one nearest a chosen point (keeps the size in check).
    cy, cx = _center(img, rng)
    ys, xs = np.nonzero(labels)
    j = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
    region = labels == labels[ys[j], xs[j]]
    texture = cv2.resize(_jitter(foreign, rng), (w, h))
    texture = np.ascontiguousarray(texture[::-1] if rng.random() < 0.5 else texture[:, ::-1])
    beta = rng.uniform(0.0, 0.6)  # how much of the original shows through
    out = img.copy()
    out[region] = (beta * img[region] + (1 - beta) * texture[region]).astype(np.uint8)
    return out


def _cutpaste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    area = rng.uniform(MIN_AREA, MAX_AREA) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 2, h - 1))
    pw = int(np.clip(np.sqrt(area / aspect), 2, w - 1))
    sy, sx = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    patch = _jitter(img[sy:sy + ph, sx:sx + pw], rng)
    if rng.random() < 0.5:
        patch = np.ascontiguousarray(patch[::-1])
    cy, cx = _center(img, rng)
    y0, x0 = int(np.clip(cy - ph // 2, 0, h - ph)), int(np.clip(cx - pw // 2, 0, w - pw))
    out = img.copy()
    out[y0:y0 + ph, x0:x0 + pw] = patch
    return out


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    cy, cx = _center(img, rng)
    length = rng.uniform(0.15, 0.5) * min(h, w)
    angle = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.3, 0.3) * length
    t = np.linspace(-0.5, 0.5, 32)
    xs = cx + t * length * np.cos(angle) - bend * (1 - 4 * t * t) * np.sin(angle)
    ys = cy + t * length * np.sin(angle) + bend * (1 - 4 * t * t) * np.cos(angle)
    pts = np.stack([xs, ys], 1).round().astype(np.int32)
    local = img[max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8].mean()
    value = 255.0 if local < 128 else 0.0  # against what it crosses
    drawn = np.zeros((h, w), np.uint8)
    cv2.polylines(drawn, [pts], False, 1, int(rng.integers(1, 4)), cv2.LINE_8)
    out = img.copy()
    strength = rng.uniform(0.5, 0.9)
    sel = drawn.astype(bool)
    out[sel] = (img[sel] * (1 - strength) + value * strength).astype(np.uint8)
    return out


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    cy, cx = _center(img, rng)
    area = rng.uniform(MIN_AREA, MAX_AREA) * h * w
    ry = np.sqrt(area / np.pi) * rng.uniform(0.6, 1.6)
    rx = area / np.pi / ry
    blob = np.zeros((h, w), np.float32)
    cv2.ellipse(blob, (cx, cy), (max(int(rx), 1), max(int(ry), 1)),
                float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    k = (max(3, int(min(rx, ry)) | 1))
    blob = cv2.GaussianBlur(blob, (k, k), 0)
    alpha = np.where(blob >= 0.5, blob, 0.0)[..., None] * rng.uniform(0.4, 0.9)
    shift = rng.uniform(-80, 80, 3)
    out = np.clip(img + alpha * shift, 0, 255).astype(np.uint8)
    return out


def make(img: np.ndarray, kind: str, rng: np.random.Generator,
         foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An anomalous copy of an RGB uint8 image and its exact mask (pixels it changed).
    `foreign`: an image to take texture from (perlin); the image itself when None."""
    if kind not in KINDS:
        raise ValueError(f"unknown anomaly kind {kind!r}; one of {', '.join(KINDS)}")
    h, w = img.shape[:2]
    for _ in range(_TRIES):
        if kind == "perlin":
            out = _perlin(img, rng, img if foreign is None else foreign)
        elif kind == "cutpaste":
            out = _cutpaste(img, rng)
        elif kind == "scratch":
            out = _scratch(img, rng)
        else:
            out = _stain(img, rng)
        mask = (out != img).any(axis=2)
        if MIN_AREA / 10 * h * w <= mask.sum() <= 2 * MAX_AREA * h * w:
            return out, mask
    return out, mask  # a flat image may never change much: the mask still says where


def make_set(images: Sequence[np.ndarray], seed: int = 0,
             kinds: Sequence[str] = KINDS) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One anomaly of each kind per image, seeded: [(image, mask, kind), ...]."""
    rng = np.random.default_rng(seed)
    out = []
    for i, img in enumerate(images):
        foreign = images[(i + 1) % len(images)]
        for kind in kinds:
            anomalous, mask = make(img, kind, rng, foreign)
            out.append((anomalous, mask, kind))
    return out


def make_one_each(images: Sequence[np.ndarray], seed: int = 0,
                  kinds: Sequence[str] = KINDS) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One anomaly per image, the kinds in turn, seeded: [(image, mask, kind), ...]."""
    rng = np.random.default_rng(seed)
    return [(*make(img, kinds[i % len(kinds)], rng, images[(i + 1) % len(images)]),
             kinds[i % len(kinds)]) for i, img in enumerate(images)]
