"""Tests for reading images, masks and MVTec-layout data sets, and for check_dataset."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspectd.core.errors import DataError
from inspectd.core.imaging import read_image, read_mask
from inspectd.models.datasets.mvtec import (
    check_dataset,
    expand_image_paths,
    list_categories,
    resolve_categories,
    test_samples,
    train_samples,
)
from inspectd.models.datasets.synthetic import generate


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """texture + object categories: 3 train, 2 test good, 3 test defect images each, 64 px."""
    return generate(tmp_path / "data", ("texture", "object"), n_train=3, n_test_good=2,
                    n_test_defect=3, size=64)


# ---------------------------------------------------------------------------- read_image/mask

def test_read_image_expands_grayscale_to_rgb(tmp_path: Path) -> None:
    gray = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    img = read_image(_write(tmp_path / "g.png", gray))
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert (img == gray[:, :, None]).all()


def test_read_image_scales_16_bit_to_8_bit(tmp_path: Path) -> None:
    deep = np.full((10, 12), 0xABCD, np.uint16)
    assert (read_image(_write(tmp_path / "d.png", deep)) == 0xAB).all()
    deep_rgb = np.zeros((10, 12, 3), np.uint16)
    deep_rgb[..., 2] = 65535  # BGR order on disk: red channel
    img = read_image(_write(tmp_path / "d3.png", deep_rgb))
    assert (img[..., 0] == 255).all() and (img[..., 1:] == 0).all()


def test_read_image_drops_alpha_and_returns_rgb_order(tmp_path: Path) -> None:
    bgra = np.zeros((7, 9, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 17  # blue, mostly transparent
    img = read_image(_write(tmp_path / "a.png", bgra))
    assert img.shape == (7, 9, 3)
    assert (img[..., 2] == 200).all() and (img[..., :2] == 0).all()


def test_read_image_keeps_odd_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (517, 333, 3), dtype=np.uint8)
    img = read_image(_write(tmp_path / "odd name #1.png", bgr))
    assert img.shape == (517, 333, 3)
    assert (img == bgr[..., ::-1]).all()


def test_read_errors_name_the_file_for_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        read_image(missing)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match=r"x\.png: not a readable image"):
        read_image(corrupt)
    with pytest.raises(DataError, match=r"x\.png"):
        read_mask(corrupt)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png"):
        read_image(empty)


def test_read_mask_is_bool_with_nonzero_as_defect(tmp_path: Path) -> None:
    m = np.zeros((5, 6), np.uint8)
    m[1, 2], m[3, 4] = 1, 255
    mask = read_mask(_write(tmp_path / "m.png", m))
    assert mask.dtype == bool and mask.shape == (5, 6)
    assert mask.sum() == 2 and mask[1, 2] and mask[3, 4]
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[0, 0, 1] = 255
    assert read_mask(_write(tmp_path / "m3.png", rgb)).sum() == 1


# ---------------------------------------------------------------------------- layout reader

def test_reader_finds_samples_with_labels_and_mask_paths(dataset: Path) -> None:
    train = train_samples(dataset, "texture")
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    test = test_samples(dataset, "texture")
    assert [(s.defect, s.path.name) for s in test] == [
        ("good", "000.png"), ("good", "001.png"),
        ("hole", "000.png"), ("scratch", "000.png"), ("stain", "000.png")]
    for s in test:
        assert s.label == (s.defect != "good")
        if s.label:
            assert s.mask_path == dataset / "texture/ground_truth" / s.defect / "000_mask.png"
            assert read_mask(s.mask_path).shape == read_image(s.path).shape[:2]
        else:
            assert s.mask_path is None


def test_user_category_without_ground_truth_has_no_mask_paths(dataset: Path) -> None:
    shutil.rmtree(dataset / "object" / "ground_truth")
    defects = [s for s in test_samples(dataset, "object") if s.label == 1]
    assert defects and all(s.mask_path is None for s in defects)
    (report,) = check_dataset(dataset, ["object"])
    assert report.ok and not report.has_ground_truth and not report.missing_masks


def test_reader_errors_for_missing_split_directories(dataset: Path) -> None:
    shutil.rmtree(dataset / "object" / "test")
    with pytest.raises(DataError, match=r"object[/\\]test: directory not found"):
        test_samples(dataset, "object")
    with pytest.raises(DataError, match="nonesuch"):
        train_samples(dataset, "nonesuch")


def test_list_and_resolve_categories(dataset: Path) -> None:
    (dataset / "not_a_category").mkdir()
    for name in ("carpet", "bottle"):
        (dataset / name / "train" / "good").mkdir(parents=True)
    assert list_categories(dataset) == ["bottle", "carpet", "object", "texture"]
    assert resolve_categories(dataset, "object") == ["object"]
    assert resolve_categories(dataset, "all") == ["bottle", "carpet", "object", "texture"]
    assert resolve_categories(dataset, "textures") == ["carpet"]
    assert resolve_categories(dataset, "objects") == ["bottle", "object", "texture"]
    assert resolve_categories(dataset, "texture,bottle") == ["texture", "bottle"]


def test_resolve_unknown_category_lists_the_available_ones(dataset: Path) -> None:
    with pytest.raises(DataError, match="'cable'.*available: object, texture"):
        resolve_categories(dataset, "cable")
    with pytest.raises(DataError, match="no texture categories"):
        resolve_categories(dataset, "textures")
    with pytest.raises(DataError, match="not found"):
        resolve_categories(dataset / "missing", "all")


def test_expand_image_paths_keeps_files_and_expands_directories(tmp_path: Path) -> None:
    px = np.zeros((4, 4), np.uint8)
    single = _write(tmp_path / "single.png", px)
    for rel in ("d/b.JPG", "d/a.png", "d/sub/c.tif"):
        _write(tmp_path / rel, px)
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / "._a.png").write_bytes(b"macOS resource fork")
    got = expand_image_paths([single, tmp_path / "d"])
    assert got == [single, tmp_path / "d/a.png", tmp_path / "d/b.JPG", tmp_path / "d/sub/c.tif"]
    with pytest.raises(DataError, match=r"gone\.png: file not found"):
        expand_image_paths([tmp_path / "gone.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        expand_image_paths([tmp_path / "empty"])


# ---------------------------------------------------------------------------- check_dataset

def test_check_dataset_reports_a_clean_set_as_ok(dataset: Path) -> None:
    reports = check_dataset(dataset, ["object", "texture"])
    assert [r.category for r in reports] == ["object", "texture"]
    tex = reports[1]
    assert tex.ok and tex.has_ground_truth
    assert tex.counts == {"train": {"good": 3}, "test": {"good": 2, "hole": 1, "scratch": 1,
                                                         "stain": 1}}
    assert tex.sizes == {"64x64": 8} and tex.modes == {"RGB 8-bit": 8}
    d = json.loads(json.dumps(tex.as_dict()))
    assert d["ok"] is True and d["category"] == "texture"


def test_check_dataset_reports_missing_mismatched_orphan_masks_and_unreadable_files(
        dataset: Path) -> None:
    gt = dataset / "texture" / "ground_truth"
    (gt / "hole" / "000_mask.png").unlink()
    _write(gt / "scratch" / "000_mask.png", np.full((32, 48), 255, np.uint8))
    _write(gt / "stain" / "007_mask.png", np.full((64, 64), 255, np.uint8))
    (dataset / "texture" / "train" / "good" / "002.png").write_bytes(b"garbage")
    _write(dataset / "texture" / "train" / "good" / "gray.png", np.zeros((50, 70), np.uint8))
    (dataset / "texture" / "test" / "empty_defect").mkdir()
    (report,) = check_dataset(dataset, ["texture"])
    assert not report.ok
    assert report.missing_masks == [str(dataset / "texture/test/hole/000.png")]
    assert len(report.mismatched_masks) == 1
    assert "000_mask.png: 48x32, image 64x64" in report.mismatched_masks[0]
    assert report.orphan_masks == [str(gt / "stain" / "007_mask.png")]
    assert len(report.unreadable) == 1 and "002.png: not a readable image" in report.unreadable[0]
    assert report.empty_dirs == [str(dataset / "texture/test/empty_defect")]
    assert report.sizes == {"64x64": 7, "70x50": 1}
    assert report.modes == {"RGB 8-bit": 7, "gray 8-bit": 1}
    assert report.counts["train"] == {"good": 4}


def test_check_dataset_flags_a_category_without_train_images(dataset: Path) -> None:
    for p in (dataset / "object" / "train" / "good").iterdir():
        p.unlink()
    (report,) = check_dataset(dataset, ["object"])
    assert not report.ok and report.empty_dirs == [str(dataset / "object/train/good")]
