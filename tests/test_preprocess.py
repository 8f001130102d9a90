from __future__ import annotations

import numpy as np
import pytest
import torch

from inspectd.core.errors import ConfigError
from inspectd.core.settings import load_settings
from inspectd.models import fit
from inspectd.models.preprocess import Geometry, stitch
from inspectd.models.settings import ModelSettings, PreprocessSettings


def geo(**kw) -> Geometry:
    return Geometry.from_settings(PreprocessSettings(**kw))


def test_tiles_cover_the_canvas_flush_to_the_edges():
    g = geo(resize=(300, 500), tile=128, tile_overlap=0.25)
    corners = g.tiles()
    cover = np.zeros(g.canvas, dtype=int)
    for y, x in corners:
        cover[y : y + 128, x : x + 128] += 1
    assert cover.min() >= 1
    assert max(y for y, _ in corners) == 300 - 128 and max(x for _, x in corners) == 500 - 128


def test_stitch_averages_overlapping_tiles():
    g = geo(resize=(4, 6), tile=4, tile_overlap=0.5)
    corners = g.tiles()
    maps = torch.stack([torch.full((4, 4), float(i)) for i in range(len(corners))])
    out = stitch(maps, corners, g.canvas)
    assert out.shape == (1, 4, 6)
    assert out[0, 0, 0] == 0.0 and out[0, 0, -1] == float(len(corners) - 1)


def test_letterbox_keeps_aspect_and_maps_back_to_the_original_size():
    g = geo(resize=256, keep_aspect=True)
    img = np.zeros((120, 240, 3), np.uint8)
    img[:, :120] = 255
    canvas, place = g.image_to_canvas(img)
    assert canvas.shape == (256, 256, 3) and place.box == (64, 0, 128, 256)
    back = g.map_to_image(canvas[..., 0].astype(np.float32), place)
    assert back.shape == (120, 240)
    assert back[:, :110].min() > 200 and back[:, 130:].max() < 50


def test_crop_larger_than_resize_is_a_config_error():
    with pytest.raises(ConfigError, match="crop"):
        geo(resize=224, crop=256)


def test_tiled_high_resolution_images_score_into_one_full_size_map():
    rng = np.random.default_rng(0)
    base = rng.integers(90, 110, (333, 517, 3), dtype=np.uint8)  # odd size, not square
    train = [np.clip(base + rng.integers(0, 8, base.shape), 0, 255).astype(np.uint8)
             for _ in range(7)]
    s = load_settings(ModelSettings, None, [
        "preprocess.resize=[192, 288]", "preprocess.tile=96", "calibration.min_holdout=2",
        "patchcore.coreset_ratio=0.5"])
    det = fit(train, s)
    bad = train[0].copy()
    bad[150:190, 300:340] = 255  # a bright blob away from the tile borders
    ok_pred, ng_pred = det.predict([train[1], bad])
    assert ng_pred.anomaly_map.shape == (333, 517)
    assert ng_pred.score > ok_pred.score
    y, x = np.unravel_index(ng_pred.anomaly_map.argmax(), ng_pred.anomaly_map.shape)
    assert 130 <= y <= 210 and 280 <= x <= 360
