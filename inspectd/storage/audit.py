"""The audit writer: one row per verdict, batched, idempotent on frame_id, never blocking the sink.

The sink calls `record()` per verdict and `poll()` from its loop; both only touch memory.
A due batch is handed to a writer thread, the only user of the database connection, so a
slow or unreachable database (a connect timeout, a dead TCP link) never stalls the sink's
deadlines and reject outputs. The writer commits each batch in one transaction; while the
database is unreachable it appends batches to an fsync'ed spool on disk, retries every
`retry_s`, and once the database is back replays the spool in order before any new row.
Inserts ignore a frame_id already present, so a replayed or repeated row never doubles.

A row the database refuses for its content (not an outage) would otherwise block the line
forever: it is appended to `<spool>/rejected.jsonl` (spool format) and logged, so nothing is
lost and an operator can replay it after a fix by renaming it to a segment name.

When the spool cannot be written either (disk full, disk gone), rows wait in memory and are
retried every `retry_s`, at most `max_memory_rows` of them: beyond, the oldest are dropped,
counted in `rows_lost` and logged with their frame ids. These are the only rows that can be
lost, and only with both the database and the disk gone.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from alembic.util import CommandError
from sqlalchemy import Insert, exc
from sqlalchemy.dialects import postgresql, sqlite

from inspectd.core.wire import ProtocolError, Verdict
from inspectd.storage.db import StorageError, first_line, make_engine, safe_url, upgrade
from inspectd.storage.schema import verdicts
from inspectd.storage.spool import Spool

log = structlog.get_logger("inspectd.audit")

Item = tuple[Verdict, dict[str, str] | None]
REJECTED = "rejected.jsonl"
REPLAY_ROWS = 2000  # rows per replay transaction
MAX_MEMORY_ROWS = 20_000  # sink.database.max_memory_rows
MAX_SPOOL_BYTES = 2**30  # sink.database.max_spool_bytes
IDLE_WAKE_S = 0.1  # shortest wait of an idle writer that has a retry or replay to do
# Outages (reconnect later) as opposed to rows the database refuses for their content.
_OUTAGE = (exc.OperationalError, exc.InterfaceError, exc.ProgrammingError, exc.InternalError)


class AuditLog:
    def __init__(self, url: str, spool_dir: Path, commit_rows: int = 200,
                 commit_interval_s: float = 0.25, retry_s: float = 2.0,
                 max_spool_bytes: int | None = MAX_SPOOL_BYTES,
                 max_memory_rows: int = MAX_MEMORY_ROWS) -> None:
        self.engine = make_engine(url)
        self.url = safe_url(url)
        self._insert = _insert_ignoring_duplicates(self.engine.dialect.name)
        self.spool = Spool(spool_dir, max_spool_bytes)
        self.commit_rows = commit_rows
        self.commit_interval_s = commit_interval_s
        self.retry_s = retry_s
        self.max_memory_rows = max_memory_rows
        self.rows_committed = 0  # rows in committed inserts (duplicates the DB ignored too)
        self.rows_spooled = 0
        self.rows_rejected = 0
        self.rows_lost = 0  # dropped from memory: no database, no spool (logged with ids)
        # Rows numbered in record() order; the writer is done with them in that order:
        # `rows_durable` counts those committed or spooled (or set aside as rejected, or
        # lost, so that the sink journal is never held forever by a row that will not come).
        self.rows_recorded = self.rows_durable = 0
        self._spool_failing = False
        self.db_up = False
        self._batch: list[Item] = []
        self._batch_t0 = 0.0
        self._retry_at = 0.0
        self._outage = False  # an outage was logged, and no write has succeeded since
        self._unspooled: list[Item] = []  # writer-side rows not yet committed or spooled
        self._queue: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._handed = self._written = 0  # batches given to the writer / done by it
        self._cond = threading.Condition()
        self._connect()  # at start, so the schema exists before the first row (or we know why)
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    @property
    def spool_backlog(self) -> int:
        return self.spool.backlog

    @property
    def memory_rows(self) -> int:
        """Rows the writer holds: neither committed nor spooled yet (a batch in hand, or the
        rows waiting for the database or the disk to come back)."""
        return len(self._unspooled)

    def record(self, v: Verdict, paths: dict[str, str] | None = None) -> int:
        """Queue one row; `poll()` hands it to the writer. Returns its number (1, 2, …):
        once `rows_durable` reaches it, the row is committed or spooled (or, with both the
        database and the disk gone, counted in `rows_lost`)."""
        if not self._batch:
            self._batch_t0 = time.monotonic()
        self._batch.append((v, paths))
        self.rows_recorded += 1
        return self.rows_recorded

    def poll(self) -> None:
        """Hand the batch to the writer once it has commit_rows rows or is commit_interval old."""
        if self._batch and (len(self._batch) >= self.commit_rows
                            or time.monotonic() - self._batch_t0 >= self.commit_interval_s):
            self._hand_off()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every batch handed off so far is committed or spooled; False on timeout."""
        with self._cond:
            handed = self._handed
            return self._cond.wait_for(lambda: self._written >= handed, timeout)

    def close(self) -> None:
        """Write everything: spool and batch to the database, or the batch to the spool."""
        self._hand_off()
        self._queue.put(None)
        self._writer.join()

    # -- the writer thread --------------------------------------------------------------------
    def _hand_off(self) -> None:
        if self._batch:
            items, self._batch = self._batch, []
            with self._cond:
                self._handed += 1
            self._queue.put(items)

    def _run(self) -> None:
        while True:
            timeout = None
            if self.spool.pending or self._unspooled:
                timeout = max(self._retry_at - time.monotonic(), IDLE_WAKE_S)
            try:
                items = self._queue.get(timeout=timeout)
            except queue.Empty:
                items = []
            self._unspooled.extend(items or [])
            try:
                self._write_or_spool()
            except Exception:  # a bug must neither end auditing nor loop: keep the rows aside
                log.exception("audit writer failed; its rows go to the rejected file",
                              spool=str(self.spool.dir))
                rows, self._unspooled = self._unspooled, []
                self._reject([encode_row(v, p) for v, p in rows])
                self.rows_durable += len(rows)
            if items:
                with self._cond:
                    self._written += 1
                    self._cond.notify_all()
            if items is None:
                break
        if self._unspooled:
            log.error("audit rows lost at shutdown: neither database nor spool took them",
                      rows=len(self._unspooled), frame_ids=[v.frame_id for v, _ in self._unspooled])
            self.rows_lost += len(self._unspooled)
        self.spool.close()
        self.engine.dispose()

    def _write_or_spool(self) -> None:
        """Replay the spool if the database is (back) up, then write or spool `_unspooled`."""
        if not self.db_up and time.monotonic() >= self._retry_at:
            self._connect()
        while self.db_up and self.spool.pending and self._replay_chunk(REPLAY_ROWS):
            pass
        items = self._unspooled
        if not items:
            return
        if self.db_up and not self.spool.pending and self._write(items):
            self._unspooled = []
            self.rows_committed += len(items)
            self.rows_durable += len(items)
            return
        try:
            self.spool.append([encode_row(v, p) for v, p in items])
        except OSError as e:
            # Keep them in memory and try again: better than losing audit rows.
            if not self._spool_failing:  # once per failure, not per retry
                log.error("cannot write the audit spool: rows wait in memory",
                          spool=str(self.spool.dir), error=str(e), rows=len(items),
                          max_memory_rows=self.max_memory_rows)
                self._spool_failing = True
            self._retry_at = time.monotonic() + self.retry_s
            self._bound_memory()
            return
        if self._spool_failing:
            log.info("audit spool writable again", spool=str(self.spool.dir), rows=len(items))
            self._spool_failing = False
        self._unspooled = []
        self.rows_spooled += len(items)
        self.rows_durable += len(items)

    def _bound_memory(self) -> None:
        """Past max_memory_rows, drop the oldest rows: counted, and logged with their ids."""
        excess = len(self._unspooled) - self.max_memory_rows
        if excess <= 0:
            return
        lost, self._unspooled = self._unspooled[:excess], self._unspooled[excess:]
        self.rows_lost += excess
        self.rows_durable += excess  # the oldest first, so the count stays in order
        log.error("audit rows lost: the database and the spool are both unavailable and "
                  "max_memory_rows is reached", rows=excess, lost_total=self.rows_lost,
                  max_memory_rows=self.max_memory_rows,
                  frame_ids=[v.frame_id for v, _ in lost])

    def _connect(self) -> None:
        try:
            upgrade(self.engine)  # also proves the database takes connections
        except (exc.SQLAlchemyError, CommandError) as e:
            self._down(e)
            return
        self.db_up = True
        if self._outage:  # said once it is back, at the first write that succeeds
            log.debug("audit database takes connections again", url=self.url)
        else:
            log.info("audit database up", url=self.url, spooled=self.spool.backlog)

    def _down(self, e: Exception) -> None:
        # Once per outage: a database that takes connections but not writes (SQLite on a
        # full disk) must not log twice per retry.
        if not self._outage:
            log.error("audit database unreachable, spooling rows", url=self.url,
                      error=first_line(e), retry_s=self.retry_s)
            self._outage = True
        else:
            log.debug("audit database still unreachable", url=self.url, error=first_line(e))
        self.db_up = False
        self._retry_at = time.monotonic() + self.retry_s
        self.engine.dispose()  # pooled connections to a restarted server are dead

    def _replay_chunk(self, max_rows: int) -> bool:
        """Replay the spool's next rows; False when the database went away meanwhile."""
        chunk = self.spool.read(max_rows)
        if chunk is None:
            self.spool.pending = False
            return True
        items: list[Item] = []
        bad: list[bytes] = []
        for line in chunk.lines:
            try:
                items.append(decode_row(line))
            except (ValueError, KeyError, TypeError, ProtocolError) as e:
                log.error("unreadable spool line", segment=str(chunk.segment), error=str(e))
                bad.append(line)
        if items and not self._write(items):
            return False  # the chunk stays for the next try
        self._reject(bad)
        self.rows_committed += len(items)
        self.spool.consume(chunk)
        return True

    def _write(self, items: list[Item]) -> bool:
        """Insert in one transaction; False on an outage (nothing to assume committed)."""
        try:
            self._execute([_row(v, p) for v, p in items])
            return True
        except exc.SQLAlchemyError as e:
            if _is_outage(e):
                self._down(e)
                return False
            log.warning("batch refused by the database, inserting row by row",
                        error=first_line(e))
        for v, p in items:  # find the rows at fault; the others go in
            try:
                self._execute([_row(v, p)])
            except exc.SQLAlchemyError as e:
                if _is_outage(e):
                    self._down(e)
                    return False
                log.error("audit row refused by the database", frame_id=v.frame_id,
                          error=first_line(e))
                self._reject([encode_row(v, p)])
        return True

    def _execute(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._insert, rows)
        if self._outage:
            log.info("audit database back: rows are written again", url=self.url,
                     spooled=self.spool.backlog)
            self._outage = False

    def _reject(self, lines: list[bytes]) -> None:
        if not lines:
            return
        try:
            with (self.spool.dir / REJECTED).open("ab") as f:
                f.write(b"".join(line + b"\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.error("audit rows lost: cannot write the rejected file", error=str(e),
                      rows=[line.decode(errors="replace") for line in lines])
        self.rows_rejected += len(lines)


def _insert_ignoring_duplicates(dialect: str) -> Insert:
    if dialect == "postgresql":
        return postgresql.insert(verdicts).on_conflict_do_nothing(index_elements=["frame_id"])
    if dialect == "sqlite":
        return sqlite.insert(verdicts).on_conflict_do_nothing(index_elements=["frame_id"])
    raise StorageError(f"unsupported audit database {dialect!r}: use SQLite or PostgreSQL")


def _is_outage(e: exc.SQLAlchemyError) -> bool:
    return isinstance(e, _OUTAGE) or bool(getattr(e, "connection_invalidated", False))


def encode_row(v: Verdict, paths: dict[str, str] | None) -> bytes:
    # default=str: a stray non-JSON value must not cost the row (the database judges it).
    return json.dumps({"verdict": v.as_dict(), "paths": paths}, separators=(",", ":"),
                      default=str).encode()


def decode_row(line: bytes) -> Item:
    data = json.loads(line)
    return Verdict.decode(json.dumps(data["verdict"]).encode()), data.get("paths")


def _utc(ts: float | None) -> datetime | None:
    try:
        if ts is None or not math.isfinite(ts) or ts <= 0:
            return None
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError, TypeError):
        return None


def _row(v: Verdict, paths: dict[str, str] | None) -> dict[str, Any]:
    t, p = v.timings_ms or {}, paths or {}
    return {
        "frame_id": v.frame_id, "line": v.line, "camera": v.camera, "sku": v.sku,
        "part_id": v.part_id, "origin": v.origin, "capture_time": _utc(v.capture_ts),
        "decided_time": _utc(v.decided_ts) or datetime.now(UTC), "verdict": v.verdict,
        "reason": v.reason, "score": v.score, "threshold": v.threshold,
        "pixel_threshold": v.pixel_threshold, "model_version": v.model_version,
        "queue_ms": t.get("queue"), "decode_ms": t.get("decode"), "infer_ms": t.get("infer"),
        "total_ms": t.get("total"), "image_path": p.get("image"), "mask_path": p.get("mask"),
        "overlay_path": p.get("overlay"), "image_sha256": v.image_sha256,
    }

