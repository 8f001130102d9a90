"""A watched folder as a camera: each complete image file written or moved into it is a frame.

Only close-after-write and moved-in events count, so a file is never read while it is being
written. Watchdog handlers only enqueue (an exception there silently ends the observer
thread); the frames loop does the work. A periodic re-scan picks up what a full queue or an
inotify overflow lost; it takes only files unchanged for a few seconds, so a slow writer's
half-written file is left for its close event.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import re
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from inspectd.core.config import FolderCamera
from inspectd.core.wire import ProtocolError, valid_name
from inspectd.daemon.sources.base import Capture, Lost, SourceBase, SourceError, as_pixels

QUEUE_SIZE = 1024
RESCAN_S = 10.0
SETTLE_S = 2.0  # a re-scan only takes files whose mtime is at least this old
_TEMP_SUFFIXES = (".tmp", ".part", "~")


class _Enqueue(FileSystemEventHandler):
    """Runs in the observer thread: put complete-file paths on the queue, never raise."""

    def __init__(self, q: queue.Queue[str], overflow: threading.Event) -> None:
        self.q, self.overflow = q, overflow

    def _put(self, path: str | bytes) -> None:
        try:
            if path:
                self.q.put_nowait(os.fsdecode(path))
        except Exception:  # queue.Full, or anything else: the re-scan will find the file
            self.overflow.set()

    def on_closed(self, event: FileSystemEvent) -> None:
        self._put(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        self._put(event.dest_path)  # "" for a file moved out of the folder


class FolderSource(SourceBase):
    kind = "folder"

    def __init__(self, name: str, cfg: FolderCamera) -> None:
        super().__init__(name, cfg)
        self.root = Path(os.path.abspath(cfg.path))
        self.done_dir = Path(os.path.abspath(cfg.done_dir or self.root / "done"))
        self.pattern: re.Pattern[str] | None = None
        if cfg.sku is None and cfg.sku_pattern is not None:
            try:
                self.pattern = re.compile(cfg.sku_pattern)
            except re.error as e:
                raise SourceError(f"cameras.{name}.sku_pattern: {e}") from None
            if "sku" not in self.pattern.groupindex:
                raise SourceError(f"cameras.{name}.sku_pattern needs a named group (?P<sku>...)")
        self.q: queue.Queue[str] = queue.Queue(QUEUE_SIZE)
        self.overflow = threading.Event()
        # path → (mtime_ns, size) of files handed on and not yet moved/deleted: no duplicates
        # from a second event or a re-scan, and `keep` does not resend a file it kept.
        self.seen: dict[str, tuple[int, int]] = {}
        self._scan_existing = cfg.existing

    def _connect(self) -> InotifyObserver:
        if not self.root.is_dir():
            raise Lost(f"folder {self.root} does not exist")
        # full events: a file moved in from outside the folder is a move, not a create.
        observer = InotifyObserver(generate_full_events=True)
        observer.schedule(_Enqueue(self.q, self.overflow), str(self.root),
                          recursive=self.cfg.recursive,
                          event_filter=[FileClosedEvent, FileMovedEvent])
        observer.start()
        return observer

    def _disconnect(self, observer: InotifyObserver, lost: bool) -> None:
        observer.stop()
        observer.join(timeout=5)

    def _grab(self, observer: InotifyObserver) -> Iterator[Capture]:
        # Files present now: at start when `existing`, and after every reconnect (events missed).
        pending: deque[str] = deque(self._scan() if self._scan_existing else ())
        self._scan_existing = True
        next_scan = time.monotonic() + RESCAN_S
        while not self.stopped():
            if pending:
                path = pending.popleft()
            else:
                if self.overflow.is_set() or time.monotonic() >= next_scan:
                    self.overflow.clear()
                    pending.extend(self._scan())
                    next_scan = time.monotonic() + RESCAN_S
                    continue
                try:
                    path = self.q.get(timeout=0.2)
                except queue.Empty:
                    if not observer.is_alive() or not self.root.is_dir():
                        raise Lost(f"watch on {self.root} ended (folder removed?)") from None
                    continue
            if not self._wanted(path):
                continue
            if not self.pace():  # before reading, so capture_ts is when the frame goes out
                return
            cap = self._capture(path)
            if cap is not None:
                yield cap

    def _wanted(self, path: str) -> bool:
        p = Path(path)
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return False
        if p.is_relative_to(self.done_dir) or (not self.cfg.recursive and len(rel.parts) != 1):
            return False
        if any(part.startswith(".") for part in rel.parts) or p.name.endswith(_TEMP_SUFFIXES):
            return False
        name = p.name.lower()
        return any(fnmatch.fnmatchcase(name, pat.lower()) for pat in self.cfg.patterns)

    def _scan(self) -> list[str]:
        """Complete-looking files in the folder, oldest first; forgets kept files now gone."""
        found: list[tuple[float, str]] = []
        settled = time.time() - SETTLE_S
        walk = os.walk(self.root) if self.cfg.recursive else [(str(self.root), [], None)]
        for top, dirs, _ in walk:
            dirs[:] = [d for d in dirs
                       if not d.startswith(".") and Path(top, d) != self.done_dir]
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_file() and self._wanted(entry.path):
                        mtime = entry.stat().st_mtime
                        if mtime <= settled:
                            found.append((mtime, entry.path))
                except OSError:
                    continue
        for path in [p for p in self.seen if not os.path.exists(p)]:
            del self.seen[path]
        return [p for _, p in sorted(found)]

    def _capture(self, path: str) -> Capture | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # gone already (moved on, deleted)
        if not stat.S_ISREG(st.st_mode):
            return None
        sig = (st.st_mtime_ns, st.st_size)
        if self.seen.get(path) == sig:
            return None
        self.seen[path] = sig
        ts = time.time()
        rel = Path(path).relative_to(self.root).as_posix()
        cap = Capture(None, "mono8", ts, origin=path, part_id=Path(path).stem,
                      done=lambda: self._done(path))
        if self.pattern is None:
            cap.sku = self.cfg.sku
        else:
            m = self.pattern.search(rel)
            if m is None or m.group("sku") is None:
                cap.error = f"file {rel} does not match sku_pattern {self.pattern.pattern!r}"
                return cap
            try:
                cap.sku = valid_name(m.group("sku"), "sku")
            except ProtocolError as e:
                cap.error = f"file {rel}: {e}"
                return cap
            if "part" in self.pattern.groupindex and m.group("part") is not None:
                cap.part_id = m.group("part")
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            cap.error = f"cannot read {path}: {e.strerror}"
            return cap
        # OpenCV decodes a cut-off JPEG as a grey-filled image with only a warning.
        if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] != b"\xff\xd9":
            cap.error = f"cannot decode {path}: truncated JPEG"
            return cap
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            cap.error = f"cannot decode {path}"
            return cap
        try:
            cap.image, cap.pixel_format = as_pixels(img)
        except ValueError as e:
            cap.error = f"{path}: {e}"
        return cap

    def _done(self, path: str) -> None:
        """After the frame was handed on: move, delete or keep the file (never raises)."""
        after = self.cfg.after
        try:
            if after == "delete":
                os.unlink(path)
            elif after == "move":
                dest = self.done_dir / Path(path).relative_to(self.root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, _free_name(dest))
            else:
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            # Stays in `seen`, so it is not sent again.
            self.log.error("cannot dispose of file", path=path, after=after, error=str(e))
            return
        self.seen.pop(path, None)


def _free_name(dest: Path) -> Path:
    """dest, or dest with -1, -2 … before the suffix when that name is taken."""
    n = 0
    candidate = dest
    while candidate.exists():
        n += 1
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    return candidate
