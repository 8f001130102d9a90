"""MVTec-AD-style data sets: listing their images and masks, and checking them.

Layout: ROOT/CATEGORY/train/good/*.png, ROOT/CATEGORY/test/<defect or good>/*.png and
ROOT/CATEGORY/ground_truth/<defect>/<stem>_mask.png (optional; without it only image-level
labels are known).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inspectd.core.errors import DataError
from inspectd.core.imaging import read_raw

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
                 "toothbrush", "transistor", "zipper")
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
_MODES = {1: "gray", 2: "gray+alpha", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class Sample:
    """One image of a data set."""

    path: Path
    label: int  # 0 good, 1 defect
    defect: str  # "good" or the defect type
    mask_path: Path | None


def _images_in(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted; hidden files (e.g. macOS ._x.png) skipped."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".") and p.is_file())


def _subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _mask_for(gt_dir: Path, stem: str) -> Path | None:
    for suffix in (".png", ".PNG", ".bmp", ".tif", ".tiff", ".jpg"):
        if (candidate := gt_dir / f"{stem}_mask{suffix}").is_file():
            return candidate
    return None


def list_categories(root: Path) -> list[str]:
    """Sorted names of the directories of `root` that contain train/good."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found")
    return [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]


def resolve_categories(root: Path, spec: str) -> list[str]:
    """Categories for `spec`: a name (or comma-separated names), "all", "objects", "textures"."""
    available = list_categories(root)
    if not available:
        raise DataError(f"{root}: no categories found (expected {root}/CATEGORY/train/good/)")
    listing = f"available: {', '.join(available)}"
    if spec in ("all", "objects", "textures"):
        chosen = [c for c in available if spec == "all"
                  or (c in MVTEC_TEXTURES) == (spec == "textures")]
        if not chosen:
            raise DataError(f"{root}: no {spec[:-1]} categories ({listing})")
        return chosen
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DataError(f"{root}: empty category name ({listing})")
    for name in names:
        if name not in available:
            raise DataError(f"{root}: no category '{name}' with train/good images ({listing})")
    return list(dict.fromkeys(names))


def train_samples(root: Path, category: str) -> list[Sample]:
    """The train/good images of a category, sorted by name."""
    directory = Path(root) / category / "train" / "good"
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found")
    samples = [Sample(p, 0, "good", None) for p in _images_in(directory)]
    if not samples:
        raise DataError(f"{directory}: no images")
    return samples


def test_samples(root: Path, category: str) -> list[Sample]:
    """The test images of a category, sorted by defect then name, with mask paths if any."""
    test_dir, gt_dir = Path(root) / category / "test", Path(root) / category / "ground_truth"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: directory not found")
    samples = []
    for d in _subdirs(test_dir):
        for p in _images_in(d):
            good = d.name == "good"
            mask = None if good else _mask_for(gt_dir / d.name, p.stem)
            samples.append(Sample(p, 0 if good else 1, d.name, mask))
    if not samples:
        raise DataError(f"{test_dir}: no images in any test/<defect or good>/ directory")
    return samples


test_samples.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def expand_image_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories expanded recursively to their image files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith(".") and f.is_file())
            if not found:
                raise DataError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: file not found")
    return list(dict.fromkeys(out))


@dataclass
class CategoryReport:
    """What check_dataset found for one category."""

    category: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> defect -> n
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> n images
    modes: dict[str, int] = field(default_factory=dict)  # "RGB 8-bit" -> n images
    has_ground_truth: bool = False  # False: no ground_truth dir, image-level labels only
    missing_masks: list[str] = field(default_factory=list)  # defect images without a mask
    mismatched_masks: list[str] = field(default_factory=list)  # "mask: WxH, image WxH"
    orphan_masks: list[str] = field(default_factory=list)  # masks without a test image
    empty_masks: list[str] = field(default_factory=list)  # masks with no defect pixel
    unreadable: list[str] = field(default_factory=list)  # "path: reason"
    empty_dirs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when files are unreadable, masks missing or mis-sized, or no train image."""
        return not (self.unreadable or self.missing_masks or self.mismatched_masks
                    or not self.counts.get("train", {}).get("good"))

    def as_dict(self) -> dict:
        """A JSON-ready dict, with `ok`."""
        return {**asdict(self), "ok": self.ok}


def _probe(path: Path) -> tuple[int, int, str, bool] | str:
    """(width, height, mode, any nonzero pixel) of an image, or why it cannot be read."""
    try:
        img = read_raw(path)
    except DataError as e:
        return str(e)
    channels = 1 if img.ndim == 2 else img.shape[2]
    mode = f"{_MODES.get(channels, channels)} {img.itemsize * 8}-bit"
    return img.shape[1], img.shape[0], mode, bool(img.any())


def check_dataset(root: Path, categories: Sequence[str]) -> list[CategoryReport]:
    """Counts, sizes and modes of each category's images, and its problems (see CategoryReport)."""
    reports = []
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for category in categories:
            cat_dir = Path(root) / category
            if not cat_dir.is_dir():
                raise DataError(f"{cat_dir}: category directory not found")
            rep = CategoryReport(category, has_ground_truth=(cat_dir / "ground_truth").is_dir())
            pairs: list[tuple[Path, Path | None]] = []  # (image, mask) for test defects
            images: list[Path] = []
            for split in ("train", "test"):
                for d in _subdirs(cat_dir / split):
                    found = _images_in(d)
                    if not found:
                        rep.empty_dirs.append(str(d))
                    rep.counts.setdefault(split, {})[d.name] = len(found)
                    images += found
                    if split == "test" and d.name != "good":
                        pairs += [(p, _mask_for(cat_dir / "ground_truth" / d.name, p.stem))
                                  for p in found]
            masks = [m for _, m in pairs if m is not None]
            all_masks = [m for d in _subdirs(cat_dir / "ground_truth") for m in _images_in(d)]
            rep.orphan_masks = [str(m) for m in sorted(set(all_masks) - set(masks))]
            if rep.has_ground_truth:
                rep.missing_masks = [str(p) for p, m in pairs if m is None]
            probes = dict(zip(images + masks, pool.map(_probe, images + masks), strict=True))
            sizes, modes = Counter(), Counter()
            for p in images:
                if isinstance(r := probes[p], str):
                    rep.unreadable.append(r)
                else:
                    sizes[f"{r[0]}x{r[1]}"] += 1
                    modes[r[2]] += 1
            for m in masks:
                if isinstance(r := probes[m], str):
                    rep.unreadable.append(r)
                elif not r[3]:
                    rep.empty_masks.append(str(m))
            for p, m in pairs:
                ri, rm = probes[p], probes.get(m) if m else None
                if m and not isinstance(ri, str) and not isinstance(rm, str) and ri[:2] != rm[:2]:
                    rep.mismatched_masks.append(f"{m}: {rm[0]}x{rm[1]}, image {ri[0]}x{ri[1]}")
            rep.sizes, rep.modes = dict(sizes.most_common()), dict(modes.most_common())
            reports.append(rep)
    return reports
