"""A synthetic data-set generator in the MVTec-AD layout (for tests and the demo).

Each category kind renders good images with random variation (texture phase, object pose and
brightness) and draws defects procedurally; each defect's mask is exactly the drawn shape.
Output: OUT/CATEGORY/train/good/000.png, OUT/CATEGORY/test/<good or defect>/000.png and
OUT/CATEGORY/ground_truth/<defect>/000_mask.png.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inspectd.core.errors import ConfigError

Image = np.ndarray  # HxWx3 float32 RGB (or HxW gray) in 0..255
Mask = np.ndarray  # HxW bool


@dataclass(frozen=True)
class Kind:
    """A generator kind: what it renders and which defects it draws."""

    description: str
    defects: tuple[str, ...]
    gray: bool = False  # written as single-channel PNGs


CATEGORIES: dict[str, Kind] = {
    "texture": Kind("colour woven fabric, random phase and slight rotation",
                    ("hole", "scratch", "stain")),
    "object": Kind("round metal nut with three lugs, a bore and bolt holes on a dark background, "
                   "pose and brightness jitter",
                   ("chip", "hole", "missing_part", "scratch", "stain")),
    "gray_texture": Kind("grayscale wood/brushed grain, random phase", ("hole", "scratch", "stain"),
                         gray=True),
}


# ---------------------------------------------------------------------------- noise and shapes

def _smooth_noise(rng: np.random.Generator, size: int, sigma: float,
                  sigma_y: float | None = None) -> np.ndarray:
    """Gaussian-blurred white noise, normalised to zero mean and unit std."""
    n = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0),
                         sigmaX=sigma, sigmaY=sigma if sigma_y is None else sigma_y,
                         borderType=cv2.BORDER_REFLECT)
    return (n - n.mean()) / (n.std() + 1e-6)


def _blob(rng: np.random.Generator, size: int, center: tuple[float, float],
          radius: float, wobble: float = 0.3) -> Mask:
    """An irregular, star-shaped filled blob."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += wobble / k * rng.uniform(0.4, 1.0) * np.sin(k * t + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(t), radius * r * np.sin(t) * aspect
    pts = np.stack([center[0] + x * np.cos(rot) - y * np.sin(rot),
                    center[1] + x * np.sin(rot) + y * np.cos(rot)], axis=1)
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _curve(rng: np.random.Generator, size: int, p0: np.ndarray, p1: np.ndarray,
           thickness: int) -> Mask:
    """A thin, gently bent line (quadratic Bezier) from p0 to p1."""
    mid = (p0 + p1) / 2
    normal = np.array([p0[1] - p1[1], p1[0] - p0[0]])
    ctrl = mid + normal * rng.uniform(-0.35, 0.35)
    t = np.linspace(0, 1, 64)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p1
    m = np.zeros((size, size), np.uint8)
    cv2.polylines(m, [np.round(pts).astype(np.int32)], False, 1, thickness, cv2.LINE_8)
    return m.astype(bool)


def _disc(size: int, center: tuple[float, float], radius: float) -> Mask:
    yy, xx = np.ogrid[:size, :size]
    return (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2


def _lum(img: Image, mask: Mask) -> float:
    return float(img[mask].mean())


# ---------------------------------------------------------------------------- surface defects

def _surface_defect(rng: np.random.Generator, img: Image, defect: str, region: Mask,
                    scale: float, clip: Mask | None = None) -> Mask:
    """Draws scratch/stain/hole centred in `region`, clipped to `clip`; returns the mask.

    `scale` is the typical feature length in pixels (a fraction of the image or object size).
    """
    clip = region if clip is None else clip
    size = img.shape[0]
    ys, xs = np.nonzero(region)
    for _ in range(50):
        i = rng.integers(len(xs))
        c = np.array([xs[i], ys[i]], np.float64)
        if defect == "scratch":
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.55, 0.9) * scale
            d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
            mask = _curve(rng, size, c - d, c + d, max(1, round(size / 128))) & clip
        elif defect == "stain":
            mask = _blob(rng, size, c, rng.uniform(0.13, 0.2) * scale, wobble=0.45) & clip
        else:  # hole
            mask = _blob(rng, size, c, max(2.0, rng.uniform(0.07, 0.1) * scale), 0.25) & clip
        if mask.sum() >= max(6, 0.001 * size * size):
            break
    bright = _lum(img, mask) < 120
    if defect == "scratch":
        value = rng.uniform(215, 245) if bright else rng.uniform(15, 40)
        img[mask] = value + rng.normal(0, 6, size=img[mask].shape)
    elif defect == "stain":
        alpha = 0.65 + 0.25 * np.clip(_smooth_noise(rng, size, max(1.0, size / 64)), -1, 1)
        if img.ndim == 3:  # coffee, oil, rust
            tint = rng.choice(np.array([[95, 55, 25], [55, 60, 30], [150, 50, 30]], np.float32))
        else:
            tint = np.float32(215 if bright else 35)
        a = alpha[mask][:, None] if img.ndim == 3 else alpha[mask]
        img[mask] = img[mask] * (1 - a) + tint * a
    else:
        img[mask] = rng.uniform(8, 22) + rng.normal(0, 3, size=img[mask].shape)
        rim = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        img[rim] = img[rim] * 0.4 + 80
    return mask


# ---------------------------------------------------------------------------- textures

def _weave(rng: np.random.Generator, size: int) -> Image:
    """Colour basket-weave fabric: warp and weft threads alternating over/under."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(-0.05, 0.05)
    period = size / 16 * rng.uniform(0.97, 1.03)
    a = (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 2)
    b = (-xx * np.sin(angle) + yy * np.cos(angle)) / period + rng.uniform(0, 2)
    fa, fb = a - np.floor(a), b - np.floor(b)
    warp_on_top = (np.floor(a) + np.floor(b)) % 2 == 0
    sa, sb = np.sin(np.pi * fa) ** 0.6, np.sin(np.pi * fb) ** 0.6
    height = np.where(warp_on_top, sa * (0.75 + 0.25 * sb), sb * (0.75 + 0.25 * sa))
    streak = max(1.0, size / 40)
    fibre = np.where(warp_on_top, _smooth_noise(rng, size, 0.6, streak),
                     _smooth_noise(rng, size, streak, 0.6))
    light = 1 + 0.05 * _smooth_noise(rng, size, size / 4)
    shade = (0.35 + 0.65 * height) * (1 + 0.08 * fibre) * light
    jitter = rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    warp = np.array([70, 105, 160], np.float32) * jitter  # denim blue
    weft = np.array([185, 170, 140], np.float32) * jitter  # beige
    colour = np.where(warp_on_top[..., None], warp, weft)
    return colour * shade[..., None] + rng.normal(0, 3, (size, size, 3)).astype(np.float32)


def _grain(rng: np.random.Generator, size: int) -> Image:
    """Grayscale wood/brushed-metal grain: warped growth rings plus fine streaks."""
    yy = np.mgrid[:size, :size][0].astype(np.float32)
    warp = _smooth_noise(rng, size, size / 10)
    rings = np.sin(2 * np.pi * (yy / (size / 9) + 0.6 * warp) + rng.uniform(0, 2 * np.pi))
    streaks = _smooth_noise(rng, size, size / 12, 0.7)
    base = rng.uniform(125, 140)
    return (base + 28 * rings + 14 * streaks + rng.normal(0, 3, (size, size))).astype(np.float32)


def _texture_sample(rng: np.random.Generator, size: int, kind: str,
                    defect: str | None) -> tuple[Image, Mask | None]:
    img = _grain(rng, size) if kind == "gray_texture" else _weave(rng, size)
    if defect is None:
        return img, None
    region = np.zeros((size, size), bool)
    margin = size // 8
    region[margin:-margin, margin:-margin] = True
    return img, _surface_defect(rng, img, defect, region, scale=0.4 * size)


# ---------------------------------------------------------------------------- object

def _object_sample(rng: np.random.Generator, size: int,
                   defect: str | None) -> tuple[Image, Mask | None]:
    """A round metal nut with three lugs, a bore and three bolt holes, on a dark background."""
    c = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    radius = 0.28 * size * rng.uniform(0.98, 1.02)
    theta = np.deg2rad(90 + rng.uniform(-8, 8))
    disc, bore = _disc(size, c, radius), _disc(size, c, 0.34 * radius)
    lugs, bolts = [], []
    for k in range(3):
        phi = theta + k * 2 * np.pi / 3
        u = np.array([np.cos(phi), np.sin(phi)])
        lug = np.zeros((size, size), np.uint8)
        w = np.array([-u[1], u[0]]) * 0.15 * radius
        p0, p1 = c + u * 0.8 * radius, c + u * 1.22 * radius
        cv2.fillConvexPoly(lug, np.round([p0 - w, p1 - w, p1 + w, p0 + w]).astype(np.int32), 1)
        lugs.append(lug.astype(bool) | _disc(size, p1, 0.15 * radius))
        phi += np.pi / 3
        bolts.append(_disc(size, c + np.array([np.cos(phi), np.sin(phi)]) * 0.66 * radius,
                           max(1.5, 0.1 * radius)))
    mask = None
    if defect == "missing_part":
        k = int(rng.integers(3))
        if rng.random() < 0.5:
            mask = lugs[k] & ~disc
            lugs[k] = np.zeros_like(disc)
        else:
            mask, bolts[k] = bolts[k], np.zeros_like(disc)
    shape = (disc | np.any(lugs, axis=0)) & ~bore & ~np.any(bolts, axis=0)
    if defect == "chip":  # a bite out of the rim, between two lugs
        phi = theta + np.pi / 3 + int(rng.integers(3)) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3)
        edge = c + np.array([np.cos(phi), np.sin(phi)]) * radius
        mask = _blob(rng, size, edge, max(2.5, rng.uniform(0.16, 0.23) * radius), 0.5) & shape
        shape &= ~mask

    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dist = np.hypot(xx - c[0], yy - c[1])
    ang = np.arctan2(yy - c[1], xx - c[0])
    light = rng.uniform(-0.2, 0.2) + np.pi / 4
    metal = 0.78 + 0.17 * np.cos(2 * (ang - light)) + 0.03 * np.sin(dist / (0.02 * radius))
    bevel = (dist < 0.48 * radius) | ((dist > 0.9 * radius) & disc)
    metal = np.where(bevel, 0.85 - 0.2 * np.cos(2 * (ang - light)), metal)
    metal *= rng.uniform(0.92, 1.08) * (1 + 0.015 * _smooth_noise(rng, size, 1.0))
    outline = shape & ~cv2.erode(shape.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    metal = np.where(outline, metal * 0.55, metal)
    steel = np.array([182, 180, 172], np.float32)
    background = np.array([34, 36, 40], np.float32) * rng.uniform(0.95, 1.05)
    img = np.where(shape[..., None], steel * metal[..., None], background)
    img += rng.normal(0, 2.5, img.shape).astype(np.float32)
    if defect in ("scratch", "stain", "hole"):
        face = shape & (dist > 0.45 * radius) & (dist < 0.85 * radius)
        mask = _surface_defect(rng, img, defect, face, 1.3 * radius, shape & (dist > 0.4 * radius))
    return img, mask


# ---------------------------------------------------------------------------- writing

_Render = Callable[[np.random.Generator, int, str | None], tuple[Image, Mask | None]]


def _renderer(kind: str) -> _Render:
    if kind == "object":
        return _object_sample
    return lambda rng, size, defect: _texture_sample(rng, size, kind, defect)


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    buf.tofile(path)


def _clear_old(directory: Path) -> None:
    """Removes files a previous run wrote (NNN.png, NNN_mask.png) so counts stay right."""
    if directory.is_dir():
        for p in directory.iterdir():
            if re.fullmatch(r"\d{3,}(_mask)?\.png", p.name):
                p.unlink()


def _split(n: int, k: int) -> list[int]:
    return [n // k + (i < n % k) for i in range(k)]


def generate(out: Path, categories: Sequence[str] = ("texture", "object"), *, n_train: int = 60,
             n_test_good: int = 12, n_test_defect: int = 18, size: int = 256,
             seed: int = 0) -> Path:
    """Writes a synthetic MVTec-layout data set under `out` (one dir per category); returns out.

    Test defect images are split evenly over the category's defect types. Deterministic per seed.
    """
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        known = ", ".join(CATEGORIES)
        raise ConfigError(f"unknown synthetic categories {unknown} (known: {known})")
    if size < 32 or min(n_train, n_test_good, n_test_defect, seed) < 0:
        raise ConfigError("synthetic data needs size >= 32 and non-negative counts and seed")
    out = Path(out)
    for category in categories:
        kind = CATEGORIES[category]
        render = _renderer(category)
        cat_seed = zlib.crc32(category.encode())
        jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
        jobs += [("test", d, n) for d, n in
                 zip(kind.defects, _split(n_test_defect, len(kind.defects)), strict=True)]
        for split_no, (split, defect, n) in enumerate(jobs):
            directory = out / category / split / defect
            gt = out / category / "ground_truth" / defect
            _clear_old(directory)
            _clear_old(gt)
            width = max(3, len(str(n - 1)))
            for i in range(n):
                rng = np.random.default_rng([seed, cat_seed, split_no, i])
                img, mask = render(rng, size, None if defect == "good" else defect)
                if kind.gray and img.ndim == 3:
                    img = img.mean(axis=2)
                _write_png(directory / f"{i:0{width}d}.png",
                           np.clip(np.round(img), 0, 255).astype(np.uint8))
                if mask is not None:
                    _write_png(gt / f"{i:0{width}d}_mask.png", mask.astype(np.uint8) * 255)
    return out
