"""A sink's storage on a small filesystem that fills up: run by tests/test_disk.py inside a
tmpfs of a few MiB mounted in a private mount namespace, it writes what it saw as JSON to
OUTSIDE/result.json.

    python -m tests.disk_scenario MOUNT OUTSIDE (dead-postgres | sqlite)

Frames alternate OK and NG, each with its image(s) and one fat audit row (a 3 KB reason, so
rows fill the disk in a few hundred frames), until the audit writer has had to drop rows
from memory. Then the images and a ballast file (45 % of the filesystem, written first, so
that what is freed does not depend on how much space the database took) are deleted and a
few more frames follow. The audit log is
SQLite on the same filesystem, or an unreachable PostgreSQL (everything spools); with the
latter the spool is then replayed into a SQLite database at OUTSIDE (a normal disk), and
the rows there are reported. The thresholds are large (50 % and 25 % free) so that each
stage has room to show; the guard measures at every image (check_s=0) so that no timing
decides which frame stops.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from structlog.testing import capture_logs

from inspectd.core.config import ImageSettings
from inspectd.core.wire import FrameHeader, Verdict
from inspectd.storage.audit import AuditLog
from inspectd.storage.disk import DiskGuard
from inspectd.storage.images import ImageStore
from inspectd.storage.journal import Journal

DEAD_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:1/none"
MIN_FREE_OK, MIN_FREE_IMAGES = 50.0, 25.0
MAX_MEMORY_ROWS = 10
MAX_SPOOL_BYTES = 256 * 1024
BALLAST = 0.45
T0 = 1714559400.0  # 2024-05-01 10:30 UTC


def verdict(i: int) -> Verdict:
    kind = "OK" if i % 2 == 0 else "NG"
    return Verdict(frame_id=f"f{i:05d}", verdict=kind, camera="cam1", sku="widget", line="l1",
                   capture_ts=T0 + i, decided_ts=T0 + i + 0.05, score=0.1, threshold=1.0,
                   pixel_threshold=0.5, reason="r" * 3000)


def frame_ids(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text("SELECT frame_id FROM verdicts ORDER BY id")).scalars())
    finally:
        engine.dispose()


def main(mount: Path, outside: Path, db: str) -> dict[str, Any]:
    with capture_logs() as logs:
        result = run(mount, outside, db, logs)
    result["logs"] = [{"event": e["event"], "level": e["log_level"],
                       "frame_ids": e.get("frame_ids")} for e in logs]
    return result


def run(mount: Path, outside: Path, db: str, logs: list[dict[str, Any]]) -> dict[str, Any]:
    data = mount / "data"
    rng = np.random.default_rng(0)
    settings = ImageSettings(min_free_ok=MIN_FREE_OK, min_free_images=MIN_FREE_IMAGES,
                             ok_per_sku=100_000)
    store = ImageStore(data / "images", settings,
                       DiskGuard(data / "images", MIN_FREE_OK, MIN_FREE_IMAGES, check_s=0))
    url = DEAD_POSTGRES if db == "dead-postgres" else f"sqlite:///{data / 'audit.db'}"
    data.mkdir()
    ballast = mount / "ballast"
    ballast.write_bytes(bytes(int(shutil.disk_usage(mount).total * BALLAST)))
    audit = AuditLog(url, data / "spool", commit_rows=1, retry_s=0,
                     max_spool_bytes=MAX_SPOOL_BYTES, max_memory_rows=MAX_MEMORY_ROWS)
    journal = Journal(data / "journal", rotate_s=0)
    frames: list[dict[str, Any]] = []
    recorded: list[str] = []

    def one(i: int) -> None:
        v = verdict(i)
        rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noise: ~12 KB as PNG
        journal.announce(_header(v))
        journal.judged(v)
        if v.verdict == "OK":
            path = store.save_ok(v, rgb)
            paths = {"image": path} if path else None
        else:
            amap = np.zeros((64, 64), np.float32)
            amap[8:24, 8:24] = 1.0
            paths = store.save_ng(v, rgb, amap) or None
        journal.recorded(v.frame_id, paths, audit.record(v, paths))
        recorded.append(v.frame_id)
        audit.poll()
        assert audit.sync(timeout=60), "the audit writer did not finish a batch in 60 s"
        journal.collect(audit.rows_durable)
        frames.append({
            "i": i, "kind": v.verdict, "saved": bool(paths), "level": store.guard.level,
            "free": shutil.disk_usage(mount).free, "total": shutil.disk_usage(mount).total,
            "memory": audit.memory_rows, "lost": audit.rows_lost,
            "spooled": audit.rows_spooled, "committed": audit.rows_committed,
            "spool_bytes": audit.spool.bytes, "over_limit": audit.spool.over_limit,
            "journal_segments": len(list((data / "journal").glob("*.jsonl"))),
        })

    i = 0
    while audit.rows_lost < 5:
        if i > 5000:
            raise SystemExit("the filesystem never filled up")
        one(i)
        i += 1
    freed_at, logs_at_free = i, len(logs)
    spool_files = sum(p.stat().st_size for p in (data / "spool").glob("*.jsonl"))
    shutil.rmtree(data / "images")  # an operator makes room
    ballast.unlink()
    for _ in range(6):
        one(i)
        i += 1
    audit.close()
    journal.close(clean=audit.rows_durable == audit.rows_recorded)
    if db == "dead-postgres":
        replay_url = f"sqlite:///{outside / 'audit.db'}"
        replay = AuditLog(replay_url, data / "spool")
        replay.close()
    else:
        replay_url = url
    db_ids = frame_ids(replay_url)
    spool_left = sorted(p.name for p in (data / "spool").glob("*.jsonl"))
    return {
        "frames": frames, "freed_at": freed_at, "logs_at_free": logs_at_free,
        "recorded": recorded, "db_ids": db_ids,
        "spool_bytes_counted": frames[freed_at - 1]["spool_bytes"],
        "spool_bytes_on_disk": spool_files, "spool_left": spool_left,
        "journal_left": len(list((data / "journal").glob("*.jsonl"))),
    }


def _header(v: Verdict) -> FrameHeader:
    return FrameHeader(v.frame_id, v.camera, v.sku, v.capture_ts, v.capture_ts + 5, (64, 64, 3),
                       "uint8", "rgb8")


if __name__ == "__main__":
    out = Path(sys.argv[2])
    (out / "result.json").write_text(json.dumps(main(Path(sys.argv[1]), out, sys.argv[3])))
