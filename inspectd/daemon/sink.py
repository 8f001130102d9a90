"""The sink: the only writer of the audit log, and the place where every frame is judged once.

One ROUTER socket takes announcements and acquisition's own verdicts (from each camera's
acquisition), and verdicts and status (from workers). An announcement is journaled
(`storage.journal`) before the sink acknowledges it, and acquisition hands a frame to a
worker only after that, so a sink that hangs or dies loses no frame: its successor replays
the journal, and acquisition re-sends what was never acknowledged. Each announced frame is
tracked against its deadline: no verdict by deadline + grace means TIMEOUT. The first
verdict for a frame id wins; a later one is counted as late and ignored, so every frame gets
exactly one audited verdict. A worker's verdict for a frame never announced is refused (a
forged or stray message must not pass a part), and the audit row takes the frame's camera,
SKU, part and times from the announcement, not from the worker. Acquisition learns each of
its frames' outcome in the acknowledgements (a folder source moves the file accordingly).

Every message is decoded into validated types; one that is malformed, or that fails for any
other reason, is counted, logged and dropped: never a crash, never a row.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import structlog
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import (
    ACK,
    ANNOUNCE,
    JUDGED,
    STATUS,
    UNKNOWN_SKU,
    VERDICT,
    Ack,
    FrameHeader,
    ProtocolError,
    Status,
    Verdict,
    pixels_to_array,
    to_rgb8,
)
from inspectd.daemon.events import EventPublisher
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.plc import VerdictOutput, open_output
from inspectd.daemon.security import line_keys
from inspectd.daemon.transport import socket
from inspectd.storage.audit import AuditLog
from inspectd.storage.images import ImageStore
from inspectd.storage.journal import Journal

log = structlog.get_logger("inspectd.sink")
REASON_KEPT = 120  # characters of a judged frame's reason kept for answering a repeat
REPORT_EVERY_S = 0.1


@dataclass
class SinkCounts:
    """Live figures for STATUS and the supervisor."""

    frames: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OK", "NG", "ERROR", "TIMEOUT"), 0))
    late: int = 0
    refused: int = 0  # verdicts for frames never announced, malformed messages
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
        keys = line_keys(settings)
        self.inbox = socket(self.ctx, zmq.ROUTER, settings.sink_address(), bind=True,
                            hwm=100_000, keys=keys)
        db = settings.sink.database
        self.audit = AuditLog(settings.database_url(), settings.spool_dir, db.commit_rows,
                              db.commit_interval_ms / 1000, db.retry_s, db.max_spool_bytes,
                              db.max_memory_rows)
        self.images = ImageStore(settings.images_dir, settings.sink.images)
        self.output = output or open_output(settings.plc)
        self.events = EventPublisher(settings.events_address(), settings.line,
                                     settings.events.mqtt, self.ctx, keys)
        self.metrics = metrics or Metrics()
        self.heartbeat = heartbeat or (lambda: None)
        self.counts = SinkCounts()
        self._report_due = 0.0
        self._events_dropped = 0  # exported so far
        self._unsent: dict[tuple[str, str], int] = {}  # per role, what it reported
        self._pending: dict[str, FrameHeader] = {}
        self._deadlines: list[tuple[float, str]] = []
        # Frame ids already judged → (verdict, reason), to ignore late or repeated messages
        # and to answer a re-sent announcement (bounded).
        self._judged: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._judged_max = 4 * settings.sink.max_pending
        self._owner: dict[str, bytes] = {}  # pending frame id → its acquisition's identity
        self._acks: defaultdict[bytes, Ack] = defaultdict(Ack)  # to send at the end of a step
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
            self._remember(v)
            self.audit.record(v, paths)
        self.journal.recovered(self.audit.rows_recorded)
        expired = 0
        now = time.time()
        for h in rec.pending:
            if h.deadline_ts + self.s.sink.timeout_grace_ms / 1000 < now:
                expired += 1
                # Offered to the PLC as of its deadline: the output's maximum age drops it
                # (counted) once its part has gone on, so a late reject never hits another
                # part; with no maximum age the PLC gets it, with its part id.
                self._judge(Verdict.for_frame(
                    h, "TIMEOUT", "no verdict by the deadline (the sink restarted)"),
                    plc_as_of=h.deadline_ts)
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
            self._send_acks()
        finally:
            self.close()

    def step(self, poller: zmq.Poller, timeout_ms: int) -> None:
        self.heartbeat()
        if dict(poller.poll(timeout_ms)):
            for _ in range(1000):  # bounded burst, so deadlines and commits keep their pace
                if not self.inbox.get(zmq.EVENTS) & zmq.POLLIN:
                    break  # cheaper than the zmq.Again a read of an empty socket raises
                try:
                    parts = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._dispatch(parts)
        self._expire(time.time())
        self._send_acks()
        self.audit.poll()
        self.journal.collect(self.audit.rows_durable)
        self.output.tick()
        now = time.monotonic()
        if now >= self._report_due:
            self._report_due = now + REPORT_EVERY_S
            self.report()

    def report(self) -> None:
        """Live figures to the metrics and the supervisor's counts (at most every
        REPORT_EVERY_S from `step`: the sink wakes for every message, and setting a dozen
        gauges each time was a fifth of its per-frame CPU at a 70 frames/s overload)."""
        for reason, n in self.output.take_drops().items():
            self.metrics.dropped(reason, n)
        if self.events.dropped > self._events_dropped:
            self.metrics.dropped("event", self.events.dropped - self._events_dropped)
            self._events_dropped = self.events.dropped
        self.counts.pending = len(self._pending)
        self.metrics.set_pending(len(self._pending))
        self.metrics.set_plc_up(self.output.healthy)
        self.metrics.set_db_up(self.audit.db_up)
        self.metrics.set_spool_rows(self.audit.spool_backlog)
        self.metrics.set_spool_bytes(self.audit.spool.bytes, self.audit.spool.over_limit)
        self.metrics.set_audit_memory(self.audit.memory_rows, self.audit.rows_lost)
        self.metrics.set_disk(self.images.guard.poll(), self.images.guard.free_bytes)
        for reason, n in self.images.take_skipped().items():
            self.metrics.dropped(reason, n)

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
        """One message from the ROUTER: [sender identity, kind, payload...]."""
        sender = parts[0].bytes if parts else b""
        kind = parts[1].bytes if len(parts) > 1 else b""
        n = len(parts) - 1
        try:
            if kind == ANNOUNCE and n == 2:
                self._announce(FrameHeader.decode(parts[2].bytes), sender)
            elif kind == JUDGED and n == 2:
                self._own_verdict(Verdict.decode(parts[2].bytes), sender)
            elif kind == VERDICT and 2 <= n <= 4:
                self._worker_verdict(Verdict.decode(parts[2].bytes),
                                     *(p.buffer for p in parts[3:]))
            elif kind == STATUS and n == 2:
                self._status(Status.decode(parts[2].bytes))
            else:
                raise ProtocolError(f"unknown message {kind[:16]!r} with {n} parts")
        except ProtocolError as e:
            self._refuse("malformed message", error=str(e))
        except Exception as e:  # a message must never stop the sink: it is dropped, loudly
            log.exception("message failed; dropped", kind=kind[:16])
            self._refuse("failed message", error=f"{type(e).__name__}: {e}")

    def _status(self, st: Status) -> None:
        if st.role == "worker":
            self.metrics.set_worker_queue(st.name, st.queue)
        else:
            self.metrics.set_held(st.name, st.queue)
        key = (st.role, st.name)
        sent_before = self._unsent.get(key, 0)
        if st.unsent > sent_before:
            self.metrics.dropped(f"{st.role} message not sent", st.unsent - sent_before)
        self._unsent[key] = st.unsent

    def _refuse(self, reason: str, **fields: object) -> None:
        self.counts.refused += 1
        self.metrics.dropped(reason)
        log.error(f"{reason} on the sink socket, dropped", **fields)

    def _announce(self, h: FrameHeader, sender: bytes) -> None:
        fid = h.frame_id
        if fid in self._judged:  # re-sent, or a file announced again after a restart
            self._acks[sender].judged[fid] = self._judged[fid]
            return
        if fid not in self._pending:
            if len(self._pending) >= self.s.sink.max_pending:
                self._owner[fid] = sender
                self._judge(Verdict.for_frame(h, "TIMEOUT", "overload: sink tracking limit"))
                return
            self.journal.announce(h)
            self._track(h)
        self._owner[fid] = sender
        self._acks[sender].held.append(fid)

    def _own_verdict(self, v: Verdict, sender: bytes) -> None:
        """Acquisition's verdict on a frame it never handed to a worker (unreadable, shed).
        Only ERROR or TIMEOUT: acquisition never judges a part good or bad, so an OK or NG
        here is forged (or a bug) and refused — it can never pass a part."""
        fid = v.frame_id
        if v.verdict not in ("ERROR", "TIMEOUT"):
            self._refuse("acquisition verdict that is not ERROR or TIMEOUT", frame_id=fid,
                         verdict=v.verdict)
            return
        if fid not in self._judged:
            h = self._pending.get(fid)
            if h is not None:  # announced earlier: the announcement's fields stand
                v = _from_announcement(v, h)
            self._owner[fid] = sender
            self._judge(v)
        else:
            self._acks[sender].judged[fid] = self._judged[fid]

    def _worker_verdict(self, v: Verdict, pixels: memoryview | None = None,
                        amap: memoryview | None = None) -> None:
        h = self._pending.get(v.frame_id)
        if h is not None:
            self._judge(_from_announcement(v, h), pixels, amap)
        elif v.frame_id in self._judged:
            self.counts.late += 1
            self.metrics.late()
            log.info("late verdict ignored", frame_id=v.frame_id, verdict=v.verdict)
        else:
            self._refuse("verdict for a frame never announced", frame_id=v.frame_id,
                         verdict=v.verdict)

    def _send_acks(self) -> None:
        for sender, ack in self._acks.items():
            try:
                self.inbox.send_multipart([sender, ACK, ack.encode()], zmq.NOBLOCK)
            except zmq.ZMQError:  # gone or not reading: it re-sends what stays unacknowledged
                pass
        self._acks.clear()

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
               amap: memoryview | None = None, plc_as_of: float | None = None) -> None:
        if v.frame_id in self._judged:
            self.counts.late += 1
            self.metrics.late()
            log.info("late verdict ignored", frame_id=v.frame_id, verdict=v.verdict)
            return
        self._pending.pop(v.frame_id, None)
        self._remember(v)
        owner = self._owner.pop(v.frame_id, None)
        if owner is not None:
            self._acks[owner].judged[v.frame_id] = (v.verdict, v.reason)
        self.journal.judged(v)
        self.output.send(v if plc_as_of is None else replace(v, decided_ts=plc_as_of))
        paths = self._save_images(v, pixels, amap)
        self.journal.recorded(v.frame_id, paths, self.audit.record(v, paths))
        self.events.publish(v, paths)
        self.counts.frames += 1
        self.counts.by_verdict[v.verdict] += 1
        self.metrics.observe_verdict(v, time.time() - v.capture_ts if v.capture_ts else None)
        if v.model_version:
            self.metrics.set_model(v.sku, v.model_version)

    def _remember(self, v: Verdict) -> None:
        # The reason, shortened: 400k remembered frames must stay a few tens of MB.
        self._judged[v.frame_id] = (v.verdict, v.reason[:REASON_KEPT] if v.reason else None)
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


def _from_announcement(v: Verdict, h: FrameHeader) -> Verdict:
    """The judgement from `v`; where, what and when from the frame's announcement."""
    return replace(v, camera=h.camera, sku=h.sku, line=h.line, part_id=h.part_id,
                   origin=h.origin, capture_ts=h.capture_ts, deadline_ts=h.deadline_ts,
                   shape=h.shape, dtype=h.dtype, pixel_format=h.pixel_format)
