"""The free-space guard: images give way before audit rows when the data disk fills up.

Levels, from the free space of the filesystem that holds the images (`shutil.disk_usage`:
the space an unprivileged process may still use), in percent of that filesystem's size:

    0  OK      every image is written
    1  LOW     free < min_free_ok: OK and unjudged samples stop (NG and ERROR images go on)
    2  FULL    free < min_free_images: NG and ERROR images stop too

Audit rows, the spool and the sink journal never ask the guard: they take what is left.
The filesystem is measured at most every `check_s` seconds, not per write; in between the
bytes the image store wrote are taken off the last measure, so a burst of images stops at
its threshold without a system call per frame. A level is left for a better one only once
free space is `HYSTERESIS` points above that threshold, so a disk hovering at a threshold
does not flip the state (and the log) at every check. Each change of level is logged once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("inspectd.disk")

CHECK_S = 2.0
HYSTERESIS = 1.0  # percentage points above a threshold before its level is left
OK, LOW, FULL = 0, 1, 2
LEVELS = ("back: every image written again", "low: OK and unjudged samples stopped",
          "very low: NG and ERROR images stopped too")
SAMPLES = ("ok", "unjudged")  # stop at LOW; anything else (ng, error) at FULL


class DiskGuard:
    def __init__(self, path: Path, min_free_ok: float, min_free_images: float,
                 check_s: float = CHECK_S, usage: Callable[[str], Any] = shutil.disk_usage,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.min_free_ok = min_free_ok
        self.min_free_images = min_free_images
        self.check_s = check_s
        self._usage = usage
        self._clock = clock
        self.level = OK
        self.total_bytes = 0
        self.free_bytes = 0  # at the last measure, less what was written since
        self._next_check = 0.0
        self._error_logged = False
        self.poll()

    def poll(self) -> int:
        """Measure the filesystem if due; returns the level."""
        if self._clock() >= self._next_check:
            self.measure()
        return self.level

    def allows(self, kind: str) -> bool:
        """May an image of this kind ("ok", "unjudged", "ng", "error") be written now?"""
        return self.poll() < (LOW if kind in SAMPLES else FULL)

    def wrote(self, nbytes: int) -> None:
        """`nbytes` were just written: count them off until the next measure."""
        self.free_bytes = max(0, self.free_bytes - nbytes)
        self._classify()

    def full(self) -> None:
        """A write failed for lack of space: measure now, and write no image until the next
        measure, whatever this one says (a file may need more than what is left)."""
        self._read()
        self._set(FULL)

    def measure(self) -> None:
        if self._read():
            self._classify()

    def _read(self) -> bool:
        self._next_check = self._clock() + self.check_s
        try:
            u = self._usage(str(_existing(self.path)))
        except OSError as e:
            if not self._error_logged:  # keep the last level; say it once
                log.error("cannot measure free disk space", path=str(self.path), error=str(e))
                self._error_logged = True
            return False
        self._error_logged = False
        self.total_bytes, self.free_bytes = int(u.total), int(u.free)
        return True

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0

    def _classify(self) -> None:
        free = self.free_percent
        worse = FULL if free < self.min_free_images else LOW if free < self.min_free_ok else OK
        better = (FULL if free < self.min_free_images + HYSTERESIS
                  else LOW if free < self.min_free_ok + HYSTERESIS else OK)
        if worse > self.level:
            self._set(worse)
        elif better < self.level:
            self._set(better)

    def _set(self, level: int) -> None:
        if level == self.level:
            return
        fields = {"path": str(self.path), "free_bytes": self.free_bytes,
                  "free_percent": round(self.free_percent, 2),
                  "min_free_ok": self.min_free_ok, "min_free_images": self.min_free_images}
        if level > self.level:
            log.warning(f"disk space {LEVELS[level]}; audit rows go on", **fields)
        else:
            log.info(f"disk space {LEVELS[level]}", **fields)
        self.level = level


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (the store's folders appear on first write)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
