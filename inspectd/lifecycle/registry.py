"""Model versions on disk: `models/<sku>/<version>/` artifacts and a `current` symlink.

Versions are immutable directories; `current` is swapped atomically (a new symlink renamed
over the old one), so a reader resolves either the old or the new version, never a mix.
Every change of `current` made through `publish`, `promote` or `rollback` is appended to
`models/<sku>/history.jsonl` (time, user, action, from, to); `rollback` walks it back.
A version made by `inspectd refit` also holds `refit.json` (its gate results).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog

from inspectd.core.errors import ArtifactError
from inspectd.models.artifact import read_manifest

log = structlog.get_logger("inspectd.registry")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CURRENT = "current"
HISTORY = "history.jsonl"
REFIT_RECORD = "refit.json"
_LOCK = ".registry.lock"


def sku_dir(models_dir: Path, sku: str) -> Path:
    if not _NAME.fullmatch(sku) or set(sku) == {"."}:
        raise ArtifactError(f"invalid SKU {sku!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return Path(models_dir) / sku


def valid_version(version: str) -> str:
    if not _NAME.fullmatch(version) or version == CURRENT or version.startswith("."):
        raise ArtifactError(f"invalid version name {version!r}")
    return version


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
            make_current: bool = True, move: bool = False, user: str | None = None) -> str:
    """Copy (or, with `move`, rename: staged beside the versions, same filesystem) a fitted
    artifact into the registry as a new immutable version; returns its name. Making it current
    is recorded in the history."""
    read_manifest(artifact)
    base = sku_dir(models_dir, sku)
    base.mkdir(parents=True, exist_ok=True)
    version = valid_version(version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime()))
    dest = base / version
    if dest.exists():
        raise ArtifactError(f"{dest}: version already exists (versions are immutable)")
    if move:
        os.replace(artifact, dest)  # same filesystem: the staged artifact appears whole
    else:
        staging = base / f".{version}.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(artifact, staging)
        os.replace(staging, dest)
    if make_current:
        with _registry_lock(base):
            _switch(models_dir, sku, version, "publish", user)
    return version


@dataclass(frozen=True)
class VersionInfo:
    """One version in the registry, as `inspectd models list` shows it."""

    name: str
    path: Path
    created: str  # ISO time from the manifest (else the directory's mtime)
    kind: str
    threshold: float
    training_images: int | None
    source: str  # "refit" (holds refit.json) or "publish"
    status: str | None  # refit outcome: "passed" or "rejected" (None when not a refit)
    gates: list[dict[str, Any]] | None
    is_current: bool

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def refit_record(version_dir: Path) -> dict[str, Any] | None:
    """The version's `refit.json`, or None when it was not made by refit."""
    try:
        return json.loads((Path(version_dir) / REFIT_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{Path(version_dir) / REFIT_RECORD}: unreadable ({e})") from None


def list_versions(models_dir: Path, sku: str) -> list[VersionInfo]:
    """The SKU's versions, oldest first; directories that are not artifacts are skipped."""
    base = sku_dir(models_dir, sku)
    if not base.is_dir():
        return []
    try:
        current = current_version(models_dir, sku)[0]
    except ArtifactError:
        current = None
    found = []
    for d in base.iterdir():
        if d.name.startswith(".") or d.name == CURRENT or not d.is_dir():
            continue  # staging areas, locks, the link itself
        try:
            m = read_manifest(d)
            refit = refit_record(d)
        except ArtifactError as e:
            log.warning("not a model version, skipped", path=str(d), error=str(e))
            continue
        created = m.get("created") or datetime.fromtimestamp(
            d.stat().st_mtime, UTC).isoformat(timespec="seconds")
        found.append(VersionInfo(
            name=d.name, path=d, created=created, kind=m["kind"],
            threshold=float(m["threshold"]["image"]),
            training_images=m.get("training", {}).get("images"),
            source="refit" if refit else "publish",
            status=refit.get("status") if refit else None,
            gates=refit.get("gates") if refit else None,
            is_current=d.name == current,
        ))
    return sorted(found, key=lambda v: (v.created, v.name))


def promote(models_dir: Path, sku: str, version: str, user: str | None = None,
            force: bool = False, action: str = "promote",
            replacing: str | None | Literal[False] = False) -> str | None:
    """Make `version` current (atomically) and record it; returns the version it replaced.

    A version whose refit gates failed is only promoted with `force` (after a human review).
    `replacing` (a version, or None for none): refuse unless that is still current — a refit
    gated against it must not undo what someone promoted or rolled back meanwhile."""
    base = sku_dir(models_dir, sku)
    valid_version(version)
    record = refit_record(base / version) if (base / version).is_dir() else None
    if record and record.get("status") == "rejected" and not force:
        raise ArtifactError(f"{sku} {version} failed its refit gates "
                            f"({record.get('reason', 'see refit.json')}); use --force to "
                            "promote it anyway")
    with _registry_lock(base):
        if replacing is not False:
            try:
                now: str | None = current_version(models_dir, sku)[0]
            except ArtifactError:
                now = None
            if now != replacing:
                raise ArtifactError(
                    f"{sku}: current is {now or 'no version'}, not {replacing or 'no version'} "
                    f"as when {version} was made; promote it by hand if it should still be")
        return _switch(models_dir, sku, version, action, user)


def rollback(models_dir: Path, sku: str, user: str | None = None) -> tuple[str, str]:
    """Back to the version that was current before the present one; returns (from, to).

    Repeated rollbacks walk further back through the promotions, like an undo stack."""
    base = sku_dir(models_dir, sku)
    with _registry_lock(base):
        current = current_version(models_dir, sku)[0]
        stack = _current_stack(read_history(models_dir, sku), current)
        if len(stack) < 2:
            raise ArtifactError(f"{sku}: no earlier version to roll back to "
                                f"({current} is the first in {base / HISTORY})")
        target = stack[-2]
        if not (base / target).is_dir():
            raise ArtifactError(f"{sku}: cannot roll back to {target}: {base / target} is gone")
        _switch(models_dir, sku, target, "rollback", user)
    return current, target


def read_history(models_dir: Path, sku: str) -> list[dict[str, Any]]:
    """The SKU's `current` changes, oldest first (unreadable lines are skipped, logged)."""
    path = sku_dir(models_dir, sku) / HISTORY
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("to"):
                entries.append(entry)
                continue
        except json.JSONDecodeError:
            pass
        if line.strip():
            log.warning("unreadable history line skipped", path=str(path), line=n)
    return entries


def _current_stack(history: list[dict[str, Any]], current: str) -> list[str]:
    """The versions that were current, as an undo stack whose top is `current`."""
    stack: list[str] = []
    for e in history:
        if e.get("action") == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != e["to"]:
            stack.append(e["to"])
    if not stack or stack[-1] != current:  # changed outside the history (set_current by hand)
        stack.append(current)
    return stack


def _switch(models_dir: Path, sku: str, version: str, action: str, user: str | None) -> str | None:
    """set_current + one history line; the caller holds the registry lock."""
    try:
        previous = current_version(models_dir, sku)[0]
    except ArtifactError:
        previous = None
    if previous == version:
        return previous
    set_current(models_dir, sku, version)
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "user": user or _user(),
             "action": action, "from": previous, "to": version}
    with open(sku_dir(models_dir, sku) / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("model version switched", sku=sku, **entry)
    return previous


@contextmanager
def _registry_lock(base: Path) -> Iterator[None]:
    """Serialises changes of `current` + history between processes (held for milliseconds)."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / _LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _user() -> str:
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())
