"""The running line: `inspectd run` with a looping video camera and a Modbus PLC, vs the bare model.

    python benchmarks/bench_daemon.py [--quick] [--json OUT]

Set-up: the synthetic `object` set at 256×256; its test images, good and defect interleaved,
as an MJPG video; PatchCore (default settings) fitted on its OK images as that camera delivers
them (through the same MJPG codec: JPEG artefacts alone push clean frames over a threshold
fitted on PNGs) and published as the line's model.

  * bare: the artifact loaded as the worker loads it (`load(dir, device="auto",
    precision="auto")`), with the worker's thread count, predicting the decoded video frames at
    batch 8; images/s per repeat, after a warm-up repeat. Measured first and again after each
    load: a load's baseline is the mean of the bare rates just before and after it.
  * per load (offered frames/s = a multiple of bare): a fresh `inspectd run` (opencv camera on
    the video, looping, paced at the offered rate; PLC = Modbus TCP to a server in this process
    that timestamps every write), READY awaited on a NOTIFY_SOCKET like systemd; `duration` s
    of frames, of which the first `warmup` s are discarded. From the audit log and the PLC's
    write times: judged (OK+NG) frames/s per 5 s bin, verdict counts and TIMEOUT reasons,
    capture → PLC latency, worker stage timings, whether part ids are 1..N without gap or
    duplicate; RSS of the daemon's process tree sampled every 2 s; cores used per role in the
    window (CPU s / s from /proc, and this process: the PLC server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Only these two before the thread count is set: OpenMP reads it once, when torch loads.
from inspectd.core.config import LineSettings  # noqa: E402
from inspectd.core.resources import set_threads  # noqa: E402
from inspectd.daemon.roles import role_threads  # noqa: E402

SKU = "object"
VERDICT_BLOCK, HEARTBEAT_REGISTER, REJECT_COIL = 0, 4, 16  # block: sequence, part, code
PART_REGISTER, VERDICT_REGISTER = VERDICT_BLOCK + 1, VERDICT_BLOCK + 2
LOADS = (("saturation", 3.0), ("half", 0.5), ("double", 2.0))  # name, × bare images/s
BIN_S = 5.0  # judged frames/s are counted per bin of this many seconds
RSS_EVERY_S = 2.0
TAIL_S = 3.0  # frames captured this close to the stop are left out of latency figures


@dataclass(frozen=True)
class Plan:
    n_train: int
    n_test_good: int
    n_test_defect: int
    bare_repeats: int
    duration_s: float
    warmup_s: float
    data: Path
    work: Path


FULL = Plan(n_train=100, n_test_good=20, n_test_defect=20, bare_repeats=7, duration_s=55.0,
            warmup_s=10.0, data=ROOT / "data/bench-daemon", work=ROOT / "outputs/bench/daemon")
QUICK = Plan(n_train=20, n_test_good=4, n_test_defect=6, bare_repeats=2, duration_s=14.0,
             warmup_s=4.0, data=ROOT / "data/bench-daemon-quick",
             work=ROOT / "outputs/bench-quick/daemon")


def log(msg: str) -> None:
    print(f"[bench-daemon {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summary(values: list[float] | np.ndarray) -> dict[str, float] | None:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return None
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def line_settings(work: Path, run_dir: Path, cameras: dict | None = None,
                  plc_port: int = 502) -> dict[str, Any]:
    """The line config as YAML data (also used, camera-less, to ask for the worker threads)."""
    return {
        "line": "bench", "data_dir": str(work / "line"), "run_dir": str(run_dir),
        "log_level": "info", "cameras": cameras or {},
        "worker": {"max_batch": 8, "max_wait_ms": 10},
        "metrics": {"enabled": False},
        "plc": {"type": "modbus", "modbus": {
            "host": "127.0.0.1", "port": plc_port, "verdict_block": VERDICT_BLOCK,
            "slots": 1, "reject_coil": REJECT_COIL, "heartbeat_register": HEARTBEAT_REGISTER,
            "max_age_ms": None}},
    }


# ------------------------------------------------------------------------------ set-up

def write_video(path: Path, images: list[Path]) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (256, 256))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video {path}")
    for p in images:
        writer.write(cv2.imread(str(p), cv2.IMREAD_COLOR))
    writer.release()


def prepare(plan: Plan) -> tuple[Path, Path, int]:
    """Synthetic data (once), the video, a fitted artifact; (artifact, video, frames in it)."""
    from inspectd.models import fit
    from inspectd.models.datasets.synthetic import generate
    from inspectd.models.settings import ModelSettings

    params = {"n_train": plan.n_train, "n_test_good": plan.n_test_good,
              "n_test_defect": plan.n_test_defect, "size": 256}
    stamp = plan.data / "bench-params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        log(f"generating synthetic data in {plan.data}")
        generate(plan.data, (SKU,), **params)
        stamp.write_text(json.dumps(params))
    shutil.rmtree(plan.work, ignore_errors=True)
    plan.work.mkdir(parents=True)
    test = plan.data / SKU / "test"
    good = sorted((test / "good").glob("*.png"))
    defect = sorted(p for d in test.iterdir() if d.name != "good" for p in d.glob("*.png"))
    order = [p for pair in zip(good, defect, strict=False) for p in pair]
    order += good[len(defect):] + defect[len(good):]
    video = plan.work / "object.avi"
    write_video(video, order)

    log(f"fitting PatchCore on {plan.n_train} OK images through the MJPG codec")
    write_video(plan.work / "train.avi", sorted((plan.data / SKU / "train" / "good").glob("*.png")))
    artifact = plan.work / "artifact"
    fit(decoded_frames(plan.work / "train.avi"), ModelSettings(kind="patchcore")).save(artifact)
    return artifact, video, len(order)


def decoded_frames(video: Path) -> list[np.ndarray]:
    """The video's frames as the worker gets them: decoded BGR, then `to_rgb8` (a view)."""
    import cv2

    from inspectd.core.wire import to_rgb8

    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(to_rgb8(frame, "bgr8"))
    cap.release()
    return frames


def bare_throughput(artifact: Path, frames: list[np.ndarray], repeats: int) -> dict[str, Any]:
    from inspectd.models import load

    det = load(artifact, device="auto", precision="auto")
    det.batch_size = 8
    det.predict(frames, keep_image=False)  # warm-up
    rates, cpu_ms = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        det.predict(frames, keep_image=False)
        rates.append(len(frames) / (time.perf_counter() - t0))
        cpu_ms.append((time.process_time() - c0) / len(frames) * 1000)
    return {"images_per_s": summary(rates), "cpu_ms_per_image": summary(cpu_ms),
            "bf16": bool(det.runtime.bf16),
            "device": str(det.runtime.device), "images_per_repeat": len(frames)}


# ----------------------------------------------------------------------------- the PLC

class PlcRecorder:
    """A Modbus TCP server on 127.0.0.1 that timestamps every register write it is sent."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, int, int]] = []  # (wall time, address, value)
        self.port = 0
        self._up = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _record(self, function_code: int, _start: int, address: int, _count: int,
                      _registers: list[int], values: list[int] | None) -> None:
        if values is not None and function_code in (6, 16):  # write register(s)
            now = time.time()
            self.writes += [(now, address + i, int(v)) for i, v in enumerate(values)]

    def _device(self) -> Any:
        from pymodbus.simulator import DataType, SimData, SimDevice

        # id 0 answers every unit id; one shared block of 32 registers holds all addresses.
        return SimDevice(id=0, action=self._record, simdata=[
            SimData(0, count=32, values=0, datatype=DataType.REGISTERS)])

    async def _serve(self) -> None:
        from pymodbus.server import ModbusTcpServer

        self._server = ModbusTcpServer(self._device(), address=("127.0.0.1", 0))
        self._loop = asyncio.get_running_loop()
        await self._server.serve_forever(background=True)
        self.port = self._server.transport.sockets[0].getsockname()[1]
        self._up.set()
        await self._server.serving

    def start(self) -> PlcRecorder:
        self._thread.start()
        if not self._up.wait(10):
            raise RuntimeError("Modbus test server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have ended already
                self._loop.call_soon_threadsafe(lambda: self._loop.create_task(
                    self._server.shutdown()))
        self._thread.join(10)

    def verdict_times(self) -> dict[int, float]:
        """Part number → when its verdict code reached the PLC (the block's part and code
        registers, written by one FC16; the first one if a part number comes twice)."""
        out: dict[int, float] = {}
        part = None
        for t, address, value in list(self.writes):
            if address == PART_REGISTER:
                part = value
            elif address == VERDICT_REGISTER and part is not None:
                out.setdefault(part, t)
                part = None
        return out


# --------------------------------------------------------------------------- the daemon

def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far (/proc/<pid>/stat; gone ones left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def context_switches(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(voluntary, involuntary) context switches of each process so far, over its threads:
    wake-ups after waiting, and preemptions (/proc/<pid>/task/*/status)."""
    out = {}
    for p in pids:
        vol = invol = 0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("voluntary_ctxt_switches"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol += int(line.split()[1])
            out[p] = (vol, invol)
    return out


def role_labels(log_path: Path) -> dict[int, str]:
    """pid → role, from the supervisor's "started" log lines."""
    label = {}
    for text in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(text)
            if e.get("event") == "started" and "pid" in e:
                label[int(e["pid"])] = str(e["child"]).split(":")[0]
    return label


def role_switches(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                  log_path: Path, seconds: float) -> dict[str, dict[str, float]]:
    """Per role, per second: wake-ups (voluntary switches) and preemptions."""
    label = role_labels(log_path)
    out: dict[str, dict[str, float]] = {}
    for p, (vol, invol) in after.items():
        v0, i0 = before.get(p, (0, 0))
        r = out.setdefault(label.get(p, "supervisor"), {"wakeups": 0.0, "preempted": 0.0})
        r["wakeups"] += round((vol - v0) / seconds)
        r["preempted"] += round((invol - i0) / seconds)
    return out


def role_cpu(before: dict[int, float], after: dict[int, float], log_path: Path,
             own: tuple[float, float], seconds: float) -> dict[str, float]:
    """Cores used per role over `seconds` (CPU s / s): the daemon's processes named by the
    supervisor's "started" log lines, and this process (the PLC server, the RSS sampler)."""
    label = role_labels(log_path)
    used: Counter[str] = Counter()
    for p, t in after.items():
        used[label.get(p, "supervisor")] += (t - before.get(p, 0.0)) / seconds
    used["benchmark (PLC server)"] = (own[1] - own[0]) / seconds
    return {k: round(v, 3) for k, v in sorted(used.items())}


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over a process and all its descendants (what has exited counts 0)."""
    total = 0
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:")), 0)
    return total


class ServiceManager:
    """The NOTIFY_SOCKET end, read all the time as systemd does: the daemon's sd_notify sends
    block once the socket's queue (net.unix.max_dgram_qlen, often 10) is full."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.ready = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                if b"READY=1" in self.sock.recv(4096):
                    self.ready.set()
            except TimeoutError:
                pass

    def wait_ready(self, proc: subprocess.Popen, log_path: Path, timeout: float = 300.0) -> None:
        end = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if proc.poll() is not None:
                raise RuntimeError(f"inspectd run exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > end:
                raise RuntimeError(f"inspectd run not READY after {timeout:.0f} s; see {log_path}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


def run_daemon(plan: Plan, name: str, video: Path, fps: float) -> dict[str, Any]:
    """One fresh `inspectd run` at `fps` offered frames/s; its audit rows and PLC writes."""
    from inspectd.lifecycle.registry import publish

    work = plan.work / name
    work.mkdir(parents=True)
    line = work / "line"
    publish(plan.work / "artifact", line / "models", SKU, "v1")
    run_dir = Path(tempfile.mkdtemp(prefix="idb", dir="/tmp"))  # ipc paths: ≤ 107 bytes
    plc = PlcRecorder().start()
    camera = {"type": "opencv", "uri": str(video), "loop": True, "max_fps": fps, "sku": SKU,
              "deadline_ms": 2000}
    config = work / "line.yaml"
    config.write_text(yaml.safe_dump(line_settings(work, run_dir, {"cam1": camera}, plc.port)))
    manager = ServiceManager(run_dir / "notify.sock")
    log_path = work / "daemon.log"
    rss: list[tuple[float, int]] = []
    cpu0: dict[int, float] = {}
    sw0: dict[int, tuple[int, int]] = {}
    own0 = 0.0
    with log_path.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "-c", str(config)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "NOTIFY_SOCKET": str(manager.path)})
        try:
            manager.wait_ready(proc, log_path)
            t_ready = time.time()
            log(f"{name}: line ready, offering {fps:.1f} frames/s for {plan.duration_s:.0f} s")
            while time.time() < t_ready + plan.duration_s and proc.poll() is None:
                rss.append((time.time(), tree_rss_kib(proc.pid)))
                if not cpu0 and time.time() >= t_ready + plan.warmup_s:
                    pids = tree_pids(proc.pid)
                    t_cpu0, cpu0, own0 = time.time(), cpu_seconds(pids), time.process_time()
                    sw0 = context_switches(pids)
                time.sleep(RSS_EVERY_S)
            t_stop = time.time()
            pids = tree_pids(proc.pid)
            cores = role_cpu(cpu0, cpu_seconds(pids), log_path,
                             (own0, time.process_time()), t_stop - t_cpu0)
            switches = role_switches(sw0, context_switches(pids), log_path, t_stop - t_cpu0)
            if proc.poll() is not None:
                raise RuntimeError(f"inspectd run exited with {proc.returncode}; see {log_path}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                log(f"{name}: inspectd run ignored SIGTERM for 120 s; killing its processes")
                for pid in tree_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                code = proc.wait()
            manager.close()
            plc.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
    return {**analyse(name, fps, line, plc, rss, t_ready, t_stop, code, log_path, plan),
            "cores_used": cores, "switches_per_s": switches}


def audit_rows(line: Path) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from inspectd.storage.schema import verdicts

    eng = sa.create_engine(f"sqlite:///{line / 'audit.db'}")
    try:
        with eng.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(verdicts))]
    finally:
        eng.dispose()


def timeout_cause(reason: str | None) -> str:
    """TIMEOUT reasons grouped: shed at intake (queue full), aged out at acquisition with no
    worker free, aged out in the worker's queue, shed by the worker because it would finish
    too late, scored too late, no verdict in time (sink), or pending when the daemon stopped."""
    r = reason or ""
    for prefix, cause in (("overload", "overload"), ("no worker free", "held"),
                          ("deadline passed before", "queued"), ("would miss", "hopeless"),
                          ("scored", "scored late"), ("no verdict", "no verdict"),
                          ("daemon stopped", "shutdown")):
        if r.startswith(prefix):
            return cause
    return "other"


def analyse(name: str, fps: float, line: Path, plc: PlcRecorder, rss: list[tuple[float, int]],
            t_ready: float, t_stop: float, code: int, log_path: Path,
            plan: Plan) -> dict[str, Any]:
    rows = audit_rows(line)
    w0, w1 = t_ready + plan.warmup_s, t_stop
    for r in rows:
        r["capture_ts"] = r["capture_time"].timestamp() if r["capture_time"] else None
        r["decided_ts"] = r["decided_time"].timestamp()
    judged = np.array([r["decided_ts"] for r in rows if r["verdict"] in ("OK", "NG")])
    edges = np.arange(w0, w1 - BIN_S / 2, BIN_S)
    per_bin = [float(((judged >= a) & (judged < a + BIN_S)).sum() / BIN_S) for a in edges]
    in_window = ((judged >= w0) & (judged < w1)).sum()

    captured = sum(1 for r in rows if r["capture_ts"] and w0 <= r["capture_ts"] < w1)
    steady = [r for r in rows if r["capture_ts"] and w0 <= r["capture_ts"] < w1 - TAIL_S]
    # Latency of judged frames: a frame shed at intake reaches the PLC at once, as a reject.
    scored = [r for r in steady if r["verdict"] in ("OK", "NG")]
    plc_at = plc.verdict_times()
    latency = [(plc_at[int(r["part_id"]) % 65536] - r["capture_ts"]) * 1000 for r in scored
               if int(r["part_id"]) % 65536 in plc_at]
    stages = {k: summary([r[f"{k}_ms"] for r in scored if r[f"{k}_ms"] is not None])
              for k in ("queue", "decode", "infer", "total")}

    parts = sorted(int(r["part_id"]) for r in rows)
    n = parts[-1] if parts else 0
    third = [kib for t, kib in rss if t >= w0]
    k = max(1, len(third) // 3)
    errors = []
    for text in log_path.read_text().splitlines():
        try:
            e = json.loads(text)
        except ValueError:
            continue
        if e.get("level") in ("error", "critical"):
            errors.append(e.get("event"))
    return {
        "name": name, "offered_fps": fps, "exit_code": code,
        "window_s": w1 - w0, "frames": len(rows),
        "judged_fps_bins": summary(per_bin), "judged_fps": float(in_window / (w1 - w0)),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "timeouts": dict(Counter(timeout_cause(r["reason"]) for r in rows
                                 if r["verdict"] == "TIMEOUT")),
        "captured_fps": captured / (w1 - w0),
        "latency_ms": summary(latency), "latency_missing": len(scored) - len(latency),
        "stages_ms": stages,
        "parts_complete": parts == list(range(1, n + 1)), "parts_max": n,
        "parts_duplicates": len(parts) - len(set(parts)),
        "parts_missing": n - len(set(parts)),
        "rss_mib_first_third": float(np.median(third[:k])) / 1024 if third else None,
        "rss_mib_last_third": float(np.median(third[-k:])) / 1024 if third else None,
        "rss_samples": len(third),
        "log_errors": dict(Counter(errors)),
    }


# --------------------------------------------------------------------------------- main

def bench_args(doc: str) -> argparse.Namespace:
    """--quick and --json, the options of every daemon benchmark."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and short runs")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    return ap.parse_args()


def write_results(res: dict[str, Any], path: Path | None) -> None:
    """The raw results as JSON: to `path`, or stdout."""
    text = json.dumps(res, indent=2) + "\n"
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        sys.stdout.write(text)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def shown_arg(arg: str) -> str:
    return shown(Path(arg)) if Path(arg).is_absolute() else arg


def main() -> None:
    a = bench_args(__doc__)
    plan = QUICK if a.quick else FULL

    probe = LineSettings(**line_settings(plan.work, Path("/tmp")))
    threads = role_threads(probe, "worker")
    set_threads(threads)
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)

    artifact, video, n_frames = prepare(plan)
    frames = decoded_frames(video)
    log(f"bare model throughput: {len(frames)} frames at batch 8, {plan.bare_repeats} repeats")
    bare = bare_throughput(artifact, frames, plan.bare_repeats)
    base = bare["images_per_s"]["median"]
    log(f"bare: {base:.1f} images/s")
    res: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([shown(Path(sys.executable)), *map(shown_arg, sys.argv)]),
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in plan.__dict__.items()},
        "worker_threads": threads, "video_frames": n_frames, "bare": bare, "runs": {},
    }
    before = base
    for name, factor in LOADS:
        r = run_daemon(plan, name, video, round(factor * base, 1))
        # The machine's speed drifts (a shared VM: the bare rate moved by a third within
        # minutes), so each load is judged against the bare rate measured just before and
        # just after it, not only against the first measure.
        again = bare_throughput(artifact, frames, plan.bare_repeats)
        after = again["images_per_s"]["median"]
        r["bare_before_after"] = [before, after]
        r["bare_cpu_ms_per_image"] = again["cpu_ms_per_image"]["median"]
        r["baseline_images_per_s"] = (before + after) / 2
        before = after
        res["runs"][name] = r
        log(f"{name}: judged {r['judged_fps']:.1f} frames/s, verdicts {r['verdicts']}, "
            f"timeouts {r['timeouts']}, exit {r['exit_code']}")
    write_results(res, a.json)


if __name__ == "__main__":
    main()
