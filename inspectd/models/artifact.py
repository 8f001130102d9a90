"""A model version on disk: `weights.safetensors` + `manifest.json`, nothing executable.

The manifest carries everything needed to rebuild the detector (kind, backbone and the hash
of its weights, layers, geometry, normalisation, thresholds, calibration, training-set
fingerprint, metrics, inspectd version); the tensors file carries only tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import inspectd
from inspectd.core.errors import ArtifactError
from inspectd.models.detector import Detector
from inspectd.models.features import Runtime, build_extractor, file_sha256, resolve_weights
from inspectd.models.padim import Padim
from inspectd.models.patchcore import PatchCore
from inspectd.models.preprocess import Geometry
from inspectd.models.settings import PreprocessSettings

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MODEL_CLASSES = {"patchcore": PatchCore, "padim": Padim, "orthoad": Padim}


def save_artifact(detector: Detector, directory: Path) -> Path:
    """Write atomically: a temp dir next to the target, renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in detector.model.tensors().items()}
    manifest = dict(detector.manifest)
    manifest.update(
        format=FORMAT,
        inspectd_version=inspectd.__version__,
        kind=detector.kind,
        model=detector.model.params,
        threshold={**manifest.get("threshold", {}),
                   "image": detector.threshold, "pixel": detector.pixel_threshold},
        tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                 for k, v in tensors.items()},
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": f"inspectd/{FORMAT}"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not a model artifact?)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unsupported artifact format {manifest.get('format')!r}")
    if manifest.get("kind") not in MODEL_CLASSES:
        raise ArtifactError(f"{path}: unknown model kind {manifest.get('kind')!r}")
    return manifest


def load_artifact(
    directory: Path,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    weights: Path | None = None,
    batch_size: int | None = None,
) -> Detector:
    """Rebuild a detector; scores equal the in-memory model's bit for bit (same precision)."""
    manifest = read_manifest(directory)
    try:
        tensors = load_file(str(Path(directory) / WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{Path(directory) / WEIGHTS}: cannot read ({e})") from None
    expected = manifest.get("tensors", {})
    for name, spec in expected.items():
        if name not in tensors or list(tensors[name].shape) != spec["shape"]:
            raise ArtifactError(f"{directory}: tensor {name!r} missing or of the wrong shape")

    bb = manifest["backbone"]
    path = resolve_weights(bb["name"], weights)
    digest = file_sha256(path)
    if digest != bb["weights_sha256"]:
        raise ArtifactError(
            f"{path}: backbone weights differ from the ones this model was fitted with "
            f"(sha256 {digest[:12]}…, expected {bb['weights_sha256'][:12]}…)"
        )
    extractor = build_extractor(bb["name"], bb["layers"], path)
    if precision == "auto":
        bf16 = bool(manifest.get("precision", {}).get("bf16_ok", False))
    else:
        bf16 = precision == "bf16"
    rt = manifest.get("settings", {}).get("runtime", {})
    runtime = Runtime.select(device, bf16, bool(rt.get("channels_last", True)))
    model = MODEL_CLASSES[manifest["kind"]].from_tensors(tensors, manifest["model"], backend)
    return Detector(
        model, extractor, runtime,
        Geometry.from_settings(PreprocessSettings(**manifest["geometry"])),
        manifest["normalization"]["mean"], manifest["normalization"]["std"],
        float(manifest["scoring"]["sigma"]),
        batch_size=batch_size or int(rt.get("batch_size", 8)),
        threshold=float(manifest["threshold"]["image"]),
        pixel_threshold=float(manifest["threshold"]["pixel"]),
        manifest=manifest,
    )
