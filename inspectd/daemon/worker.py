"""The scoring worker: frames in, one verdict per frame out, micro-batched by SKU.

Frames stay in ZeroMQ's bounded queue until the worker has room (`worker.queue`), so an
overloaded worker pushes back on acquisition (which then audits the frame it cannot hand on)
instead of growing memory. A frame whose deadline has passed before scoring is not scored.
"""

from __future__ import annotations

import hashlib
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
    UNKNOWN_SKU,
    VERDICT,
    FrameHeader,
    ProtocolError,
    Verdict,
    pixels_to_array,
    to_rgb8,
)
from inspectd.daemon.transport import socket

log = structlog.get_logger("inspectd.worker")


@dataclass
class _Frame:
    header: FrameHeader
    pixels: zmq.Frame
    received: float  # time.time() when it left ZeroMQ


class ModelCache:
    """SKU → loaded detector for the version `current` points at; least recently used evicted.

    A SKU's first model loads in the foreground (there is nothing else to score with). A new
    version of a loaded SKU loads in a background thread while the old one keeps scoring;
    the swap happens between batches, so a batch is scored by one version and every verdict
    names the version that scored it.
    """

    def __init__(self, models_dir: Path, size: int, device: str, precision: str,
                 heartbeat: Callable[[], None] = lambda: None) -> None:
        self.models_dir, self.size = models_dir, size
        self.device, self.precision = device, precision
        self.heartbeat = heartbeat
        self._cache: OrderedDict[str, tuple[str, object]] = OrderedDict()
        self._loading: dict[str, tuple[str, threading.Thread]] = {}
        self._loaded: dict[str, tuple[str, object]] = {}  # finished background loads
        self._failed: dict[str, tuple[str, float]] = {}  # sku → (version, when), for backoff
        self._lock = threading.Lock()

    def get(self, sku: str) -> tuple[str, object]:
        """(version, detector); re-resolves `current` each call so a promotion takes effect."""
        from inspectd.lifecycle.registry import current_version

        version, path = current_version(self.models_dir, sku)
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
            with _beating(self.heartbeat):  # loading and warming up is slow, not hung
                entry = (version, self._load(sku, version, path))
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
        if failed is not None and failed[0] == version and time.monotonic() - failed[1] < 30:
            return  # a broken version: the old one keeps scoring; retry now and then

        def run() -> None:
            try:
                det = self._load(sku, version, path)
            except Exception as e:  # keep scoring with the loaded version
                log.error("new model version failed to load; keeping the old one", sku=sku,
                          version=version, error=str(e))
                self._failed[sku] = (version, time.monotonic())
                return
            with self._lock:
                self._loaded[sku] = (version, det)

        t = threading.Thread(target=run, name=f"load-{sku}", daemon=True)
        self._loading[sku] = (version, t)
        log.info("loading new model version in the background", sku=sku, version=version)
        t.start()

    def versions(self) -> dict[str, str]:
        return {sku: v for sku, (v, _) in self._cache.items()}


@contextmanager
def _beating(heartbeat: Callable[[], None], every: float = 0.5) -> Iterator[None]:
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
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
        endpoints = [settings.frames_endpoint(c) for c in settings.cameras]
        self.frames = socket(self.ctx, zmq.PULL, endpoints, bind=False, hwm=w.max_batch)
        self.out = socket(self.ctx, zmq.PUSH, settings.sink_address(), bind=False, hwm=10_000,
                          send_timeout_ms=5000)
        self.heartbeat = heartbeat or (lambda: None)
        self.models = ModelCache(settings.models_dir, w.model_cache, w.device, w.precision,
                                 self.heartbeat)
        self.queue: deque[_Frame] = deque()
        self._ms_per_image: float | None = None  # moving average of inference time
        self._ok_seen = 0

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
        poller.register(self.frames, zmq.POLLIN)
        while not stop.is_set():
            self.heartbeat()
            self._receive()
            batch, wait = self._next_batch()
            if batch:
                self._score(batch)
            elif dict(poller.poll(100 if wait is None else max(1, int(wait * 1000)))):
                continue
        self.close()

    def close(self) -> None:
        self.frames.close(0)
        self.out.close()

    # -- batching -------------------------------------------------------------------------
    def _receive(self) -> None:
        # Hold two batches: enough to group by SKU; the rest waits (bounded) at acquisition.
        while len(self.queue) < 2 * self.s.worker.max_batch:
            try:
                parts = self.frames.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
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
        return same, None

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
        live = self._shed_hopeless(live, t_start)
        if not live:
            return
        try:
            version, det = self.models.get(sku)
        except InspectdError as e:
            for f, raw, _, dec in live:
                self._send(Verdict.for_frame(f.header, "ERROR", f"{UNKNOWN_SKU}: {e}",
                                             timings_ms=self._timings(f, t_start, dec)),
                           raw)
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
        per_image = infer_ms / len(live)
        self._ms_per_image = per_image if self._ms_per_image is None else (
            0.8 * self._ms_per_image + 0.2 * per_image)
        done = time.time()
        for (f, raw, _, dec), p in zip(live, preds, strict=True):
            h = f.header
            kind, reason = p.verdict, None
            if done > h.deadline_ts:
                kind, reason = "TIMEOUT", f"scored {(done - h.deadline_ts) * 1000:.0f} ms " \
                    f"after the deadline (would have been {p.verdict})"
            v = Verdict.for_frame(
                h, kind, reason, score=p.score, threshold=p.threshold,
                pixel_threshold=p.pixel_threshold, model_version=version,
                image_sha256=hashlib.sha256(raw.data).hexdigest(),
                timings_ms=self._timings(f, t_start, dec, infer_ms))
            attach = kind != "OK" or self._sample_ok()
            self._send(v, raw if attach else None, p.anomaly_map if kind != "OK" else None)

    def _shed_hopeless(self, live: list, t_start: float) -> list:
        """Under overload, inference spent on a frame that will miss its deadline anyway is
        taken from frames that could still make theirs: judge those TIMEOUT unscored."""
        if self._ms_per_image is None:
            return live
        expected = self._ms_per_image * len(live) / 1000
        keep = []
        for item in live:
            f, _, _, dec = item
            if t_start + expected > f.header.deadline_ts:
                self._send(Verdict.for_frame(
                    f.header, "TIMEOUT", f"would miss its deadline (queued "
                    f"{(t_start - f.header.capture_ts) * 1000:.0f} ms, scoring takes "
                    f"~{expected * 1000:.0f} ms)", timings_ms=self._timings(f, t_start, dec)))
            else:
                keep.append(item)
        return keep

    def _sample_ok(self) -> bool:
        every = self.s.worker.attach_ok_every
        if not every:
            return False
        self._ok_seen += 1
        return self._ok_seen % every == 0

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
        try:
            self.out.send_multipart(parts)  # copies: the buffers are reused by nobody after
        except zmq.Again:
            log.error("sink not accepting verdicts; frame will be audited as TIMEOUT",
                      frame_id=v.frame_id, verdict=v.verdict)
