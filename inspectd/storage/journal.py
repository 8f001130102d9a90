"""The sink's journal: what it has taken on but not yet made durable, so a sink that dies
(a crash, SIGKILL, the supervisor's watchdog) loses no frame.

Without it a restarted sink would not know the frames announced to its predecessor that
were still waiting for a verdict (no row would ever be written for them), nor the verdicts
its predecessor had judged — and sent to the PLC — whose audit rows were still in memory.

The journal is a directory of JSON-lines segments `<sequence>.jsonl`, one line per event,
written before the sink acts on it: `{"announce": header}` when a frame is announced, a
spool-format row (`encode_row`, no paths yet) when a frame is judged — before its PLC output
— and `{"paths": {frame_id: paths}}` once its images are saved. The sink starts a new
segment every `rotate_s`; the oldest segment is
deleted once every frame announced in it has been judged and the audit log has made every
row judged in it durable (committed or spooled). Oldest first, so an announcement is never
left without the later segment that holds its verdict.

On start the sink replays what is left: judged rows go to the audit log again (inserts are
idempotent on frame_id, and the PLC and subscribers already had them); announced frames
without a verdict are tracked again against their deadlines. Lines are written, not
fsync'ed: a killed process loses nothing, a power cut can lose the last moments, as it
would lose the frames in the cameras' and workers' memory anyway. A torn last line (a
crash mid-write) is skipped. A sink killed between a verdict's line and its images leaves a
row without image paths; one killed between a frame's PLC output and its line (a few
microseconds) leaves that frame announced, so it is audited TIMEOUT: fail closed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from inspectd.core.wire import FrameHeader, ProtocolError, Verdict
from inspectd.storage.audit import Item, decode_row, encode_row
from inspectd.storage.files import fsync_dir

log = structlog.get_logger("inspectd.journal")

SUFFIX = ".jsonl"


@dataclass
class _Segment:
    path: Path
    opened: float
    announced: set[str] = field(default_factory=set)  # frame ids still waiting for a verdict
    last_row: int = 0  # audit row number of the last verdict judged in it


@dataclass
class Recovered:
    """A dead sink's unfinished business."""

    rows: list[Item]  # judged: each needs its audit row (again)
    pending: list[FrameHeader]  # announced, never judged: track them again
    segments: int


class Journal:
    def __init__(self, directory: Path, rotate_s: float = 10.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rotate_s = rotate_s
        self._segments: list[_Segment] = []
        self._owner: dict[str, _Segment] = {}  # announced frame id → its segment
        self._fd: int | None = None
        self.write_errors = 0  # lines that could not be written (disk full): logged once a run

    def recover(self) -> Recovered:
        """Read what a previous sink left. Its segments stay until their frames are judged
        and their rows durable: call `recovered(row)` once the rows are recorded."""
        judged: dict[str, Verdict] = {}
        saved: dict[str, dict[str, str]] = {}
        announced: dict[str, tuple[FrameHeader, _Segment]] = {}
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            seg = _Segment(path, time.monotonic())
            for line in path.read_bytes().splitlines():
                try:
                    data = json.loads(line)
                    if "announce" in data:
                        h = FrameHeader.decode(json.dumps(data["announce"]).encode())
                        announced.setdefault(h.frame_id, (h, seg))
                    elif "verdict" in data:
                        v, _ = decode_row(line)
                        judged.setdefault(v.frame_id, v)
                    else:
                        saved.update(data["paths"])
                except (ValueError, KeyError, TypeError, ProtocolError) as e:
                    log.warning("unreadable journal line skipped", segment=str(path),
                                error=str(e))
            self._segments.append(seg)
        pending = []
        for fid, (h, seg) in announced.items():
            if fid not in judged:
                seg.announced.add(fid)
                self._owner[fid] = seg
                pending.append(h)
        return Recovered([(v, saved.get(fid)) for fid, v in judged.items()], pending,
                         len(self._segments))

    def recovered(self, last_row: int) -> None:
        """The recovered rows are recorded, the last as audit row number `last_row`."""
        for seg in self._segments:
            seg.last_row = last_row

    def announce(self, h: FrameHeader) -> None:
        seg = self._current()
        seg.announced.add(h.frame_id)
        self._owner[h.frame_id] = seg
        self._write(b'{"announce":' + h.encode() + b"}\n")

    def judged(self, v: Verdict) -> None:
        """Before `v` leaves the sink (PLC, images, audit log, events)."""
        seg = self._owner.pop(v.frame_id, None)
        if seg is not None:
            seg.announced.discard(v.frame_id)
        self._current()
        self._write(encode_row(v, None) + b"\n")

    def recorded(self, frame_id: str, paths: dict[str, str] | None, row: int) -> None:
        """The judged frame's images are saved at `paths` and its audit row is number `row`."""
        self._current().last_row = row
        if paths:
            self._write(json.dumps({"paths": {frame_id: paths}}).encode() + b"\n")

    def collect(self, durable_rows: int) -> None:
        """Drop the oldest segments that are done (every announced frame judged, every row up
        to their last one durable); start a new segment when due."""
        while (len(self._segments) > 1 and not self._segments[0].announced
               and self._segments[0].last_row <= durable_rows):
            self._segments.pop(0).path.unlink(missing_ok=True)
        cur = self._segments[-1] if self._fd is not None else None
        if cur is not None and time.monotonic() - cur.opened >= self.rotate_s:
            os.close(self._fd)
            self._fd = None

    def close(self, clean: bool) -> None:
        """`clean`: every frame judged and every row durable, so nothing is left to replay."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if clean:
            for seg in self._segments:
                seg.path.unlink(missing_ok=True)
            self._segments.clear()
            fsync_dir(self.dir)

    def _current(self) -> _Segment:
        if self._fd is None:
            last = int(self._segments[-1].path.stem) if self._segments else 0
            path = self.dir / f"{last + 1:012d}{SUFFIX}"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            fsync_dir(self.dir)
            self._segments.append(_Segment(path, time.monotonic()))
        return self._segments[-1]

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:  # the line goes on; only a crash now could lose frames
            if len(view) < len(line):  # a torn line: later lines go to a new segment
                os.close(self._fd)
                self._fd = None
            if not self.write_errors:
                log.error("cannot write the sink journal (logged once until it can again)",
                          journal=str(self.dir), error=str(e))
            self.write_errors += 1
            return
        if self.write_errors:
            log.info("sink journal writable again", journal=str(self.dir),
                     lines_not_written=self.write_errors)
            self.write_errors = 0
