"""The acquisition role: one camera's frames onto the line, none of them lost on the way.

For every capture:

1. announce it to the sink, which journals it and acknowledges: from then on the frame has
   an audit row coming whatever happens to any role. An announcement not acknowledged
   within RESEND_S is sent again (the sink answers a repeat idempotently), so a sink that
   hangs or restarts loses nothing;
2. hold it, ordered by deadline, in a queue bounded in bytes (`cameras.<name>.queue_bytes`);
3. hand it to a worker when one has room, earliest deadline first. A held frame whose
   deadline passes before a worker takes it is audited TIMEOUT ("no worker free"); the
   worker sheds, by its measured service time, what reaches it too late to be scored.

Admission is by deadline, not by count: a burst the line can judge in time waits here and
is judged. Acquisition measures how fast the line takes its frames while they wait (the
drain rate, `DrainRate`), so it knows when a frame can no longer make its deadline. A file
source (folder, unpaced video file) takes the next file only when the line can judge it in
time and the queue has room: otherwise files wait in the folder, none is shed. A live
camera cannot wait: a held frame that could not be judged in time even if handed on next is
audited TIMEOUT, and while the held frames cannot all make it (overload) the newest are
handed on first, so the frames scored are scored with time to spare and the oldest, which
would miss anyway, cost no inference; a full queue sheds the frame nearest its deadline. A
frame acquisition cannot read is audited ERROR at once.

The sink tells acquisition each frame's outcome; a folder source then moves the file (OK,
NG: `after`; ERROR, TIMEOUT: quarantine), so a file is never deleted unjudged. On stop, no
new frame is taken, held frames are audited TIMEOUT, and acquisition waits up to
`supervisor.drain_s` for the outcomes of the frames already with a worker.
"""

from __future__ import annotations

import heapq
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import (
    ACK,
    ANNOUNCE,
    FRAME,
    JUDGED,
    STATUS,
    Ack,
    FrameHeader,
    ProtocolError,
    Status,
    Verdict,
    new_frame_id,
    valid_name,
)
from inspectd.daemon.security import line_keys
from inspectd.daemon.sources import Capture, open_source
from inspectd.daemon.transport import socket

log = structlog.get_logger("inspectd.acquire")
RESEND_S = 1.0  # an announcement not acknowledged by then is sent again
STATUS_EVERY_S = 1.0
RECHECK_S = 5.0  # a frame with a worker and no outcome this long after its deadline: ask
FEED_SLOTS = 4  # captures waiting between the source thread and the loop
MAX_TRACKED = 100_000  # frame headers awaiting an acknowledgement or an outcome


@dataclass
class _Frame:
    header: FrameHeader | None  # None: judged here (ERROR) without an announcement
    message: list[bytes]  # what goes to the sink: the announcement, or our own verdict
    image: np.ndarray | None  # pixels while held; None once handed on or shed
    done: Callable[[str, str | None], None] | None
    sent_at: float = 0.0  # monotonic, last time `message` went to the sink
    acked: bool = False
    dispatched: bool = False
    judged_here: bool = False  # we sent its verdict (TIMEOUT): only its outcome is awaited

    @property
    def nbytes(self) -> int:
        return self.image.nbytes if self.image is not None else 0


class DrainRate:
    """How fast the line takes this camera's frames while they wait: the mean interval
    between hand-overs that a waiting frame made (the worker was the limit, not arrivals),
    over the last WINDOW of them. Measured, so it follows CPU contention, the SKU mix and
    the number of workers."""

    WINDOW = 64
    MIN = 8  # intervals before an estimate is trusted

    def __init__(self) -> None:
        self._intervals: deque[float] = deque(maxlen=self.WINDOW)
        self._last: float | None = None
        self._waiting = False

    def dispatched(self, now: float, backlog_left: bool) -> None:
        if self._last is not None and self._waiting:
            self._intervals.append(now - self._last)
        self._last, self._waiting = now, backlog_left

    @property
    def per_frame(self) -> float | None:
        if len(self._intervals) < self.MIN:
            return None
        return sum(self._intervals) / len(self._intervals)


class HoldingQueue:
    """Acknowledged frames waiting for a worker, by deadline: the earliest and the latest
    are both at hand (two heaps; entries let go of elsewhere are skipped lazily)."""

    def __init__(self) -> None:
        self._min: list[tuple[float, int, str]] = []
        self._max: list[tuple[float, int, str]] = []
        self._live: dict[str, float] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def push(self, deadline: float, fid: str) -> None:
        self._seq += 1
        self._live[fid] = deadline
        heapq.heappush(self._min, (deadline, self._seq, fid))
        heapq.heappush(self._max, (-deadline, -self._seq, fid))

    def discard(self, fid: str) -> None:
        self._live.pop(fid, None)

    def earliest(self) -> tuple[float, str] | None:
        while self._min and self._min[0][2] not in self._live:
            heapq.heappop(self._min)
        return (self._min[0][0], self._min[0][2]) if self._min else None

    def latest(self) -> tuple[float, str] | None:
        while self._max and self._max[0][2] not in self._live:
            heapq.heappop(self._max)
        return (-self._max[0][0], self._max[0][2]) if self._max else None

    def clear(self) -> None:
        self._live.clear()
        self._min.clear()
        self._max.clear()


class _Feeder(threading.Thread):
    """Runs the source's blocking frame loop and hands captures to the acquisition loop.

    The hand-over queue is small: while the loop takes no capture (the holding queue is
    full), `put` blocks and a file source stops reading files — back pressure.
    """

    def __init__(self, source: object, stop: threading.Event, ctx: zmq.Context,
                 wake: str) -> None:
        super().__init__(name="source", daemon=True)
        self.source, self.stop, self.ctx, self.wake = source, stop, ctx, wake
        self.q: queue.Queue[Capture] = queue.Queue(FEED_SLOTS)
        self.error: BaseException | None = None
        self.ended = threading.Event()

    def run(self) -> None:
        poke = self.ctx.socket(zmq.PUSH)
        poke.setsockopt(zmq.LINGER, 0)
        poke.setsockopt(zmq.SNDHWM, 1)
        poke.connect(self.wake)
        try:
            for cap in self.source.frames(self.stop):  # type: ignore[attr-defined]
                while not self.stop.is_set():
                    try:
                        self.q.put(cap, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                else:
                    break
                _poke(poke)
        except BaseException as e:  # reported by the loop: the role exits and is restarted
            self.error = e
        finally:
            self.ended.set()
            _poke(poke)
            poke.close()


def _poke(sock: zmq.Socket) -> None:
    try:
        sock.send(b"", zmq.NOBLOCK)
    except zmq.Again:
        pass  # a wake-up is already waiting


class Acquirer:
    def __init__(self, settings: LineSettings, camera: str,
                 ctx: zmq.Context | None = None) -> None:
        self.s, self.camera, self.cfg = settings, camera, settings.cameras[camera]
        self.ctx = ctx or zmq.Context.instance()
        keys = line_keys(settings)
        # Frames wait in the holding queue here, not in ZeroMQ's pipes: one in flight.
        self.frames = socket(self.ctx, zmq.PUSH, settings.frames_endpoint(camera), bind=True,
                             hwm=1, linger_ms=0, keys=keys)
        self.sink = socket(self.ctx, zmq.DEALER, settings.sink_address(), bind=False,
                           hwm=MAX_TRACKED, linger_ms=2000, keys=keys)
        self.wake_endpoint = f"inproc://acquire-wake-{camera}-{id(self)}"
        self.wake = self.ctx.socket(zmq.PULL)
        self.wake.bind(self.wake_endpoint)
        self.tracked: dict[str, _Frame] = {}  # sent to the sink, outcome not yet known
        self.ready = HoldingQueue()  # acknowledged, held, waiting for a worker
        self.held_bytes = 0
        self.held_frames = 0
        self.drain = DrainRate()
        self._status_due = 0.0
        self.sent = self.shed = self.errors = 0

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event, ready: Callable[[], None] = lambda: None,
            heartbeat: Callable[[], None] = lambda: None) -> None:
        source = open_source(self.camera, self.cfg)
        push_back = bool(getattr(source, "push_back", False))
        taking = threading.Event()  # cleared on stop: the source stops, the loop drains
        feeder = _Feeder(source, _Either(stop, taking), self.ctx, self.wake_endpoint)
        feeder.start()
        poller = zmq.Poller()
        poller.register(self.sink, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        waiting_for_worker = False
        ready()
        drain_until: float | None = None
        try:
            while True:
                heartbeat()
                if stop.is_set() and drain_until is None:
                    taking.set()
                    drain_until = time.monotonic() + self.s.supervisor.drain_s
                    self._stop_holding()
                if drain_until is not None and (not self.tracked
                                                or time.monotonic() > drain_until):
                    break
                if feeder.error is not None:
                    raise feeder.error
                if feeder.ended.is_set() and feeder.q.empty() and not self.tracked \
                        and drain_until is None:
                    log.info("camera source ended", camera=self.camera)
                    break
                if bool(self.ready) != waiting_for_worker:  # POLLOUT: a worker has room
                    waiting_for_worker = bool(self.ready)
                    if waiting_for_worker:
                        poller.register(self.frames, zmq.POLLOUT)
                    else:
                        poller.unregister(self.frames)
                events = dict(poller.poll(self._poll_ms()))
                if self.wake in events:
                    while True:
                        try:
                            self.wake.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if self.sink in events:
                    self._receive_acks()
                if drain_until is None:
                    self._take(feeder.q, push_back)
                self._dispatch()
                if not push_back:
                    self._shed_hopeless()
                self._expire()
                self._resend()
                self._status()
        finally:
            taking.set()
            source.close()
            feeder.join(timeout=5)
            self.close()

    def close(self) -> None:
        self.frames.close()
        self.sink.close()
        self.wake.close(0)

    def _poll_ms(self) -> int:
        # Wake for the next deadline among held frames, and at least every 100 ms for the
        # heartbeat and resends.
        timeout = 0.1
        first = self.ready.earliest()
        if first is not None:
            timeout = min(timeout, max(0.0, first[0] - time.time()))
        return int(timeout * 1000) + 1

    # -- captures in ------------------------------------------------------------------------
    def _take(self, q: queue.Queue[Capture], push_back: bool) -> None:
        limit = self.cfg.queue_bytes
        while len(self.tracked) < MAX_TRACKED:
            if push_back and (self.held_bytes >= limit or not self._room_in_time()):
                return  # the source waits: no file is shed for want of room or time
            try:
                cap = q.get_nowait()
            except queue.Empty:
                return
            self.handle(cap)
            while not push_back and self.held_bytes > limit and self._shed_nearest():
                pass

    def handle(self, cap: Capture) -> str:
        """Take one capture on: announced and held, or audited ERROR; returns which."""
        fid = cap.frame_id or new_frame_id()
        deadline = (cap.received_ts or cap.capture_ts) + self.cfg.deadline_ms / 1000
        sku = cap.sku or self.cfg.sku or ""
        image = cap.image
        reason = cap.error
        if reason is None:
            try:
                valid_name(sku, "sku")
            except ProtocolError as e:
                reason = str(e)
        if reason is None and (image is None or image.dtype not in (np.uint8, np.uint16)
                               or not 2 <= image.ndim <= 3):
            reason = "frame without uint8/uint16 pixels"
        if reason is not None:
            v = Verdict(frame_id=fid, verdict="ERROR", camera=self.camera,
                        sku=sku if _is_name(sku) else "", line=self.s.line,
                        part_id=cap.part_id, origin=cap.origin, capture_ts=cap.capture_ts,
                        deadline_ts=deadline, reason=reason)
            self._track(_Frame(None, [JUDGED, v.encode()], None, cap.done), fid)
            self.errors += 1
            return "error"
        image = np.ascontiguousarray(image)
        h = FrameHeader(fid, self.camera, sku, cap.capture_ts, deadline, image.shape,
                        str(image.dtype), cap.pixel_format, cap.part_id, self.s.line,
                        cap.origin)
        self._track(_Frame(h, [ANNOUNCE, h.encode()], image, cap.done), fid)
        return "held"

    def _track(self, f: _Frame, fid: str) -> None:
        old = self.tracked.get(fid)
        if old is not None:  # the same file seen again (a repeated event): one is enough
            return
        self.tracked[fid] = f
        self.held_bytes += f.nbytes
        self.held_frames += f.image is not None
        self._to_sink(f)

    # -- the sink's answers -----------------------------------------------------------------
    def _receive_acks(self) -> None:
        while True:
            try:
                parts = self.sink.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 2 or parts[0] != ACK:
                log.warning("unexpected message from the sink", parts=len(parts))
                continue
            try:
                ack = Ack.decode(parts[1])
            except ProtocolError as e:
                log.warning("unreadable acknowledgement from the sink", error=str(e))
                continue
            for fid in ack.held:
                f = self.tracked.get(fid)
                if f is not None and not f.acked and not f.judged_here:
                    f.acked = True
                    if f.image is not None and f.header is not None:
                        self.ready.push(f.header.deadline_ts, fid)
                    elif not f.dispatched and f.header is not None:
                        self._judge_here(fid, f, "overload: shed from the holding queue")
            for fid, (verdict, reason) in ack.judged.items():
                self._finish(fid, verdict, reason)

    def _finish(self, fid: str, verdict: str, reason: str | None) -> None:
        """The frame's outcome is known: let go of it (a folder source disposes of the file)."""
        f = self.tracked.pop(fid, None)
        if f is None:
            return
        self._let_go(f)
        if f.done is not None:
            f.done(verdict, reason)

    # -- frames out ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand held frames to workers while one has room: earliest deadline first while
        the line keeps up; newest first when it cannot (every held frame would not make
        it), so the frames scored are scored with time to spare, and the oldest — which
        would miss anyway — are shed before they cost any inference."""
        while self.ready:
            pick = self.ready.latest() if self._overloaded() else self.ready.earliest()
            deadline, fid = pick
            f = self.tracked.get(fid)
            if f is None or f.image is None or f.header is None:
                self.ready.discard(fid)
                continue
            if deadline <= time.time():
                return  # _expire audits it
            try:
                # copy=False: ZeroMQ sends from this frame's own array, never reused.
                self.frames.send_multipart([FRAME, f.message[1], f.image], flags=zmq.NOBLOCK,
                                           copy=False)
            except zmq.Again:
                return  # no worker has room: the frame stays held
            self.ready.discard(fid)
            self._let_go(f)
            f.dispatched = True
            f.sent_at = time.monotonic()
            self.sent += 1
            self.drain.dispatched(f.sent_at, backlog_left=bool(self.ready))
            if f.done is None:  # nobody needs its outcome here
                self.tracked.pop(fid, None)

    def _overloaded(self) -> bool:
        """The held frames cannot all be judged in time: the newest, served after all the
        others at the measured drain rate, would miss its deadline."""
        last = self.ready.latest()
        finish = self._finish_s(len(self.ready) - 1)
        return last is not None and finish is not None and time.time() + finish > last[0]

    def _expire(self) -> None:
        now = time.time()
        while (first := self.ready.earliest()) is not None and first[0] <= now:
            fid = first[1]
            self.ready.discard(fid)
            f = self.tracked.get(fid)
            if f is None or f.image is None:
                continue
            held = (now - f.header.capture_ts) * 1000 if f.header else 0.0
            self._judge_here(fid, f, f"no worker free before the deadline (held {held:.0f} ms)")

    def _let_go(self, f: _Frame) -> None:
        """The frame's pixels leave the holding queue (handed on, shed or judged)."""
        if f.image is not None:
            self.held_bytes -= f.image.nbytes
            self.held_frames -= 1
            f.image = None

    def _finish_s(self, ahead: int) -> float | None:
        """Seconds until a frame with `ahead` held frames before it would be judged: those,
        and a worker's own queue (two batches), at the measured drain rate; None before it
        is measured."""
        per_frame = self.drain.per_frame
        if per_frame is None:
            return None
        return (ahead + 2 * self.s.worker.max_batch + 1) * per_frame

    def _room_in_time(self) -> bool:
        """A file source takes the next file only if the line can judge it in time."""
        finish = self._finish_s(self.held_frames)
        return finish is None or finish <= self.cfg.deadline_ms / 1000

    def _shed_hopeless(self) -> None:
        """Live camera: a held frame that could not be judged in time even if handed on
        next (the measured drain rate through a worker's queue) is audited TIMEOUT now."""
        finish = self._finish_s(0)
        if finish is None:
            return
        deadline_before = time.time() + finish
        while (first := self.ready.earliest()) is not None and first[0] < deadline_before:
            fid = first[1]
            self.ready.discard(fid)
            f = self.tracked.get(fid)
            if f is None or f.image is None:
                continue
            self._judge_here(fid, f, f"would miss its deadline even handed on now: the line "
                                     f"takes ~{finish * 1000:.0f} ms through a worker")

    def _shed_nearest(self) -> bool:
        """Live camera, queue full: shed the held frame nearest its deadline."""
        held = [(f.header.deadline_ts, fid) for fid, f in self.tracked.items()
                if f.image is not None and f.header is not None]
        if not held:
            return False
        _, fid = min(held)
        f = self.tracked[fid]
        self._let_go(f)
        if f.acked:
            self._judge_here(fid, f, "overload: shed from the holding queue")
        # else: judged when its acknowledgement comes (no pixels left to send)
        return True

    def _judge_here(self, fid: str, f: _Frame, reason: str) -> None:
        """Audit a held frame TIMEOUT from here; the outcome comes back in an ack."""
        assert f.header is not None
        self.ready.discard(fid)
        self._let_go(f)
        f.acked = False
        f.judged_here = True
        f.message = [JUDGED, Verdict.for_frame(f.header, "TIMEOUT", reason).encode()]
        self.shed += 1
        self._to_sink(f)

    def _stop_holding(self) -> None:
        """On stop: frames no worker has are audited TIMEOUT now."""
        for fid, f in list(self.tracked.items()):
            if f.image is not None and f.header is not None:
                self._judge_here(fid, f, "daemon stopped before the frame was scored")
        self.ready.clear()

    def _status(self) -> None:
        """Frames held here, to the sink's metrics, about once a second."""
        now = time.monotonic()
        if now < self._status_due:
            return
        self._status_due = now + STATUS_EVERY_S
        try:
            self.sink.send_multipart([STATUS, Status("acquire", self.camera,
                                                     self.held_frames).encode()], zmq.NOBLOCK)
        except zmq.Again:
            pass

    # -- to the sink ----------------------------------------------------------------------------
    def _to_sink(self, f: _Frame) -> None:
        f.sent_at = time.monotonic()
        try:
            self.sink.send_multipart(f.message, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the sink is not reading: sent again by _resend

    def _resend(self) -> None:
        """Announcements and own verdicts the sink has not acknowledged (a sink restarted,
        hung, or not up yet); and, now and then, frames with a worker whose outcome is
        overdue (the sink that judged them may have restarted)."""
        now = time.monotonic()
        wall = time.time()
        for f in self.tracked.values():
            if not f.acked:
                due = f.sent_at + RESEND_S
            elif f.dispatched and f.header is not None and wall > f.header.deadline_ts:
                due = f.sent_at + RECHECK_S
            else:
                continue
            if now >= due:
                self._to_sink(f)


class _Either:
    """An Event-like view that is set when either event is."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.a.wait(0.05 if left is None else min(left, 0.05))
        return True


def _is_name(sku: str) -> bool:
    try:
        valid_name(sku)
    except ProtocolError:
        return False
    return True
