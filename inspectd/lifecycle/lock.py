"""One refit per SKU at a time, and the error a refit that cannot run raises."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inspectd.core.errors import InspectdError
from inspectd.lifecycle.registry import sku_dir

LOCK = ".refit.lock"


class RefitError(InspectdError):
    """A refit cannot start or cannot go on (too few frames, another refit running)."""


@contextmanager
def refit_lock(models_dir: Path, sku: str) -> Iterator[None]:
    """One refit per SKU at a time: a non-blocking flock on models/<sku>/.refit.lock holding
    the owner's pid. The kernel drops the lock when the process ends, however it ends."""
    base = sku_dir(models_dir, sku)
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RefitError(f"refit of SKU {sku} already running (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
