"""`inspectd run` end to end, as systemd would run it: a watched folder camera, the worker, the
sink with its audit log, NG images, events and PLC; a stalled and a killed worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import yaml

from inspectd.daemon.events import subscribe
from inspectd.daemon.plc import VERDICT_CODES
from inspectd.lifecycle.registry import publish
from tests.helpers import audit_rows, free_port, until, wait_rows
from tests.test_plc import WRITE_COIL, WRITE_REGISTERS, PlcPeer


class Daemon:
    def __init__(self, config: Path, tmp: Path, notify: Path | None = None) -> None:
        env = dict(os.environ)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify)
            env["WATCHDOG_USEC"] = "2000000"
        self.log_path = tmp / "daemon.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inspectd", "run", "-c", str(config)], stdout=self.log,
            stderr=subprocess.STDOUT, env=env)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def pids(self, child: str) -> list[int]:
        return [e["pid"] for e in self.events() if e.get("event") == "started"
                and e.get("child") == child]

    def wait_log(self, predicate, timeout: float = 120.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events():
                if predicate(e):
                    return e
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n"
                                     + self.log_path.read_text()[-4000:])
            time.sleep(0.1)
        raise AssertionError("log line not seen:\n" + self.log_path.read_text()[-4000:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture
def line(object_artifact: Path, tmp_path: Path) -> Iterator[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix="idd", dir="/tmp"))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = tmp_path / "data"
    cfg = {
        "line": "e2e", "data_dir": str(data), "run_dir": str(run_dir), "log_level": "info",
        "cameras": {"cam1": {
            "type": "folder", "path": str(inbox), "after": "delete", "deadline_ms": 4000,
            "sku_pattern": r"(?P<sku>[A-Za-z0-9]+)_(?P<part>\d+)\.png"}},
        "worker": {"max_batch": 4, "max_wait_ms": 10, "model_cache": 2},
        "sink": {"timeout_grace_ms": 200},
        "metrics": {"enabled": False},
        "supervisor": {"heartbeat_timeout_s": 3.0, "drain_s": 2.0},
    }
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump(cfg))
    publish(object_artifact, data / "models", "obj", "v1")
    yield {"config": config, "inbox": inbox, "url": f"sqlite:///{data / 'audit.db'}",
           "data": data, "run_dir": run_dir}
    shutil.rmtree(run_dir, ignore_errors=True)


def drop(inbox: Path, name: str, src: Path | bytes) -> None:
    """Write a file the way a camera PC does: into a temp name, then rename."""
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(src if isinstance(src, bytes) else src.read_bytes())
    os.replace(tmp, inbox / name)


def feed_until_judged(line: dict, image: Path, sent: int, timeout: float = 120.0) -> int:
    """Drop a frame at a time until one is judged OK or NG (a replaced worker is back);
    every frame must get its row meanwhile. Returns the frames sent in all."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        drop(line["inbox"], f"obj_{sent:04d}.png", image)
        sent += 1
        if any(r["verdict"] in ("OK", "NG") for r in wait_rows(line["url"], sent)):
            return sent
        time.sleep(0.5)
    raise AssertionError(f"no frame judged OK or NG in {timeout:.0f} s")


def assert_each_frame_once(line: dict, sent: int) -> None:
    rows = audit_rows(line["url"])
    assert len(rows) == sent and len({r["frame_id"] for r in rows}) == sent


class Collector:
    def __init__(self, endpoint: str) -> None:
        self.got: list[dict] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(endpoint,), daemon=True)
        self.t.start()

    def _run(self, endpoint: str) -> None:
        for ev in subscribe(endpoint, stop=self.stop):
            self.got.append(ev)


class Notifications:
    """A fake NOTIFY_SOCKET: collects the daemon's sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def seen(self, key: str) -> bool:
        return any(key in m.splitlines() for m in self.got)

    def close(self) -> None:
        self.stop.set()
        self.t.join()
        self.sock.close()


def test_line_judges_every_frame_once_and_reports_it(line, synth_root, tmp_path):
    plc = PlcPeer(free_port())
    plc.start()
    cfg = yaml.safe_load(line["config"].read_text())
    cfg["plc"] = {"type": "modbus", "modbus": {
        "port": plc.port, "verdict_block": 10, "reject_coil": 3, "max_age_ms": None}}
    line["config"].write_text(yaml.safe_dump(cfg))
    notes = Notifications(tmp_path / "notify.sock")
    d = Daemon(line["config"], tmp_path, tmp_path / "notify.sock")
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        until(lambda: notes.seen("READY=1"), "READY=1")
        until(lambda: notes.seen("WATCHDOG=1"), "WATCHDOG=1")
        events = Collector(f"ipc://{line['run_dir']}/events.sock")
        time.sleep(0.5)  # let the subscription reach the publisher
        test = synth_root / "object" / "test"
        goods = sorted((test / "good").glob("*.png"))
        defects = sorted(p for d_ in test.iterdir() if d_.name != "good" for p in d_.glob("*.png"))
        expect = {}
        for i, p in enumerate(goods + defects):
            drop(line["inbox"], f"obj_{i:04d}.png", p)
            expect[f"{i:04d}"] = "good" if p in goods else "defect"
        drop(line["inbox"], "nosku_0100.png", goods[0])
        drop(line["inbox"], "obj_0101.png", b"not a png at all")
        n = len(expect) + 2
        rows = wait_rows(line["url"], n)
        time.sleep(1.0)
        assert len(audit_rows(line["url"])) == n
        end = time.monotonic() + 10
        while len(events.got) < n and time.monotonic() < end:
            time.sleep(0.1)
        events.stop.set()
        assert d.stop() == 0
        until(lambda: notes.seen("STOPPING=1"), "STOPPING=1")
    finally:
        d.stop()
        notes.close()
        plc.stop()
    assert any(m.startswith("STATUS=frames ") for m in notes.got)
    by_part = {r["part_id"]: r for r in rows}
    # The PLC saw, per frame, one block (sequence, part id, verdict code), in verdict order.
    blocks = [v for fc, a, v, _ in plc.writes if fc == WRITE_REGISTERS and a == 10]
    assert [b[0] for b in blocks] == list(range(1, len(rows) + 1))
    assert {b[1:] for b in blocks} == {(int(r["part_id"]), VERDICT_CODES[r["verdict"]])
                                       for r in rows}
    coil = [v[0] for fc, a, v, _ in plc.writes if fc == WRITE_COIL and a == 3]
    rejects = sum(r["verdict"] != "OK" for r in rows)
    assert coil.count(1) == rejects and coil[-1] == 0  # one pulse per reject, then released
    assert by_part["0100"]["verdict"] == "ERROR" and "nosku" in by_part["0100"]["reason"]
    assert by_part["0101"]["verdict"] == "ERROR"
    scored = [by_part[k] for k in expect]
    assert [(r["verdict"], r["reason"]) for r in scored if r["verdict"] not in ("OK", "NG")] == []
    assert all(r["verdict"] in ("OK", "NG") and r["model_version"] == "v1" for r in scored)
    ng = [r for r in scored if r["verdict"] == "NG"]
    assert sum(expect[r["part_id"]] == "defect" for r in ng) >= len(defects) // 2
    for r in ng:
        assert Path(r["image_path"]).is_file() and Path(r["mask_path"]).is_file()
        assert cv2.imread(r["mask_path"], cv2.IMREAD_GRAYSCALE).shape == (128, 128)
    assert sorted(e["frame_id"] for e in events.got) == sorted(r["frame_id"] for r in rows)
    assert not any(line["inbox"].glob("*.png"))  # after: delete


def test_stalled_and_killed_workers_cost_timeouts_not_frames(line, synth_root, tmp_path):
    good = sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0]
    d = Daemon(line["config"], tmp_path)
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        (worker,) = d.pids("worker:0")
        # A hung worker: frames it holds run out of time, the supervisor replaces it.
        os.kill(worker, signal.SIGSTOP)
        for i in range(3):
            drop(line["inbox"], f"obj_{i:04d}.png", good)
        rows = wait_rows(line["url"], 3)
        assert [r["verdict"] for r in rows] == ["TIMEOUT"] * 3
        d.wait_log(lambda e: e.get("event") == "restarting child" and "heartbeat" in e["reason"])
        # A killed worker: same again, and it comes back.
        d.wait_log(lambda e: e.get("event") == "started" and e.get("child") == "worker:0"
                   and e.get("pid") != worker)
        time.sleep(0.5)
        (_, worker2) = d.pids("worker:0")
        os.kill(worker2, signal.SIGKILL)
        d.wait_log(lambda e: e.get("event") == "restarting child" and "exited" in e["reason"])
        # Frames keep coming until a restarted worker judges them again; each gets one row.
        sent = feed_until_judged(line, good, 3)
        assert d.stop() == 0
    finally:
        d.stop()
    assert_each_frame_once(line, sent)


def test_a_killed_sink_costs_no_frame(line, synth_root, tmp_path):
    """Frames announced to a sink that is then killed, held by a hung worker that never
    answers: the restarted sink finds them in the journal and audits them TIMEOUT."""
    good = sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0]
    journal = line["data"] / "journal"
    d = Daemon(line["config"], tmp_path)
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        (worker,) = d.pids("worker:0")
        (sink,) = d.pids("sink")
        os.kill(worker, signal.SIGSTOP)
        for i in range(3):
            drop(line["inbox"], f"obj_{i:04d}.png", good)
        until(lambda: sum(p.read_bytes().count(b'{"announce"') for p in journal.glob("*.jsonl"))
              >= 3, "3 frames announced to the sink", timeout=60)
        os.kill(sink, signal.SIGKILL)
        replay = d.wait_log(lambda e: e.get("event") == "sink journal replayed")
        assert replay["pending"] + replay["expired"] == 3
        rows = wait_rows(line["url"], 3)
        assert [r["verdict"] for r in rows] == ["TIMEOUT"] * 3
        # The line goes on: the hung worker is replaced, later frames are judged.
        sent = feed_until_judged(line, good, 3)
        assert d.stop() == 0
    finally:
        d.stop()
    assert_each_frame_once(line, sent)
    assert not any(journal.glob("*.jsonl"))



def test_a_hung_sink_loses_no_frame(line, synth_root, tmp_path):
    """SIGSTOP of the sink while frames arrive: acquisition holds what the sink never
    acknowledged, the supervisor replaces the hung sink, and every frame ends with exactly
    one row; no file leaves the inbox unjudged."""
    good = sorted((synth_root / "object" / "test" / "good").glob("*.png"))[0]
    d = Daemon(line["config"], tmp_path)
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        (sink,) = d.pids("sink")
        os.kill(sink, signal.SIGSTOP)
        for i in range(8):
            drop(line["inbox"], f"obj_{i:04d}.png", good)
            time.sleep(0.2)
        d.wait_log(lambda e: e.get("event") == "restarting child" and e.get("child") == "sink")
        rows = wait_rows(line["url"], 8, timeout=90)
        sent = feed_until_judged(line, good, 8)
        until(lambda: not any(line["inbox"].glob("*.png")), "every file judged and disposed")
        assert d.stop() == 0
    finally:
        d.stop()
        try:
            os.kill(sink, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert_each_frame_once(line, sent)
    assert all(r["verdict"] in ("OK", "NG", "TIMEOUT") for r in rows)


def test_a_worker_restarted_within_budget_keeps_the_watchdog_fed(line, tmp_path):
    """systemd's watchdog sees real progress: a killed worker being restarted (spawn, torch,
    its models: longer than a watchdog interval here) is the supervisor doing its job, so
    WATCHDOG=1 keeps coming, never further apart than the interval, and STATUS says which
    child is restarting."""
    from tests.test_systemd import NotifyLog

    notes = NotifyLog(tmp_path / "notify.sock")
    d = Daemon(line["config"], tmp_path, tmp_path / "notify.sock")  # WATCHDOG_USEC 2 s
    interval = 2.0
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        until(lambda: notes.times("WATCHDOG=1"), "WATCHDOG=1", timeout=30)
        (worker,) = d.pids("worker:0")
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        d.wait_log(lambda e: e.get("event") == "child ready" and e.get("child") == "worker:0")
        back = time.monotonic()
        until(lambda: notes.times("WATCHDOG=1", back), "a ping after the restart", timeout=30)
        assert d.stop() == 0
    finally:
        d.stop()
        notes.close()
    pings = notes.times("WATCHDOG=1")
    around = [t for t in pings if t < killed][-1:] + [t for t in pings if t >= killed]
    around = around[: len([t for t in around if t <= back]) + 1]  # up to the first after
    gaps = [b - a for a, b in zip(around, around[1:], strict=False)]
    assert around[0] < killed and around[-1] >= back
    assert max(gaps) <= interval, gaps
    assert any("worker:0 restarting (1/" in m for m in notes.messages())


def test_a_child_dying_past_the_restart_limit_stops_the_pings_and_the_line(line, tmp_path):
    """Each worker killed as soon as it starts: within restart_limit the supervisor pings on,
    past it the line stops, no WATCHDOG=1 follows, and the exit code is non-zero (systemd's
    Restart= takes over)."""
    from tests.test_systemd import NotifyLog

    cfg = yaml.safe_load(line["config"].read_text())
    cfg["supervisor"].update(restart_limit=2, restart_window_s=600)
    line["config"].write_text(yaml.safe_dump(cfg))
    notes = NotifyLog(tmp_path / "notify.sock")
    d = Daemon(line["config"], tmp_path, tmp_path / "notify.sock")
    killed: list[int] = []
    try:
        d.wait_log(lambda e: e.get("event") == "line up")
        until(lambda: notes.times("WATCHDOG=1"), "WATCHDOG=1", timeout=30)
        last_kill = 0.0
        for n in range(3):  # the first worker, then each restart
            until(lambda n=n: len(d.pids("worker:0")) > n, f"worker start {n + 1}",
                  timeout=30)
            if killed:  # restarting within budget: the supervisor pings on
                until(lambda since=last_kill: notes.times("WATCHDOG=1", since),
                      "a ping while restarting")
            killed.append(d.pids("worker:0")[n])
            last_kill = time.monotonic()
            os.kill(killed[-1], signal.SIGKILL)
        assert d.proc.wait(60) != 0
    finally:
        d.stop()
        notes.close()
    limit = [e for e in d.events() if e.get("event", "").startswith("restart limit reached")]
    assert len(limit) == 1 and limit[0]["child"] == "worker:0"
    assert len(d.pids("worker:0")) == 3  # no third restart
    msgs = notes.messages()
    assert any("worker:0 restarting (2/2)" in m for m in msgs)
    stopping = next(i for i, m in enumerate(msgs) if m.startswith("STOPPING=1"))
    assert "WATCHDOG=1" not in msgs[stopping:]  # past the limit, never again
    assert "worker:0 past its restart limit" in msgs[stopping]
