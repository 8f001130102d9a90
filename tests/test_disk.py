"""Disk space: the free-space guard, image retention, and the sink's storage on a small real
filesystem that fills up (a tmpfs mounted in a private mount namespace; tests/disk_scenario.py).

The tmpfs needs a mount namespace: root gets one directly (`unshare --mount`), anyone else
as root of an unprivileged user namespace (`unshare --user --map-root-user --mount`). Where
neither works the tests fail and say why: they are never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from pydantic import ValidationError
from structlog.testing import capture_logs

from inspectd.core.config import DatabaseSettings, ImageSettings, LineSettings
from inspectd.core.wire import ANNOUNCE, VERDICT, FrameHeader, Verdict, new_frame_id
from inspectd.daemon.sink import Sink
from inspectd.daemon.transport import socket
from inspectd.storage import images as images_module
from inspectd.storage.disk import FULL, LOW, OK, DiskGuard
from inspectd.storage.images import ImageStore
from tests import disk_scenario

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
Usage = namedtuple("Usage", "total used free")
# Mount a tmpfs of size $1 at $2, then run the rest of the arguments there.
MOUNT = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'


@pytest.fixture(scope="session")
def in_tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """run(size, mountpoint, *argv): argv in a private mount namespace with a fresh tmpfs of
    `size` at `mountpoint` (gone with the process)."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests mount a small tmpfs and need `unshare` (util-linux)")
    ways = [["unshare", "--user", "--map-root-user", "--mount"]]
    if os.geteuid() == 0:
        ways.insert(0, ["unshare", "--mount"])
    probe = tmp_path_factory.mktemp("probe")
    errors = []
    for way in ways:
        p = subprocess.run([*way, "sh", "-c", MOUNT, "sh", "1m", str(probe), "true"],
                           capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            break
        errors.append(f"{' '.join(way)}: {p.stderr.strip() or p.returncode}")
    else:
        pytest.fail("cannot mount a tmpfs for the disk-full tests: neither root nor an "
                    "unprivileged user namespace is available (enable them: sysctl "
                    "kernel.unprivileged_userns_clone=1, or on Ubuntu "
                    "kernel.apparmor_restrict_unprivileged_userns=0; or run as root):\n"
                    + "\n".join(errors))

    def run(size: str, mountpoint: Path, *argv: str) -> None:
        p = subprocess.run([*way, "sh", "-c", MOUNT, "sh", size, str(mountpoint), *argv],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
        assert p.returncode == 0, (f"{' '.join(argv)} failed:\n{p.stdout[-4000:]}\n"
                                   f"{p.stderr[-4000:]}")

    return run


# -- the whole story on a real filesystem -----------------------------------------------------

@pytest.mark.parametrize("db", ["dead-postgres", "sqlite"])
def test_a_filling_disk_stops_samples_then_images_and_rows_go_on(
    in_tmpfs: Callable[..., None], tmp_path: Path, db: str,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    in_tmpfs("8m", mnt, sys.executable, "-m", "tests.disk_scenario", str(mnt), str(tmp_path), db)
    r = json.loads((tmp_path / "result.json").read_text())
    frames, freed = r["frames"], r["freed_at"]
    total = frames[0]["total"]
    fill, after = frames[:freed], frames[freed:]
    oks = [f for f in fill if f["kind"] == "OK"]
    ngs = [f for f in fill if f["kind"] == "NG"]

    # OK samples stop first, near min_free_ok, and stay stopped; NG images go on until
    # min_free_images, then stop too.
    ok_stop = min(f["i"] for f in oks if not f["saved"])
    ng_stop = min(f["i"] for f in ngs if not f["saved"])
    assert ok_stop < ng_stop
    assert not any(f["saved"] for f in oks if f["i"] > ok_stop)
    assert not any(f["saved"] for f in ngs if f["i"] > ng_stop)
    assert sum(f["saved"] for f in ngs if ok_stop < f["i"] < ng_stop) >= 5
    slack = 256 * 1024  # a frame's images, row and journal lines, with tmpfs pages
    assert abs(frames[ok_stop - 1]["free"] - total * disk_scenario.MIN_FREE_OK / 100) < slack
    assert abs(frames[ng_stop - 1]["free"] - total * disk_scenario.MIN_FREE_IMAGES / 100) < slack

    # Every row is committed or spooled until the disk is truly full.
    full = min(f["i"] for f in fill if f["memory"])
    assert all(f["memory"] == 0 and f["lost"] == 0 for f in fill[:full])
    assert frames[full]["free"] < 64 * 1024
    assert frames[full - 1]["committed" if db == "sqlite" else "spooled"] == full
    # Then the writer keeps at most max_memory_rows; the oldest beyond are lost, counted and
    # logged with their frame ids.
    assert max(f["memory"] for f in frames) == disk_scenario.MAX_MEMORY_ROWS
    lost_logs = [e for e in r["logs"] if e["event"].startswith("audit rows lost")]
    lost = [fid for e in lost_logs for fid in e["frame_ids"]]
    assert lost == r["recorded"][full:full + 5]
    assert frames[-1]["lost"] == 5 and len(lost_logs) <= 5

    # Space comes back: images and rows resume at once, the rows in memory first.
    assert after[0]["memory"] == 0 and after[0]["lost"] == 5
    assert next(f for f in after if f["kind"] == "OK")["saved"]
    assert next(f for f in after if f["kind"] == "NG")["saved"]

    # Every row not counted lost reaches the database (the spool replayed), once, in order.
    db_ids, recorded = r["db_ids"], r["recorded"]
    assert set(recorded) - set(db_ids) <= set(lost)
    assert len(db_ids) == len(set(db_ids)) and db_ids == sorted(db_ids)
    assert set(db_ids) <= set(recorded)
    assert r["spool_left"] == [] and r["journal_left"] == 0

    # Each state change is logged once, not per frame.
    events = [e["event"] for e in r["logs"]]
    filling = events[:r["logs_at_free"]]
    disk = [e for e in filling if e.startswith("disk space")]
    assert [e.split(":")[0] for e in disk] == ["disk space low", "disk space very low"]
    assert any(e.startswith("disk space back") for e in events[r["logs_at_free"]:])
    assert filling.count("cannot write the audit spool: rows wait in memory") == 1
    assert sum(e.startswith("cannot write the sink journal") for e in filling) <= 3
    assert events.count("audit database unreachable, spooling rows") == 1
    assert max(f["journal_segments"] for f in fill[:full]) <= 2  # rows durable: collected
    if db == "dead-postgres":
        assert events.count("audit spool above max_spool_bytes: the database has been away "
                            "long; rows go on spooling while the disk has room") == 1
        assert fill[full - 1]["spool_bytes"] > 4 * disk_scenario.MAX_SPOOL_BYTES  # went on
        assert r["spool_bytes_counted"] == r["spool_bytes_on_disk"]
        assert "audit spool writable again" in events


# -- the guard --------------------------------------------------------------------------------

class FakeDisk:
    def __init__(self, total: int = 100 * MiB, free: int = 100 * MiB) -> None:
        self.total, self.free, self.calls, self.now = total, free, 0, 0.0

    def usage(self, path: str) -> Usage:
        self.calls += 1
        return Usage(self.total, self.total - self.free, self.free)

    def guard(self, ok: float = 10.0, images: float = 5.0, check_s: float = 2.0) -> DiskGuard:
        return DiskGuard(Path("/nowhere"), ok, images, check_s=check_s, usage=self.usage,
                         clock=lambda: self.now)


def test_guard_levels_follow_the_thresholds_with_a_margin_to_come_back() -> None:
    disk = FakeDisk()
    g = disk.guard(check_s=0)
    assert g.level == OK and g.allows("ok") and g.allows("ng")
    disk.free = 10 * MiB  # exactly 10 %: still enough
    assert g.poll() == OK
    disk.free = 10 * MiB - 1
    assert g.poll() == LOW
    assert not g.allows("ok") and not g.allows("unjudged") and g.allows("ng") and g.allows("error")
    disk.free = 4 * MiB
    assert g.poll() == FULL and not g.allows("ng") and not g.allows("error")
    disk.free = int(5.5 * MiB)  # above 5 % but not by the 1-point margin
    assert g.poll() == FULL
    disk.free = 6 * MiB
    assert g.poll() == LOW
    disk.free = int(10.9 * MiB)
    assert g.poll() == LOW
    disk.free = 50 * MiB  # straight back from any level
    assert g.poll() == OK
    disk.free = 1 * MiB
    assert g.poll() == FULL  # straight down too
    assert g.free_bytes == 1 * MiB and g.total_bytes == 100 * MiB


def test_guard_measures_at_most_every_check_s_and_counts_writes_in_between() -> None:
    disk = FakeDisk(free=20 * MiB)
    g = disk.guard(check_s=2.0)
    assert disk.calls == 1
    for _ in range(100):
        assert g.allows("ok")
    assert disk.calls == 1  # not per write
    g.wrote(9 * MiB)  # 11 % left by its own count
    assert g.allows("ok")
    g.wrote(2 * MiB)  # 9 %: the samples stop before the next measure
    assert not g.allows("ok") and disk.calls == 1
    disk.now = 2.0  # due: the real figure replaces the estimate
    assert g.allows("ok") and disk.calls == 2


def test_guard_full_after_a_failed_write_lasts_until_the_next_measure() -> None:
    disk = FakeDisk()
    g = disk.guard()
    g.full()
    assert g.level == FULL and not g.allows("ng")
    disk.now = 2.0
    assert g.allows("ng") and g.allows("ok")


def test_guard_logs_each_change_once() -> None:
    disk = FakeDisk()
    g = disk.guard(check_s=0)
    with capture_logs() as logs:
        for free in (50, 8, 8, 8, 3, 3, 4, 40, 40):
            disk.free = free * MiB
            for _ in range(5):
                g.allows("ok")
    assert [(e["log_level"], e["event"].split(":")[0]) for e in logs] == [
        ("warning", "disk space low"), ("warning", "disk space very low"),
        ("info", "disk space back")]
    assert logs[0]["free_bytes"] == 8 * MiB and logs[0]["min_free_ok"] == 10.0


def test_guard_with_zero_thresholds_never_stops_and_a_missing_folder_is_measured_above(
    tmp_path: Path,
) -> None:
    disk = FakeDisk(free=0)
    assert disk.guard(0, 0).allows("ok")
    g = DiskGuard(tmp_path / "not" / "yet", 10, 5)  # the real filesystem of tmp_path
    assert g.total_bytes == shutil.disk_usage(tmp_path).total


# -- the image store under the guard ----------------------------------------------------------

def _verdict(i: int, kind: str) -> Verdict:
    return Verdict(frame_id=f"f{i:04d}", verdict=kind, sku="widget", capture_ts=disk_scenario.T0)


def test_image_store_skips_by_kind_and_counts_what_it_skipped(tmp_path: Path) -> None:
    disk = FakeDisk(free=50 * MiB)
    store = ImageStore(tmp_path, ImageSettings(), disk.guard(check_s=0))
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert store.save_ok(_verdict(1, "OK"), rgb)
    disk.free = 7 * MiB
    assert store.save_ok(_verdict(2, "OK"), rgb) is None
    assert store.save_unjudged(_verdict(3, "ERROR"), rgb) is None
    assert store.save_ng(_verdict(4, "NG"), rgb)
    assert store.save_error(_verdict(5, "ERROR"), rgb)
    disk.free = 1 * MiB
    assert store.save_ng(_verdict(6, "NG"), rgb) == {}
    assert store.save_error(_verdict(7, "ERROR"), rgb) == {}
    assert store.save_ok(_verdict(8, "OK"), rgb) is None
    assert store.skipped == {"ok": 2, "unjudged": 1, "ng": 1, "error": 1}
    assert store.take_skipped() == {"image skipped: disk low (ok)": 2,
                                    "image skipped: disk low (unjudged)": 1,
                                    "image skipped: disk low (ng)": 1,
                                    "image skipped: disk low (error)": 1}
    assert store.take_skipped() == {}
    disk.free = 50 * MiB  # space back: writing resumes
    assert store.save_ok(_verdict(9, "OK"), rgb)
    assert sorted(p.name for p in (tmp_path / "ok" / "widget").iterdir()) == [
        "f0001.png", "f0009.png"]


def test_a_write_refused_for_space_skips_the_image_and_stops_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = FakeDisk(free=50 * MiB)
    store = ImageStore(tmp_path, ImageSettings(), disk.guard())
    real = images_module.write_atomic
    calls: list[Path] = []

    def no_space_for_masks(path: Path, data: bytes) -> None:
        calls.append(path)
        if path.name.endswith("_mask.png"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(images_module, "write_atomic", no_space_for_masks)
    v = Verdict(frame_id="f0001", verdict="NG", sku="widget", capture_ts=disk_scenario.T0,
                pixel_threshold=0.5)
    rgb = np.zeros((8, 8, 3), np.uint8)
    paths = store.save_ng(v, rgb, np.ones((8, 8), np.float32))
    assert list(paths) == ["image"] and Path(paths["image"]).exists()  # what is on disk
    assert store.guard.level == FULL and store.skipped == {"ng": 1}
    assert store.save_ng(_verdict(2, "NG"), rgb) == {} and len(calls) == 2  # no new attempt
    disk.now = 2.0  # the next measure finds room
    assert store.save_ng(_verdict(3, "NG"), rgb)

    def other_error(path: Path, data: bytes) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(images_module, "write_atomic", other_error)
    with pytest.raises(OSError, match="Input/output"):  # not a space problem: the sink logs it
        store.save_ok(_verdict(4, "OK"), rgb)


def test_old_rejects_are_pruned_even_while_the_disk_is_too_low_to_write_them(
    tmp_path: Path,
) -> None:
    disk = FakeDisk(free=1 * MiB)
    store = ImageStore(tmp_path, ImageSettings(), disk.guard())
    old = tmp_path / "ng" / "widget" / "2001-01-01"
    old.mkdir(parents=True)
    assert store.save_ng(_verdict(1, "NG"), np.zeros((8, 8, 3), np.uint8)) == {}
    assert not old.exists()


def test_the_sink_exports_skipped_images_free_space_and_the_spool(tmp_path: Path) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="idt", dir="/tmp"))  # ipc paths must stay short
    # More free space than any disk has: OK samples are skipped, NG images are written.
    s = LineSettings(line="t1", data_dir=tmp_path / "data", run_dir=run_dir,
                     sink={"images": {"min_free_ok": 99.999, "min_free_images": 0}},
                     metrics={"enabled": False})
    ctx = zmq.Context()
    sink = Sink(s, ctx)
    to_sink = socket(ctx, zmq.DEALER, s.sink_address(), bind=False, hwm=100,
                     send_timeout_ms=2000)
    poller = zmq.Poller()
    poller.register(sink.inbox, zmq.POLLIN)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        for kind in ("OK", "NG"):
            now = time.time()
            h = FrameHeader(new_frame_id(), "cam1", "obj", now, now + 60, img.shape, "uint8",
                            "rgb8", line="t1")
            to_sink.send_multipart([ANNOUNCE, h.encode()])
            v = Verdict.for_frame(h, kind, score=0.1, threshold=1.0)
            to_sink.send_multipart([VERDICT, v.encode(), img.tobytes()])
        end = time.monotonic() + 30
        while sink.counts.frames < 2 and time.monotonic() < end:
            sink.step(poller, 50)
        sink.step(poller, 0)
        sink.report()
        assert sink.counts.frames == 2
        value = sink.metrics.registry.get_sample_value
        assert value("inspectd_dropped_total", {"reason": "image skipped: disk low (ok)"}) == 1
        assert value("inspectd_dropped_total", {"reason": "image skipped: disk low (ng)"}) is None
        assert value("inspectd_disk_guard_level") == LOW
        assert value("inspectd_disk_free_bytes") == sink.images.guard.free_bytes > 0
        assert value("inspectd_audit_spool_bytes") == 0
        assert value("inspectd_audit_spool_over_limit") == 0
        assert value("inspectd_audit_memory_rows") == 0
    finally:
        sink.close()
        to_sink.close(0)
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert list((tmp_path / "data" / "images" / "ng").rglob("*.png"))
    assert not (tmp_path / "data" / "images" / "ok").exists()


# -- settings ---------------------------------------------------------------------------------

def test_defaults_bound_disk_and_memory() -> None:
    s = LineSettings()
    assert s.sink.images.ng_retention_days == 90
    assert (s.sink.images.min_free_ok, s.sink.images.min_free_images) == (10.0, 5.0)
    assert s.sink.database.max_spool_bytes == 2**30
    assert s.sink.database.max_memory_rows == 20_000
    assert ImageSettings(ng_retention_days=None).ng_retention_days is None  # forever


@pytest.mark.parametrize("kw", [{"min_free_ok": 5, "min_free_images": 6},
                                {"min_free_ok": 100}, {"min_free_images": -1}])
def test_bad_free_space_thresholds_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ImageSettings(**kw)


def test_bad_spool_and_memory_bounds_are_refused() -> None:
    with pytest.raises(ValidationError):
        DatabaseSettings(max_memory_rows=0)
    with pytest.raises(ValidationError):
        DatabaseSettings(max_spool_bytes=0)
