"""Image geometry: original image → model canvas (resize, letterbox, crop) → tiles, and back.

Anomaly maps are computed on the canvas and mapped back to the original image, so saved
masks and overlays line up with the camera frame whatever the model input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from inspectd.core.errors import ConfigError


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class Placement:
    """Where the resized image sits on the canvas (for the inverse mapping)."""

    orig: tuple[int, int]  # original H, W
    box: tuple[int, int, int, int]  # y0, x0, h, w of the image content in resize space
    crop: tuple[int, int]  # y, x offset of the crop in resize space


@dataclass(frozen=True)
class Geometry:
    resize: tuple[int, int]
    crop: tuple[int, int] | None
    keep_aspect: bool
    tile: int | None
    tile_overlap: float

    @classmethod
    def from_settings(cls, p: object) -> Geometry:
        g = cls(
            _pair(p.resize), _pair(p.crop) if p.crop else None, bool(p.keep_aspect),
            p.tile, float(p.tile_overlap),
        )
        h, w = g.canvas
        if g.crop and (g.crop[0] > g.resize[0] or g.crop[1] > g.resize[1]):
            raise ConfigError(f"preprocess.crop {g.crop} is larger than preprocess.resize")
        if g.tile and (g.tile > h or g.tile > w):
            raise ConfigError(f"preprocess.tile {g.tile} is larger than the canvas {h}x{w}")
        return g

    def as_dict(self) -> dict:
        return {
            "resize": list(self.resize), "crop": list(self.crop) if self.crop else None,
            "keep_aspect": self.keep_aspect, "tile": self.tile, "tile_overlap": self.tile_overlap,
        }

    @property
    def canvas(self) -> tuple[int, int]:
        return self.crop or self.resize

    @property
    def input_size(self) -> tuple[int, int]:
        """The size the backbone sees: a tile, or the whole canvas."""
        return (self.tile, self.tile) if self.tile else self.canvas

    def _resize(self, img: np.ndarray, interp: int) -> tuple[np.ndarray, Placement]:
        h0, w0 = img.shape[:2]
        rh, rw = self.resize
        if self.keep_aspect:
            s = min(rh / h0, rw / w0)
            h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
        else:
            h, w = rh, rw
        out = cv2.resize(img, (w, h), interpolation=interp)
        y0, x0 = (rh - h) // 2, (rw - w) // 2
        if (h, w) != (rh, rw):
            out = cv2.copyMakeBorder(
                out, y0, rh - h - y0, x0, rw - w - x0, cv2.BORDER_REPLICATE
            )
        ch, cw = self.canvas
        cy, cx = (rh - ch) // 2, (rw - cw) // 2
        return out[cy : cy + ch, cx : cx + cw], Placement((h0, w0), (y0, x0, h, w), (cy, cx))

    def image_to_canvas(self, img: np.ndarray) -> tuple[np.ndarray, Placement]:
        """HxWx3 uint8 → canvas-sized uint8, area-averaged when shrinking."""
        shrink = img.shape[0] > self.resize[0] or img.shape[1] > self.resize[1]
        return self._resize(img, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def mask_to_canvas(self, mask: np.ndarray) -> np.ndarray:
        m, _ = self._resize(mask.astype(np.uint8), cv2.INTER_NEAREST)
        return m.astype(bool)

    def map_to_image(self, amap: np.ndarray, place: Placement) -> np.ndarray:
        """Canvas-sized float map → original image size (outside the crop: the map's min)."""
        rh, rw = self.resize
        full = np.full((rh, rw), float(amap.min()), dtype=np.float32)
        cy, cx = place.crop
        full[cy : cy + amap.shape[0], cx : cx + amap.shape[1]] = amap
        y0, x0, h, w = place.box
        content = full[y0 : y0 + h, x0 : x0 + w]
        return cv2.resize(content, (place.orig[1], place.orig[0]), interpolation=cv2.INTER_LINEAR)

    def tiles(self) -> list[tuple[int, int]]:
        """Top-left corners of the tiles covering the canvas (the last ones flush to the edge)."""
        if not self.tile:
            return [(0, 0)]
        t = self.tile
        step = max(1, round(t * (1.0 - self.tile_overlap)))

        def starts(n: int) -> list[int]:
            s = list(range(0, max(n - t, 0) + 1, step))
            if s[-1] != n - t:
                s.append(n - t)
            return s

        h, w = self.canvas
        return [(y, x) for y in starts(h) for x in starts(w)]


def to_tensor(canvas: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 HxWx3 → normalised float32 3xHxW."""
    x = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


def split_tiles(x: torch.Tensor, corners: list[tuple[int, int]], tile: int | None) -> torch.Tensor:
    """[B,3,H,W] → [B*T,3,t,t] (image-major)."""
    if not tile:
        return x
    parts = [x[:, :, y : y + tile, xx : xx + tile] for y, xx in corners]
    return torch.stack(parts, 1).flatten(0, 1)


def stitch(
    maps: torch.Tensor, corners: list[tuple[int, int]], canvas: tuple[int, int]
) -> torch.Tensor:
    """[B*T,t,t] tile maps → [B,H,W], averaging where tiles overlap."""
    t = len(corners)
    if t == 1 and maps.shape[-2:] == canvas:
        return maps
    b = maps.shape[0] // t
    maps = maps.view(b, t, *maps.shape[-2:])
    acc = maps.new_zeros(b, *canvas)
    cnt = maps.new_zeros(canvas)
    th, tw = maps.shape[-2:]
    for i, (y, x) in enumerate(corners):
        acc[:, y : y + th, x : x + tw] += maps[:, i]
        cnt[y : y + th, x : x + tw] += 1
    return acc / cnt
