"""Tests for the synthetic MVTec-layout data-set generator."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.core.errors import InspectdError
from inspectd.models.datasets.synthetic import CATEGORIES, generate

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 5, "size": 96}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), tuple(CATEGORIES), **SMALL)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_generate_writes_mvtec_layout_with_requested_counts(small_set: Path) -> None:
    for category, kind in CATEGORIES.items():
        cat = small_set / category
        assert _files(cat / "train" / "good") == ["000.png", "001.png", "002.png"]
        assert _files(cat / "test" / "good") == ["000.png", "001.png"]
        per_defect = [len(_files(cat / "test" / d)) for d in kind.defects]
        assert sum(per_defect) == 5
        assert max(per_defect) - min(per_defect) <= 1  # split evenly
        assert set(_files(cat / "test")) == {"good", *kind.defects}
        assert set(_files(cat / "ground_truth")) == set(kind.defects)
        assert not (cat / "ground_truth" / "good").exists()


def test_every_defect_image_has_a_same_sized_nonempty_small_mask(small_set: Path) -> None:
    for category, kind in CATEGORIES.items():
        for defect in kind.defects:
            for img_path in sorted((small_set / category / "test" / defect).glob("*.png")):
                img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
                mask_path = small_set / category / "ground_truth" / defect
                mask = cv2.imread(str(mask_path / f"{img_path.stem}_mask.png"),
                                  cv2.IMREAD_UNCHANGED)
                assert mask is not None, f"{category}/{defect}/{img_path.name} has no mask"
                assert mask.shape == img.shape[:2]
                assert set(np.unique(mask)) <= {0, 255}
                assert 0.0008 < (mask > 0).mean() < 0.06, f"{category}/{defect}"


def test_gray_kind_writes_single_channel_pngs_and_colour_kinds_three(small_set: Path) -> None:
    for category, kind in CATEGORIES.items():
        img = cv2.imread(str(small_set / category / "train" / "good" / "000.png"),
                         cv2.IMREAD_UNCHANGED)
        assert img.shape == ((96, 96) if kind.gray else (96, 96, 3))


def test_good_images_vary_but_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    args = {"n_train": 2, "n_test_good": 1, "n_test_defect": 3, "size": 64}
    a = generate(tmp_path / "a", ("texture", "object"), seed=7, **args)
    b = generate(tmp_path / "b", ("texture", "object"), seed=7, **args)
    c = generate(tmp_path / "c", ("texture", "object"), seed=8, **args)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    for category in ("texture", "object"):
        good = a / category / "train" / "good"
        assert (good / "000.png").read_bytes() != (good / "001.png").read_bytes()


def test_defect_images_differ_from_good_ones_inside_the_mask(small_set: Path) -> None:
    cat = small_set / "texture"
    img = cv2.imread(str(cat / "test" / "stain" / "000.png")).astype(np.float32)
    mask = cv2.imread(str(cat / "ground_truth" / "stain" / "000_mask.png"), 0) > 0
    good = cv2.imread(str(cat / "train" / "good" / "000.png")).astype(np.float32)
    inside, outside = img[mask].mean(axis=0), img[~mask].mean(axis=0)
    assert np.abs(inside - outside).max() > 20
    assert abs(outside.mean() - good.mean()) < 15


def test_regenerating_with_fewer_images_leaves_no_stale_files(tmp_path: Path) -> None:
    generate(tmp_path, ("texture",), n_train=4, n_test_good=1, n_test_defect=3, size=64)
    generate(tmp_path, ("texture",), n_train=2, n_test_good=1, n_test_defect=3, size=64)
    assert _files(tmp_path / "texture" / "train" / "good") == ["000.png", "001.png"]


def test_unknown_category_or_bad_size_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InspectdError, match="nonesuch"):
        generate(tmp_path, ("nonesuch",))
    with pytest.raises(InspectdError, match="size"):
        generate(tmp_path, ("texture",), size=8)
