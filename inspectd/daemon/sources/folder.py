"""A watched folder as a camera: each complete image file written or moved into it is a frame.

Only close-after-write and moved-in events count, so a file is never read while it is being
written. Watchdog handlers only enqueue (an exception there silently ends the observer
thread); the frames loop does the work. A new sub-folder is scanned as soon as it appears
(files written into it before its watch existed have no event). A periodic re-scan picks up
what a full queue or an inotify overflow lost; it takes only files unchanged for a few
seconds, so a slow writer's half-written file is left for its close event.

No file stops the line: anything wrong with one (empty, truncated, not an image, too many
pixels, a symlink, unreadable) makes that frame an ERROR with the reason. A file's frame id
is derived from the file (path, size, mtime, inode), so the same file seen again after a
restart is the same frame. The file stays in the folder until the sink has the frame's
outcome: then OK and NG files go by `after`, ERROR and TIMEOUT files to the quarantine
folder with a `.txt` saying why — a file is never deleted unjudged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
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
from PIL import Image
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

from inspectd.core.config import FolderCamera
from inspectd.core.wire import ProtocolError, printable, valid_name
from inspectd.daemon.sources.base import Capture, Lost, SourceBase, SourceError, as_pixels

QUEUE_SIZE = 1024
RESCAN_S = 10.0
SETTLE_S = 2.0  # a re-scan only takes files whose mtime is at least this old
MAX_FILE_BYTES = 1 << 30  # no camera writes a bigger image file: refuse before reading it
_TEMP_SUFFIXES = (".tmp", ".part", "~")
_DIR = "\0dir:"  # queue item prefix: a directory to scan now (new sub-folder)


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
        if not event.dest_path:
            return  # moved out of the folder
        self._put((_DIR if event.is_directory else "") + os.fsdecode(event.dest_path))

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._put(_DIR + os.fsdecode(event.src_path))
        elif os.path.islink(event.src_path):  # a symlink made in place never closes
            self._put(event.src_path)


class FolderSource(SourceBase):
    kind = "folder"
    push_back = True  # files wait in the folder while the line is busy

    def __init__(self, name: str, cfg: FolderCamera) -> None:
        super().__init__(name, cfg)
        self.root = Path(os.path.abspath(cfg.path))
        self.done_dir = Path(os.path.abspath(cfg.done_dir or self.root / "done"))
        self.quarantine_dir = Path(os.path.abspath(cfg.quarantine_dir
                                                   or self.root / "quarantine"))
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
        self._seen_lock = threading.Lock()  # `_done` runs in acquisition's thread
        self._scan_existing = cfg.existing

    def _connect(self) -> InotifyObserver:
        if not self.root.is_dir():
            raise Lost(f"folder {self.root} does not exist")
        # full events: a file moved in from outside the folder is a move, not a create.
        observer = InotifyObserver(generate_full_events=True)
        observer.schedule(_Enqueue(self.q, self.overflow), str(self.root),
                          recursive=self.cfg.recursive,
                          event_filter=[FileClosedEvent, FileMovedEvent, FileCreatedEvent,
                                        DirCreatedEvent, DirMovedEvent])
        observer.start()
        return observer

    def _disconnect(self, observer: InotifyObserver, lost: bool) -> None:
        observer.stop()
        observer.join(timeout=5)

    def _grab(self, observer: InotifyObserver) -> Iterator[Capture]:
        # Files present now: at start when `existing`, and after every reconnect (events missed).
        # A file a scan finds had no event: it waited unseen (written while the line was
        # down or starting, or lost to an overflow), so its deadline counts from now.
        pending: deque[str] = deque()
        received: dict[str, float] = {}

        def scan(top_dir: str | None = None, settle: bool = True) -> float:
            """Queue what a scan finds; → seconds to the next scan: soon if it left young
            files for later (written just before the watch began, they have no event)."""
            found, young = self._scan(top_dir, settle)
            now = time.time()
            for p in found:
                received.setdefault(p, now)
            pending.extend(found)
            return SETTLE_S if young else RESCAN_S

        next_scan = time.monotonic() + (scan() if self._scan_existing else RESCAN_S)
        self._scan_existing = True
        while not self.stopped():
            scanned = bool(pending)
            if pending:
                path = pending.popleft()
            else:
                if self.overflow.is_set() or time.monotonic() >= next_scan:
                    self.overflow.clear()
                    next_scan = time.monotonic() + scan()
                    continue
                try:
                    path = self.q.get(timeout=0.2)
                except queue.Empty:
                    if not observer.is_alive() or not self.root.is_dir():
                        raise Lost(f"watch on {self.root} ended (folder removed?)") from None
                    continue
                if path.startswith(_DIR):
                    new_dir = path[len(_DIR):]
                    if self.cfg.recursive and self._wanted_dir(new_dir):
                        scan(new_dir, settle=False)
                    continue
            if not self._wanted(path):
                continue
            if not self.pace():
                return
            try:
                cap = self._capture(path, received.pop(path, None), scanned)
            except Exception as e:  # one file never stops the line: it is that frame's ERROR
                cap = self._error(path, f"cannot read {path}: {type(e).__name__}: {e}")
            if cap is not None:
                yield cap

    def _wanted(self, path: str) -> bool:
        p = Path(path)
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return False
        if p.is_relative_to(self.done_dir) or p.is_relative_to(self.quarantine_dir) or (
                not self.cfg.recursive and len(rel.parts) != 1):
            return False
        if any(part.startswith(".") for part in rel.parts) or p.name.endswith(_TEMP_SUFFIXES):
            return False
        name = p.name.lower()
        return any(fnmatch.fnmatchcase(name, pat.lower()) for pat in self.cfg.patterns)

    def _wanted_dir(self, path: str) -> bool:
        p = Path(path)
        if not p.is_relative_to(self.root) or p.is_relative_to(self.done_dir) \
                or p.is_relative_to(self.quarantine_dir):
            return False
        return not any(part.startswith(".") for part in p.relative_to(self.root).parts)

    def _scan(self, top_dir: str | None = None,
              settle: bool = True) -> tuple[list[str], bool]:
        """Complete-looking files in the folder (or in `top_dir`, a new sub-folder, taken
        whatever their age: its files had no events), oldest first, and whether younger
        files were left for later; forgets kept files now gone."""
        found: list[tuple[float, str]] = []
        young = False
        settled = time.time() - SETTLE_S if settle else float("inf")
        start = top_dir or str(self.root)
        walk = os.walk(start) if self.cfg.recursive else [(str(self.root), [], None)]
        skip = (self.done_dir, self.quarantine_dir)
        for top, dirs, _ in walk:
            dirs[:] = [d for d in dirs if not d.startswith(".") and Path(top, d) not in skip]
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for entry in entries:
                try:
                    # a symlink too, whatever it points at (nothing, a device): its ERROR
                    if (entry.is_symlink() or entry.is_file()) and self._wanted(entry.path):
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                        if mtime <= settled:
                            found.append((mtime, entry.path))
                        else:
                            young = True
                except OSError:
                    continue
        with self._seen_lock:
            known = list(self.seen)
        gone = [p for p in known if not os.path.exists(p)]
        with self._seen_lock:
            for path in gone:
                self.seen.pop(path, None)
        return [p for _, p in sorted(found)], young

    def _capture(self, path: str, received: float | None, scanned: bool) -> Capture | None:
        """The file's frame, an ERROR frame, or None (gone, seen, not a file, or found by a
        scan while maybe still being written: its close event or a later scan brings it)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None  # gone already (moved on, deleted)
        sig = (st.st_mtime_ns, st.st_size)
        with self._seen_lock:
            if self.seen.get(path) == sig:
                return None
            if not (stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode)):
                return None
            self.seen[path] = sig
        if stat.S_ISLNK(st.st_mode):
            return self._error(path, f"{path}: a symbolic link, not an image file", st)
        rel = Path(path).relative_to(self.root).as_posix()
        cap = Capture(None, "mono8", min(st.st_mtime, time.time()), origin=path,
                      part_id=Path(path).stem, done=lambda v, r: self._done(path, v, r),
                      frame_id=_file_id(self.name, path, st), received_ts=received)
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
        cap.error = self._decode_into(cap, path, st.st_size)
        if cap.error is not None and scanned and time.time() - st.st_mtime < SETTLE_S:
            with self._seen_lock:
                self.seen.pop(path, None)  # perhaps half written: not judged yet
            return None
        return cap

    def _decode_into(self, cap: Capture, path: str, size: int) -> str | None:
        """Read and decode the file into `cap`; the reason when it cannot be a frame."""
        if size == 0:
            return f"{path}: empty file"
        if size > MAX_FILE_BYTES:
            return f"{path}: {size} bytes, more than any image file taken ({MAX_FILE_BYTES})"
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        # Dimensions from the header before decoding: a small file can claim gigapixels.
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Image.DecompressionBombError as e:  # Pillow's own guard, far above ours
            return f"{path}: more pixels than cameras.{self.name}.max_pixels allows ({e})"
        except Exception:  # not an image Pillow knows; OpenCV may still decode it
            width = height = None
        if width is not None and width * height > self.cfg.max_pixels:
            return (f"{path}: {width}×{height} pixels, more than cameras.{self.name}."
                    f"max_pixels ({self.cfg.max_pixels})")
        # OpenCV decodes a cut-off JPEG as a grey-filled image with only a warning.
        if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] != b"\xff\xd9":
            return f"cannot decode {path}: truncated JPEG"
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            return f"cannot decode {path}: not an image OpenCV reads"
        if img.shape[0] * img.shape[1] > self.cfg.max_pixels:
            return f"{path}: {img.shape[1]}×{img.shape[0]} pixels, more than max_pixels"
        try:
            cap.image, cap.pixel_format = as_pixels(img)
        except ValueError as e:
            return f"{path}: {e}"
        return None

    def _error(self, path: str, reason: str, st: os.stat_result | None = None) -> Capture:
        """A frame for a file that cannot be read: an ERROR, and the file is quarantined."""
        try:
            st = st or os.lstat(path)
            fid = _file_id(self.name, path, st)
            ts = min(st.st_mtime, time.time())
        except OSError:
            fid, ts = None, time.time()
        return Capture(None, "mono8", ts, sku=self.cfg.sku, origin=path,
                       part_id=Path(path).stem, error=reason,
                       done=lambda v, r: self._done(path, v, r), frame_id=fid)

    def _done(self, path: str, verdict: str, reason: str | None) -> None:
        """The frame's outcome is known: OK/NG files go by `after`; ERROR/TIMEOUT files to
        quarantine, beside a note of why (never raises)."""
        after = self.cfg.after if verdict in ("OK", "NG") else "quarantine"
        try:
            if after == "delete":
                os.unlink(path)
            elif after in ("move", "quarantine"):
                base = self.done_dir if after == "move" else self.quarantine_dir
                dest = _free_name(base / Path(path).relative_to(self.root))
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, dest)
                if after == "quarantine":
                    note_path(dest).write_text(
                        printable(f"{verdict}: {reason or 'no reason given'}\n"))
            else:
                return
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 — one file's disposal never stops the line
            # Stays in `seen`, so it is not sent again.
            self.log.error("cannot dispose of file", path=printable(path), after=after,
                           error=printable(f"{type(e).__name__}: {e}"))
            return
        with self._seen_lock:
            self.seen.pop(path, None)


def _file_id(camera: str, path: str, st: os.stat_result) -> str:
    """The same file (path, inode, size, mtime) gives the same frame id, across restarts."""
    key = f"{camera}\0{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:32]


NAME_MAX = 255  # bytes in one file name (Linux file systems)


def _fitted(stem: str, tail: str) -> str:
    """stem + tail, the stem shortened (with a hash of it, so names stay distinct) when the
    whole would pass NAME_MAX bytes: a file named at the limit still gets its note."""
    raw = os.fsencode(stem)
    room = NAME_MAX - len(os.fsencode(tail))
    if len(raw) <= room:
        return stem + tail
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    return os.fsdecode(raw[:room - len(tag)]) + tag + tail


def note_path(dest: Path) -> Path:
    """The `.txt` beside a quarantined file that says why it is there."""
    return dest.with_name(_fitted(dest.name, ".txt"))


def _free_name(dest: Path) -> Path:
    """dest, or dest with -1, -2 … before the suffix when that name is taken."""
    n = 0
    candidate = dest
    while os.path.lexists(candidate):
        n += 1
        candidate = dest.with_name(_fitted(dest.stem, f"-{n}{dest.suffix}"))
    return candidate
