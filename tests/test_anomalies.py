"""Synthetic anomalies for choosing a model without defect images: exact masks, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from inspectd.core.imaging import read_image
from inspectd.models import anomalies


@pytest.fixture(scope="module")
def images(synth_root):
    paths = sorted((synth_root / "object" / "train" / "good").glob("*.png"))[:3]
    return [read_image(p) for p in paths]


@pytest.mark.parametrize("kind", anomalies.KINDS)
def test_each_kind_changes_exactly_the_pixels_its_mask_says(images, kind):
    rng = np.random.default_rng(0)
    for img in images:
        out, mask = anomalies.make(img, kind, rng, foreign=images[-1])
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(mask, (out != img).any(axis=2))
        assert 0 < mask.mean() <= 2 * anomalies.MAX_AREA


def test_sets_are_seeded_and_cover_every_kind(images):
    a, b = anomalies.make_set(images, seed=7), anomalies.make_set(images, seed=7)
    assert [k for *_, k in a] == list(anomalies.KINDS) * len(images)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
               for x, y in zip(a, b, strict=True))
    c = anomalies.make_set(images, seed=8)
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_perlin_noise_is_smooth_and_bounded():
    n = anomalies.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert n.shape == (64, 64) and np.abs(n).max() <= 1.5
    assert np.abs(np.diff(n, axis=1)).max() < 0.2  # gradient noise, not white noise
