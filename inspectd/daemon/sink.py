"""The sink: the only writer of the audit log, and the place where every frame is judged once.

It receives announcements (from acquisition) and verdicts (from workers, or from acquisition
for frames that never reached a worker) on one PULL socket. Each announced frame is tracked
against its deadline: no verdict by deadline + grace means TIMEOUT. The first verdict for a
frame id wins; a later one (a worker finishing after the TIMEOUT) is counted as late and
ignored, so every frame gets exactly one audited verdict. What the sink takes on goes to its
journal first (`storage.journal`), so a restarted sink finishes what a dead one left.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import (
    ANNOUNCE,
    UNKNOWN_SKU,
    VERDICT,
    FrameHeader,
    ProtocolError,
    Verdict,
    pixels_to_array,
    to_rgb8,
)
from inspectd.daemon.events import EventPublisher
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.plc import VerdictOutput, open_output
from inspectd.daemon.transport import socket
from inspectd.storage.audit import AuditLog
from inspectd.storage.images import ImageStore
from inspectd.storage.journal import Journal

log = structlog.get_logger("inspectd.sink")


@dataclass
class SinkCounts:
    """Live figures for STATUS and the supervisor."""

    frames: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OK", "NG", "ERROR", "TIMEOUT"), 0))
    late: int = 0
    pending: int = 0

    def summary(self) -> str:
        ok = self.by_verdict["OK"] / self.frames * 100 if self.frames else 0.0
        return (f"frames {self.frames}, ok {ok:.1f}%, ng {self.by_verdict['NG']}, "
                f"error {self.by_verdict['ERROR']}, timeout {self.by_verdict['TIMEOUT']}, "
                f"pending {self.pending}")


class Sink:
    def __init__(self, settings: LineSettings, ctx: zmq.Context | None = None,
                 output: VerdictOutput | None = None, metrics: Metrics | None = None,
                 heartbeat: Callable[[], None] | None = None) -> None:
        self.s = settings
        self.ctx = ctx or zmq.Context.instance()
        self.inbox = socket(self.ctx, zmq.PULL, settings.sink_address(), bind=True, hwm=100_000)
        db = settings.sink.database
        self.audit = AuditLog(settings.database_url(), settings.spool_dir, db.commit_rows,
                              db.commit_interval_ms / 1000, db.retry_s)
        self.images = ImageStore(settings.images_dir, settings.sink.images)
        self.output = output or open_output(settings.plc)
        self.events = EventPublisher(settings.events_address(), settings.line,
                                     settings.events.mqtt, self.ctx)
        self.metrics = metrics or Metrics()
        self.heartbeat = heartbeat or (lambda: None)
        self.counts = SinkCounts()
        self._pending: dict[str, FrameHeader] = {}
        self._deadlines: list[tuple[float, str]] = []
        # Frame ids already judged, to ignore late or repeated messages (bounded).
        self._judged: OrderedDict[str, None] = OrderedDict()
        self._judged_max = 4 * settings.sink.max_pending
        self.journal = Journal(settings.journal_dir)
        self._recover()

    def _recover(self) -> None:
        """Finish what a sink that died left: its judged rows go to the audit log (again: the
        insert ignores rows already there; the PLC and subscribers had them), its announced
        frames without a verdict are tracked again. One whose deadline passed while no sink
        ran is audited TIMEOUT without a PLC output: the part is long gone."""
        rec = self.journal.recover()
        if not rec.segments:
            return
        for v, paths in rec.rows:
            self._remember(v.frame_id)
            self.audit.record(v, paths)
        self.journal.recovered(self.audit.rows_recorded)
        expired = 0
        now = time.time()
        for h in rec.pending:
            if h.deadline_ts + self.s.sink.timeout_grace_ms / 1000 < now:
                expired += 1
                self._judge(Verdict.for_frame(
                    h, "TIMEOUT", "no verdict by the deadline (the sink restarted)"), plc=False)
            else:
                self._track(h)
        log.warning("sink journal replayed", why="a previous sink stopped without finishing",
                    rows=len(rec.rows), pending=len(rec.pending) - expired, expired=expired,
                    segments=rec.segments)

    def run(self, stop: threading.Event, drain_s: float | None = None) -> None:
        """Serve until `stop`; then wait up to drain_s for pending verdicts, and audit what is
        still pending as TIMEOUT (shutdown) before closing."""
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        try:
            while not stop.is_set():
                self.step(poller, 50)
            drain_s = self.s.supervisor.drain_s if drain_s is None else drain_s
            end = time.monotonic() + drain_s
            while self._pending and time.monotonic() < end:
                self.step(poller, 20)
            for fid in list(self._pending):
                self._judge(Verdict.for_frame(self._pending[fid], "TIMEOUT",
                                              "daemon stopped before a verdict arrived"))
        finally:
            self.close()

    def step(self, poller: zmq.Poller, timeout_ms: int) -> None:
        self.heartbeat()
        if dict(poller.poll(timeout_ms)):
            for _ in range(1000):  # bounded burst, so deadlines and commits keep their pace
                try:
                    parts = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._dispatch(parts)
        self._expire(time.time())
        self.audit.poll()
        self.journal.collect(self.audit.rows_durable)
        self.output.tick()
        self.counts.pending = len(self._pending)
        self.metrics.set_pending(len(self._pending))
        self.metrics.set_plc_up(self.output.healthy)
        self.metrics.set_db_up(self.audit.db_up)
        self.metrics.set_spool_rows(self.audit.spool_backlog)

    def close(self) -> None:
        self.audit.close()
        # Clean: nothing pending and every row durable, so no later sink has to replay.
        self.journal.close(not self._pending
                           and self.audit.rows_durable == self.audit.rows_recorded)
        self.output.close()
        self.events.close()
        self.inbox.close(0)

    # -- messages -------------------------------------------------------------------------
    def _dispatch(self, parts: list[zmq.Frame]) -> None:
        kind = parts[0].bytes if parts else b""
        try:
            if kind == ANNOUNCE and len(parts) == 2:
                self._announce(FrameHeader.decode(parts[1].bytes))
            elif kind == VERDICT and 2 <= len(parts) <= 4:
                v = Verdict.decode(parts[1].bytes)
                self._judge(v, *(p.buffer for p in parts[2:]))
            else:
                raise ProtocolError(f"unknown message {kind[:16]!r} with {len(parts)} parts")
        except ProtocolError as e:
            self.metrics.dropped("malformed message")
            log.error("malformed message on the sink socket", error=str(e))

    def _announce(self, h: FrameHeader) -> None:
        if h.frame_id in self._judged or h.frame_id in self._pending:
            return  # its verdict overtook the announcement
        if len(self._pending) >= self.s.sink.max_pending:
            self._judge(Verdict.for_frame(h, "TIMEOUT", "overload: sink tracking limit"))
            return
        self.journal.announce(h)
        self._track(h)

    def _track(self, h: FrameHeader) -> None:
        self._pending[h.frame_id] = h
        heapq.heappush(self._deadlines, (h.deadline_ts, h.frame_id))

    def _expire(self, now: float) -> None:
        grace = self.s.sink.timeout_grace_ms / 1000
        while self._deadlines and self._deadlines[0][0] + grace < now:
            _, fid = heapq.heappop(self._deadlines)
            h = self._pending.get(fid)
            if h is not None:
                self._judge(Verdict.for_frame(
                    h, "TIMEOUT", "no verdict by the deadline (worker dead, hung or overloaded)"))

    def _judge(self, v: Verdict, pixels: memoryview | None = None,
               amap: memoryview | None = None, plc: bool = True) -> None:
        if v.frame_id in self._judged:
            self.counts.late += 1
            self.metrics.late()
            log.info("late verdict ignored", frame_id=v.frame_id, verdict=v.verdict)
            return
        self._pending.pop(v.frame_id, None)
        self._remember(v.frame_id)
        self.journal.judged(v)
        if plc:
            self.output.send(v)
        paths = self._save_images(v, pixels, amap)
        self.journal.recorded(v.frame_id, paths, self.audit.record(v, paths))
        self.events.publish(v, paths)
        self.counts.frames += 1
        self.counts.by_verdict[v.verdict] += 1
        self.metrics.observe_verdict(v, time.time() - v.capture_ts if v.capture_ts else None)
        if v.model_version:
            self.metrics.set_model(v.sku, v.model_version)

    def _remember(self, frame_id: str) -> None:
        self._judged[frame_id] = None
        if len(self._judged) > self._judged_max:
            self._judged.popitem(last=False)

    def _save_images(self, v: Verdict, pixels: memoryview | None,
                     amap: memoryview | None) -> dict[str, str] | None:
        if pixels is None:
            return None
        try:
            rgb = to_rgb8(pixels_to_array(v, pixels), v.pixel_format or "rgb8")
            heat = None
            if amap is not None:
                heat = np.frombuffer(amap, np.float16).reshape(rgb.shape[:2]).astype(np.float32)
            if v.verdict == "OK":
                path = self.images.save_ok(v, rgb)
                return {"image": path} if path else None
            if v.verdict == "ERROR" and (v.reason or "").startswith(UNKNOWN_SKU):
                path = self.images.save_unjudged(v, rgb)
                return {"image": path} if path else None
            if v.verdict == "ERROR":
                return self.images.save_error(v, rgb)
            return self.images.save_ng(v, rgb, heat)
        except (ProtocolError, ValueError, OSError) as e:
            log.error("could not save frame images", frame_id=v.frame_id, error=str(e))
            return None
