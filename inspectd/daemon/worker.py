"""The scoring worker: frames in, one verdict per frame out, micro-batched by SKU.

The worker holds two batches' worth of frames; the rest wait at acquisition, earliest
deadline first. It measures, per SKU, how long a batch of n frames takes (t(n) = a + b·n,
fitted to its recent batches), and before scoring a batch keeps the largest set of frames,
earliest deadline first, that the batch can still judge in time: a frame that cannot make
its deadline even alone is audited TIMEOUT unscored, and frames that would make the batch
too slow for the earlier ones wait for the next batch instead of being shed.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.errors import InspectdError
from inspectd.core.wire import (
    FRAME,
    STATUS,
    UNKNOWN_SKU,
    VERDICT,
    FrameHeader,
    ProtocolError,
    Status,
    Verdict,
    pixels_to_array,
    to_rgb8,
)
from inspectd.daemon.security import line_keys
from inspectd.daemon.transport import socket

log = structlog.get_logger("inspectd.worker")
STATUS_EVERY_S = 1.0
LOAD_RETRY_S = (2.0, 60.0)  # a SKU whose model fails to load: retry after 2 s, doubling to 60
LOAD_BEAT_S = 300.0  # a model load may take this long before the worker counts as hung


class ServiceTime:
    """How long scoring a batch of n frames of one SKU takes: t(n) = a + b·n, least squares
    over its last WINDOW batches (proportional, t = b·n, while every batch had the same n).
    Per SKU, so a slow model never makes a fast one shed."""

    WINDOW = 32

    def __init__(self) -> None:
        self._obs: deque[tuple[int, float]] = deque(maxlen=self.WINDOW)

    def add(self, n: int, seconds: float) -> None:
        if n > 0 and math.isfinite(seconds) and seconds >= 0:
            self._obs.append((n, seconds))

    def estimate(self, n: int) -> float | None:
        """Seconds for a batch of n, or None before the first batch."""
        if not self._obs:
            return None
        ns = [o[0] for o in self._obs]
        ts = [o[1] for o in self._obs]
        mean_n, mean_t = sum(ns) / len(ns), sum(ts) / len(ts)
        var = sum((x - mean_n) ** 2 for x in ns)
        if var == 0:
            return mean_t / mean_n * n
        b = sum((x - mean_n) * (t - mean_t) for x, t in zip(ns, ts, strict=True)) / var
        b = max(b, 0.0)
        a = max(mean_t - b * mean_n, 0.0)
        return a + b * n


@dataclass
class _Frame:
    header: FrameHeader
    pixels: zmq.Frame
    received: float  # time.time() when it left ZeroMQ


class NoModel(InspectdError):
    """The SKU has no model in the registry (no `current`)."""


class ModelUnavailable(InspectdError):
    """The SKU's current version cannot be loaded (a broken artifact, missing weights)."""


@dataclass
class _Failure:
    version: str
    reason: str
    retry_at: float  # monotonic
    delay: float


class ModelCache:
    """SKU → loaded detector for the version `current` points at; least recently used evicted.

    A SKU's first model loads in the foreground (there is nothing else to score with). A new
    version of a loaded SKU loads in a background thread while the old one keeps scoring;
    the swap happens between batches, so a batch is scored by one version and every verdict
    names the version that scored it. A version that fails to load is retried with backoff
    (LOAD_RETRY_S), and meanwhile that SKU's frames fail at once (ERROR) instead of each
    batch paying for another load: a broken artifact costs its own SKU only.
    """

    def __init__(self, models_dir: Path, size: int, device: str, precision: str,
                 heartbeat: Callable[[], None] = lambda: None) -> None:
        self.models_dir, self.size = models_dir, size
        self.device, self.precision = device, precision
        self.heartbeat = heartbeat
        self._cache: OrderedDict[str, tuple[str, object]] = OrderedDict()
        self._loading: dict[str, tuple[str, threading.Thread]] = {}
        self._loaded: dict[str, tuple[str, object]] = {}  # finished background loads
        self._failed: dict[str, _Failure] = {}  # sku → its version that failed to load
        self._lock = threading.Lock()

    def get(self, sku: str) -> tuple[str, object]:
        """(version, detector); re-resolves `current` each call so a promotion takes effect."""
        from inspectd.lifecycle.registry import current_version

        try:
            version, path = current_version(self.models_dir, sku)
        except InspectdError as e:
            raise NoModel(str(e)) from None
        with self._lock:
            done = self._loaded.pop(sku, None)
        if done is not None and done[0] == version:
            self._put(sku, done)
            log.info("model swapped in", sku=sku, version=version)
        hit = self._cache.get(sku)
        if hit is not None and hit[0] == version:
            self._cache.move_to_end(sku)
            return hit
        if hit is None:
            failed = self._failed.get(sku)
            if failed is not None and failed.version == version and \
                    time.monotonic() < failed.retry_at:
                raise ModelUnavailable(failed.reason)
            try:
                with _beating(self.heartbeat):  # loading and warming up is slow, not hung
                    entry = (version, self._load(sku, version, path))
            except Exception as e:
                raise ModelUnavailable(self._failure(sku, version, e)) from None
            self._failed.pop(sku, None)
            self._put(sku, entry)
            return entry
        self._load_in_background(sku, version, path)
        self._cache.move_to_end(sku)
        return hit

    def _put(self, sku: str, entry: tuple[str, object]) -> None:
        self._cache[sku] = entry
        self._cache.move_to_end(sku)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def _load(self, sku: str, version: str, path: Path) -> object:
        from inspectd.models.detector import load_detector

        det = load_detector(path, device=self.device, precision=self.precision)
        det.predict([np.zeros((64, 64, 3), np.uint8)], keep_image=False)
        log.info("model loaded", sku=sku, version=version, kind=det.kind,
                 bf16=det.runtime.bf16, device=str(det.runtime.device))
        return det

    def _load_in_background(self, sku: str, version: str, path: Path) -> None:
        busy = self._loading.get(sku)
        if busy is not None and busy[1].is_alive():
            return
        failed = self._failed.get(sku)
        if failed is not None and failed.version == version and \
                time.monotonic() < failed.retry_at:
            return  # a broken version: the old one keeps scoring; retry now and then

        def run() -> None:
            try:
                det = self._load(sku, version, path)
            except Exception as e:  # keep scoring with the loaded version
                log.error("new model version failed to load; keeping the old one", sku=sku,
                          version=version, error=str(e))
                self._failure(sku, version, e)
                return
            with self._lock:
                self._loaded[sku] = (version, det)

        t = threading.Thread(target=run, name=f"load-{sku}", daemon=True)
        self._loading[sku] = (version, t)
        log.info("loading new model version in the background", sku=sku, version=version)
        t.start()

    def _failure(self, sku: str, version: str, e: Exception) -> str:
        """Record a failed load; the next try waits twice as long as the last (capped)."""
        last = self._failed.get(sku)
        low, high = LOAD_RETRY_S
        delay = min(last.delay * 2, high) if last is not None and last.version == version \
            else low
        reason = f"model {sku} {version} cannot be loaded: {type(e).__name__}: {e}"
        self._failed[sku] = _Failure(version, reason, time.monotonic() + delay, delay)
        log.error("model failed to load", sku=sku, version=version, error=str(e),
                  retry_in_s=delay)
        return reason

    def versions(self) -> dict[str, str]:
        return {sku: v for sku, (v, _) in self._cache.items()}


@contextmanager
def _beating(heartbeat: Callable[[], None], every: float = 0.5,
             at_most: float = LOAD_BEAT_S) -> Iterator[None]:
    """Heartbeats while a model loads (slow, not hung) — for at most `at_most` seconds, so a
    load that hangs for good still ends in a restart by the watchdog."""
    done = threading.Event()

    def beat() -> None:
        end = time.monotonic() + at_most
        while not done.wait(every) and time.monotonic() < end:
            heartbeat()

    t = threading.Thread(target=beat, name="load-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        heartbeat()


class Worker:
    def __init__(self, settings: LineSettings, ctx: zmq.Context | None = None,
                 heartbeat: Callable[[], None] | None = None) -> None:
        self.s = settings
        w = settings.worker
        self.ctx = ctx or zmq.Context.instance()
        keys = line_keys(settings)
        # One socket per camera: each endpoint has its own security (ipc, or tcp + CURVE).
        self.frames = [socket(self.ctx, zmq.PULL, settings.frames_endpoint(c), bind=False,
                              hwm=w.max_batch, keys=keys) for c in settings.cameras]
        self.out = socket(self.ctx, zmq.DEALER, settings.sink_address(), bind=False,
                          hwm=10_000, keys=keys)
        self.heartbeat = heartbeat or (lambda: None)
        self.models = ModelCache(settings.models_dir, w.model_cache, w.device, w.precision,
                                 self.heartbeat)
        self.queue: deque[_Frame] = deque()
        self.service: dict[str, ServiceTime] = {}
        self.name = f"{settings.line}-{os.getpid()}"
        self._rng = random.Random()
        self._status_due = 0.0
        self._turn = 0
        self.unsent = 0  # verdicts and status the sink did not take

    def preload(self) -> None:
        """Load (and warm up) models before the line reports ready, so the first frames are not
        late: the cameras' fixed SKUs first, then other SKUs in the registry, as many as the
        cache holds. A SKU without a model is not fatal: its frames become ERROR verdicts."""
        fixed = [c.sku for c in self.s.cameras.values() if c.sku]
        known = sorted(p.parent.name for p in self.s.models_dir.glob("*/current"))
        for sku in list(dict.fromkeys(fixed + known))[: self.s.worker.model_cache]:
            try:
                self.models.get(sku)
            except InspectdError as e:
                log.warning("model not available", sku=sku, error=str(e))

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        for sock in self.frames:
            poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            self.heartbeat()
            self._status()
            self._receive()
            batch, wait = self._next_batch()
            if batch:
                self._score(batch)
            elif dict(poller.poll(100 if wait is None else max(1, int(wait * 1000)))):
                continue
        self.close()

    def close(self) -> None:
        for sock in self.frames:
            sock.close(0)
        self.out.close()

    def _status(self) -> None:
        """Queue depth and service times to the sink (metrics), about once a second."""
        now = time.monotonic()
        if now < self._status_due:
            return
        self._status_due = now + STATUS_EVERY_S
        n = self.s.worker.max_batch
        service = {sku: est * 1000 for sku, st in self.service.items()
                   if (est := st.estimate(n)) is not None}
        self._send_parts([STATUS, Status("worker", self.name, len(self.queue), service,
                                         self.unsent).encode()])

    # -- batching -------------------------------------------------------------------------
    def _receive(self) -> None:
        # Hold two batches: enough to group by SKU; the rest waits (bounded) at acquisition.
        # Cameras take turns, so a busy one cannot starve the others.
        idle = 0
        while len(self.queue) < 2 * self.s.worker.max_batch and idle < len(self.frames):
            sock = self.frames[self._turn % len(self.frames)]
            self._turn += 1
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                idle += 1
                continue
            idle = 0
            now = time.time()
            if len(parts) != 3 or parts[0].bytes != FRAME:
                log.warning("dropped malformed message", parts=len(parts))
                continue
            try:
                header = FrameHeader.decode(parts[1].bytes)
            except ProtocolError as e:
                # Without a header there is no frame id to judge; the sink still holds the
                # acquisition's announcement and will audit the frame as TIMEOUT.
                log.warning("unreadable frame header", error=str(e))
                continue
            self.queue.append(_Frame(header, parts[2], now))

    def _next_batch(self) -> tuple[list[_Frame], float | None]:
        """Frames of the oldest frame's SKU, once the batch is full or max_wait has passed;
        otherwise ([], seconds to wait)."""
        if not self.queue:
            return [], None
        w = self.s.worker
        head = self.queue[0]
        same = [f for f in self.queue if f.header.sku == head.header.sku][: w.max_batch]
        waited = time.time() - head.received
        if len(same) < w.max_batch and waited < w.max_wait_ms / 1000:
            return [], w.max_wait_ms / 1000 - waited
        ids = {id(f) for f in same}
        self.queue = deque(f for f in self.queue if id(f) not in ids)
        return self._plan(same), None

    def _plan(self, batch: list[_Frame]) -> list[_Frame]:
        """The frames this batch can judge in time, earliest deadline first. Frames that
        cannot make their deadline even alone are audited TIMEOUT unscored; frames that would
        make the batch too slow for an earlier deadline go back to the queue's head."""
        st = self.service.get(batch[0].header.sku)
        if st is None or st.estimate(1) is None:
            return batch  # not measured yet: score them all
        now = time.time()
        batch = sorted(batch, key=lambda f: f.header.deadline_ts)
        alone = st.estimate(1)
        keep: list[_Frame] = []
        later: list[_Frame] = []
        for f in batch:
            if now + alone > f.header.deadline_ts:
                self._send(Verdict.for_frame(
                    f.header, "TIMEOUT", f"would miss its deadline: "
                    f"{(f.header.deadline_ts - now) * 1000:.0f} ms left, scoring one frame "
                    f"of {f.header.sku} takes ~{alone * 1000:.0f} ms",
                    timings_ms=self._timings(f, now)))
            elif keep and now + st.estimate(len(keep) + 1) > keep[0].header.deadline_ts:
                later.append(f)  # would delay the earliest; the next batch takes it
            else:
                keep.append(f)
        self.queue.extendleft(reversed(later))
        return keep

    # -- scoring --------------------------------------------------------------------------
    def _score(self, batch: list[_Frame]) -> None:
        t_start = time.time()
        sku = batch[0].header.sku
        live: list[tuple[_Frame, np.ndarray, np.ndarray, float]] = []
        for f in batch:
            h = f.header
            if t_start > h.deadline_ts:
                self._send(Verdict.for_frame(
                    h, "TIMEOUT", f"deadline passed before scoring (queued "
                    f"{(t_start - h.capture_ts) * 1000:.0f} ms)",
                    timings_ms=self._timings(f, t_start)))
                continue
            t0 = time.perf_counter()
            try:
                raw = pixels_to_array(h, f.pixels.buffer)
                rgb = to_rgb8(raw, h.pixel_format)
            except ProtocolError as e:
                self._send(Verdict.for_frame(h, "ERROR", f"corrupt frame: {e}",
                                             timings_ms=self._timings(f, t_start)))
                continue
            live.append((f, raw, rgb, (time.perf_counter() - t0) * 1000))
        if not live:
            return
        try:
            version, det = self.models.get(sku)
        except (NoModel, ModelUnavailable) as e:
            # No model: the frames are kept for the SKU's first refit (UNKNOWN_SKU).
            reason = f"{UNKNOWN_SKU}: {e}" if isinstance(e, NoModel) else str(e)
            for f, raw, _, dec in live:
                self._send(Verdict.for_frame(f.header, "ERROR", reason,
                                             timings_ms=self._timings(f, t_start, dec)), raw)
            return
        domain = det.domain
        if domain is not None:  # a frame unlike the training images gets no score
            inside = []
            for item in live:
                f, raw, _, dec = item
                problem = domain.problem(raw)
                if problem is None:
                    inside.append(item)
                else:
                    self._send(Verdict.for_frame(f.header, "ERROR", problem,
                                                 model_version=version,
                                                 timings_ms=self._timings(f, t_start, dec)), raw)
            live = inside
            if not live:
                return
        t0 = time.perf_counter()
        try:
            preds = det.predict([rgb for _, _, rgb, _ in live], keep_image=False)
        except Exception as e:  # a model failure must still give every frame a verdict
            log.exception("model failure", sku=sku, version=version)
            for f, raw, _, dec in live:
                self._send(Verdict.for_frame(
                    f.header, "ERROR", f"model failure: {type(e).__name__}: {e}",
                    model_version=version, timings_ms=self._timings(f, t_start, dec)), raw)
            return
        infer_ms = (time.perf_counter() - t0) * 1000
        done = time.time()
        self.service.setdefault(sku, ServiceTime()).add(len(live), done - t_start)
        for (f, raw, _, dec), p in zip(live, preds, strict=True):
            h = f.header
            kind, reason = p.verdict, None
            if not math.isfinite(p.score):  # never OK by accident: NaN < threshold is False
                kind, reason = "ERROR", f"model failure: non-finite score {p.score}"
            elif done > h.deadline_ts:
                kind, reason = "TIMEOUT", f"scored {(done - h.deadline_ts) * 1000:.0f} ms " \
                    f"after the deadline (would have been {p.verdict})"
            v = Verdict.for_frame(
                h, kind, reason, score=p.score if math.isfinite(p.score) else None,
                threshold=p.threshold,
                pixel_threshold=p.pixel_threshold, model_version=version,
                image_sha256=hashlib.sha256(raw.data).hexdigest(),
                timings_ms=self._timings(f, t_start, dec, infer_ms))
            attach = kind != "OK" or self._sample_ok()
            self._send(v, raw if attach else None, p.anomaly_map if kind != "OK" else None)

    def _sample_ok(self) -> bool:
        """One OK frame in `attach_ok_every` on average, at random: every Nth could always
        take the same nest of a periodic fixture, and refit would learn a biased sample."""
        every = self.s.worker.attach_ok_every
        return bool(every) and self._rng.random() < 1.0 / every

    @staticmethod
    def _timings(f: _Frame, t_start: float, decode_ms: float = 0.0,
                 infer_ms: float = 0.0) -> dict[str, float]:
        return {"queue": (t_start - f.header.capture_ts) * 1000, "decode": decode_ms,
                "infer": infer_ms, "total": (time.time() - f.header.capture_ts) * 1000}

    def _send(self, v: Verdict, pixels: np.ndarray | None = None,
              amap: np.ndarray | None = None) -> None:
        parts: list[bytes | memoryview] = [VERDICT, v.encode()]
        if pixels is not None:
            parts.append(np.ascontiguousarray(pixels).data)
            if amap is not None:
                parts.append(np.ascontiguousarray(amap, dtype=np.float16).data)
        if not self._send_parts(parts):
            log.error("sink not accepting verdicts; the sink audits the frame TIMEOUT",
                      frame_id=v.frame_id, verdict=v.verdict)

    def _send_parts(self, parts: list[bytes | memoryview]) -> bool:
        """Never blocks: a hung sink must not stall scoring (its successor replays the
        journal and audits what it never got as TIMEOUT)."""
        try:
            self.out.send_multipart(parts, zmq.NOBLOCK)  # copies: nothing is reused after
            return True
        except zmq.Again:
            self.unsent += 1
            return False
