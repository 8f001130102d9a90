"""The acquisition role: one camera's frames onto the line, each announced to the sink first.

The announcement lets the sink audit a frame as TIMEOUT when no verdict arrives by its
deadline (worker dead, frame lost). A frame that cannot be handed to a worker at once (no
worker connected, worker queue full) is not buffered: it is audited as TIMEOUT right away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import (
    ANNOUNCE,
    FRAME,
    VERDICT,
    FrameHeader,
    ProtocolError,
    Verdict,
    new_frame_id,
    valid_name,
)
from inspectd.daemon.sources import Capture, open_source
from inspectd.daemon.transport import TransportError, socket

log = structlog.get_logger("inspectd.acquire")
WORKER_WAIT_S = 30.0


class Acquirer:
    def __init__(self, settings: LineSettings, camera: str,
                 ctx: zmq.Context | None = None) -> None:
        self.s, self.camera, self.cfg = settings, camera, settings.cameras[camera]
        self.ctx = ctx or zmq.Context.instance()
        # Up to `worker.queue` frames wait here for a worker (a burst of files, a busy
        # worker); past that the line is overloaded and a frame is audited as a reject at
        # once, instead of queueing for longer than its deadline.
        hwm = settings.worker.queue
        self.frames = socket(self.ctx, zmq.PUSH, settings.frames_endpoint(camera), bind=True,
                             hwm=hwm, linger_ms=0)
        self.sink = socket(self.ctx, zmq.PUSH, settings.sink_address(), bind=False,
                           hwm=10_000, send_timeout_ms=5000)
        self.sent = self.shed = self.errors = 0

    def run(self, stop: threading.Event, ready: Callable[[], None] = lambda: None) -> None:
        source = open_source(self.camera, self.cfg)
        self.wait_for_worker(stop)
        ready()
        try:
            for cap in source.frames(stop):
                self.handle(cap)
                if stop.is_set():
                    break
        finally:
            source.close()
            self.close()

    def wait_for_worker(self, stop: threading.Event, timeout: float = WORKER_WAIT_S) -> bool:
        """Before the first frame, wait until a worker has connected: workers connect to this
        camera's endpoint only once it is bound, and a frame sent before that is shed."""
        mon = self.frames.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            end = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < end:
                if mon.poll(100):
                    return True
        finally:
            self.frames.disable_monitor()
            mon.close(0)
        log.warning("no worker connected; frames are audited as TIMEOUT until one does",
                    camera=self.camera, waited_s=timeout)
        return False

    def close(self) -> None:
        self.frames.close()
        self.sink.close()

    def handle(self, cap: Capture) -> str:
        """Send one capture on; returns what happened: sent, shed or error."""
        fid = new_frame_id()
        deadline = cap.capture_ts + self.cfg.deadline_ms / 1000
        sku = cap.sku or self.cfg.sku or ""
        image = cap.image
        reason = cap.error
        if reason is None:
            try:
                valid_name(sku, "sku")
            except ProtocolError as e:
                reason = str(e)
        if reason is None and (image is None or image.dtype not in (np.uint8, np.uint16)):
            reason = "frame without uint8/uint16 pixels"
        if reason is not None:
            self._verdict(Verdict(frame_id=fid, verdict="ERROR", camera=self.camera, sku=sku,
                                  line=self.s.line, part_id=cap.part_id, origin=cap.origin,
                                  capture_ts=cap.capture_ts, deadline_ts=deadline,
                                  reason=reason))
            self.errors += 1
            outcome = "error"
        else:
            image = np.ascontiguousarray(image)
            h = FrameHeader(fid, self.camera, sku, cap.capture_ts, deadline, image.shape,
                            str(image.dtype), cap.pixel_format, cap.part_id, self.s.line,
                            cap.origin)
            head = h.encode()
            self._to_sink([ANNOUNCE, head])
            try:
                # copy=False: ZeroMQ sends from this array, which is this frame's own buffer.
                self.frames.send_multipart([FRAME, head, image], flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
                outcome = "sent"
            except zmq.Again:
                self._verdict(Verdict.for_frame(
                    h, "TIMEOUT", "overload: no worker ready to take the frame"))
                self.shed += 1
                outcome = "shed"
        if cap.done is not None:
            cap.done()
        return outcome

    def _verdict(self, v: Verdict) -> None:
        self._to_sink([VERDICT, v.encode()])

    def _to_sink(self, parts: list[bytes]) -> None:
        try:
            self.sink.send_multipart(parts)
        except zmq.Again:
            raise TransportError(
                f"{self.s.sink_address()}: sink not accepting messages for 5 s"
            ) from None

