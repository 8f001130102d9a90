"""A model version on disk: `weights.safetensors` + `manifest.json`, nothing executable.

The manifest carries everything needed to rebuild the detector (kind, backbone and the hash
of its weights, layers, geometry, normalisation, thresholds, calibration, training-set
fingerprint, metrics, inspectd version); the tensors file carries only tensors. This module
is the file format; `detector` turns a detector into these files and back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inspectd.core.errors import ArtifactError
from inspectd.models.kinds import KINDS

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def tensor_specs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shape and dtype of each tensor, as the manifest lists them."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()}


def write_artifact(directory: Path, tensors: dict[str, torch.Tensor],
                   manifest: dict[str, Any]) -> Path:
    """Write atomically: a temp dir next to the target, renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
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
    if manifest.get("kind") not in KINDS:
        raise ArtifactError(f"{path}: unknown model kind {manifest.get('kind')!r}")
    return manifest


def read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The artifact's tensors, each checked against the shape its manifest lists."""
    try:
        tensors = load_file(str(Path(directory) / WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{Path(directory) / WEIGHTS}: cannot read ({e})") from None
    for name, spec in manifest.get("tensors", {}).items():
        if name not in tensors or list(tensors[name].shape) != spec["shape"]:
            raise ArtifactError(f"{directory}: tensor {name!r} missing or of the wrong shape")
    return tensors
