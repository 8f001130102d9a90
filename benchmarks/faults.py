"""The fault suite: every frame that enters the line gets exactly one audited verdict, whatever
fails.

    .venv/bin/python benchmarks/faults.py [--quick] [--only NAME[,NAME…]] [--soak-min N]
                                          [--capacity FPS] [--out FILE]

Every scenario runs a real line: `inspectd run` as a subprocess with a config written here,
READY awaited on a NOTIFY_SOCKET as systemd does; a fresh PostgreSQL database on the server at
127.0.0.1:5432 (trust auth; created for the run, dropped after); a Modbus TCP PLC on 127.0.0.1
that records every write (one FC16 block [sequence, part id, verdict code] per verdict at
`verdict_block`, pulses of `reject_coil`; `max_age_ms: null`, so late outputs are written and
counted too); a ZeroMQ subscriber counting events. One fault is injected, then what was
offered (files dropped into a watched folder, named with a part number; frames of a finite
video file paced as a live camera, numbered by the camera; the Aravis fake GigE camera's frame
ids) is compared with the audit rows, the PLC's verdict blocks and the events.

Scenarios (`--only` takes these names): sigkill, sigstop, tree-kill, db-outage, disk-full,
camera-unplug, burst, hostile, wire, contention, soak. The line's capacity comes from a short
calibration run first (an unpaced video file: the camera waits for the line, so judged
frames/s is what the line can do; `--capacity` skips it). A full run writes RELIABILITY.md;
`--quick` (short phases, 2-min soak) and `--only` write outputs/faults*/RELIABILITY.md unless
`--out` says otherwise. Raw results: outputs/faults*/results.json; each line's config, log and
inbox under outputs/faults*/runs/<scenario>/; data under data/faults/.

Nothing here sends a packet beyond 127.0.0.0/8: every server binds 127.0.0.1, the Aravis
camera is opened by address (never discovered). Every process started here is stopped, also
on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bench_daemon import (
    PlcRecorder,
    ServiceManager,
    decoded_frames,
    shown,
    shown_arg,
    timeout_cause,
    tree_pids,
    tree_rss_kib,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from inspectd.core.resources import set_threads  # noqa: E402
from inspectd.core.wire import printable  # noqa: E402
from inspectd.daemon.sources.folder import note_path  # noqa: E402

DATA = ROOT / "data/faults"
ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PATTERN = r"(?P<sku>[A-Za-z0-9]+)_(?P<part>\d+)\.png"
SIZE = 128  # synthetic images and the model's input, px
BLOCK, HEARTBEAT, COIL = 0, 8, 16  # verdict block (3 registers), heartbeat register, coil
CODES = {"OK": 1, "NG": 2, "ERROR": 3, "TIMEOUT": 4}
FAKE_CAMERA = "arv-fake-gv-camera-0.8"
JUDGED = ("OK", "NG")


@dataclass(frozen=True)
class Plan:
    steady_s: float  # the line runs this long before a fault
    after_s: float  # and this long after it judges again
    feed_share: float  # folder feed rate, share of the capacity
    down_s: float  # whole-tree kill: the daemon is down this long
    outage_s: float  # database outage and hang, each
    unplug_s: float  # camera unplugged
    overload_s: float  # video at 3× capacity
    phase_s: float  # CPU contention: before, during, after, each
    hostile_per_kind: int
    hostile_good: int
    burst: int
    soak_min: float
    out: Path


FULL = Plan(steady_s=20, after_s=15, feed_share=0.25, down_s=10, outage_s=60, unplug_s=5,
            overload_s=60, phase_s=60, hostile_per_kind=60, hostile_good=200, burst=200,
            soak_min=30, out=ROOT / "outputs/faults")
QUICK = Plan(steady_s=8, after_s=6, feed_share=0.25, down_s=5, outage_s=15, unplug_s=5,
             overload_s=15, phase_s=15, hostile_per_kind=4, hostile_good=20, burst=200,
             soak_min=2, out=ROOT / "outputs/faults-quick")


def log(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def until(cond: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """cond()'s first truthy value, or None after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > end:
            return value or None
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            deep_merge(a[k], v)
        else:
            a[k] = v
    return a


def plc_part(part_id: str | None) -> int:
    """The part id as the PLC block carries it: low 16 bits, 0 when not a number."""
    try:
        return int(part_id) % 65536 if part_id is not None else 0
    except ValueError:
        return 0


# ------------------------------------------------------------------------- the model, data

@dataclass
class Assets:
    obj: Path  # PatchCore fitted on the PNG training images (folder cameras, SKU obj)
    vid: Path  # the same, on those images through the MJPG codec (video cameras, SKU vid)
    fake: Path  # obj without its domain check: the Aravis fake camera's 512² test pattern
    images: list[bytes]  # PNG test images, good and defect interleaved, to feed folders
    order: list[Path]  # the same files, for videos
    capacity: float = 0.0  # judged frames/s of the line (calibration)
    bare: float = 0.0  # the bare model's images/s at batch 8, as bench_daemon measures it


def prepare(plan: Plan) -> Assets:
    """Synthetic data (once, under data/faults) and three published-ready artifacts."""
    from inspectd.models import fit
    from inspectd.models.datasets.synthetic import generate
    from inspectd.models.settings import ModelSettings

    params = {"n_train": 30, "n_test_good": 20, "n_test_defect": 20, "size": SIZE, "seed": 11}
    stamp = DATA / "params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        log(f"generating the synthetic object set in {shown(DATA)}")
        shutil.rmtree(DATA, ignore_errors=True)
        generate(DATA, ("object",), **params)
        stamp.write_text(json.dumps(params))
    test = DATA / "object/test"
    good = sorted((test / "good").glob("*.png"))
    defect = sorted(p for d in test.iterdir() if d.name != "good" for p in d.glob("*.png"))
    order = [p for pair in zip(good, defect, strict=False) for p in pair]
    art = plan.out / "artifacts"
    settings = ModelSettings(kind="patchcore", preprocess={"resize": SIZE})
    train = sorted((DATA / "object/train/good").glob("*.png"))
    if not (art / "obj/manifest.json").is_file() or not (art / "vid/manifest.json").is_file():
        shutil.rmtree(art, ignore_errors=True)
        log(f"fitting PatchCore ({len(train)} OK images, {SIZE}²) on PNGs and through MJPG")
        fit(DATA / "object/train/good", settings).save(art / "obj")
        write_video(art / "train.avi", train)
        fit(decoded_frames(art / "train.avi"), settings).save(art / "vid")
        shutil.copytree(art / "obj", art / "fake")
        manifest = json.loads((art / "fake/manifest.json").read_text())
        manifest.pop("domain", None)
        (art / "fake/manifest.json").write_text(json.dumps(manifest))
    return Assets(art / "obj", art / "vid", art / "fake", [p.read_bytes() for p in order], order)


def write_video(path: Path, images: list[Path], frames: int | None = None) -> Path:
    """An MJPG video of `images` (cycled to `frames` frames); kept when it exists."""
    import cv2

    if path.is_file() and frames is not None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in images]
    tmp = path.with_name(path.stem + ".tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 25, (SIZE, SIZE))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video {tmp}")
    for i in range(frames or len(pixels)):
        writer.write(pixels[i % len(pixels)])
    writer.release()
    os.replace(tmp, path)
    return path


def video(assets: Assets, frames: int) -> Path:
    return write_video(DATA / f"videos/test-{frames}.avi", assets.order, frames)


def bare_rate(artifact: Path, clip: Path) -> float:
    """The artifact as the worker loads it, predicting decoded frames at batch 8: images/s
    (median of 3 repeats after a warm-up), as bench_daemon measures the bare model."""
    from inspectd.models import load

    frames = decoded_frames(clip)
    det = load(artifact, device="auto", precision="auto")
    det.batch_size = 8
    det.predict(frames, keep_image=False)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        det.predict(frames, keep_image=False)
        rates.append(len(frames) / (time.perf_counter() - t0))
    return float(np.median(rates))


# ------------------------------------------------------------------- the PLC, database, events

class Plc(PlcRecorder):
    """bench_daemon's Modbus recorder as unit 1 with coils, keeping every write whole:
    (time, function code, address, values)."""

    def __init__(self) -> None:
        super().__init__()
        self.start()

    async def _record(self, fc: int, _start: int, address: int, _count: int, _regs: list[int],
                      values: list[int] | list[bool] | None) -> None:
        if values is not None:
            self.writes.append((time.time(), fc, address, tuple(int(v) for v in values)))

    def _device(self) -> Any:
        from pymodbus.simulator import DataType, SimData, SimDevice

        return SimDevice(1, action=self._record, simdata=(
            [SimData(0, count=32, values=False, datatype=DataType.BITS)],
            [SimData(0, values=False, datatype=DataType.BITS)],
            [SimData(0, count=64, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, values=0, datatype=DataType.REGISTERS)]))

    def blocks(self) -> list[tuple[float, int, int, int]]:
        """(time, sequence, part, code) of every verdict block written."""
        return [(t, *v) for t, fc, a, v in list(self.writes) if fc == 16 and a == BLOCK]

    def pulses(self) -> int:
        return sum(1 for _, fc, a, v in list(self.writes) if fc == 5 and a == COIL and v == (1,))


class Database:
    """A fresh database on the PostgreSQL at 127.0.0.1:5432, dropped by `drop()`."""

    def __init__(self, tag: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self.sa = sa
        self.admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                                      connect_args={"connect_timeout": 5})
        self.name = f"faults_{re.sub('[^a-z0-9]', '_', tag.lower())}_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"
        self.engine = sa.create_engine(self.url, poolclass=NullPool,
                                       connect_args={"connect_timeout": 5})

    def url_on(self, port: int) -> str:
        return self.url.replace(":5432/", f":{port}/")

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        try:
            with self.engine.connect() as c:
                return [dict(r._mapping) for r in c.execute(self.sa.text(sql), params)]
        except self.sa.exc.ProgrammingError:  # no table yet
            return []

    def rows(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM verdicts ORDER BY id")
        for r in rows:
            r["capture_ts"] = r["capture_time"].timestamp() if r["capture_time"] else None
            r["decided_ts"] = r["decided_time"].timestamp()
        return rows

    def count(self) -> int:
        got = self.query("SELECT count(*) AS n FROM verdicts")
        return int(got[0]["n"]) if got else 0

    def judged_after(self, t: float) -> float | None:
        """Decision time of the first OK/NG frame captured at or after t."""
        got = self.query("SELECT extract(epoch FROM min(decided_time)) AS d FROM verdicts WHERE "
                         "verdict IN ('OK', 'NG') AND capture_time >= to_timestamp(:t)", t=t)
        return float(got[0]["d"]) if got and got[0]["d"] is not None else None

    def drop(self) -> None:
        self.engine.dispose()
        with self.admin.connect() as c:
            c.execute(self.sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class Events:
    """The line's ZeroMQ events, as `inspectd events` gets them (inspectd.daemon.events)."""

    def __init__(self, endpoint: str, keys: Any = None) -> None:
        self.got: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint, keys), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str, keys: Any) -> None:
        from inspectd.daemon.events import subscribe

        for ev in subscribe(endpoint, stop=self._stop, keys=keys):
            self.got.append(ev)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class DbProxy:
    """127.0.0.1:port → the PostgreSQL at 127.0.0.1:5432. `down()` closes the port and resets
    every connection (connections refused until `up()`); `freeze()` keeps every connection
    open and accepts new ones but relays nothing (a database that stops answering) until
    `thaw()`."""

    def __init__(self, target: int = 5432) -> None:
        self.target, self.port, self.mode = target, free_port(), "up"
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._listener: socket.socket | None = None
        self._listen()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s

    def _accept(self) -> None:
        while not self._closed:
            s = self._listener
            if s is None:
                time.sleep(0.1)
                continue
            try:
                if not select.select([s], [], [], 0.2)[0]:
                    continue
                client, _ = s.accept()
            except (OSError, ValueError):
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with self._lock:
            self._socks.append(client)
        while self.mode == "frozen" and not self._closed:
            time.sleep(0.05)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks.append(upstream)
        peer = {client: upstream, upstream: client}
        try:
            while not self._closed:
                if self.mode == "frozen":
                    time.sleep(0.05)
                    continue
                ready = select.select([client, upstream], [], [], 0.2)[0]
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def _reset_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def down(self) -> None:
        self.mode = "down"
        s, self._listener = self._listener, None
        if s is not None:
            s.close()
        self._reset_all()

    def up(self) -> None:
        self._listen()
        self.mode = "up"

    def freeze(self) -> None:
        self.mode = "frozen"

    def thaw(self) -> None:
        self.mode = "up"

    def close(self) -> None:
        self._closed = True
        self.down()
        self._thread.join(5)


# ----------------------------------------------------------------------------- the line

class Line:
    """One `inspectd run` with its own data_dir and run_dir, a fresh PostgreSQL database, the
    PLC recorder and an events subscriber; `close()` stops and removes all of it."""

    def __init__(self, plan: Plan, name: str, cameras: dict[str, dict], models: dict[str, Path],
                 over: dict | None = None, db_port: int | None = None,
                 wrap: list[str] | None = None, keys: bool = False) -> None:
        self.name, self.wrap = name, wrap or []
        self.work = plan.out / "runs" / name
        shutil.rmtree(self.work, ignore_errors=True)
        self.inbox = self.work / "inbox"
        self.inbox.mkdir(parents=True)
        self.data = self.work / "data"
        self.data.mkdir()
        self.run_dir = Path(tempfile.mkdtemp(prefix="ifl", dir="/tmp"))  # ipc paths ≤ 107 B
        self.log_path = self.work / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.events: Events | None = None
        self.managers: list[ServiceManager] = []
        self.running_at_end: bool | None = None
        self.exit_code: int | None = None
        self.starts = 0
        self._log_pos, self._log_events = 0, []
        self.plc = self.db = None
        try:
            self.plc = Plc()
            self.db = Database(name)
            url = self.db.url if db_port is None else self.db.url_on(db_port)
            self.cfg = deep_merge({
                "line": "faults", "data_dir": str(self.data), "run_dir": str(self.run_dir),
                "log_level": "info", "cameras": cameras,
                "worker": {"max_batch": 8, "max_wait_ms": 10},
                "sink": {"database": {"url": url}},
                "metrics": {"enabled": False},
                "plc": {"type": "modbus", "modbus": {
                    "host": "127.0.0.1", "port": self.plc.port, "verdict_block": BLOCK,
                    "slots": 1, "reject_coil": COIL, "heartbeat_register": HEARTBEAT,
                    "max_age_ms": None}},
            }, over or {})
            self.config = self.work / "line.yaml"
            self.config.write_text(yaml.safe_dump(self.cfg, allow_unicode=True))
            if not wrap:  # a wrapped line (disk-full) publishes inside its own filesystem
                publish_models(models, self.data / "models")
            self.keys = None
            if keys:
                subprocess.run([sys.executable, "-m", "inspectd", "keys", "generate", "-c",
                                str(self.config)], check=True, capture_output=True, cwd=ROOT)
                from inspectd.daemon.security import load

                self.keys = load(self.data / "keys")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Line:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def events_endpoint(self) -> str:
        return self.cfg.get("events", {}).get("endpoint") or f"ipc://{self.run_dir}/events.sock"

    def start(self, timeout: float = 300) -> float:
        """Start `inspectd run`; returns when it is READY (its time)."""
        self.starts += 1
        manager = ServiceManager(self.run_dir / f"notify{self.starts}.sock")
        self.managers.append(manager)
        with self.log_path.open("a") as logf:
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "inspectd", "run", "-c", str(self.config)],
                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(manager.path)})
        manager.wait_ready(self.proc, self.log_path, timeout)
        if self.events is None:
            self.events = Events(self.events_endpoint, self.keys)
            time.sleep(0.5)  # the subscription reaches the publisher
        log(f"{self.name}: line up (start {self.starts})")
        return time.time()

    def log_events(self) -> list[dict[str, Any]]:
        with self.log_path.open("rb") as f:
            f.seek(self._log_pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._log_pos += end
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                self._log_events.append(json.loads(line))
        return self._log_events

    def wait_log(self, pred: Callable[[dict], bool], timeout: float = 120) -> dict | None:
        return until(lambda: next((e for e in self.log_events() if pred(e)), None), timeout)

    def pid(self, child: str) -> int:
        return [e["pid"] for e in self.log_events()
                if e.get("event") == "started" and e.get("child") == child][-1]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_tree(self) -> None:
        """SIGKILL the daemon and all its children at once."""
        pids = tree_pids(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(120)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: inspectd run ignored SIGTERM for 120 s; killing its tree")
                self.kill_tree()
        return self.proc.returncode

    def finish(self) -> None:
        """Record whether the line still runs, then stop it cleanly (SIGTERM)."""
        self.running_at_end = self.alive()
        self.exit_code = self.stop()

    def settle(self, n: int, timeout: float = 180) -> int:
        """Wait until the audit log holds n rows (or timeout), then a moment for stragglers."""
        until(lambda: self.db.count() >= n, timeout, every=0.5)
        time.sleep(2.0)
        return self.db.count()

    def restarts(self) -> list[str]:
        return [f"{e.get('child')}: {e.get('reason')}" for e in self.log_events()
                if e.get("event") == "restarting child"]

    def close(self) -> None:
        if self.proc is not None:
            leftovers = tree_pids(self.proc.pid) if self.proc.poll() is None else []
            with contextlib.suppress(Exception):
                self.stop()
            for pid in leftovers:  # whatever outlived the stop
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for stop in ([self.events.close] if self.events else []) + [
                m.close for m in self.managers] + ([self.plc.stop] if self.plc else []):
            with contextlib.suppress(Exception):
                stop()
        if self.db is not None:
            with contextlib.suppress(Exception):  # the evidence stays; the database goes
                (self.work / "rows.jsonl").write_text("".join(
                    json.dumps(r, default=str) + "\n" for r in self.db.rows()))
            with contextlib.suppress(Exception):
                self.db.drop()
        shutil.rmtree(self.data / "images", ignore_errors=True)  # GBs after a soak
        shutil.rmtree(self.run_dir, ignore_errors=True)


def publish_models(models: dict[str, Path], models_dir: Path) -> None:
    from inspectd.lifecycle.registry import publish

    for sku, artifact in models.items():
        publish(artifact, models_dir, sku, "v1")


def folder_camera(inbox: Path, deadline_ms: int = 4000, **kw: Any) -> dict[str, Any]:
    return {"type": "folder", "path": str(inbox), "sku_pattern": PATTERN, "after": "delete",
            "deadline_ms": deadline_ms, **kw}


def video_camera(clip: Path, fps: float | None, deadline_ms: int = 2000) -> dict[str, Any]:
    return {"type": "opencv", "uri": str(clip), "loop": False, "max_fps": fps, "sku": "vid",
            "deadline_ms": deadline_ms}


def runs(plan: Plan, name: str) -> Path:
    return plan.out / "runs" / name


class Feeder:
    """Drops numbered part files (obj_000001.png, …) into a folder as a camera PC does (a
    temporary name, then a rename), at a rate in a thread or in bursts."""

    def __init__(self, inbox: Path, images: list[bytes]) -> None:
        self.inbox, self.images = inbox, images
        self.dropped: dict[int, float] = {}  # part → when
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drop(self, n: int = 1) -> list[int]:
        parts = []
        with self._lock:
            for _ in range(n):
                part = len(self.dropped) + 1
                tmp = self.inbox / f".obj_{part:06d}.tmp"
                tmp.write_bytes(self.images[part % len(self.images)])
                os.replace(tmp, self.inbox / f"obj_{part:06d}.png")
                self.dropped[part] = time.time()
                parts.append(part)
        return parts

    def run(self, rate: float) -> Feeder:
        def loop() -> None:
            due = time.monotonic()
            while not self._stop.is_set():
                self.drop()
                due += 1.0 / rate
                self._stop.wait(max(0.0, due - time.monotonic()))

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def between(self, a: float, b: float) -> int:
        return sum(1 for t in self.dropped.values() if a <= t < b)


def part_key(r: dict) -> int:
    return int(r["part_id"])


# ----------------------------------------------------------------------------- analysis

def analyse(line: Line, name: str, offered: Iterable, key_of: Callable[[dict], Any],
            fault_ts: float | None = None, what: str = "", **extra: Any) -> dict[str, Any]:
    """Rows vs offered frames vs PLC blocks vs events, after `line.finish()`."""
    offered = list(offered)
    rows = line.db.rows()
    keys = Counter(key_of(r) for r in rows)
    wanted = set(offered)
    missing = [k for k in offered if k not in keys]
    dup_keys = {k: n for k, n in keys.items() if n > 1}
    dup_frames = len(rows) - len({r["frame_id"] for r in rows})
    unexpected = [k for k in keys if k not in wanted]
    verdicts = Counter(r["verdict"] for r in rows)

    blocks = line.plc.blocks()
    have = Counter((part, code) for _, _, part, code in blocks)
    unrejected, passed_at_plc, ok_without = [], [], 0
    for r in rows:
        p, code = plc_part(r["part_id"]), CODES[r["verdict"]]
        if r["verdict"] == "OK":
            ok_without += have[(p, 1)] == 0
            continue
        if have[(p, 1)] and not any(have[(p, c)] for c in (2, 3, 4)):
            passed_at_plc.append(r["part_id"])
        if have[(p, code)]:
            have[(p, code)] -= 1
        elif not any(have[(p, c)] for c in (2, 3, 4)):
            unrejected.append((r["part_id"], r["verdict"]))
    per_part = Counter(part for _, _, part, _ in blocks)

    events = list(line.events.got) if line.events else []
    ev_ids = Counter(e.get("frame_id") for e in events)
    ev_keys = set()
    for e in events:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            ev_keys.add(key_of(e))
    judged_lost = [k for k in missing if k in ev_keys]  # judged (an event went out), no row
    row_ids = {r["frame_id"] for r in rows}
    recovery = None
    if fault_ts is not None:
        after = [r["decided_ts"] for r in rows
                 if r["verdict"] in JUDGED and (r["capture_ts"] or 0) >= fault_ts]
        recovery = min(after) - fault_ts if after else None
    errors = Counter(e.get("event") for e in line.log_events()
                     if e.get("level") in ("error", "critical"))
    res = {
        "scenario": name, "what": what, "offered": len(offered), "rows": len(rows),
        "missing": len(missing), "missing_examples": [str(k) for k in missing[:10]],
        "missing_judged": len(judged_lost),
        "duplicates": sum(n - 1 for n in dup_keys.values()) + dup_frames,
        "duplicate_examples": [str(k) for k in list(dup_keys)[:10]],
        "unexpected": len(unexpected), "unexpected_examples": [str(k) for k in unexpected[:10]],
        "verdicts": {k: verdicts.get(k, 0) for k in CODES},
        "timeout_causes": dict(Counter(timeout_cause(r["reason"]) for r in rows
                                       if r["verdict"] == "TIMEOUT")),
        "error_reasons": dict(Counter(_short_reason(r["reason"]) for r in rows
                                      if r["verdict"] == "ERROR").most_common(12)),
        "plc_blocks": len(blocks), "plc_pulses": line.plc.pulses(),
        "unrejected": len(unrejected), "unrejected_examples": unrejected[:10],
        "plc_ok_for_a_reject": len(passed_at_plc), "plc_ok_examples": passed_at_plc[:10],
        "ok_rows_without_block": ok_without,
        "parts_with_several_blocks": sum(1 for n in per_part.values() if n > 1),
        "events": sum(ev_ids.values()), "events_for_rows": len(row_ids & set(ev_ids)),
        "events_not_rows": len(set(ev_ids) - row_ids),
        "recovery_s": recovery, "restarts": line.restarts(),
        "running_at_end": line.running_at_end, "exit_code": line.exit_code,
        "log_errors": dict(errors),
    }
    res.update(extra)
    res["goal"] = goal_problems(res)
    log(f"{name}: offered {res['offered']}, rows {res['rows']}, missing {res['missing']}, "
        f"duplicates {res['duplicates']}, verdicts {res['verdicts']}, unrejected "
        f"{res['unrejected']}, running {res['running_at_end']}"
        + (f"; PROBLEMS: {res['goal']}" if res["goal"] else ""))
    return res


def _short_reason(reason: str | None) -> str:
    """An ERROR reason without the file path, so reasons group."""
    r = re.sub(r"/\S*(?:\s\S+)*?\.(png|jpg|jpeg|bmp|tif|tiff)\b", "FILE", reason or "")
    return re.sub(r"\d+", "N", r)[:90]


def goal_problems(r: dict[str, Any]) -> list[str]:
    """What keeps a row from the goal: 0 missing, 0 duplicates, every non-OK rejected at the
    PLC, the line still running (and the scenario's own checks, `checks`)."""
    out = []
    if r["missing"]:
        out.append(f"{r['missing']} offered frames without a row, {r['missing_judged']} of them "
                   f"judged (an event went out) (e.g. {r['missing_examples']})")
    if r["duplicates"]:
        out.append(f"{r['duplicates']} duplicate rows (e.g. {r['duplicate_examples']})")
    if r["unexpected"]:
        out.append(f"{r['unexpected']} rows for frames never offered "
                   f"(e.g. {r['unexpected_examples']})")
    if r["unrejected"]:
        out.append(f"{r['unrejected']} non-OK rows without a reject block at the PLC "
                   f"(e.g. {r['unrejected_examples']})")
    if r["plc_ok_for_a_reject"]:
        out.append(f"{r['plc_ok_for_a_reject']} rejected parts got only an OK block at the PLC "
                   f"(e.g. {r['plc_ok_examples']})")
    if not r["running_at_end"]:
        out.append(f"the line was not running at the end (exit code {r['exit_code']})")
    elif r["exit_code"] not in (0, None):
        out.append(f"exit code {r['exit_code']} after SIGTERM")
    for check, ok in r.get("checks", {}).items():
        if not ok:
            out.append(check)
    return out


# ----------------------------------------------------------------------------- scenarios

ROLES = (("sink", "sink"), ("worker", "worker:0"), ("acquisition", "acquire:cam1"))


def scenario_sigkill(plan: Plan, assets: Assets) -> list[dict]:
    return [signal_role(plan, assets, role, child, signal.SIGKILL) for role, child in ROLES]


def scenario_sigstop(plan: Plan, assets: Assets) -> list[dict]:
    return [signal_role(plan, assets, role, child, signal.SIGSTOP) for role, child in ROLES]


def mid_burst(line: Line, feed: Feeder, n: int = 30, seen: int = 8) -> None:
    """Drop a burst of n files and return once the PLC has `seen` of their verdicts: the
    fault then hits a line with frames everywhere (held, in a worker, being written)."""
    before = len(line.plc.blocks())
    feed.drop(n)
    until(lambda: len(line.plc.blocks()) >= before + seen, 60, every=0.02)


def signal_role(plan: Plan, assets: Assets, role: str, child: str, sig: int) -> dict:
    kind = "sigkill" if sig == signal.SIGKILL else "sigstop"
    name = f"{kind} {role}"
    hb = 5.0
    with Line(plan, f"{kind}-{role}", {"cam1": folder_camera(runs(plan, f"{kind}-{role}")
                                                             / "inbox")},
              {"obj": assets.obj}, over={"supervisor": {"heartbeat_timeout_s": hb}}) as line:
        feed = Feeder(line.inbox, assets.images)
        line.start()
        feed.run(plan.feed_share * assets.capacity)
        time.sleep(plan.steady_s)
        mid_burst(line, feed)
        pid = line.pid(child)
        t = time.time()
        os.kill(pid, sig)
        log(f"{name}: {signal.Signals(sig).name} to {child} (pid {pid})")
        restart = line.wait_log(lambda e: e.get("event") == "restarting child"
                                and e.get("child") == child, timeout=60)
        back = until(lambda: line.db.judged_after(t), 240, every=0.5)
        time.sleep(plan.after_s)
        feed.stop()
        line.settle(len(feed.dropped))
        line.finish()
        stopped = _state(pid)
        if stopped is not None:  # never expected: the supervisor kills what it replaces
            os.kill(pid, signal.SIGKILL)
        what = (f"A folder camera fed {plan.feed_share:.0%} of capacity "
                f"({plan.feed_share * assets.capacity:.1f} files/s); after {plan.steady_s:.0f} s "
                f"a burst of 30 files, and once the PLC had 8 of their verdicts, "
                f"{signal.Signals(sig).name} to the {role} ({child})"
                + (f", left stopped: heartbeat_timeout_s = {hb:.0f} s, no SIGCONT ever"
                   if sig == signal.SIGSTOP else "")
                + f"; feeding went on throughout and {plan.after_s:.0f} s after the line judged "
                  "again.")
        return analyse(line, name, feed.dropped, part_key, fault_ts=t, what=what,
                       restart_reason=restart.get("reason") if restart else None,
                       judged_again=back is not None, signalled_left=stopped,
                       checks={f"the supervisor did not restart {child}": restart is not None,
                               "no OK/NG verdict for a frame captured after the fault":
                                   back is not None})


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def scenario_tree_kill(plan: Plan, assets: Assets) -> list[dict]:
    name = "tree-kill"
    with Line(plan, name, {"cam1": folder_camera(runs(plan, name) / "inbox")},
              {"obj": assets.obj}) as line:
        feed = Feeder(line.inbox, assets.images)
        line.start()
        feed.run(plan.feed_share * assets.capacity)
        time.sleep(plan.steady_s)
        mid_burst(line, feed)
        t = time.time()
        pids = tree_pids(line.proc.pid)
        line.kill_tree()
        log(f"{name}: SIGKILL to the daemon and its {len(pids) - 1} children; down "
            f"{plan.down_s:.0f} s, files still dropped")
        time.sleep(plan.down_s)
        t_ready = line.start()
        back = until(lambda: line.db.judged_after(t), 240, every=0.5)
        time.sleep(plan.after_s)
        feed.stop()
        line.settle(len(feed.dropped))
        line.finish()
        before, during = feed.between(0, t), feed.between(t, t_ready)
        after = len(feed.dropped) - before - during
        replay = next((e for e in line.log_events() if e.get("event") == "sink journal replayed"),
                      None)
        what = (f"A folder camera fed {plan.feed_share:.0%} of capacity; mid-burst (as for "
                f"sigkill) every process of the tree ({len(pids)}: supervisor, sink, worker, "
                f"acquisition) got SIGKILL at once; {plan.down_s:.0f} s later `inspectd run` "
                f"started again with the same config and data_dir. Files dropped before the kill: "
                f"{before}, while the line was down or starting: {during}, after: {after}. "
                + (f"The new sink replayed its journal: {replay.get('rows')} rows, "
                   f"{replay.get('pending')} pending, {replay.get('expired')} expired."
                   if replay else "No journal replay was logged."))
        return [analyse(line, name, feed.dropped, part_key, fault_ts=t, what=what,
                        dropped={"before": before, "down": during, "after": after},
                       journal_replay={k: replay.get(k) for k in ("rows", "pending", "expired")}
                       if replay else None,
                        checks={"no OK/NG verdict after the restart": back is not None})]


def scenario_db_outage(plan: Plan, assets: Assets) -> list[dict]:
    return [db_fault(plan, assets, "down"), db_fault(plan, assets, "hung")]


def db_fault(plan: Plan, assets: Assets, mode: str) -> dict:
    name = f"db-{mode}"
    proxy = DbProxy()
    try:
        with Line(plan, name, {"cam1": folder_camera(runs(plan, name) / "inbox")},
                  {"obj": assets.obj}, db_port=proxy.port) as line:
            feed = Feeder(line.inbox, assets.images)
            line.start()
            feed.run(plan.feed_share * assets.capacity)
            time.sleep(plan.steady_s)
            t = time.time()
            proxy.down() if mode == "down" else proxy.freeze()
            log(f"{name}: database {'unreachable' if mode == 'down' else 'hung'} for "
                f"{plan.outage_s:.0f} s")
            time.sleep(plan.outage_s)
            judged = len(line.events.got)
            rows_then = line.db.count()
            proxy.up() if mode == "down" else proxy.thaw()
            t_back = time.time()
            caught_up = until(lambda: line.db.count() >= judged, 300, every=0.25)
            replay_s = time.time() - t_back if caught_up else None
            time.sleep(plan.after_s)
            feed.stop()
            line.settle(len(feed.dropped))
            line.finish()
            spool = [e for e in line.log_events() if "spool" in e.get("event", "")
                     or "audit database" in e.get("event", "")]
            if mode == "down":
                what = (f"The line's audit database URL pointed at a TCP proxy on 127.0.0.1 in "
                        f"front of the PostgreSQL; files fed at {plan.feed_share:.0%} of "
                        f"capacity. After {plan.steady_s:.0f} s the proxy closed its port and "
                        f"reset every open connection (connections refused) for "
                        f"{plan.outage_s:.0f} s, then listened again.")
            else:
                what = (f"As db-down, but the proxy kept every connection open and accepted new "
                        f"ones while relaying nothing for {plan.outage_s:.0f} s (a database "
                        f"that stops answering; TCP stays up, so no keepalive or "
                        f"tcp_user_timeout fires), then relayed again.")
            what += (f" Rows in the database at the end of the fault: {rows_then} of {judged} "
                     f"frames judged by then (events); the database had them all "
                     + (f"{replay_s:.1f} s after it came back." if replay_s is not None
                        else "only after more than 300 s (or never)."))
            return analyse(line, name, feed.dropped, part_key, fault_ts=t, what=what,
                           replay_s=replay_s, rows_at_fault_end=rows_then,
                           judged_at_fault_end=judged,
                           db_log=[e.get("event") for e in spool][:12],
                           checks={"the spool was not replayed within 300 s": caught_up
                                   is not None})
    finally:
        proxy.close()


def scenario_disk_full(plan: Plan, assets: Assets) -> list[dict]:
    name = "disk-full"
    work = runs(plan, name)
    models = sum(f.stat().st_size for f in assets.obj.rglob("*") if f.is_file())
    # Room for the models and for the images of the phases before and after the fill (about
    # 2 MiB a second at this feed): otherwise the NG images of the steady phase fill it, and
    # "space back" would still be below min_free_images.
    size_mib = math.ceil(models / 2**20) + 8 + math.ceil(2 * (plan.steady_s + plan.after_s))
    stage = Path(tempfile.mkdtemp(prefix="ifl-models-", dir="/tmp"))
    publish_models({"obj": assets.obj}, stage / "models")
    # A private mount namespace with a tmpfs of size_mib at data_dir (root: unshare --mount,
    # as tests/test_disk.py), the models copied in, then the daemon itself (exec: same pid).
    mount = ('mount -t tmpfs -o "size=$1" tmpfs "$2" && cp -a "$3" "$2/models" && shift 3 '
             '&& exec "$@"')
    wrap = ["unshare", "--mount", "sh", "-c", mount, "sh", f"{size_mib}m", str(work / "data"),
            str(stage / "models")]
    try:
        with Line(plan, name, {"cam1": folder_camera(work / "inbox")}, {"obj": assets.obj},
                  wrap=wrap) as line:
            feed = Feeder(line.inbox, assets.images)
            line.start()
            view = Path(f"/proc/{line.proc.pid}/root") / line.data.relative_to("/")
            feed.run(plan.feed_share * assets.capacity)
            time.sleep(plan.steady_s)
            t = time.time()
            filled = fill(view / "ballast")
            free_full = shutil.disk_usage(view).free
            log(f"{name}: data_dir ({size_mib} MiB tmpfs) filled with {filled / 2**20:.1f} MiB, "
                f"{free_full} bytes free; full for {plan.outage_s / 2:.0f} s")
            time.sleep(plan.outage_s / 2)
            t_free = time.time()
            for p in view.glob("ballast*"):
                p.unlink()
            time.sleep(plan.after_s)
            feed.stop()
            line.settle(len(feed.dropped))
            rows = line.db.rows()
            ng_full = [r for r in rows if r["verdict"] == "NG" and t < r["decided_ts"] < t_free]
            ng_after = [r for r in rows if r["verdict"] == "NG" and r["decided_ts"] > t_free + 3]
            disk_log = [e.get("event") for e in line.log_events()
                        if any(w in e.get("event", "") for w in ("disk", "journal", "spool",
                                                                   "image"))]
            line.finish()
            what = (f"data_dir (models, images, journal, spool) on a {size_mib} MiB tmpfs in a "
                    f"private mount namespace (`unshare --mount`, as tests/test_disk.py); the "
                    f"audit log is the PostgreSQL. Files fed at {plan.feed_share:.0%} of "
                    f"capacity; after {plan.steady_s:.0f} s a ballast file filled the tmpfs to "
                    f"{free_full} bytes free for {plan.outage_s / 2:.0f} s, then was deleted. "
                    f"NG rows decided while full: {len(ng_full)}, with an image: "
                    f"{sum(bool(r['image_path']) for r in ng_full)}; NG rows after space came "
                    f"back: {len(ng_after)}, with an image: "
                    f"{sum(bool(r['image_path']) for r in ng_after)}. Disk events logged: "
                    f"{dict(Counter(disk_log))}.")
            return [analyse(line, name, feed.dropped, part_key, fault_ts=t, what=what,
                            tmpfs_mib=size_mib, free_when_full=free_full,
                           ng_full=len(ng_full),
                           ng_full_with_image=sum(bool(r["image_path"]) for r in ng_full),
                           ng_after=len(ng_after),
                           ng_after_with_image=sum(bool(r["image_path"]) for r in ng_after),
                           disk_log=dict(Counter(disk_log)),
                           checks={"NG images did not resume once space was back":
                                   not ng_after or any(r["image_path"] for r in ng_after)})]
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def fill(path: Path) -> int:
    """Write zeros into `path` until the filesystem refuses (ENOSPC); bytes written."""
    written, chunk = 0, 1 << 20
    with open(path, "ab", buffering=0) as f:
        while chunk >= 512:
            try:
                written += f.write(bytes(chunk))
            except OSError:
                chunk //= 4
    return written


class FakeCamera:
    """The Aravis fake GigE Vision camera on 127.0.0.1 only (tests/conftest.py FakeCamera)."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def bound() -> bool:
        return any(line.split()[1] == "0100007F:0F74"  # 127.0.0.1:3956 (GVCP)
                   for line in Path("/proc/net/udp").read_text().splitlines()[1:])

    def start(self) -> None:
        if self.bound():
            raise RuntimeError("127.0.0.1:3956 is taken: another GigE Vision camera runs")
        self.proc = subprocess.Popen([FAKE_CAMERA, "-i", "127.0.0.1", "-s", self.serial],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not until(self.bound, 10, every=0.05):
            raise RuntimeError(f"{FAKE_CAMERA} did not start (exit {self.proc.poll()})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def scenario_camera_unplug(plan: Plan, assets: Assets) -> list[dict]:
    name = "camera-unplug"
    fps = 5.0
    camera = {"type": "aravis", "device": "127.0.0.1", "sku": "fake", "pixel_format": "Mono8",
              "trigger": "software", "max_fps": fps, "deadline_ms": 4000}
    cam = FakeCamera("FAKE1")
    try:
        cam.start()
        with Line(plan, name, {"cam1": camera}, {"fake": assets.fake}) as line:
            line.start()
            time.sleep(plan.steady_s)
            t = time.time()
            cam.kill()
            log(f"{name}: fake camera killed for {plan.unplug_s:.0f} s")
            time.sleep(plan.unplug_s)
            cam.start()
            t_back = time.time()
            back = until(lambda: line.db.judged_after(t_back), 120, every=0.5)
            time.sleep(plan.after_s)
            line.finish()
            rows = line.db.rows()

            def session(r: dict) -> int:
                return int((r["capture_ts"] or 0) >= t)

            def key(r: dict) -> tuple[int, int]:
                return session(r), int(r["part_id"])

            offered, spans = [], []
            for s in (0, 1):
                ids = sorted(int(r["part_id"]) for r in rows if session(r) == s)
                if ids:
                    offered += [(s, i) for i in range(ids[0], ids[-1] + 1)]
                    spans.append(f"{ids[0]}..{ids[-1]}")
            lost = [e for e in line.log_events() if e.get("event") == "source lost, reconnecting"]
            what = (f"The Aravis fake GigE Vision camera (`{FAKE_CAMERA} -i 127.0.0.1 -s FAKE1`; "
                    f"camera `type: aravis, device: 127.0.0.1`, software trigger at {fps:.0f} "
                    f"frames/s, so each frame id the camera sends is one trigger) ran "
                    f"{plan.steady_s:.0f} s, was killed for {plan.unplug_s:.0f} s and started "
                    f"again. Frame ids are the camera's own counter, which restarts with it: "
                    f"before the unplug {spans[0] if spans else '–'}, after "
                    f"{spans[1] if len(spans) > 1 else '–'}; offered = every id from the first "
                    f"to the last of each session (a gap would be a lost frame; frames the "
                    f"camera never sent while unplugged are not frames). Acquisition logged "
                    f"{len(lost)} 'source lost' lines; the model is obj's without its domain "
                    f"check (the camera's pattern is nothing like the parts).")
            return [analyse(line, name, offered, key, fault_ts=t, what=what,
                            sessions=spans, source_lost=len(lost),
                           checks={"no OK/NG verdict after the camera came back":
                                   back is not None,
                                   "no frame from the camera after it came back":
                                   len(spans) == 2})]
    finally:
        cam.kill()


def scenario_burst(plan: Plan, assets: Assets) -> list[dict]:
    need_s = plan.burst / assets.capacity
    generous = int(math.ceil(need_s * 2 + 2) * 1000)
    out = [burst(plan, assets, generous, f"{plan.burst} files need ~{need_s:.0f} s at the "
                 f"measured capacity; deadline_ms = {generous} (2 × that + 2 s)"),
           burst(plan, assets, 2000, f"deadline_ms = 2000 (the default), shorter than the "
                 f"~{need_s:.0f} s the burst needs: the line judges what it can in time, and "
                 f"every other file must still get its row (TIMEOUT, a reject)")]
    # Overload: a live camera (finite video, paced) at 3× the line's capacity.
    name = "overload 3×"
    fps = round(3 * assets.capacity, 1)
    n = int(fps * plan.overload_s)
    clip = video(assets, n)
    with Line(plan, "overload", {"cam1": video_camera(clip, fps)}, {"vid": assets.vid}) as line:
        line.start()
        ended = line.wait_log(lambda e: e.get("event") == "video ended",
                              timeout=plan.overload_s * 3 + 60)
        line.settle(n)
        line.finish()
        frames = ended.get("frames", n) if ended else n
        what = (f"A live camera at 3× the line's capacity: a finite MJPG video of {n} frames "
                f"played by the opencv camera paced at max_fps {fps} (a paced file behaves as a "
                f"live camera: it never waits), deadline 2000 ms; the camera numbers its frames "
                f"1..N. Offered = the frames the camera logged at the end of the video "
                f"({frames}).")
        out.append(analyse(line, name, range(1, frames + 1), part_key, what=what,
                           checks={"the video did not end": ended is not None}))
    return out


def burst(plan: Plan, assets: Assets, deadline_ms: int, why: str) -> dict:
    name = f"burst {plan.burst} (deadline {deadline_ms / 1000:g} s)"
    tag = f"burst-{deadline_ms}"
    with Line(plan, tag, {"cam1": folder_camera(runs(plan, tag) / "inbox", deadline_ms)},
              {"obj": assets.obj}) as line:
        feed = Feeder(line.inbox, assets.images)
        line.start()
        t = time.time()
        feed.drop(plan.burst)
        took = time.time() - t
        line.settle(plan.burst, timeout=300)
        line.finish()
        rows = line.db.rows()
        span = max(r["decided_ts"] for r in rows) - t if rows else None
        what = (f"{plan.burst} files dropped at once (in {took:.2f} s) into the folder of an idle "
                f"line; {why}. The last verdict came {span:.1f} s after the burst."
                if span is not None else f"{plan.burst} files dropped at once; {why}.")
        return analyse(line, name, feed.dropped, part_key, what=what, deadline_ms=deadline_ms,
                       burst_span_s=span)


# -- hostile files ----------------------------------------------------------------------------

@dataclass
class Hostile:
    rel: bytes  # path under the inbox (bytes: some names are not UTF-8)
    kind: str
    expect: str  # "error": ERROR and quarantined with a .txt; "judged": OK/NG; "any"
    data: bytes | None = None
    link: str | None = None  # a symlink to this target instead of data
    move_in: bool = True  # written elsewhere and renamed in (else created in place)
    dir_move: bool = False  # its new sub-folder is built aside, then renamed in whole


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (as tests/test_acquire.py)."""
    import cv2

    png = cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()
    ihdr = png.index(b"IHDR")
    body = png[ihdr:ihdr + 4] + struct.pack(">II", width, height) + png[ihdr + 12:ihdr + 17]
    return png[:ihdr] + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF) + png[ihdr + 21:]


def hostile_set(assets: Assets, n: int, outside: Path) -> list[Hostile]:
    """n files of each of 28 hostile kinds (fewer of a few: giants, long and non-UTF-8 names
    with bad content, symlinks to nothing)."""
    import cv2
    from PIL import Image

    rng = random.Random(5)
    good = assets.images[0]
    img = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)

    def enc(ext: str, a: np.ndarray) -> bytes:
        return cv2.imencode(ext, a)[1].tobytes()

    def pil(a: np.ndarray, fmt: str, mode: str | None = None, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im = Image.fromarray(a[..., ::-1] if a.ndim == 3 else a)
        (im.convert(mode) if mode else im).save(buf, fmt, **kw)
        return buf.getvalue()

    jpeg, bmp, tiff = enc(".jpg", img), enc(".bmp", img), enc(".tiff", img)
    giant = enc(".png", np.zeros((6000, 6000), np.uint8))
    gif = pil(img, "GIF")
    cmyk = pil(img, "JPEG", "CMYK")
    bmp8 = pil(gray, "BMP")
    tiff16 = enc(".tiff", img.astype(np.uint16) * 257)
    tiff_float = enc(".tiff", img.astype(np.float32) / 255)
    mono16 = enc(".png", gray.astype(np.uint16) * 257)
    one = enc(".png", np.zeros((1, 1, 3), np.uint8))
    odd = ["with space {i}.png", "ü ñ 漢字 {i}.png", "-dash{i}.png", "--{i}.png",
           "quote'\"{i}.png", "back\\slash{i}.png", "new\nline{i}.png", "tab\t{i}.png",
           "emoji 🧪{i}.png", "semi;colon $(x){i}.png", "%s%n{i}.png"]
    out: list[Hostile] = []

    def add(kind: str, expect: str, count: int, make: Callable[[int], Hostile | bytes],
            name: str = "{kind}_{i}.png") -> None:
        for i in range(count):
            h = make(i)
            if isinstance(h, bytes):
                h = Hostile(name.format(kind=kind, i=i).encode(), kind, expect, h)
            h.kind, h.expect = kind, expect
            out.append(h)

    def cut(data: bytes) -> bytes:
        return data[:rng.randint(len(data) // 10, len(data) * 9 // 10)]

    add("empty", "error", n, lambda i: b"")
    add("png-truncated", "error", n, lambda i: cut(good))
    add("jpeg-truncated", "error", n, lambda i: cut(jpeg), "{kind}_{i}.jpg")
    add("text-as-png", "error", n, lambda i: f"not an image {i}\n".encode() * rng.randint(1, 99))
    add("random-bytes-png-signature", "error", n,
        lambda i: good[:8] + rng.randbytes(rng.randint(10, 5000)))
    add("png-claims-20000x20000", "error", n,
        lambda i: png_claiming(20000 + i, 20000) if i % 2 else png_claiming(9000, 9000 + i))
    add("png-bad-crc", "error", n, lambda i: _flip(good, rng))
    add("1x1", "error", n, lambda i: one)
    add("mono16-png", "error", n, lambda i: mono16)
    add("cmyk-jpeg", "any", n, lambda i: cmyk, "{kind}_{i}.jpg")
    add("gif-as-png", "any", n, lambda i: gif)
    add("bmp-24bit", "judged", n, lambda i: bmp, "{kind}_{i}.bmp")
    add("bmp-8bit-gray", "any", n, lambda i: bmp8, "{kind}_{i}.bmp")
    add("bmp-truncated", "error", n, lambda i: cut(bmp), "{kind}_{i}.bmp")
    add("tiff", "judged", n, lambda i: tiff, "{kind}_{i}.tiff")
    add("tiff-16bit", "any", n, lambda i: tiff16, "{kind}_{i}.tif")
    add("tiff-float32", "error", n, lambda i: tiff_float, "{kind}_{i}.tiff")
    add("tiff-truncated", "error", n, lambda i: cut(tiff), "{kind}_{i}.tiff")
    add("giant-6000x6000", "error", 3, lambda i: giant)
    add("odd-name", "judged", n,
        lambda i: Hostile(odd[i % len(odd)].format(i=i).encode(), "", "", good))
    add("name-200-chars", "judged", n,
        lambda i: Hostile((f"{i:04d}" + "n" * 196 + ".png").encode(), "", "", good))
    add("non-utf8-name", "judged", n,
        lambda i: Hostile(b"bad\xff\xfe" + str(i).encode() + b".png", "", "", good))
    add("non-utf8-name-bad-content", "error", max(3, n // 4),
        lambda i: Hostile(b"bad\xff" + str(i).encode() + b"_x.png", "", "", b"junk" * 10))
    add("name-250-bytes-bad-content", "error", max(3, n // 4),
        lambda i: Hostile((f"{i:04d}" + "L" * 246 + ".png").encode(), "", "", b"junk" * 10))
    add("symlink-to-good-file", "error", n,
        lambda i: Hostile(f"link_{i}.png".encode(), "", "", link=str(outside),
                          move_in=bool(i % 2)))
    add("symlink-dangling", "error", max(3, n // 4),
        lambda i: Hostile(f"dangling_{i}.png".encode(), "", "", link=f"/nonexistent/{i}.png",
                          move_in=bool(i % 2)))
    add("symlink-to-dev-zero", "error", max(3, n // 4),
        lambda i: Hostile(f"devzero_{i}.png".encode(), "", "", link="/dev/zero",
                          move_in=bool(i % 2)))
    add("new-subfolder", "judged", n,
        lambda i: Hostile(f"sub_{i // 4}/deeper/part_{i}.png".encode(), "", "", good,
                          dir_move=i % 8 < 4))
    return out


def _flip(data: bytes, rng: random.Random) -> bytes:
    """A PNG with bytes in its image data changed: the chunk's CRC no longer matches."""
    i = data.index(b"IDAT") + 8 + rng.randint(0, 40)
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def put(inbox: Path, h: Hostile, stage: Path) -> None:
    """Drop one hostile file: renamed in from a temporary name (or a whole new sub-folder
    renamed in), or created in place."""
    dest = os.path.join(os.fsencode(inbox), h.rel)
    parent = os.path.dirname(dest)
    if h.dir_move and not os.path.exists(parent):
        top = os.path.join(os.fsencode(inbox), h.rel.split(b"/")[0])
        tmp_top = os.path.join(os.fsencode(stage), h.rel.split(b"/")[0])
        tmp = os.path.join(os.fsencode(stage), h.rel)
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(h.data or b"")
        os.rename(tmp_top, top)
        return
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, b"." + os.path.basename(h.rel)[:200] + b".tmp")
    if h.link is not None:
        os.symlink(h.link, tmp if h.move_in else dest)
    else:
        with open(tmp, "wb") as f:
            f.write(h.data or b"")
    if h.move_in or h.link is None:
        os.rename(tmp, dest)


def scenario_hostile(plan: Plan, assets: Assets) -> list[dict]:
    """Two rows: every hostile kind but non-UTF-8 names, then those names alone (each of
    them would otherwise hide what the others show)."""
    def files(work: Path, utf8: bool, good: int) -> tuple[list[Hostile], Path]:
        outside = work / "outside.png"
        hostile = [h for h in hostile_set(assets, plan.hostile_per_kind, outside)
                   if h.kind.startswith("non-utf8") != utf8]
        hostile += [Hostile(f"good_{i}.png".encode(), "good", "judged", assets.images[i % 40])
                    for i in range(good)]
        random.Random(7).shuffle(hostile)
        return hostile, outside

    return [hostile_run(plan, assets, "hostile files", "hostile",
                        lambda w: files(w, True, plan.hostile_good)),
            hostile_run(plan, assets, "hostile: non-UTF-8 names", "hostile-nonutf8",
                        lambda w: files(w, False, plan.hostile_good // 4))]


def hostile_run(plan: Plan, assets: Assets, name: str, tag: str,
                make: Callable[[Path], tuple[list[Hostile], Path]]) -> dict:
    work = runs(plan, tag)
    cam = {"type": "folder", "path": str(work / "inbox"), "sku": "obj", "recursive": True,
           "after": "delete", "deadline_ms": 10000}
    with Line(plan, tag, {"cam1": cam}, {"obj": assets.obj}) as line:
        files, outside = make(line.work)
        outside.write_bytes(assets.images[0])
        stage = line.work / "stage"
        stage.mkdir()
        n_good = sum(h.kind == "good" for h in files)
        kinds_n = len({h.kind for h in files}) - 1
        line.start()
        rate = max(5.0, assets.capacity / 2)
        log(f"{name}: {len(files)} files ({len(files) - n_good} hostile, {kinds_n} kinds) at "
            f"{rate:.0f} files/s")
        t0 = time.time()
        for i, h in enumerate(files):
            put(line.inbox, h, stage)
            time.sleep(max(0.0, t0 + (i + 1) / rate - time.time()))
        line.settle(len(files), timeout=600)
        left = [p for p in line.inbox.rglob("*") if (p.is_file() or p.is_symlink())
                and "quarantine" not in p.relative_to(line.inbox).parts]
        line.finish()
        rows = line.db.rows()
        inbox = os.fsencode(line.inbox)

        def key(r: dict) -> bytes:
            return os.path.relpath(os.fsencode(r["origin"] or ""), inbox)

        def audited(rel: bytes) -> bytes:  # a name as the audit row spells it (\xNN escapes)
            return os.fsencode(printable(os.fsdecode(rel)))

        by_key = {key(r): r for r in rows}
        kinds: dict[str, Counter] = {}
        quarantine = os.path.join(inbox, b"quarantine")
        no_txt, wrong = [], []
        for h in files:
            r = by_key.get(audited(h.rel))
            c = kinds.setdefault(h.kind, Counter())
            c["files"] += 1
            if r is None:
                c["no row"] += 1
                continue
            c[r["verdict"]] += 1
            if (h.expect == "error" and r["verdict"] != "ERROR") or (
                    h.expect == "judged" and r["verdict"] not in JUDGED):
                wrong.append((h.kind, os.fsdecode(h.rel)[:60], r["verdict"],
                              (r["reason"] or "")[:100]))
            if r["verdict"] in ("ERROR", "TIMEOUT"):
                q = os.path.join(quarantine, h.rel)
                if not os.path.lexists(q) or not note_path(Path(os.fsdecode(q))).exists():
                    no_txt.append((h.kind, os.fsdecode(h.rel)[:60]))
                    c["no quarantine .txt"] += 1
        rejected = line.data / "spool" / "rejected.jsonl"
        n_rejected = len(rejected.read_bytes().splitlines()) if rejected.exists() else 0
        what = (f"{len(files)} files into a recursive folder camera (fixed SKU, deadline 10 s): "
                f"{len(files) - n_good} hostile ones of {kinds_n} kinds and {n_good} good ones, "
                f"shuffled, dropped at {rate:.0f} files/s (most renamed in from a temporary "
                f"name; half the symlinks created in place; half the new sub-folders renamed in "
                f"whole). Expected: a row each; bad content → ERROR, quarantined beside a .txt; "
                f"good content under odd names, in new sub-folders, as BMP/TIFF → OK or NG; no "
                f"child restarted. Rows the audit writer set aside in spool/rejected.jsonl: "
                f"{n_rejected}. Files left in the inbox (neither disposed of nor quarantined) at "
                f"the end: {len(left)}.")
        restarts = line.restarts()
        return analyse(line, name, [audited(h.rel) for h in files], key, what=what,
                       kinds={k: dict(v) for k, v in sorted(kinds.items())},
                       wrong_verdicts=len(wrong), wrong_examples=wrong[:15],
                       without_quarantine_txt=len(no_txt), no_txt_examples=no_txt[:15],
                       rejected_rows=n_rejected, left_in_inbox=len(left),
                       left_examples=[str(p.relative_to(line.inbox))[:80] for p in left[:10]],
                       checks={f"{len(restarts)} child restarts": not restarts,
                               f"{len(wrong)} files with an unexpected verdict": not wrong,
                               f"{len(no_txt)} ERROR/TIMEOUT files not in quarantine with a "
                               f".txt": not no_txt,
                               f"{len(left)} files left in the inbox": not left,
                               f"{n_rejected} rows set aside in spool/rejected.jsonl":
                                   not n_rejected,
                               "a symlink's target was changed":
                                   outside.read_bytes() == assets.images[0]})


# -- forged wire messages ---------------------------------------------------------------------

def forged() -> list[tuple[str, list[bytes], bool]]:
    """(what, message parts, may make a row) sent to the sink's ROUTER by a stranger."""
    from inspectd.core.wire import ACK, ANNOUNCE, JUDGED, STATUS, VERDICT, FrameHeader, Verdict

    now = time.time()

    def verdict(kind: str, part: str, **kw: Any) -> bytes:
        return Verdict(frame_id=uuid.uuid4().hex, verdict=kind, camera="cam1", sku="obj",
                       line="faults", part_id=part, capture_ts=now, deadline_ts=now + 5,
                       **kw).encode()

    def with_(raw: bytes, **fields: Any) -> bytes:
        return json.dumps({**json.loads(raw), **fields}).encode()

    header = FrameHeader(uuid.uuid4().hex, "cam1", "obj", now, now + 5, (8, 8), "uint8", "mono8",
                         "99100", "faults").encode()
    return [
        ("a single garbage part", [b"\x00garbage"], False),
        ("an unknown message kind", [b"hello", b"world"], False),
        ("a verdict without its JSON", [VERDICT], False),
        ("a verdict that is not JSON", [VERDICT, b"\xff\xfe not json"], False),
        ("a verdict that is a JSON list", [VERDICT, b"[1, 2, 3]"], False),
        ("a verdict with wrong types", [VERDICT, b'{"frame_id": 5, "verdict": "MAYBE", "v": 1}'],
         False),
        ("a verdict with an infinite time", [VERDICT, with_(verdict("OK", "99001"),
                                                            capture_ts=float("inf"))], False),
        ("a verdict of protocol version 2", [VERDICT, with_(verdict("OK", "99002"), v=2)], False),
        ("a verdict with a path as frame id", [VERDICT, with_(verdict("OK", "99003"),
                                                              frame_id="../../etc/passwd")],
         False),
        ("an OK verdict for a frame never announced", [VERDICT, verdict("OK", "99004")], False),
        ("an NG verdict never announced, pixels of the wrong size",
         [VERDICT, verdict("NG", "99005", shape=(8, 8), dtype="uint8", pixel_format="mono8"),
          b"\x00" * 7], False),
        ("a verdict in five parts", [VERDICT, verdict("OK", "99006"), b"", b"", b""], False),
        ("a JSON nested 100,000 deep", [VERDICT, b"[" * 100_000 + b"]" * 100_000], False),
        ("8 MiB of random bytes as a verdict", [VERDICT, os.urandom(8 << 20)], False),
        ("an announcement with a negative shape", [ANNOUNCE, with_(header, shape=[-1, 5])],
         False),
        ("an announcement with an unknown field", [ANNOUNCE, with_(header, evil=1)], False),
        ("an announcement with an extra part", [ANNOUNCE, header, b"x"], False),
        ("a status of an unknown role", [STATUS, b'{"role": "root", "name": "x", "queue": 1, '
                                                  b'"v": 1}'], False),
        ("an ack sent to the sink", [ACK, b'{"held": [], "judged": {}, "v": 1}'], False),
        ("acquisition's own verdict OK for a frame never announced",
         [JUDGED, verdict("OK", "99007")], False),
        # A same-user process on ipc is inside the trust boundary: it can speak as
        # acquisition, but only to reject (an unreadable frame's ERROR), never to pass.
        ("acquisition's own verdict ERROR for a frame never announced",
         [JUDGED, verdict("ERROR", "99008", reason="forged")], True),
    ]


def send_forged(endpoint: str, messages: list[tuple[str, list[bytes], bool]],
                curve: tuple[bytes, bytes, bytes] | None = None) -> None:
    """A DEALER (as acquisition and workers use) sends each message to the sink's ROUTER;
    `curve` = (server public key, own public, own secret)."""
    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 2000)
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    s.connect(endpoint)
    time.sleep(0.5)
    for _, parts, _ in messages:
        with contextlib.suppress(zmq.ZMQError):
            s.send_multipart(parts, zmq.NOBLOCK)
        time.sleep(0.05)
    time.sleep(1.0)
    s.close()


def steal(kind: int, endpoint: str, seconds: float,
          curve: tuple[bytes, bytes, bytes] | None = None) -> int:
    """Connect a PULL (frames) or SUB (events) to a line's endpoint; messages received."""
    import zmq

    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    s.connect(endpoint)
    got, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        if s.poll(100):
            s.recv_multipart()
            got += 1
    s.close()
    return got


def scenario_wire(plan: Plan, assets: Assets) -> list[dict]:
    return [wire_ipc(plan, assets), wire_tcp(plan, assets)]


def refused(line: Line) -> int:
    return sum(1 for e in line.log_events()
               if str(e.get("event", "")).endswith("on the sink socket, dropped"))


def wire_ipc(plan: Plan, assets: Assets) -> dict:
    name = "wire ipc (no keys)"
    tag = "wire-ipc"
    messages = forged()
    with Line(plan, tag, {"cam1": folder_camera(runs(plan, tag) / "inbox")},
              {"obj": assets.obj}) as line:
        feed = Feeder(line.inbox, assets.images)
        line.start()
        feed.run(plan.feed_share * assets.capacity)
        time.sleep(3)
        send_forged(f"ipc://{line.run_dir}/sink.sock", messages)
        time.sleep(3)
        feed.stop()
        line.settle(len(feed.dropped))
        line.finish()
        n = refused(line)
        bad = [m for m in messages if not m[2]]
        rejects = [int(json.loads(m[1][1])["part_id"]) for m in messages if m[2]]
        what = (f"The default line (ipc sockets in a private run_dir). While files were fed, a "
                f"local process (same user) connected a DEALER to the sink's ROUTER "
                f"(ipc://…/sink.sock) and sent {len(messages)} forged messages: "
                + "; ".join(m[0] for m in messages)
                + f". The sink logged {n} messages as dropped; each of the {len(bad)} refused "
                  f"ones should be one of them and none of them may become a row. A process of "
                  f"the line's own user is inside the ipc trust boundary: it may speak as "
                  f"acquisition, but only to reject, so the {len(rejects)} forged ERROR row(s) "
                  f"count as offered (offered = the files and those).")
        return analyse(line, name, [*feed.dropped, *rejects], part_key, what=what,
                       forged=len(messages),
                       refused_logged=n,
                       checks={f"the sink logged {n} refused messages, {len(bad)} expected":
                               n >= len(bad)})


def wire_tcp(plan: Plan, assets: Assets) -> dict:
    import zmq

    name = "wire tcp + CURVE keys"
    tag = "wire-tcp"
    ports = [free_port() for _ in range(3)]
    cam = folder_camera(runs(plan, tag) / "inbox", endpoint=f"tcp://127.0.0.1:{ports[1]}")
    over = {"sink_endpoint": f"tcp://127.0.0.1:{ports[0]}",
            "events": {"endpoint": f"tcp://127.0.0.1:{ports[2]}"}}
    messages = forged()
    with Line(plan, tag, {"cam1": cam}, {"obj": assets.obj}, over=over, keys=True) as line:
        feed = Feeder(line.inbox, assets.images)
        line.start()
        feed.run(plan.feed_share * assets.capacity)
        time.sleep(2)
        pub, sec = zmq.curve_keypair()
        other = (line.keys.public, pub, sec)
        stolen = {}
        for label, curve in (("plain", None), ("other keys", other)):
            send_forged(over["sink_endpoint"], messages, curve)
            stolen[f"frames, {label}"] = steal(zmq.PULL, cam["endpoint"], 5, curve)
            stolen[f"events, {label}"] = steal(zmq.SUB, over["events"]["endpoint"], 3, curve)
        time.sleep(2)
        feed.stop()
        line.settle(len(feed.dropped))
        line.finish()
        n = refused(line)
        what = (f"A line on tcp://127.0.0.1 endpoints (sink, camera frames, events) with its "
                f"CURVE keys (`inspectd keys generate`). While files were fed, a client without "
                f"the keys (plain ZeroMQ) and one with another key pair (knowing the line's "
                f"public key) each sent the {len(messages)} forged messages of the ipc case to "
                f"the sink, pulled from the camera's frames endpoint for 5 s and subscribed to "
                f"the events for 3 s. Received by them: {stolen}; messages the sink logged as "
                f"dropped: {n} (none should reach it).")
        return analyse(line, name, feed.dropped, part_key, what=what, stolen=stolen,
                       refused_logged=n,
                       checks={f"strangers received {stolen}": not any(stolen.values()),
                               f"{n} forged messages reached the sink": n == 0})


# -- CPU contention, soak ---------------------------------------------------------------------

def scenario_contention(plan: Plan, assets: Assets) -> list[dict]:
    name = "cpu contention"
    fps = round(0.5 * assets.capacity, 1)
    n = int(fps * (3 * plan.phase_s + 10))
    clip = video(assets, n)
    hogs: list[subprocess.Popen] = []
    with Line(plan, "contention", {"cam1": video_camera(clip, fps)}, {"vid": assets.vid}) as line:
        try:
            t0 = line.start()
            time.sleep(plan.phase_s)
            t1 = time.time()
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(os.cpu_count() or 2)]
            log(f"{name}: {len(hogs)} busy loops for {plan.phase_s:.0f} s")
            time.sleep(plan.phase_s)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        t2 = time.time()
        ended = line.wait_log(lambda e: e.get("event") == "video ended",
                              timeout=plan.phase_s * 3 + 120)
        line.settle(n)
        line.finish()
        rows = line.db.rows()
        frames = ended.get("frames", n) if ended else n

        def phase(a: float, b: float) -> dict[str, int]:
            c = Counter(r["verdict"] for r in rows if a <= (r["capture_ts"] or 0) < b)
            return {k: c.get(k, 0) for k in CODES}

        late = [r["capture_ts"] for r in rows if r["verdict"] == "TIMEOUT"
                and (r["capture_ts"] or 0) >= t2]
        tail = max(late) - t2 if late else 0.0
        phases = {"before": phase(t0, t1), "during": phase(t1, t2),
                  "after": phase(t2, float("inf"))}
        what = (f"A live camera (finite MJPG video of {n} frames, paced at {fps} frames/s = 50 % "
                f"of the measured capacity, deadline 2000 ms). {plan.phase_s:.0f} s after READY, "
                f"{len(hogs)} competing `python -c 'while True: pass'` processes at normal "
                f"priority (one per core) for {plan.phase_s:.0f} s, then killed. Verdicts by "
                f"capture time, before / during / after: {phases['before']} / "
                f"{phases['during']} / {phases['after']}; the last TIMEOUT was captured "
                f"{tail:.1f} s after the competitors stopped.")
        res = analyse(line, name, range(1, frames + 1), part_key, fault_ts=t1, what=what,
                      phases=phases, timeouts_end_after_s=tail,
                      checks={"the video did not end": ended is not None})
        res["recovery_note"] = f"TIMEOUTs end +{tail:.1f} s"
        return [res]


def scenario_soak(plan: Plan, assets: Assets) -> list[dict]:
    name = f"soak {plan.soak_min:g} min"
    fps = round(0.8 * assets.capacity, 1)
    seconds = plan.soak_min * 60
    n = int(fps * seconds)
    clip = video(assets, n)
    with Line(plan, "soak", {"cam1": video_camera(clip, fps)}, {"vid": assets.vid}) as line:
        t0 = line.start()
        rss: list[tuple[float, float]] = []
        ended = None
        while ended is None and time.time() < t0 + seconds * 1.5 + 60:
            rss.append((time.time() - t0, tree_rss_kib(line.proc.pid) / 1024))
            ended = line.wait_log(lambda e: e.get("event") == "video ended", timeout=10)
        line.settle(n)
        line.finish()
        frames = ended.get("frames", n) if ended else n
        warmup = min(120.0, seconds / 3)
        warm = [(t, m) for t, m in rss if t >= warmup]
        slope = (float(np.polyfit([t / 3600 for t, _ in warm], [m for _, m in warm], 1)[0])
                 if len(warm) >= 3 else None)
        what = (f"A live camera (finite MJPG video of {n} frames paced at {fps} frames/s = 80 % "
                f"of the measured capacity, deadline 2000 ms) for {plan.soak_min:g} min; RSS of "
                f"the daemon's process tree (VmRSS summed over the supervisor and its children) "
                f"every 10 s: {rss[0][1]:.0f} MiB at READY, {warm[0][1] if warm else 0:.0f} MiB "
                f"after a {warmup / 60:g}-min warm-up, {rss[-1][1]:.0f} MiB at the end; slope by "
                f"least squares after the warm-up: "
                + (f"{slope:+.1f} MB/h." if slope is not None else "too few samples."))
        return [analyse(line, name, range(1, frames + 1), part_key, what=what,
                        rss_mib=[(round(t), round(m, 1)) for t, m in rss],
                        rss_slope_mb_per_h=slope,
                        checks={"the video did not end": ended is not None})]


# ------------------------------------------------------------------------ calibration, report

def calibrate(plan: Plan, assets: Assets) -> dict[str, Any]:
    """The line's capacity: an unpaced video file (a file source waits for the line, so
    nothing is shed) judged end to end; judged frames/s after the first 10 %."""
    n = 150 if plan.out == QUICK.out else 400
    clip = video(assets, n)
    with Line(plan, "calibration", {"cam1": video_camera(clip, None, 5000)},
              {"vid": assets.vid}) as line:
        line.start()
        line.wait_log(lambda e: e.get("event") == "video ended", timeout=600)
        line.settle(n, timeout=600)
        line.finish()
        rows = line.db.rows()
    judged = sorted(r["decided_ts"] for r in rows if r["verdict"] in JUDGED)
    skip = len(judged) // 10
    rate = (len(judged) - skip - 1) / (judged[-1] - judged[skip])
    log(f"calibration: {len(judged)} of {len(rows)} frames judged, {rate:.1f} frames/s; "
        "bare model …")
    bare = bare_rate(assets.vid, video(assets, 40))
    log(f"bare model {bare:.1f} images/s")
    return {"frames": n, "rows": len(rows), "verdicts": dict(Counter(r["verdict"] for r in rows)),
            "capacity": rate, "bare": bare}


SCENARIOS: dict[str, Callable[[Plan, Assets], list[dict]]] = {
    "sigkill": scenario_sigkill, "sigstop": scenario_sigstop, "tree-kill": scenario_tree_kill,
    "db-outage": scenario_db_outage, "disk-full": scenario_disk_full,
    "camera-unplug": scenario_camera_unplug, "burst": scenario_burst,
    "hostile": scenario_hostile, "wire": scenario_wire, "contention": scenario_contention,
    "soak": scenario_soak,
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM"


def git_state() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = [x[3:] for x in git("status", "--porcelain", "inspectd").splitlines()]
    return git("rev-parse", "--short", "HEAD") + (
        f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def table_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['scenario']} | harness failed: {r['error'][:120]} |" + " |" * 11
    v = r["verdicts"]
    rej = "✓" if not r["unrejected"] and not r["plc_ok_for_a_reject"] else (
        f"✗ {r['unrejected']} unrejected" + (f", {r['plc_ok_for_a_reject']} passed"
                                            if r["plc_ok_for_a_reject"] else ""))
    rec = fmt_s(r["recovery_s"]) + (f" ({r['recovery_note']})" if r.get("recovery_note") else "")
    running = "✓" if r["running_at_end"] and r["exit_code"] == 0 else (
        f"✗ (exit {r['exit_code']})" if not r["running_at_end"] else f"✓, exit {r['exit_code']}")
    missing = str(r["missing"]) + (f" ({r['missing_judged']} judged, row lost)"
                                   if r["missing_judged"] else "") + (
        f" (+{r['unexpected']} not offered)" if r["unexpected"] else "")
    goal = "✓" if not r["goal"] else "✗"
    return (f"| {r['scenario']} | {r['offered']:,} | {r['rows']:,} | {missing} | "
            f"{r['duplicates']} | {v['OK']} / {v['NG']} / {v['ERROR']} / {v['TIMEOUT']} | "
            f"{r['plc_blocks']:,} | {rej} | {r['events']:,} | {rec} | {len(r['restarts'])} | "
            f"{running} | {goal} |")


def report(res: dict[str, Any]) -> str:
    cal = res["calibration"]
    lines = [
        "# Reliability: the fault suite",
        "",
        "Every frame that enters the line must get exactly one audited verdict, whatever fails. "
        "`benchmarks/faults.py` runs each fault on a real line — `inspectd run` as a "
        "subprocess (READY awaited on a NOTIFY_SOCKET), a fresh PostgreSQL database per run on "
        "the server at 127.0.0.1:5432, a Modbus TCP PLC on 127.0.0.1 recording every write "
        "(per verdict one FC16 block [sequence, part id, verdict code] at `verdict_block`, a "
        "pulse of `reject_coil` per reject; `max_age_ms: null`, so late outputs are written and "
        "counted), a ZeroMQ events subscriber — and compares what was offered with the audit "
        "rows, the PLC's blocks and the events. Numbers below are from the run described here; "
        "rerun to refresh them.",
        "",
        "|  |  |",
        "| --- | --- |",
        f"| machine | {res['machine']} |",
        f"| date | {res['date']} |",
        f"| command | `{res['command']}` |",
        f"| inspectd | {res['git']} |",
        f"| capacity | {cal['capacity']:.1f} judged frames/s: calibration run, an unpaced "
        f"{cal['frames']}-frame MJPG video (a file source waits for the line, so nothing is "
        f"shed; judged/s after the first 10 %); the bare model scores {cal['bare']:.1f} "
        f"images/s at batch 8 (as bench_daemon measures it). Feed rates and loads below are "
        f"shares of the line's capacity |",
        f"| model | PatchCore (default settings, {SIZE}² input) fitted on 30 synthetic `object` "
        f"OK images: SKU `obj` on the PNGs (folder cameras), `vid` on the same through the "
        f"MJPG codec (video cameras), `fake` = obj without its domain check (Aravis camera) |",
        "| line | worker max_batch 8, max_wait 10 ms; folder cameras deadline 4000 ms, "
        "`after: delete`; videos deadline 2000 ms; supervisor defaults (heartbeat_timeout_s "
        "10, 5 for sigkill/sigstop) |",
        f"| 1-min load average | {res['load'][0]:.2f} at start, {res['load'][1]:.2f} at end |",
        f"| total time | {res['minutes']:.0f} min |",
        "",
        "## Results",
        "",
        "| scenario | frames offered | audit rows | missing | duplicates | OK / NG / ERROR / "
        "TIMEOUT | PLC blocks | every non-OK rejected at the PLC | events | recovery s | "
        "child restarts | line running at the end | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[table_row(r) for r in res["results"]],
        "",
        "Offered = files dropped, frames a finite video delivered (the camera numbers them "
        "1..N and logs N at the end), or camera frame ids; missing = offered with no row "
        "(\"+n not offered\": rows for frames nobody offered); duplicates = part ids (or file "
        "names) with more than one row, plus frame ids with more than one row; PLC: every "
        "non-OK row needs a block with a reject code (≠ 1) for its part id (a multiset match: "
        "each block serves one row); recovery = from the fault to the first OK/NG verdict of a "
        "frame captured after it; line running = `inspectd run` alive when the scenario ended "
        "and exit code 0 on SIGTERM. Goal: 0 missing, 0 duplicates, every non-OK rejected at "
        "the PLC, the line still running, and the scenario's own checks.",
        "",
        "## Scenarios",
        "",
    ]
    for r in res["results"]:
        lines += [f"### {r['scenario']}", "", r.get("what", "")]
        if "error" in r:
            lines += ["", f"The harness failed: `{r['error']}`."]
        else:
            extra = []
            if r["timeout_causes"]:
                extra.append(f"TIMEOUT causes: {r['timeout_causes']}")
            if r["error_reasons"]:
                extra.append(f"ERROR reasons: {r['error_reasons']}")
            if r["restarts"]:
                extra.append(f"restarts: {r['restarts']}")
            extra.append(f"PLC: {r['plc_blocks']} blocks, {r['plc_pulses']} reject pulses, "
                         f"{r['parts_with_several_blocks']} part ids with more than one block, "
                         f"{r['ok_rows_without_block']} OK rows without a block")
            extra.append(f"events: {r['events']} received, {r['events_for_rows']} rows had "
                         f"one")
            if r["log_errors"]:
                extra.append(f"error log lines: {r['log_errors']}")
            lines += ["", "Measured: " + "; ".join(extra) + "."]
            if r["goal"]:
                lines += ["", "**Goal not met:** " + "; ".join(r["goal"]) + "."]
            else:
                lines += ["", "Goal met: every offered frame has exactly one row, every reject "
                          "reached the PLC as a reject, and the line ran on."]
        lines.append("")
    lines += ["## Findings", ""]
    bad = [r for r in res["results"] if r.get("goal") or "error" in r]
    if not bad:
        lines.append("Every scenario met the goal.")
    for r in bad:
        lines.append(f"* **{r['scenario']}**: " + ("; ".join(r.get("goal", []))
                                                  or r.get("error", "")))
    lines += ["", f"Raw results: `{shown(res['raw'])}`; each line's config, log and inbox: "
              f"`{shown(res['runs'])}/<scenario>/`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases, 2-min soak: a smoke run")
    ap.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    ap.add_argument("--soak-min", type=float, help="soak minutes (default 30; quick 2)")
    ap.add_argument("--capacity", type=float, help="judged frames/s; skips the calibration")
    ap.add_argument("--out", type=Path, help="the Markdown report (default RELIABILITY.md "
                    "for a full run, else outputs/faults*/RELIABILITY.md)")
    a = ap.parse_args()
    plan = QUICK if a.quick else FULL
    if a.soak_min:
        plan = replace(plan, soak_min=a.soak_min)
    only = a.only.split(",") if a.only else list(SCENARIOS)
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    out = a.out or (ROOT / "RELIABILITY.md" if not a.quick and not a.only
                    else plan.out / "RELIABILITY.md")
    # A SIGTERM to this script unwinds like Ctrl-C, so every `finally` stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    set_threads(os.cpu_count() or 1)  # before torch loads (fitting, the bare model)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()
    load0 = os.getloadavg()[0]
    plan.out.mkdir(parents=True, exist_ok=True)
    assets = prepare(plan)
    if a.capacity:
        cal = {"frames": 0, "capacity": a.capacity, "bare": bare_rate(assets.vid,
                                                                        video(assets, 40))}
    else:
        cal = calibrate(plan, assets)
    assets.capacity, assets.bare = cal["capacity"], cal["bare"]
    results: list[dict] = []
    raw = plan.out / "results.json"
    res: dict[str, Any] = {
        "machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([shown(Path(sys.executable)), *map(shown_arg, sys.argv)]),
        "git": git_state(), "calibration": cal, "plan": {k: str(v) for k, v in
                                                           plan.__dict__.items()},
        "results": results, "raw": raw, "runs": plan.out / "runs"}
    for name in only:
        log(f"=== {name}")
        try:
            results += SCENARIOS[name](plan, assets)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one scenario's harness failure is reported, the rest run
            import traceback

            traceback.print_exc()
            results.append({"scenario": name, "error": f"{type(e).__name__}: {e}", "goal": []})
        raw.write_text(json.dumps(res, indent=1, default=str))
    res["load"] = (load0, os.getloadavg()[0])
    res["minutes"] = (time.time() - t_start) / 60
    raw.write_text(json.dumps(res, indent=1, default=str))
    out.write_text(report(res))
    log(f"wrote {shown(out)} and {shown(raw)}")


if __name__ == "__main__":
    main()
