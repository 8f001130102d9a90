"""Worker and sink in-process (threads), fed by a hand-driven acquisition socket: every frame,
good or broken, ends as exactly one audited verdict."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import (
    ACK,
    ANNOUNCE,
    FRAME,
    JUDGED,
    VERDICT,
    Ack,
    FrameHeader,
    Verdict,
    new_frame_id,
)
from inspectd.daemon.sink import Sink
from inspectd.daemon.transport import socket
from inspectd.daemon.worker import Worker
from inspectd.lifecycle.registry import publish
from tests.helpers import audit_rows, until, wait_rows


class Line:
    """Sink and worker threads plus the two sockets an acquisition process would hold."""

    def __init__(self, settings: LineSettings, worker: bool = True) -> None:
        self.s = settings
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self.sink = Sink(settings, self.ctx)
        self.frames = socket(self.ctx, zmq.PUSH, settings.frames_endpoint("cam1"), bind=True,
                             hwm=100, linger_ms=0)
        self.to_sink = socket(self.ctx, zmq.DEALER, settings.sink_address(), bind=False,
                              hwm=100, send_timeout_ms=2000)
        self.acked: set[str] = set()
        self.threads = [threading.Thread(target=self.sink.run, args=(self.stop, 1.0))]
        if worker:
            self.worker = Worker(settings, self.ctx)
            self.worker.preload()
            self.threads.append(threading.Thread(target=self.worker.run, args=(self.stop,)))
        for t in self.threads:
            t.start()

    def header(self, img: np.ndarray, sku: str = "obj", deadline_s: float = 30.0,
               **kw: object) -> FrameHeader:
        now = time.time()
        h = FrameHeader(new_frame_id(), "cam1", sku, now, now + deadline_s, img.shape,
                        str(img.dtype), "rgb8", line=self.s.line)
        for k, v in kw.items():
            setattr(h, k, v)
        return h

    def send(self, h: FrameHeader, pixels: bytes | np.ndarray) -> str:
        """As acquisition does: announce, wait for the sink to hold it, then hand it on."""
        self.to_sink.send_multipart([ANNOUNCE, h.encode()])
        end = time.monotonic() + 10
        while h.frame_id not in self.acked:
            assert time.monotonic() < end, "the sink did not acknowledge the announcement"
            if self.to_sink.poll(100):
                kind, raw = self.to_sink.recv_multipart()
                if kind == ACK:
                    ack = Ack.decode(raw)
                    self.acked.update(ack.held, ack.judged)
        self.frames.send_multipart([FRAME, h.encode(), pixels], copy=False)
        return h.frame_id

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.frames.close(0)
        self.to_sink.close(0)
        self.ctx.term()


@pytest.fixture
def settings(object_artifact: Path, tmp_path: Path) -> Iterator[LineSettings]:
    run_dir = Path(tempfile.mkdtemp(prefix="idt", dir="/tmp"))  # ipc paths must stay short
    s = LineSettings(
        line="t1", data_dir=tmp_path / "data", run_dir=run_dir,
        cameras={"cam1": {"type": "folder", "path": str(tmp_path / "in"), "sku": "obj"}},
        worker={"max_batch": 4, "max_wait_ms": 20, "attach_ok_every": 1},
        sink={"timeout_grace_ms": 100}, metrics={"enabled": False})
    publish(object_artifact, s.models_dir, "obj", "v1")
    yield s
    shutil.rmtree(run_dir, ignore_errors=True)


def _image(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_every_frame_gets_exactly_one_verdict_even_when_broken(settings, synth_root):
    test = synth_root / "object" / "test"
    good = [_image(p) for p in sorted((test / "good").glob("*.png"))[:3]]
    bad = [_image(p) for d in sorted(test.iterdir()) if d.name != "good"
           for p in sorted(d.glob("*.png"))[:1]][:3]
    line = Line(settings)
    try:
        ids = {}
        for img in good:
            ids[line.send(line.header(img), img)] = "good"
        for img in bad:
            ids[line.send(line.header(img), img)] = "defect"
        img = good[0]
        ids[line.send(line.header(img, shape=(99, 99, 3)), img)] = "wrong shape"
        ids[line.send(line.header(img), b"\x00" * 17)] = "corrupt"
        ids[line.send(line.header(img, sku="nosuch"), img)] = "unknown sku"
        ids[line.send(line.header(img, deadline_s=-1.0), img)] = "expired"
        # Announced but never handed to a worker (lost on the way): the sink times it out.
        lost = line.header(img, deadline_s=0.5)
        line.to_sink.send_multipart([ANNOUNCE, lost.encode()])
        ids[lost.frame_id] = "lost"
        rows = wait_rows(settings.database_url(), len(ids))
        time.sleep(1.0)  # nothing more may arrive
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert sorted(r["frame_id"] for r in rows) == sorted(ids)
    by = {ids[r["frame_id"]]: r for r in rows if ids[r["frame_id"]] not in ("good", "defect")}
    wrong = by["wrong shape"]
    assert wrong["verdict"] == "ERROR" and "corrupt frame" in wrong["reason"]
    assert by["corrupt"]["verdict"] == "ERROR"
    assert by["unknown sku"]["verdict"] == "ERROR" and "nosuch" in by["unknown sku"]["reason"]
    # kept (bounded) for the SKU's first refit
    assert "/images/unjudged/nosuch/" in by["unknown sku"]["image_path"]
    assert by["expired"]["verdict"] == "TIMEOUT"
    assert by["lost"]["verdict"] == "TIMEOUT"
    scored = [r for r in rows if ids[r["frame_id"]] in ("good", "defect")]
    assert all(r["verdict"] in ("OK", "NG") and r["model_version"] == "v1" for r in scored)
    assert all(r["score"] is not None and r["threshold"] is not None for r in scored)
    assert sum(r["verdict"] == "NG" for r in scored if ids[r["frame_id"]] == "defect") >= 2
    for r in scored:
        if r["verdict"] == "NG":
            for key in ("image_path", "mask_path", "overlay_path"):
                assert Path(r[key]).is_file(), key
    assert all(r["total_ms"] is not None for r in scored)


def test_late_and_repeated_verdicts_are_ignored(settings):
    line = Line(settings, worker=False)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        h = line.header(img, deadline_s=0.2)
        line.to_sink.send_multipart([ANNOUNCE, h.encode()])
        wait_rows(settings.database_url(), 1)
        late = Verdict.for_frame(h, "OK", score=0.1, threshold=1.0, model_version="v1")
        line.to_sink.send_multipart([VERDICT, late.encode()])
        line.to_sink.send_multipart([VERDICT, late.encode()])
        time.sleep(0.5)
        assert line.sink.counts.late == 2
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert [r["verdict"] for r in rows] == ["TIMEOUT"]


def test_stop_audits_frames_still_in_flight_as_timeout(settings):
    line = Line(settings, worker=False)
    img = np.zeros((8, 8, 3), np.uint8)
    h = line.header(img, deadline_s=600)
    line.to_sink.send_multipart([ANNOUNCE, h.encode()])
    time.sleep(0.3)
    line.close()
    rows = audit_rows(settings.database_url())
    assert [(r["frame_id"], r["verdict"]) for r in rows] == [(h.frame_id, "TIMEOUT")]
    assert "stopped" in rows[0]["reason"]


def _run_sink(settings: LineSettings) -> None:
    Sink(settings).run(threading.Event())


def test_a_killed_sink_leaves_no_frame_unaudited(settings):
    """SIGKILL a sink holding frames announced but not judged and verdicts not yet committed
    (commits held back): the sink that replaces it audits every one of them exactly once."""
    db = settings.sink.database.model_copy(update={"commit_interval_ms": 600_000,
                                                   "commit_rows": 10_000})
    held = settings.model_copy(update={"sink": settings.sink.model_copy(update={"database": db})})
    first = mp.get_context("spawn").Process(target=_run_sink, args=(held,))
    first.start()
    ctx = zmq.Context()
    to_sink = socket(ctx, zmq.DEALER, settings.sink_address(), bind=False, hwm=100,
                     send_timeout_ms=30_000)
    line = None
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        until(settings.journal_dir.is_dir, "the first sink up", timeout=60)
        now = time.time()
        # The last frame's deadline passes while no sink runs.
        hs = [FrameHeader(new_frame_id(), "cam1", "obj", now, now + d, img.shape, "uint8",
                          "rgb8", line=settings.line) for d in (60, 60, 60, 3)]
        for h in hs:
            to_sink.send_multipart([ANNOUNCE, h.encode()])
        ok = Verdict.for_frame(hs[0], "OK", score=0.1, threshold=1.0, model_version="v1")
        ng = Verdict.for_frame(hs[1], "NG", score=2.0, threshold=1.0, model_version="v1")
        to_sink.send_multipart([VERDICT, ok.encode()])
        to_sink.send_multipart([VERDICT, ng.encode(), img.tobytes()])

        def journal_lines() -> int:
            return sum(len(p.read_bytes().splitlines())
                       for p in settings.journal_dir.glob("*.jsonl"))

        until(lambda: journal_lines() >= 7, "4 announcements, 2 verdicts, 1 image in the journal")
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        assert audit_rows(settings.database_url()) == []  # nothing had been committed
        time.sleep(max(0.0, hs[3].deadline_ts + 0.2 - time.time()))  # the last one's is past

        line = Line(settings, worker=False)
        assert line.sink.counts.frames == 1  # the expired one, judged at start
        late = Verdict.for_frame(hs[2], "NG", score=3.0, threshold=1.0, model_version="v1")
        line.to_sink.send_multipart([VERDICT, late.encode()])
        wait_rows(settings.database_url(), 4)
        time.sleep(0.5)  # nothing more may arrive
    finally:
        to_sink.close(0)
        ctx.term()
        if first.is_alive():
            first.kill()
        if line is not None:
            line.close()
    rows = {r["frame_id"]: r for r in audit_rows(settings.database_url())}
    assert sorted(rows) == sorted(h.frame_id for h in hs)
    assert [rows[h.frame_id]["verdict"] for h in hs] == ["OK", "NG", "NG", "TIMEOUT"]
    assert Path(rows[hs[1].frame_id]["image_path"]).is_file()  # the dead sink saved it
    assert "sink restarted" in rows[hs[3].frame_id]["reason"]
    assert not any(settings.journal_dir.glob("*.jsonl"))  # a clean stop leaves nothing to replay


def test_hot_swap_loses_no_frame_and_rows_name_the_scoring_version(settings, synth_root,
                                                                   object_artifact, tmp_path):
    # v2: the same model with a different threshold, so each row shows which version scored it.
    v2 = tmp_path / "v2"
    shutil.copytree(object_artifact, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    t1 = manifest["threshold"]["image"]
    manifest["threshold"]["image"] = t2 = t1 * 3
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    img = _image(sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0])
    line = Line(settings)
    sent = []
    try:
        while len(sent) < 10:
            sent.append(line.send(line.header(img), img))
            time.sleep(0.05)
        publish(v2, settings.models_dir, "obj", "v2")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            sent.append(line.send(line.header(img), img))
            time.sleep(0.05)
            rows = audit_rows(settings.database_url())
            if any(r["model_version"] == "v2" for r in rows) and len(sent) > 40:
                break
        wait_rows(settings.database_url(), len(sent))
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert sorted(r["frame_id"] for r in rows) == sorted(sent)
    assert {r["verdict"] for r in rows} <= {"OK", "NG"}
    assert {r["model_version"] for r in rows} == {"v1", "v2"}
    for r in rows:
        assert r["threshold"] == pytest.approx(t1 if r["model_version"] == "v1" else t2)
    order = [r["model_version"] for r in sorted(rows, key=lambda r: sent.index(r["frame_id"]))]
    assert order == sorted(order)  # once swapped, never back


def test_a_verdict_for_a_frame_never_announced_is_refused(settings):
    """A forged OK for a part the line never saw must not become an OK row."""
    line = Line(settings, worker=False)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        forged = Verdict.for_frame(line.header(img), "OK", score=0.1, threshold=1.0)
        line.to_sink.send_multipart([VERDICT, forged.encode()])
        # ... nor acquisition's own verdict: it only ever judges ERROR or TIMEOUT
        for kind in ("OK", "NG"):
            own = Verdict.for_frame(line.header(img), kind, score=0.1, threshold=1.0)
            line.to_sink.send_multipart([JUDGED, own.encode()])
        until(lambda: line.sink.counts.refused == 3, "the forged verdicts refused")
        h = line.header(img, deadline_s=0.3)  # the sink is still judging: a TIMEOUT row
        line.to_sink.send_multipart([ANNOUNCE, h.encode()])
        wait_rows(settings.database_url(), 1)
    finally:
        line.close()
    assert [(r["frame_id"], r["verdict"]) for r in audit_rows(settings.database_url())] == [
        (h.frame_id, "TIMEOUT")]


def test_malformed_messages_are_dropped_and_counted_never_a_crash_or_a_row(settings):
    line = Line(settings, worker=False)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        h = line.header(img, deadline_s=60)
        line.to_sink.send_multipart([ANNOUNCE, h.encode()])
        good = json.loads(Verdict.for_frame(h, "OK", score=0.1, threshold=1.0).encode())
        poisoned = [
            {**good, "capture_ts": "yesterday"}, {**good, "score": True},
            {**good, "score": "NaN"}, {**good, "frame_id": "../../etc"},
            {**good, "timings_ms": {"total": "slow"}}, {**good, "shape": [-1, 5]},
            {**good, "reason": "x" * 100_000}, {**good, "verdict": "ok"},
            {**good, "v": 2}, {**good, "frame_id": None},
        ]
        for bad in poisoned:
            line.to_sink.send_multipart([VERDICT, json.dumps(bad).encode()])
        raw = b'{"frame_id": "f", "verdict": "OK", "score": NaN, "v": 1}'
        for parts in ([VERDICT, raw], [VERDICT, b"\xff\xfe"], [b"nonsense", b"{}"],
                      [ANNOUNCE], [ANNOUNCE, b"{}"], [VERDICT, b"[]", b"", b"", b"", b""]):
            line.to_sink.send_multipart(parts)
        until(lambda: line.sink.counts.refused == len(poisoned) + 6, "every one refused")
        # The sink goes on: the frame, still pending, gets its real verdict.
        line.to_sink.send_multipart([VERDICT, json.dumps(good).encode()])
        wait_rows(settings.database_url(), 1)
    finally:
        line.close()
    rows = audit_rows(settings.database_url())
    assert [(r["frame_id"], r["verdict"]) for r in rows] == [(h.frame_id, "OK")]


def test_the_row_takes_camera_sku_part_and_times_from_the_announcement(settings):
    line = Line(settings, worker=False)
    try:
        img = np.zeros((8, 8, 3), np.uint8)
        h = line.header(img, part_id="4711")
        line.to_sink.send_multipart([ANNOUNCE, h.encode()])
        v = Verdict.for_frame(h, "OK", score=0.1, threshold=1.0)
        v.sku, v.camera, v.part_id, v.capture_ts = "other", "cam9", "1", 1.0
        line.to_sink.send_multipart([VERDICT, v.encode()])
        [row] = wait_rows(settings.database_url(), 1)
    finally:
        line.close()
    assert (row["sku"], row["camera"], row["part_id"]) == ("obj", "cam1", "4711")
    announced = datetime.fromtimestamp(h.capture_ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert str(row["capture_time"]).startswith(announced)


def test_frames_unlike_the_training_images_are_errors_not_scores(settings, synth_root):
    """1×1, 16-bit, overexposed and oversized frames are outside the model's domain."""
    good = _image(sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0])
    cases = {
        "tiny": np.zeros((1, 1, 3), np.uint8),
        "16 bit": (good[..., 0].astype(np.uint16) << 8),
        "overexposed": np.full_like(good, 255),
        "huge": np.repeat(np.repeat(good, 3, 0), 3, 1),
    }
    line = Line(settings)
    try:
        ids = {}
        for name, img in cases.items():
            h = line.header(img)
            if img.dtype == np.uint16:
                h.dtype, h.pixel_format = "uint16", "mono16"
            ids[line.send(h, np.ascontiguousarray(img))] = name
        ids[line.send(line.header(good), good)] = "good"
        rows = wait_rows(settings.database_url(), len(ids))
    finally:
        line.close()
    by = {ids[r["frame_id"]]: r for r in rows}
    for name in cases:
        assert by[name]["verdict"] == "ERROR", name
        assert "outside the model's domain" in by[name]["reason"], by[name]["reason"]
        assert by[name]["score"] is None
    assert by["good"]["verdict"] in ("OK", "NG")


def test_a_broken_artifact_fails_its_own_sku_only_and_is_retried_with_backoff(
        settings, synth_root, object_artifact, tmp_path, monkeypatch):
    """A version whose weights are corrupt: its SKU's frames are ERROR at once (no load per
    batch), the other SKU is judged as usual."""
    from inspectd.daemon import worker as worker_mod

    broken = tmp_path / "broken"
    shutil.copytree(object_artifact, broken)
    (broken / "weights.safetensors").write_bytes(b"\0" * 64)
    publish(broken, settings.models_dir, "bad", "v1")
    loads = []
    real_load = worker_mod.ModelCache._load
    monkeypatch.setattr(worker_mod.ModelCache, "_load",
                        lambda self, *a: loads.append(a[0]) or real_load(self, *a))
    img = _image(sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0])
    line = Line(settings)
    try:
        ids = {}
        for _ in range(6):
            ids[line.send(line.header(img, sku="bad"), img)] = "bad"
            ids[line.send(line.header(img), img)] = "obj"
            time.sleep(0.1)
        rows = wait_rows(settings.database_url(), len(ids))
    finally:
        line.close()
    for r in rows:
        if ids[r["frame_id"]] == "bad":
            assert r["verdict"] == "ERROR" and "cannot be loaded" in r["reason"], r["reason"]
            assert "unknown SKU" not in r["reason"]  # not kept for a first refit
        else:
            assert r["verdict"] in ("OK", "NG")
    assert 1 <= loads.count("bad") <= 2  # preload and at most one retry in ~1 s, not 6


def test_service_time_is_fitted_per_sku_and_batch_size():
    from inspectd.daemon.worker import ServiceTime

    st = ServiceTime()
    assert st.estimate(4) is None
    for n in (1, 2, 4, 8, 8, 4):
        st.add(n, 0.05 + 0.01 * n)  # a fixed 50 ms and 10 ms a frame
    assert st.estimate(1) == pytest.approx(0.06) and st.estimate(8) == pytest.approx(0.13)
    same = ServiceTime()
    for _ in range(5):
        same.add(8, 0.4)
    assert same.estimate(4) == pytest.approx(0.2)  # one batch size seen: proportional
