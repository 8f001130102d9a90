from __future__ import annotations

import pytest
import torch
import torchvision

from inspectd.core.errors import ConfigError, WeightsNotFoundError
from inspectd.models.features import (
    FeatureExtractor,
    build_extractor,
    load_backbone,
    resolve_weights,
)


def test_lite0_weights_load_and_the_extractor_stops_after_the_last_layer():
    path = resolve_weights("efficientnet_lite0", None)
    ex = build_extractor("efficientnet_lite0", ["blocks.2", "blocks.4"], path)
    assert ex.names[-1] == "blocks.4"  # blocks.5, blocks.6 and the head are never run
    assert ex.shapes(256, 256) == {"blocks.2": (40, 32, 32), "blocks.4": (112, 16, 16)}
    file_tensors = list(torch.load(path, map_location="cpu", weights_only=True).values())
    model_tensors = list(load_backbone("efficientnet_lite0", path).state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(file_tensors, model_tensors, strict=True))


def test_unknown_layer_lists_the_available_ones():
    path = resolve_weights("efficientnet_lite0", None)
    with pytest.raises(ConfigError, match=r"no layer layer9.*blocks\.3"):
        build_extractor("efficientnet_lite0", ["layer9"], path)


def test_torchvision_backbone_reads_a_local_weights_file(tmp_path):
    path = tmp_path / "r18.pth"
    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(reference.state_dict(), path)
    ex = build_extractor("resnet18", ["layer2", "layer3"], path)
    assert ex.names[-1] == "layer3"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x)))))))
        assert torch.allclose(ex(x)["layer3"], want)


def test_missing_torchvision_weights_name_the_hub_cache_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"checkpoints/wide_resnet50_2-95faca4d\.pth"):
        resolve_weights("wide_resnet50_2", None)


def test_wrong_weights_file_is_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsNotFoundError, match="not efficientnet_lite0 weights"):
        load_backbone("efficientnet_lite0", path)


def test_extractor_runs_layers_in_forward_order():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    ex = FeatureExtractor(net, ["0", "2"])
    out = ex(torch.zeros(1, 3, 9, 9))
    assert out["0"].shape == (1, 4, 7, 7) and out["2"].shape == (1, 5, 5, 5)
