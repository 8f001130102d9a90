"""Model lifecycle: `inspectd refit` of the OK frames a line kept, and the line's pace meanwhile.

    python benchmarks/bench_refit.py [--quick] [--json OUT]

Set-up (cached under data/bench-refit, keyed by the plan's sizes): the synthetic `object` set
at 256×256, every image passed through an MJPG video as the camera of bench_daemon delivers
it. The line's current version `v1` is PatchCore (default settings) fitted on the first
`n_current` OK frames. The next `n_accumulated` OK frames are judged by v1 and stored the way
the sink stores them (`ImageStore.save_ok` / `save_ng`, one `AuditLog` row each with v1's
score and thresholds, capture times 30 s apart, ending an hour ago); `n_ng` defect frames are
judged too and labelled NG by an operator (the confirmed-NG gate).

  * refit: `inspectd refit --sku object -c LINE --max-images N --json` as a subprocess, wall
    clock from spawn to exit (start-up, pool query, fit, calibration, save, gates, publish,
    promote), on a fresh copy of the line's models and audit log per run; default refit
    settings (SCHED_IDLE, every core, nice 10) and `-o refit.threads=1`. Stages from the
    refit's own log timestamps and the published manifest; CPU time and peak RSS from wait4.
  * line: the bare model's images/s (as bench_daemon measures it), then per case (load and
    refit scheduling) a fresh `inspectd run` (opencv camera looping over the test video at a
    multiple of that rate, no PLC) on a copy of the line: after `warmup` + `before` s,
    `inspectd refit --dry-run` runs with the line's own config (SCHED_IDLE, or nice only with
    `-o refit.idle=false`); `after` s later the line stops. A second fresh run at the same
    load, as long, runs no refit. Judged frames/s and capture → verdict latency (audit rows)
    in the refit's interval, compared with the same interval of the run without one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bench_daemon import (
    BIN_S,
    RSS_EVERY_S,
    SKU,
    TAIL_S,
    ServiceManager,
    audit_rows,
    bare_throughput,
    bench_args,
    decoded_frames,
    line_settings,
    shown,
    shown_arg,
    summary,
    timeout_cause,
    tree_pids,
    tree_rss_kib,
    write_results,
    write_video,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Only these before the thread count is set: OpenMP reads it once, when torch loads.
from inspectd.core.config import LineSettings  # noqa: E402
from inspectd.core.resources import THREAD_VARS, set_threads  # noqa: E402
from inspectd.daemon.roles import role_threads  # noqa: E402

GAP_S = 30.0  # capture times of the accumulated frames are this far apart


@dataclass(frozen=True)
class Plan:
    n_current: int  # OK frames the current version v1 is fitted on
    n_accumulated: int  # OK frames judged by v1 and kept for refit
    max_images: int  # refit --max-images
    n_ng: int  # defect frames judged by v1, labelled NG by an operator
    n_test_good: int  # the daemon's video: test good and defect images, interleaved
    n_test_defect: int
    refit_repeats: int
    threads: tuple[int | None, ...]  # refit.threads per refit series (None: the default)
    # name, offered frames/s ÷ bare images/s, refit under SCHED_IDLE (else nice only). A
    # saturated line leaves an idle refit no CPU: it would only run into refit_timeout_s.
    loads: tuple[tuple[str, float, bool], ...]
    bare_repeats: int
    warmup_s: float
    before_s: float  # line time after the warm-up before the refit starts
    after_s: float  # line time after the refit ends
    refit_timeout_s: float
    data: Path
    work: Path


FULL = Plan(n_current=200, n_accumulated=1200, max_images=500, n_ng=10, n_test_good=20,
            n_test_defect=20, refit_repeats=3, threads=(None, 1),
            loads=(("half", 0.5, True), ("half-nice", 0.5, False),
                   ("saturation-nice", 3.0, False)), bare_repeats=5, warmup_s=10.0,
            before_s=30.0, after_s=20.0, refit_timeout_s=600.0,
            data=ROOT / "data/bench-refit", work=ROOT / "outputs/bench/refit")
QUICK = Plan(n_current=40, n_accumulated=80, max_images=30, n_ng=3, n_test_good=4,
             n_test_defect=6, refit_repeats=1, threads=(None, 1), loads=(("half", 0.5, True),),
             bare_repeats=2, warmup_s=4.0, before_s=6.0, after_s=4.0, refit_timeout_s=300.0,
             data=ROOT / "data/bench-refit-quick", work=ROOT / "outputs/bench-quick/refit")


def log(msg: str) -> None:
    print(f"[bench-refit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without its thread counts: each role sets its own."""
    return {**{k: v for k, v in os.environ.items() if k not in THREAD_VARS}, **extra}


def write_config(path: Path, data_dir: Path, run_dir: Path | None = None,
                 camera: dict[str, Any] | None = None) -> Path:
    """The line's YAML: bench_daemon's line without a PLC, on `data_dir`."""
    cfg = line_settings(path.parent, run_dir or data_dir / "run",
                        {"cam1": camera} if camera else None)
    cfg.update(data_dir=str(data_dir), plc={"type": "none"})
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------ set-up

def scores(det: Any, frames: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([det.score_images(frames[i:i + 8])[0]
                           for i in range(0, len(frames), 8)])


def prepare(plan: Plan) -> dict[str, Any]:
    """The line as the sink leaves it (once per plan); its description, cached in a stamp."""
    params = {"n_current": plan.n_current, "n_accumulated": plan.n_accumulated,
              "n_ng": plan.n_ng, "n_test_good": plan.n_test_good,
              "n_test_defect": plan.n_test_defect, "size": 256, "gap_s": GAP_S}
    stamp = plan.data / "line.json"
    if stamp.is_file() and (info := json.loads(stamp.read_text()))["params"] == params:
        return info
    from inspectd.core.config import ImageSettings
    from inspectd.core.wire import Verdict
    from inspectd.lifecycle.registry import publish
    from inspectd.models import fit, load
    from inspectd.models.datasets.synthetic import generate
    from inspectd.models.settings import ModelSettings
    from inspectd.storage import queries
    from inspectd.storage.audit import AuditLog
    from inspectd.storage.images import ImageStore

    shutil.rmtree(plan.data, ignore_errors=True)
    log(f"generating synthetic data in {shown(plan.data)}")
    generate(plan.data / "synthetic", (SKU,), n_train=plan.n_current + plan.n_accumulated,
             n_test_good=plan.n_test_good, n_test_defect=plan.n_test_defect, size=256)
    root = plan.data / "synthetic" / SKU
    train = sorted((root / "train" / "good").glob("*.png"))
    good = sorted((root / "test" / "good").glob("*.png"))
    defect = sorted(p for d in (root / "test").iterdir() if d.name != "good"
                    for p in d.glob("*.png"))
    order = [p for pair in zip(good, defect, strict=False) for p in pair]
    order += good[len(defect):] + defect[len(good):]
    write_video(plan.data / "line.avi", order)  # what the daemon's camera shows
    write_video(plan.data / "kept.avi", train + defect[: plan.n_ng])
    frames = decoded_frames(plan.data / "kept.avi")
    current, kept = frames[: plan.n_current], frames[plan.n_current:]

    log(f"fitting v1 on {len(current)} OK frames; judging {len(kept)} frames with it")
    artifact = plan.data / "v1"
    fit(current, ModelSettings(kind="patchcore")).save(artifact)
    line = plan.data / "line"
    publish(artifact, line / "models", SKU, "v1")
    det = load(artifact, device="auto", precision="auto")  # as the worker loads it
    kept_scores = scores(det, kept)

    s = LineSettings(**yaml.safe_load(write_config(plan.data / "line.yaml", line).read_text()))
    audit = AuditLog(s.database_url(), s.spool_dir, commit_rows=1000)
    store = ImageStore(s.images_dir, ImageSettings())
    t0 = time.time() - 3600 - GAP_S * len(kept)
    verdicts = Counter()
    ng_ids = []
    for i, (rgb, score) in enumerate(zip(kept, kept_scores, strict=True)):
        is_defect = i >= plan.n_accumulated
        fid = f"{'ng' if is_defect else 'ok'}{i:04d}"
        kind = "NG" if score >= det.threshold else "OK"
        verdicts[kind] += 1
        v = Verdict(fid, kind, camera="cam1", sku=SKU, line="bench", part_id=str(i + 1),
                    capture_ts=t0 + GAP_S * i, decided_ts=t0 + GAP_S * i + 0.05,
                    score=float(score), threshold=det.threshold,
                    pixel_threshold=det.pixel_threshold, model_version="v1")
        audit.record(v, {"image": store.save_ok(v, rgb)} if kind == "OK" else store.save_ng(v, rgb))
        if is_defect:
            ng_ids.append(fid)
    audit.close()
    for fid in ng_ids:
        queries.set_label(s.database_url(), fid, "NG", note="confirmed", user="bench")
    pool = queries.refit_candidates(s.database_url(), SKU, near_threshold=s.refit.near_threshold)
    ok = kept_scores[: plan.n_accumulated]
    info = {
        "params": params, "threshold": det.threshold, "bf16": bool(det.runtime.bf16),
        "verdicts": dict(verdicts), "usable": len(pool),
        "accumulated_ng": int((ok >= det.threshold).sum()),  # OK parts v1 rejected
        "near_threshold": s.refit.near_threshold,
        "ok_ratio": {"median": float(np.median(ok / det.threshold)),
                     "p95": float(np.quantile(ok / det.threshold, 0.95))},
        "video_frames": len(order),
    }
    if len(pool) < plan.max_images:
        raise RuntimeError(f"only {len(pool)} of {plan.n_accumulated} accumulated frames are "
                           f"usable for refit; raise n_accumulated above {plan.max_images}")
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def copy_line(plan: Plan, dest: Path) -> Path:
    """A fresh copy of the line's models and audit log (the images stay where the audit rows
    name them): every run starts from the same state."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    src = plan.data / "line"
    shutil.copytree(src / "models", dest / "models", symlinks=True)
    shutil.copy2(src / "audit.db", dest / "audit.db")  # closed cleanly: no WAL left beside it
    return dest


# ------------------------------------------------------------------------------- refit

class RefitRun:
    """`inspectd refit` as a subprocess, reaped with wait4 (CPU time, peak RSS) by a thread."""

    def __init__(self, config: Path, plan: Plan, out: Path, threads: int | None = None,
                 dry_run: bool = False, idle: bool = True) -> None:
        # info logs: their timestamps split the stages
        args = [sys.executable, "-m", "inspectd", "--log-level", "info", "refit", "--sku", SKU,
                "-c", str(config), "--max-images", str(plan.max_images), "--json"]
        args += ["--dry-run"] if dry_run else []
        args += ["-o", f"refit.threads={threads}"] if threads else []
        args += [] if idle else ["-o", "refit.idle=false"]
        self.out, self.err = out.with_suffix(".json"), out.with_suffix(".log")
        self.code: int | None = None
        self.rusage: Any = None
        self._done = threading.Event()
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.t_start, t0 = time.time(), time.perf_counter()
            self.proc = subprocess.Popen(args, stdout=stdout, stderr=stderr, cwd=ROOT,
                                         env=child_env())
        self._t0 = t0
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        _, status, self.rusage = os.wait4(self.proc.pid, 0)
        self.wall_s = time.perf_counter() - self._t0
        self.t_end = time.time()
        self.code = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._done.set()

    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float) -> dict[str, Any]:
        if not self._done.wait(timeout):
            log(f"refit still running after {timeout:.0f} s; killing it")
            self.proc.kill()
            self._done.wait()
        return self.result()

    def result(self) -> dict[str, Any]:
        events = {}
        for line in self.err.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                e = json.loads(line)
                events.setdefault(e["event"], e)
        try:
            out = json.loads(self.out.read_text())
        except ValueError:
            out = None
        at = {k: datetime.fromisoformat(e["timestamp"]).timestamp() - self.t_start
              for k, e in events.items() if "timestamp" in e}
        stages = {
            "start": at.get("refit"),  # spawn → pool chosen: interpreter, torch, audit query
            "fit": at["fitted"] - at["refit"] if {"fitted", "refit"} <= at.keys() else None,
            "coreset": events.get("coreset", {}).get("seconds"),
            "gates": at["refit done"] - at["fitted"] if {"fitted", "refit done"} <= at.keys()
            else None,  # save, reload, both versions score the gate set, publish, promote
            "exit": self.wall_s - at["refit done"] if "refit done" in at else None,
        }
        ru = self.rusage
        return {
            "exit_code": self.code, "wall_s": self.wall_s, "t_start": self.t_start,
            "t_end": self.t_end, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mib": ru.ru_maxrss / 1024, "stages_s": stages, "result": out,
            "errors": [e["event"] for e in events.values() if e.get("level") in
                       ("error", "critical")],
        }


def manifest_stages(line: Path, version: str | None) -> dict[str, float | None]:
    """Fit-time split from the published version's manifest: features+coreset, calibration."""
    if not version:
        return {}
    t = json.loads((line / "models" / SKU / version / "manifest.json").read_text())["training"]
    return {"fit_seconds": t["fit_seconds"], "calibration": t["total_seconds"] - t["fit_seconds"]}


def refit_series(plan: Plan) -> dict[str, Any]:
    out = {}
    for threads in plan.threads:
        name = f"threads{threads or 'default'}"
        runs = []
        for i in range(plan.refit_repeats):
            work = plan.work / "refit" / f"{name}-{i}"
            line = copy_line(plan, work / "line")
            config = write_config(work / "line.yaml", line)
            log(f"refit ({name}) run {i + 1}/{plan.refit_repeats}")
            r = RefitRun(config, plan, work / "refit", threads).wait(plan.refit_timeout_s)
            r["stages_s"].update(manifest_stages(line, (r["result"] or {}).get("version")))
            runs.append(r)
            res = r["result"] or {}
            log(f"refit ({name}): {r['wall_s']:.1f} s wall, exit {r['exit_code']}, "
                f"pool {res.get('pool')}, passed {res.get('passed')}, {res.get('reason')}")
        out[name] = {"threads": threads, "runs": runs,
                     "wall_s": summary([r["wall_s"] for r in runs])}
    return out


# --------------------------------------------------------------------------------- line

def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        log("inspectd run ignored SIGTERM for 120 s; killing its processes")
        for pid in tree_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return proc.wait()


def run_line(plan: Plan, name: str, fps: float, refit: bool, idle: bool = True,
             offsets: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """A fresh `inspectd run` at `fps`; with `refit`, a dry-run refit (under SCHED_IDLE when
    `idle`) `warmup + before` s after READY. Otherwise `offsets` (refit start, refit end, stop;
    s after READY) of a refit run."""
    work = plan.work / "line" / name
    line = copy_line(plan, work / "line")
    run_dir = Path(tempfile.mkdtemp(prefix="idr", dir="/tmp"))  # ipc paths: ≤ 107 bytes
    camera = {"type": "opencv", "uri": str(plan.data / "line.avi"), "loop": True,
              "max_fps": fps, "sku": SKU, "deadline_ms": 2000}
    config = write_config(work / "line.yaml", line, run_dir, camera)
    manager = ServiceManager(run_dir / "notify.sock")
    log_path = work / "daemon.log"
    rss: list[tuple[float, int, int]] = []  # time, daemon tree KiB, refit KiB
    r: RefitRun | None = None
    with log_path.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "-c", str(config)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=child_env(NOTIFY_SOCKET=str(manager.path)))
        try:
            manager.wait_ready(proc, log_path)
            t_ready = time.time()
            start_at = t_ready + (offsets[0] if offsets else plan.warmup_s + plan.before_s)
            stop_at = t_ready + offsets[2] if offsets else None
            log(f"{name}: line ready, offering {fps:.1f} frames/s"
                + (", refit follows" if refit else ""))
            while proc.poll() is None:
                now = time.time()
                if refit and r is None and now >= start_at:
                    r = RefitRun(config, plan, work / "refit", dry_run=True, idle=idle)
                if r is not None and stop_at is None:
                    if r.running() and now > r.t_start + plan.refit_timeout_s:
                        r.wait(0)  # kills it
                    if not r.running():
                        stop_at = r.t_end + plan.after_s
                if stop_at is not None and now >= stop_at:
                    break
                rss.append((now, tree_rss_kib(proc.pid),
                            tree_rss_kib(r.proc.pid) if r and r.running() else 0))
                time.sleep(RSS_EVERY_S)
            t_stop = time.time()
            if proc.poll() is not None:
                raise RuntimeError(f"inspectd run exited with {proc.returncode}; see {log_path}")
        finally:
            code = stop(proc)
            manager.close()
            shutil.rmtree(run_dir, ignore_errors=True)
    refit_res = r.wait(0) if r else None
    if refit_res:
        r0, r1 = refit_res["t_start"], refit_res["t_end"]
    else:
        r0, r1 = t_ready + offsets[0], t_ready + offsets[1]
    rows = [x for x in audit_rows(line) if x["decided_time"].timestamp() >= t_ready - 60]
    windows = {"during": (r0, r1)}
    if refit_res:
        windows |= {"before": (t_ready + plan.warmup_s, r0), "after": (r1, t_stop)}
    during_rss = [d for t, d, _ in rss if r0 <= t < r1]
    return {
        "name": name, "offered_fps": fps, "refit": refit_res, "exit_code": code,
        "offsets_s": (r0 - t_ready, r1 - t_ready, t_stop - t_ready),
        "windows": {k: window_stats(rows, *w) for k, w in windows.items()},
        "frames": len(rows),
        "rss_mib_daemon_during": float(np.median(during_rss)) / 1024 if during_rss else None,
        "rss_mib_refit_max": max((f for _, _, f in rss), default=0) / 1024,
    }


def window_stats(rows: list[dict[str, Any]], w0: float, w1: float) -> dict[str, Any]:
    """Judged frames/s by decision time in [w0, w1), per 5 s bin too; latency and verdicts of
    the frames captured in it (latency: the last TAIL_S s of captures left out)."""
    for r in rows:
        r["capture_ts"] = r["capture_time"].timestamp() if r["capture_time"] else None
        r["decided_ts"] = r["decided_time"].timestamp()
    judged = np.array([r["decided_ts"] for r in rows if r["verdict"] in ("OK", "NG")])
    edges = np.arange(w0, w1 - BIN_S / 2, BIN_S)
    captured = [r for r in rows if r["capture_ts"] and w0 <= r["capture_ts"] < w1]
    scored = [r for r in captured if r["verdict"] in ("OK", "NG") and r["capture_ts"] < w1 - TAIL_S]
    return {
        "window_s": w1 - w0,
        "judged_fps": float(((judged >= w0) & (judged < w1)).sum() / (w1 - w0)),
        "judged_fps_bins": summary([((judged >= a) & (judged < a + BIN_S)).sum() / BIN_S
                                    for a in edges]),
        "captured_fps": len(captured) / (w1 - w0),
        "latency_ms": summary([(r["decided_ts"] - r["capture_ts"]) * 1000 for r in scored]),
        "infer_ms": summary([r["infer_ms"] for r in scored if r["infer_ms"] is not None]),
        "verdicts": dict(Counter(r["verdict"] for r in captured)),
        "timeouts": dict(Counter(timeout_cause(r["reason"]) for r in captured
                                 if r["verdict"] == "TIMEOUT")),
    }


def line_series(plan: Plan, base: float) -> dict[str, Any]:
    out = {}
    for name, factor, idle in plan.loads:
        fps = round(factor * base, 1)
        with_refit = run_line(plan, f"{name}-refit", fps, refit=True, idle=idle)
        w = with_refit["windows"]["during"]
        log(f"{name}: refit {with_refit['refit']['wall_s']:.0f} s under load; judged "
            f"{w['judged_fps']:.1f} frames/s during it")
        without = run_line(plan, f"{name}-none", fps, refit=False,
                           offsets=with_refit["offsets_s"])
        log(f"{name}: without a refit, judged {without['windows']['during']['judged_fps']:.1f} "
            "frames/s in the same interval")
        out[name] = {"factor": factor, "idle": idle, "refit": with_refit, "none": without}
    return out


# --------------------------------------------------------------------------------- main

def main() -> None:
    a = bench_args(__doc__)
    plan = QUICK if a.quick else FULL

    threads = role_threads(LineSettings(), "worker")  # the worker's share, for the bare rate
    set_threads(threads)
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)

    line = prepare(plan)
    shutil.rmtree(plan.work, ignore_errors=True)
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([shown(Path(sys.executable)), *map(shown_arg, sys.argv)]),
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in plan.__dict__.items()},
        "line": line, "worker_threads": threads,
    }
    res["refit"] = refit_series(plan)
    frames = decoded_frames(plan.data / "line.avi")
    log(f"bare model throughput: {len(frames)} frames at batch 8, {plan.bare_repeats} repeats")
    res["bare"] = bare_throughput(plan.data / "v1", frames, plan.bare_repeats)
    res["loads"] = line_series(plan, res["bare"]["images_per_s"]["median"])
    write_results(res, a.json)


if __name__ == "__main__":
    main()
