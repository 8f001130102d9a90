"""Model versions on disk: `models/<sku>/<version>/` artifacts and a `current` symlink.

Versions are immutable directories; `current` is swapped atomically (a new symlink renamed
over the old one), so a reader resolves either the old or the new version, never a mix.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from inspectd.errors import ArtifactError
from inspectd.models.artifact import read_manifest

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CURRENT = "current"


def sku_dir(models_dir: Path, sku: str) -> Path:
    if not _NAME.fullmatch(sku) or set(sku) == {"."}:
        raise ArtifactError(f"invalid SKU {sku!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return Path(models_dir) / sku


def current_version(models_dir: Path, sku: str) -> tuple[str, Path]:
    """(version name, directory) that `current` points at; ArtifactError when there is none."""
    link = sku_dir(models_dir, sku) / CURRENT
    try:
        target = Path(os.readlink(link))
    except FileNotFoundError:
        raise ArtifactError(f"no model for SKU {sku!r} ({link} missing)") from None
    except OSError as e:
        raise ArtifactError(f"{link}: not a version link ({e.strerror})") from None
    path = target if target.is_absolute() else link.parent / target
    return path.name, path


def set_current(models_dir: Path, sku: str, version: str) -> None:
    """Point `current` at an existing version, atomically."""
    base = sku_dir(models_dir, sku)
    read_manifest(base / version)  # refuse to point at something that is not an artifact
    tmp = base / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    os.replace(tmp, base / CURRENT)


def publish(artifact: Path, models_dir: Path, sku: str, version: str | None = None,
            make_current: bool = True) -> str:
    """Copy a fitted artifact into the registry as a new immutable version; returns its name."""
    read_manifest(artifact)
    base = sku_dir(models_dir, sku)
    base.mkdir(parents=True, exist_ok=True)
    version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime())
    if not _NAME.fullmatch(version) or version == CURRENT:
        raise ArtifactError(f"invalid version name {version!r}")
    dest = base / version
    if dest.exists():
        raise ArtifactError(f"{dest}: version already exists (versions are immutable)")
    staging = base / f".{version}.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(artifact, staging)
    os.replace(staging, dest)
    if make_current:
        set_current(models_dir, sku, version)
    return version
