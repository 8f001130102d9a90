"""An append-only, fsync'ed queue on disk for audit rows the database could not take yet.

Segments are JSON-lines files named `<sequence>.jsonl` (zero-padded, so names sort in write
order). One writer: a process appends to a segment it created itself and never reopens an
old one, so the only damage a crash can leave is a torn last line, which replay skips.
Rows are read from the oldest segment; a segment is deleted once all its rows are committed.

`max_bytes` is an alarm, not a cap: above it the spool logs an error once (and again once it
is back under) and `over_limit` is set for the metrics, but rows go on being spooled while
the filesystem takes them, since the alternative is losing audit rows. By then the image
store's free-space guard has stopped writing images, so what disk is left goes to rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from inspectd.storage.files import fsync_dir

log = structlog.get_logger("inspectd.spool")

SUFFIX = ".jsonl"
MAX_SEGMENT_BYTES = 16 * 2**20


@dataclass
class Chunk:
    """Rows read from the head segment, and where the next read starts once they commit."""

    lines: list[bytes]
    segment: Path
    end: int  # byte offset after the last line read (torn tail included when skipped)


class Spool:
    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._current: Path | None = None
        self._current_size = 0
        self._head_offset = 0  # of the oldest segment: rows before it are committed
        segs = self.segments()
        self._next_seq = int(segs[-1].stem) + 1 if segs else 1
        self.backlog = sum(_count_lines(p) for p in segs)
        self.bytes = sum(p.stat().st_size for p in segs)  # of the segments on disk
        self.over_limit = False
        self.pending = bool(segs)  # segments left to replay (set False once read finds none)
        if self.backlog:
            log.info("spooled audit rows waiting for the database", rows=self.backlog,
                     segments=len(segs), spool=str(self.dir))
        self._check_limit()

    def segments(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def append(self, lines: list[bytes]) -> None:
        """Append complete lines and fsync; raises OSError when the disk refuses."""
        if not lines:
            return
        if self._fd is None or self._current_size >= MAX_SEGMENT_BYTES:
            self._open_segment()
        data = b"".join(line + b"\n" for line in lines)
        view = memoryview(data)
        written = 0
        try:
            while view:
                n = os.write(self._fd, view)
                written += n
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            if written:
                # A partial line may be on disk: leave this segment (replay skips its torn
                # tail) so the caller's retry starts a clean one. With nothing written (a
                # full disk) the segment is intact and stays: no empty segment per retry.
                self.bytes += written
                self._close_segment()
            raise
        self._current_size += len(data)
        self.bytes += len(data)
        self.backlog += len(lines)
        self.pending = True
        self._check_limit()

    def read(self, max_rows: int) -> Chunk | None:
        """Up to max_rows complete lines from the oldest segment, without consuming them."""
        segs = self.segments()
        if not segs:
            return None
        seg = segs[0]
        with seg.open("rb") as f:
            f.seek(self._head_offset)
            lines: list[bytes] = []
            end = self._head_offset
            while len(lines) < max_rows:
                line = f.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    # Only a crash mid-append leaves this, and only in a segment no longer
                    # written to: the row never finished reaching the disk.
                    if seg != self._current:
                        log.warning("skipping a torn line at the end of a spool segment",
                                    segment=str(seg), bytes=len(line))
                        end += len(line)
                    break
                end += len(line)
                if line.strip():
                    lines.append(line.rstrip(b"\n"))
        return Chunk(lines, seg, end)

    def consume(self, chunk: Chunk) -> None:
        """The chunk's rows are committed: advance, deleting the segment when it is done."""
        self.backlog = max(0, self.backlog - len(chunk.lines))
        self._head_offset = chunk.end
        if chunk.end < chunk.segment.stat().st_size:
            return
        if chunk.segment == self._current:
            self._close_segment()
        size = chunk.segment.stat().st_size
        chunk.segment.unlink()
        fsync_dir(self.dir)
        self._head_offset = 0
        self.bytes = max(0, self.bytes - size)
        self._check_limit()

    def close(self) -> None:
        empty = self._current if self._fd is not None and self._current_size == 0 else None
        self._close_segment()
        if empty is not None:  # opened for an append the disk refused: nothing to replay
            empty.unlink(missing_ok=True)

    def _check_limit(self) -> None:
        over = self.max_bytes is not None and self.bytes > self.max_bytes
        if over and not self.over_limit:
            log.error("audit spool above max_spool_bytes: the database has been away long; "
                      "rows go on spooling while the disk has room", spool=str(self.dir),
                      bytes=self.bytes, max_spool_bytes=self.max_bytes, rows=self.backlog)
        elif self.over_limit and not over:
            log.info("audit spool back under max_spool_bytes", spool=str(self.dir),
                     bytes=self.bytes, max_spool_bytes=self.max_bytes)
        self.over_limit = over

    def _open_segment(self) -> None:
        self._close_segment()
        self._current = self.dir / f"{self._next_seq:016d}{SUFFIX}"
        self._next_seq += 1
        self._fd = os.open(self._current, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL,
                           0o640)
        self._current_size = 0
        fsync_dir(self.dir)  # the new name must survive a crash too

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._current = None


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.endswith(b"\n") and line.strip())
