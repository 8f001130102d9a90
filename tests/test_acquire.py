"""Acquisition, sink and worker in one process (threads), fed by a real watched folder: a
burst the line can judge gets no TIMEOUT, no hostile file stops the line, a sink that goes
away loses no frame, a full queue on a live camera sheds by deadline, and every file leaves
the folder only once its frame's outcome is known."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from PIL import Image

from inspectd.core.config import LineSettings
from inspectd.daemon import acquire as acquire_mod
from inspectd.daemon import security
from inspectd.daemon.acquire import Acquirer
from inspectd.daemon.sink import Sink
from inspectd.daemon.sources.base import Capture
from inspectd.daemon.sources.folder import note_path
from inspectd.daemon.worker import Worker
from inspectd.lifecycle.registry import publish
from tests.helpers import audit_rows, until, wait_rows


class Line:
    """Sink, worker and one camera's acquisition as threads of this process."""

    def __init__(self, settings: LineSettings, sink: bool = True, worker: bool = True) -> None:
        self.s = settings
        self.ctx = zmq.Context()
        self.stops: dict[str, threading.Event] = {}
        self.threads: dict[str, threading.Thread] = {}
        if sink:
            self.start_sink()
        if worker:
            w = Worker(settings, self.ctx)
            w.preload()
            self._start("worker", w.run)
        self.acquirer = Acquirer(settings, "cam1", self.ctx)
        self._start("acquire", self.acquirer.run)

    def start_sink(self) -> None:
        sink = Sink(settings=self.s, ctx=self.ctx)
        self.sink_metrics = sink.metrics
        self._start("sink", lambda stop: sink.run(stop, 1.0))

    def _start(self, name: str, target: Callable[[threading.Event], None]) -> None:
        stop = threading.Event()
        t = threading.Thread(target=target, args=(stop,), name=name)
        self.stops[name], self.threads[name] = stop, t
        t.start()

    def stop_role(self, name: str) -> None:
        self.stops[name].set()
        self.threads[name].join(30)
        assert not self.threads[name].is_alive(), f"{name} did not stop"

    def close(self) -> None:
        for name in ("acquire", "worker", "sink"):  # the supervisor's order
            if name in self.threads and self.threads[name].is_alive():
                self.stop_role(name)
        security.release(self.ctx)
        self.ctx.term()


@pytest.fixture
def settings(object_artifact: Path, tmp_path: Path) -> Iterator[LineSettings]:
    run_dir = Path(tempfile.mkdtemp(prefix="ida", dir="/tmp"))  # ipc paths must stay short
    inbox = tmp_path / "in"
    inbox.mkdir()
    s = LineSettings(
        line="t1", data_dir=tmp_path / "data", run_dir=run_dir,
        cameras={"cam1": {"type": "folder", "path": str(inbox), "sku": "obj",
                          "recursive": True, "deadline_ms": 30_000, "existing": False}},
        worker={"max_batch": 4, "max_wait_ms": 20}, sink={"timeout_grace_ms": 100},
        metrics={"enabled": False}, supervisor={"drain_s": 5.0})
    publish(object_artifact, s.models_dir, "obj", "v1")
    yield s
    shutil.rmtree(run_dir, ignore_errors=True)


def _goods(synth_root: Path) -> list[Path]:
    return sorted((synth_root / "object" / "test" / "good").glob("*.png"))


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """As a camera PC writes: a temp name, then renamed into place."""
    dest = inbox / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{abs(hash(name))}.tmp")  # short: the name may be at NAME_MAX
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def _files_left(inbox: Path) -> list[Path]:
    skip = {"done", "quarantine"}
    return [p for p in inbox.rglob("*") if (p.is_file() or p.is_symlink())
            and not skip & set(p.relative_to(inbox).parts) and not p.name.startswith(".")]


def test_a_burst_the_line_can_judge_in_time_gets_no_timeout(settings, synth_root):
    inbox = settings.cameras["cam1"].path
    goods = _goods(synth_root)
    data = [p.read_bytes() for p in goods]
    line = Line(settings)
    try:
        time.sleep(0.5)  # the watch is up
        n = 40
        for i in range(n):  # all at once, faster than one worker scores them
            drop(inbox, f"burst_{i:03d}.png", data[i % len(data)])
        rows = wait_rows(settings.database_url(), n, timeout=120)
        until(lambda: not _files_left(inbox), "every file moved on")
    finally:
        line.close()
    assert sorted(r["verdict"] for r in rows if r["verdict"] not in ("OK", "NG")) == []
    assert len({r["frame_id"] for r in rows}) == n
    assert len(list((inbox / "done").glob("*.png"))) == n


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width × height pixels."""
    png = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()
    ihdr = png.index(b"IHDR")
    body = png[ihdr:ihdr + 17]
    body = body[:4] + struct.pack(">II", width, height) + body[12:]
    crc = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return png[:ihdr] + body + crc + png[ihdr + 21:]


def _cmyk_jpeg(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img[..., ::-1]).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def test_no_hostile_file_stops_the_line(settings, synth_root, tmp_path):
    """Every file gets exactly one row; unreadable ones are ERROR with the reason and end in
    quarantine with a note; good files before and after are judged."""
    inbox = settings.cameras["cam1"].path
    good = _goods(synth_root)[0].read_bytes()
    img = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    png16 = cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes()  # mono16
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(good)
    hostile = {
        "zero.png": b"",
        "cut.png": good[: len(good) // 3],
        "text.png": b"not an image, just text\n" * 20,
        "huge.png": _png_claiming(20000, 20000),
        "one.png": cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(),
        "deep.png": png16,
        "cmyk.jpg": _cmyk_jpeg(img),
        "gif.png": b"GIF89a" + b"\x00" * 64,
        "with space ü.png": good,
        "-dash.png": good,
        ("n" * 200) + ".png": good,
        "newdir/inside.png": good,
        os.fsdecode(b"latin1-\xe9.png"): good,  # not UTF-8: audited by an escaped name
        os.fsdecode(b"cut-\xff.png"): good[:100],  # ... and quarantined with its note
        "L" * 251 + ".png": b"",  # a name at NAME_MAX: its note's name is shortened
    }
    line = Line(settings)
    try:
        time.sleep(0.5)
        drop(inbox, "first.png", good)
        for name, data in hostile.items():
            drop(inbox, name, data)
        os.symlink(outside, inbox / "link.png")  # links made in place: no close event
        os.symlink(tmp_path / "nothing.png", inbox / "dangling.png")
        os.symlink("/dev/zero", inbox / "device.png")
        drop(inbox, "last.png", good)
        n = len(hostile) + 5
        rows = wait_rows(settings.database_url(), n, timeout=120)
        time.sleep(1.0)  # nothing more may arrive
        until(lambda: not _files_left(inbox), "every file moved on")
        assert all(t.is_alive() for t in line.threads.values())
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert len(rows) == n and len({r["frame_id"] for r in rows}) == n
    by = {Path(r["origin"]).name: r for r in rows}
    for name in ("first.png", "last.png", "with space ü.png", "-dash.png", "inside.png",
                 "latin1-\\xe9.png"):
        assert by[name]["verdict"] in ("OK", "NG"), (name, by[name]["reason"])
    errors = {"zero.png": "empty file", "cut.png": "cannot decode", "text.png": "cannot decode",
              "huge.png": "max_pixels", "link.png": "symbolic link",
              "dangling.png": "symbolic link", "device.png": "symbolic link",
              "cut-\\xff.png": "cannot decode", "L" * 251 + ".png": "empty file",
              "one.png": "outside the model's domain", "deep.png": "16-bit",
              "gif.png": "cannot decode"}
    for name, why in errors.items():
        assert by[name]["verdict"] == "ERROR", (name, by[name]["reason"])
        assert why in by[name]["reason"], (name, by[name]["reason"])
        on_disk = inbox / "quarantine" / name.replace("\\xff", os.fsdecode(b"\xff"))
        assert os.path.lexists(on_disk)
        assert why in note_path(on_disk).read_text()
    assert by["cmyk.jpg"]["verdict"] in ("OK", "NG", "ERROR")  # judged one way or the other
    assert outside.read_bytes() == good  # a link's target is never touched


class _LiveSource:
    """A live camera that cannot wait: a frame every 10 ms, whatever happens downstream."""

    push_back = False

    def __init__(self, n: int) -> None:
        self.n = n

    def frames(self, stop: threading.Event) -> Iterator[Capture]:
        for i in range(self.n):
            if stop.is_set():
                return
            yield Capture(np.full((64, 64), i % 256, np.uint8), "mono8", time.time(),
                          sku="obj", part_id=str(i))
            time.sleep(0.01)

    def close(self) -> None:
        pass


def test_a_full_queue_on_a_live_camera_sheds_by_deadline_and_audits_it(settings, monkeypatch):
    """No worker and room for 5 frames: the camera keeps delivering; the frames nearest
    their deadline are shed, every one audited."""
    cam = settings.cameras["cam1"].model_copy(update={"queue_bytes": 5 * 64 * 64})
    s = settings.model_copy(update={"cameras": {"cam1": cam}})
    monkeypatch.setattr(acquire_mod, "open_source", lambda name, cfg: _LiveSource(30))
    line = Line(s, worker=False)
    try:
        until(lambda: line.acquirer.shed >= 25, "25 frames shed", timeout=30)
        rows = wait_rows(s.database_url(), 25)
    finally:
        line.close()
    rows = audit_rows(s.database_url())  # the held ones: TIMEOUT at stop
    assert len(rows) == 30 and {r["verdict"] for r in rows} == {"TIMEOUT"}
    shed = sorted(int(r["part_id"]) for r in rows if "shed" in r["reason"])
    assert len(shed) >= 25 and shed == sorted(shed)[: len(shed)]
    assert max(shed) < 30 and min(shed) == 0  # the oldest go first


def test_without_a_worker_held_frames_time_out_at_their_deadline(settings, synth_root):
    cam = settings.cameras["cam1"].model_copy(update={"deadline_ms": 800})
    s = settings.model_copy(update={"cameras": {"cam1": cam}})
    inbox = cam.path
    line = Line(s, worker=False)
    try:
        time.sleep(0.5)
        for i in range(3):
            drop(inbox, f"waiting_{i}.png", _goods(synth_root)[0].read_bytes())
        rows = wait_rows(s.database_url(), 3)
        until(lambda: not _files_left(inbox), "files quarantined")
    finally:
        line.close()
    assert {r["verdict"] for r in rows} == {"TIMEOUT"}
    assert all("no worker free before the deadline" in r["reason"] for r in rows)
    assert sorted(p.name for p in (inbox / "quarantine").glob("*.png")) == [
        f"waiting_{i}.png" for i in range(3)]


def test_a_sink_that_is_away_loses_no_frame_and_files_wait(settings, synth_root):
    """Acquisition starts before any sink: its announcements go unacknowledged, so no frame
    goes to a worker and no file leaves the folder; once a sink is up, everything is judged
    once. Then the sink stops and another takes over mid-stream: still once each."""
    inbox = settings.cameras["cam1"].path
    good = _goods(synth_root)[0].read_bytes()
    line = Line(settings, sink=False)
    try:
        time.sleep(0.5)
        for i in range(5):
            drop(inbox, f"early_{i}.png", good)
        time.sleep(2.0)
        assert len(_files_left(inbox)) == 5 and line.acquirer.sent == 0
        line.start_sink()
        wait_rows(settings.database_url(), 5)
        line.stop_role("sink")
        for i in range(5):
            drop(inbox, f"later_{i}.png", good)
        time.sleep(1.5)
        line.start_sink()
        rows = wait_rows(settings.database_url(), 10, timeout=60)
        until(lambda: not _files_left(inbox), "every file moved on")
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert len(rows) == 10 and len({r["frame_id"] for r in rows}) == 10
    assert {r["verdict"] for r in rows} <= {"OK", "NG"}


def test_the_sink_exports_worker_queue_depth_and_frames_held_at_acquisition(settings,
                                                                            synth_root):
    inbox = settings.cameras["cam1"].path
    line = Line(settings)
    try:
        time.sleep(0.5)
        drop(inbox, "one.png", _goods(synth_root)[0].read_bytes())
        wait_rows(settings.database_url(), 1)
        registry = line.sink_metrics.registry

        def sample(name: str) -> list[float]:
            return [s.value for fam in registry.collect() for s in fam.samples
                    if s.name == name]

        until(lambda: sample("inspectd_worker_queue_depth")
              and sample("inspectd_held_frames") == [0.0], "both figures exported")
    finally:
        line.close()
