"""The images a model was fitted on, and whether a frame is like them.

A model judges parts like the ones it learnt from. A frame of another size, bit depth or
brightness (a wrong camera setting, a lens cap, a test pattern, a stray file) is outside its
domain: the line audits it ERROR with the reason instead of a score that means nothing. The
bounds are generous: they catch a different kind of image, never a defect (a defect is
judged NG by the model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

SIZE_SLACK = 0.5  # a side may be this much smaller or larger than any training image's
BRIGHTNESS_SLACK = 64.0  # grey levels (of 255) beyond the training images' mean brightness


def _brightness(img: np.ndarray) -> float:
    """Mean grey level on the 8-bit scale (16-bit images are compared as the model sees them)."""
    img = np.asarray(img)
    if img.dtype == np.uint16:
        return float((img >> 8).mean())
    return float(img.mean())


@dataclass(frozen=True)
class Domain:
    height: tuple[int, int]  # min, max over the training images
    width: tuple[int, int]
    bit_depth: tuple[int, ...]  # 8 and/or 16
    brightness: tuple[float, float]  # min, max of the images' mean grey level (0–255)

    @classmethod
    def of(cls, images: Iterable[np.ndarray]) -> Domain:
        """From the training images as stored (uint8 or uint16, gray or colour)."""
        hs, ws, depths, means = [], [], set(), []
        for img in images:
            hs.append(img.shape[0])
            ws.append(img.shape[1])
            depths.add(8 * img.dtype.itemsize)
            means.append(_brightness(img))
        if not hs:
            raise ValueError("a domain needs at least one image")
        return cls((min(hs), max(hs)), (min(ws), max(ws)), tuple(sorted(depths)),
                   (min(means), max(means)))

    def as_dict(self) -> dict[str, Any]:
        return {"height": list(self.height), "width": list(self.width),
                "bit_depth": list(self.bit_depth), "brightness": list(self.brightness)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Domain:
        return cls(tuple(d["height"]), tuple(d["width"]), tuple(d["bit_depth"]),
                   tuple(d["brightness"]))

    def problem(self, img: np.ndarray) -> str | None:
        """Why a frame (as it arrived: uint8/uint16, gray or colour) is outside this domain,
        or None when it is inside."""
        h, w = img.shape[:2]
        for side, got, (lo, hi) in (("height", h, self.height), ("width", w, self.width)):
            if not lo * (1 - SIZE_SLACK) <= got <= hi * (1 + SIZE_SLACK):
                return (f"outside the model's domain: {w}×{h} px, fitted on "
                        f"{_span(self.width)}×{_span(self.height)} px ({side})")
        depth = 8 * img.dtype.itemsize
        if depth not in self.bit_depth:
            return (f"outside the model's domain: {depth}-bit pixels, fitted on "
                    f"{'/'.join(map(str, self.bit_depth))}-bit")
        mean = _brightness(img)
        lo, hi = self.brightness
        if not lo - BRIGHTNESS_SLACK <= mean <= hi + BRIGHTNESS_SLACK:
            return (f"outside the model's domain: mean brightness {mean:.0f}, fitted on "
                    f"{lo:.0f}–{hi:.0f}")
        return None


def _span(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}–{r[1]}"
