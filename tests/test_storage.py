"""Audit log (SQLite and PostgreSQL), spool, migrations and the image store, on real databases."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from inspectd.core.config import ImageSettings
from inspectd.core.wire import FrameHeader, ProtocolError, Verdict
from inspectd.storage import files
from inspectd.storage import spool as spool_module
from inspectd.storage.audit import AuditLog
from inspectd.storage.db import upgrade
from inspectd.storage.images import ImageStore
from inspectd.storage.journal import Journal
from inspectd.storage.spool import Spool

T0 = datetime(2024, 5, 1, 10, 30, tzinfo=UTC).timestamp()


@dataclass
class Backend:
    name: str
    url: str
    unreachable_url: str
    outage: Callable[[], AbstractContextManager[None]]  # the database refuses work inside

    def frame_ids(self) -> list[str]:
        return frame_ids(self.url)

    def row(self, frame_id: str) -> dict[str, Any]:
        from inspectd.storage.schema import verdicts

        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as c:
                q = sa.select(verdicts).where(verdicts.c.frame_id == frame_id)
                return dict(c.execute(q).one()._mapping)
        finally:
            engine.dispose()


def frame_ids(url: str) -> list[str]:
    """Audited frame ids in insertion order."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text("SELECT frame_id FROM verdicts ORDER BY id")).scalars())
    finally:
        engine.dispose()


def empty_postgres(pg: Any) -> Any:
    """The session's PostgreSQL database without tables, so each test starts afresh."""
    engine = sa.create_engine(pg.url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS labels, verdicts, alembic_version"))
    engine.dispose()
    return pg


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        db = tmp_path / "audit.db"
        (tmp_path / "not-a-dir").write_text("")

        @contextmanager
        def locked() -> Iterator[None]:
            # Another process holding the write lock: the sink's inserts time out.
            con = sqlite3.connect(db, isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                con.rollback()
                con.close()

        return Backend("sqlite", f"sqlite:///{db}", f"sqlite:///{tmp_path}/not-a-dir/audit.db",
                       locked)

    pg = empty_postgres(request.getfixturevalue("postgres_db"))

    @contextmanager
    def refusing() -> Iterator[None]:
        with pg.admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS false'))
            c.execute(sa.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              f"WHERE datname = '{pg.name}'"))
        try:
            yield
        finally:
            with pg.admin.connect() as c:
                c.execute(sa.text(f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS true'))

    # Nothing listens on port 1 of loopback: connection refused at once.
    return Backend("postgres", pg.url, "postgresql+psycopg://postgres@127.0.0.1:1/none", refusing)


def verdict(i: int, kind: str = "OK", **kw: object) -> Verdict:
    fields: dict[str, Any] = {"camera": "cam1", "sku": "widget", "line": "l1",
                              "capture_ts": T0 + i, "decided_ts": T0 + i + 0.05,
                              "score": 0.1 * i, "threshold": 1.0}
    return Verdict(frame_id=f"f{i:04d}", verdict=kind, **(fields | kw))


OpenLog = Callable[..., AuditLog]


@pytest.fixture
def audit_log() -> Iterator[OpenLog]:
    """AuditLog(...) that is closed after the test even when it fails (its writer thread)."""
    logs: list[AuditLog] = []

    def open_log(*args: Any, **kw: Any) -> AuditLog:
        logs.append(AuditLog(*args, **kw))
        return logs[-1]

    yield open_log
    for log in logs:
        log.close()


def segments(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.jsonl"))


def test_upgrade_creates_schema_and_is_rerunnable(backend: Backend) -> None:
    upgrade(backend.url)
    upgrade(backend.url)
    engine = sa.create_engine(backend.url)
    try:
        insp = sa.inspect(engine)
        cols = {c["name"]: c for c in insp.get_columns("verdicts")}
        assert {"id", "frame_id", "line", "camera", "sku", "part_id", "origin", "capture_time",
                "decided_time", "verdict", "reason", "score", "threshold", "pixel_threshold",
                "model_version", "queue_ms", "decode_ms", "infer_ms", "total_ms", "image_path",
                "mask_path", "overlay_path", "image_sha256"} == set(cols)
        indexes = {tuple(ix["column_names"]) for ix in insp.get_indexes("verdicts")}
        assert {("sku", "capture_time"), ("verdict", "capture_time"),
                ("capture_time",)} <= indexes
        unique = [u["column_names"] for u in insp.get_unique_constraints("verdicts")]
        assert ["frame_id"] in unique
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
                ("0002",)]
    finally:
        engine.dispose()


def test_sqlite_audit_log_runs_in_wal_mode(audit_log: OpenLog, tmp_path: Path) -> None:
    log = audit_log(f"sqlite:///{tmp_path}/audit.db", tmp_path / "spool")
    log.close()
    with sqlite3.connect(tmp_path / "audit.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_rows_commit_in_batches_of_commit_rows(
    audit_log: OpenLog, backend: Backend, tmp_path: Path,
) -> None:
    log = audit_log(backend.url, tmp_path / "spool", commit_rows=3, commit_interval_s=3600)
    assert log.db_up
    for i in range(2):
        log.record(verdict(i))
    log.poll()
    assert log.sync(timeout=30)
    assert backend.frame_ids() == []
    log.record(verdict(2))
    log.poll()
    assert log.sync(timeout=30)
    assert backend.frame_ids() == ["f0000", "f0001", "f0002"]
    log.record(verdict(3))
    log.poll()
    assert log.sync(timeout=30)
    assert log.rows_committed == 3
    log.close()
    assert backend.frame_ids() == ["f0000", "f0001", "f0002", "f0003"]
    assert (log.rows_committed, log.rows_spooled, log.spool_backlog) == (4, 0, 0)


def test_commit_interval_flushes_a_partial_batch(audit_log: OpenLog, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    log = audit_log(url, tmp_path / "spool", commit_rows=100, commit_interval_s=0)
    log.record(verdict(1))
    log.poll()
    log.close()
    assert log.rows_committed == 1


def test_row_keeps_every_verdict_field(
    audit_log: OpenLog, backend: Backend, tmp_path: Path,
) -> None:
    v = verdict(7, "NG", part_id="P-42", origin="/in/a.png", reason="score above threshold",
                pixel_threshold=0.5, model_version="20240501-1", image_sha256="ab" * 32,
                timings_ms={"queue": 1.5, "decode": 2.0, "infer": 9.25, "total": 14.0})
    paths = {"image": "/d/f.png", "mask": "/d/f_mask.png", "overlay": "/d/f_overlay.jpg"}
    log = audit_log(backend.url, tmp_path / "spool")
    log.record(v, paths)
    log.close()
    r = backend.row("f0007")
    assert r["capture_time"].astimezone(UTC) == datetime.fromtimestamp(v.capture_ts, UTC)
    assert r["decided_time"].astimezone(UTC) == datetime.fromtimestamp(v.decided_ts, UTC)
    assert (r["line"], r["camera"], r["sku"], r["part_id"], r["origin"], r["verdict"]) == (
        "l1", "cam1", "widget", "P-42", "/in/a.png", "NG")
    assert (r["reason"], r["score"], r["threshold"], r["pixel_threshold"]) == (
        "score above threshold", pytest.approx(0.7), 1.0, 0.5)
    assert (r["model_version"], r["image_sha256"]) == ("20240501-1", "ab" * 32)
    assert (r["queue_ms"], r["decode_ms"], r["infer_ms"], r["total_ms"]) == (1.5, 2.0, 9.25, 14.0)
    assert (r["image_path"], r["mask_path"], r["overlay_path"]) == (
        paths["image"], paths["mask"], paths["overlay"])


def test_duplicate_frame_id_is_ignored(
    audit_log: OpenLog, backend: Backend, tmp_path: Path,
) -> None:
    log = audit_log(backend.url, tmp_path / "spool", commit_rows=3, commit_interval_s=3600)
    log.record(verdict(1))
    log.record(verdict(1, "NG"))  # same frame in the same batch
    log.record(verdict(2))
    log.poll()
    log.record(verdict(2, "TIMEOUT"))  # and in a later batch
    log.record(verdict(3))
    log.close()
    assert backend.frame_ids() == ["f0001", "f0002", "f0003"]
    assert backend.row("f0001")["verdict"] == "OK"  # the first verdict stands
    assert backend.row("f0002")["verdict"] == "OK"


def test_db_outage_spools_and_replays_in_order(
    audit_log: OpenLog, backend: Backend, tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    log = audit_log(backend.url, spool, commit_rows=2, commit_interval_s=3600, retry_s=0)
    log.record(verdict(0))
    log.record(verdict(1))
    log.poll()
    assert log.sync(timeout=30)
    with backend.outage():
        for i in range(2, 6):
            log.record(verdict(i))
            log.poll()
        assert log.sync(timeout=30)
        assert (log.rows_committed, log.rows_spooled) == (2, 4)
        assert segments(spool)
    log.record(verdict(6))
    log.record(verdict(7))
    log.poll()  # back: the spool goes first, then the new batch
    log.close()
    assert log.db_up
    assert backend.frame_ids() == [f"f{i:04d}" for i in range(8)]
    assert log.spool_backlog == 0
    assert segments(spool) == []


def test_spool_survives_restart_while_db_is_down(
    audit_log: OpenLog, backend: Backend, tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    down = audit_log(backend.unreachable_url, spool, commit_rows=2)
    for i in range(5):
        down.record(verdict(i))
        down.poll()
    down.close()
    assert not down.db_up
    assert down.rows_spooled == 5
    log = audit_log(backend.url, spool)
    log.record(verdict(3))  # already in the spool: must not double
    log.record(verdict(9))
    log.close()
    assert backend.frame_ids() == ["f0000", "f0001", "f0002", "f0003", "f0004", "f0009"]
    assert segments(spool) == []


def test_torn_spool_line_is_skipped_on_replay(audit_log: OpenLog, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (tmp_path / "not-a-dir").write_text("")  # a file where the directory should be
    down = audit_log(f"sqlite:///{tmp_path}/not-a-dir/audit.db", spool)
    for i in range(3):
        down.record(verdict(i))
    down.close()
    [seg] = segments(spool)
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 25])  # a crash in the middle of the last line
    url = f"sqlite:///{tmp_path}/audit.db"
    log = audit_log(url, spool)
    log.close()
    assert log.rows_committed == 2
    assert frame_ids(url) == ["f0000", "f0001"]
    assert segments(spool) == []


def test_spool_counts_its_bytes_and_says_once_when_above_its_bound(
    audit_log: OpenLog, tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    dead = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    with capture_logs() as logs:
        down = audit_log(dead, spool, commit_rows=1, max_spool_bytes=2000)
        for i in range(10):
            down.record(verdict(i))
            down.poll()
            assert down.sync(timeout=30)
        down.close()
    on_disk = sum(p.stat().st_size for p in segments(spool))
    assert down.spool.bytes == on_disk > 2000 and down.spool.over_limit
    assert down.rows_spooled == 10  # the bound is an alarm: no row is refused
    over = [e for e in logs if e["event"].startswith("audit spool above max_spool_bytes")]
    assert len(over) == 1 and over[0]["log_level"] == "error"
    url = f"sqlite:///{tmp_path}/audit.db"
    with capture_logs() as logs:
        up = audit_log(url, spool, max_spool_bytes=2000)  # finds it above, says so, replays
        up.close()
    assert frame_ids(url) == [f"f{i:04d}" for i in range(10)]
    assert up.spool.bytes == 0 and not up.spool.over_limit
    assert [e["log_level"] for e in logs if "max_spool_bytes" in e["event"]] == ["error", "info"]


def test_rows_the_spool_cannot_take_wait_in_memory_bounded_then_are_lost_counted(
    audit_log: OpenLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = tmp_path / "spool"
    log = audit_log("postgresql+psycopg://postgres@127.0.0.1:1/none", spool, commit_rows=1,
                    retry_s=3600, max_memory_rows=5)
    real_append = Spool.append

    def disk_full(self: Spool, lines: list[bytes]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Spool, "append", disk_full)
    with capture_logs() as logs:
        for i in range(8):
            log.record(verdict(i))
            log.poll()
            assert log.sync(timeout=30)
            assert log.memory_rows <= 5
        monkeypatch.setattr(Spool, "append", real_append)  # the disk has room again
        log.record(verdict(8))
        log.poll()
        assert log.sync(timeout=30)
    assert (log.memory_rows, log.rows_lost, log.rows_spooled) == (0, 3, 6)
    assert log.rows_durable == log.rows_recorded == 9  # the journal is not held forever
    lost = [e for e in logs if e["event"].startswith("audit rows lost")]
    assert [fid for e in lost for fid in e["frame_ids"]] == ["f0000", "f0001", "f0002"]
    events = [e["event"] for e in logs]
    assert events.count("cannot write the audit spool: rows wait in memory") == 1
    assert events.count("audit spool writable again") == 1
    log.close()
    replayed = audit_log(f"sqlite:///{tmp_path}/audit.db", spool)
    replayed.close()
    assert frame_ids(f"sqlite:///{tmp_path}/audit.db") == [f"f{i:04d}" for i in range(3, 9)]


def test_a_full_disk_does_not_leave_an_empty_spool_segment_per_retry(
    audit_log: OpenLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoSpaceOs:  # the spool's `os`, whose writes find the disk full
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def write(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")

    spool = tmp_path / "spool"
    dead = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    log = audit_log(dead, spool, commit_rows=1)
    monkeypatch.setattr(spool_module, "os", NoSpaceOs())
    for i in range(5):
        log.record(verdict(i))
        log.poll()
        assert log.sync(timeout=30)
    assert len(segments(spool)) == 1 and log.memory_rows == 5
    monkeypatch.undo()
    log.close()
    assert log.rows_spooled == 5 and len(segments(spool)) == 1

    other = audit_log(dead, tmp_path / "spool2", commit_rows=1)
    monkeypatch.setattr(spool_module, "os", NoSpaceOs())
    other.record(verdict(9))
    other.close()  # neither database nor disk: counted lost, and no empty segment left
    assert other.rows_lost == 1 and segments(tmp_path / "spool2") == []


def test_row_refused_by_the_database_is_kept_aside(
    audit_log: OpenLog, tmp_path: Path, postgres_db: Any,
) -> None:
    empty_postgres(postgres_db)
    spool = tmp_path / "spool"
    log = audit_log(postgres_db.url, spool, commit_rows=3)
    log.record(verdict(1))
    log.record(verdict(2, "ERROR", reason="bad\x00byte"))  # PostgreSQL text cannot hold NUL
    log.record(verdict(3))
    log.close()
    assert frame_ids(postgres_db.url) == ["f0001", "f0003"]
    assert log.db_up and log.rows_rejected == 1
    [line] = (spool / "rejected.jsonl").read_bytes().splitlines()
    assert b'"frame_id":"f0002"' in line


# -- image store ------------------------------------------------------------------------------

def frame(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_ng_images_written_under_sku_and_capture_day(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", ImageSettings())
    rgb = frame()
    amap = np.zeros(rgb.shape[:2], np.float32)
    amap[10:20, 30:40] = 2.0
    v = verdict(1, "NG", pixel_threshold=1.0)
    paths = store.save_ng(v, rgb, amap)
    day = tmp_path / "images" / "ng" / "widget" / "2024-05-01"
    assert paths == {"image": str(day / "f0001.png"), "mask": str(day / "f0001_mask.png"),
                     "overlay": str(day / "f0001_overlay.jpg")}
    assert np.array_equal(cv2.imread(paths["image"])[..., ::-1], rgb)  # lossless, RGB kept
    mask = cv2.imread(paths["mask"], cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(mask > 0, amap >= 1.0) and set(np.unique(mask)) == {0, 255}
    assert cv2.imread(paths["overlay"]).shape == rgb.shape
    assert sorted(p.name for p in day.iterdir()) == [
        "f0001.png", "f0001_mask.png", "f0001_overlay.jpg"]  # no temporary files left


def test_error_frame_without_anomaly_map_saves_the_image_only(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImageSettings())
    paths = store.save_error(verdict(2, "ERROR"), frame())
    assert paths == {"image": str(tmp_path / "error" / "widget" / "2024-05-01" / "f0002.png")}
    assert ImageStore(tmp_path, ImageSettings(save_error=False)).save_error(
        verdict(3, "ERROR"), frame()) == {}


@pytest.mark.parametrize(("sku", "frame_id"), [("../etc", "f1"), ("widget", "../../x"),
                                               ("..", "f1"), ("widget", "a/b")])
def test_image_store_refuses_names_that_are_not_path_parts(tmp_path: Path, sku: str,
                                                           frame_id: str) -> None:
    store = ImageStore(tmp_path / "images", ImageSettings())
    v = Verdict(frame_id=frame_id, verdict="NG", sku=sku, capture_ts=T0)
    with pytest.raises(ProtocolError):
        store.save_ng(v, frame())
    with pytest.raises(ProtocolError):
        store.save_ok(v, frame())
    assert not any(tmp_path.rglob("*.png"))


def test_ok_images_are_bounded_per_sku_oldest_dropped(tmp_path: Path) -> None:
    settings = ImageSettings(ok_per_sku=3)
    store = ImageStore(tmp_path, settings)
    for i in range(5):
        assert store.save_ok(verdict(i), frame()) == str(tmp_path / "ok" / "widget" /
                                                         f"f{i:04d}.png")
    store.save_ok(verdict(0, sku="other"), frame())
    assert sorted(p.name for p in (tmp_path / "ok" / "widget").iterdir()) == [
        "f0002.png", "f0003.png", "f0004.png"]
    for age, name in enumerate(("f0004.png", "f0003.png", "f0002.png")):  # mtimes: 2 oldest
        os.utime(tmp_path / "ok" / "widget" / name, (T0 - age, T0 - age))
    restarted = ImageStore(tmp_path, settings)  # counts what is on disk
    restarted.save_ok(verdict(9), frame())
    assert sorted(p.name for p in (tmp_path / "ok" / "widget").iterdir()) == [
        "f0003.png", "f0004.png", "f0009.png"]
    assert ImageStore(tmp_path, ImageSettings(ok_per_sku=0)).save_ok(verdict(10), frame()) is None


def test_prune_drops_reject_days_past_retention(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImageSettings(ng_retention_days=2))
    for day in ("2024-04-28", "2024-04-29", "2024-04-30", "2024-05-01"):
        (tmp_path / "ng" / "widget" / day).mkdir(parents=True)
        (tmp_path / "error" / "widget" / day).mkdir(parents=True)
    assert store.prune(now=T0) == 2
    assert sorted(p.name for p in (tmp_path / "ng" / "widget").iterdir()) == [
        "2024-04-29", "2024-04-30", "2024-05-01"]
    assert ImageStore(tmp_path, ImageSettings(ng_retention_days=None)).prune(
        now=T0 + 1000 * 86400) == 0  # null: forever


def test_rejects_are_kept_90_days_by_default(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, ImageSettings())
    for day in ("2024-01-31", "2024-02-01", "2024-05-01"):
        (tmp_path / "error" / "widget" / day).mkdir(parents=True)
    assert store.prune(now=T0) == 1  # 2024-05-01 less 90 days is 2024-02-01: kept
    assert sorted(p.name for p in (tmp_path / "error" / "widget").iterdir()) == [
        "2024-02-01", "2024-05-01"]


def test_failed_atomic_write_leaves_the_old_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.png"
    files.write_atomic(target, b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError):
        files.write_atomic(target, b"new and longer")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_sink_side_imports_stay_free_of_torch() -> None:
    code = ("import sys, inspectd.core.imaging, inspectd.storage.audit, inspectd.storage.images; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _header(i: int) -> FrameHeader:
    return FrameHeader(f"f{i:04d}", "cam1", "sku1", T0 + i, T0 + i + 5, (8, 8, 3), "uint8",
                       "rgb8")


def test_journal_keeps_segments_until_frames_are_judged_and_rows_durable(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal", rotate_s=0.0)  # a new segment at every collect
    j.announce(_header(0))
    j.announce(_header(1))
    j.collect(durable_rows=0)
    j.judged(verdict(0))
    j.recorded("f0000", {"image": "/x/f0000.png"}, row=1)
    j.collect(durable_rows=0)
    names = lambda: [p.name for p in sorted((tmp_path / "journal").glob("*.jsonl"))]  # noqa: E731
    assert names() == ["000000000001.jsonl", "000000000002.jsonl"]  # f0001 still open
    j.judged(verdict(1))
    j.recorded("f0001", {"image": "/x/f0001.png"}, row=2)
    j.collect(durable_rows=1)
    # Both older segments are done (f0001 judged, row 1 durable); the third holds row 2.
    assert names() == ["000000000003.jsonl"]
    j.close(clean=False)

    again = Journal(tmp_path / "journal")  # a sink that died: what is left is replayed
    rec = again.recover()
    assert [(v.frame_id, paths) for v, paths in rec.rows] == [
        ("f0001", {"image": "/x/f0001.png"})]
    assert rec.pending == [] and rec.segments == 1
    again.recovered(last_row=2)
    again.announce(_header(2))
    again.collect(durable_rows=2)
    assert names() == ["000000000004.jsonl"]  # only the live one
    again.close(clean=True)
    assert names() == []


def test_journal_skips_a_torn_line_and_returns_unjudged_frames(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    for i in range(3):
        j.announce(_header(i))
    j.judged(verdict(1))
    j.close(clean=False)
    [seg] = tmp_path.glob("*.jsonl")
    seg.write_bytes(seg.read_bytes()[:-10])  # killed in the middle of the verdict's line
    rec = Journal(tmp_path).recover()
    assert rec.rows == [] and [h.frame_id for h in rec.pending] == ["f0000", "f0001", "f0002"]


def test_journal_stays_bounded_while_the_database_is_down(
    audit_log: OpenLog, tmp_path: Path,
) -> None:
    """Spooled rows are durable: the journal drops its segments as it does with the database
    up, however long the outage."""
    log = audit_log("postgresql+psycopg://postgres@127.0.0.1:1/none", tmp_path / "spool",
                    commit_rows=1)
    j = Journal(tmp_path / "journal", rotate_s=0.0)  # a new segment at every collect
    most = 0
    for i in range(200):
        j.announce(_header(i))
        v = verdict(i)
        j.judged(v)
        j.recorded(v.frame_id, None, log.record(v))
        log.poll()
        assert log.sync(timeout=30)
        j.collect(log.rows_durable)
        most = max(most, len(list((tmp_path / "journal").glob("*.jsonl"))))
    assert not log.db_up and log.rows_spooled == 200
    assert most <= 2
    j.close(clean=log.rows_durable == log.rows_recorded)
    assert not list((tmp_path / "journal").glob("*.jsonl"))
