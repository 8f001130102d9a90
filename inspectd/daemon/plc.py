"""Verdict outputs to the line's PLC: Modbus TCP here, OPC UA in `daemon/opcua.py`.

The sink calls `send` for every judged frame and `tick` from its loop, so an output never
blocks: its I/O runs on a worker thread fed through a bounded queue. `QueuedOutput` is what
every output shares (README "PLC" states the contract):

* per verdict one atomic write of (sequence, part id, verdict code); the sequence counts every
  verdict the sink sent, 1..65535 wrapping and never 0, so the PLC tells a new verdict from a
  repeated one and counts the ones it missed (a dropped verdict is a gap);
* per reject one distinct pulse of the reject output: on for `reject_pulse_ms`, then off for at
  least `reject_gap_ms` before the next; pulses queue (bounded), they never merge;
* maximum age: an output not written `max_age_ms` after its verdict was decided is dropped and
  counted, never written late: a late reject would act on the wrong part. Likewise while the
  PLC is unreachable (counted, logged once per state change; reconnect with backoff);
* a heartbeat that counts while the sink ticks: it stops when the sink or the PLC link does.

A transport implements `_connect`, `_disconnect`, `_write_block`, `_write_reject` and
`_write_heartbeat` on the worker thread, raising `Outage` (reconnect) or `Refused` (the peer
answered but refused: a configuration fault, the connection stays).

Modbus addressing: every address in `ModbusSettings` is the 0-based address on the wire
(the PDU address), e.g. `verdict_block: 0` is what a PLC manual calls 40001. Some server
data stores are 1-based internally; that is the server's business, the client always speaks
wire addresses.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from inspectd.core.config import ModbusSettings, PlcSettings, PlcTiming
from inspectd.core.wire import Verdict

log = structlog.get_logger("inspectd.plc")

VERDICT_CODES = {"OK": 1, "NG": 2, "ERROR": 3, "TIMEOUT": 4}
QUEUE_SIZE = 1000  # verdicts waiting for the worker thread
PULSE_QUEUE = 64  # rejects waiting for their pulse (max_age drops them long before, by default)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
BLOCK_WORDS = 3  # sequence, part id, verdict code

# `counts()` keys that are drops, and the `reason` label the sink's metrics give each.
DROP_REASONS = {
    "dropped_full": "plc queue full",
    "dropped_offline": "plc unreachable",
    "dropped_stale": "plc max age",
    "refused": "plc refused",
    "pulses_dropped": "plc reject pulse",
}


class VerdictOutput(Protocol):
    healthy: bool  # connected and writes succeeding

    def send(self, v: Verdict) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...

    def take_drops(self) -> dict[str, int]: ...  # drops since the last call, by metrics reason


class NullOutput:
    """No PLC on this line: verdicts go to the audit log and events only."""

    healthy = True
    dropped = 0

    def send(self, v: Verdict) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass

    def counts(self) -> dict[str, int]:
        return {}

    def take_drops(self) -> dict[str, int]:
        return {}


def open_output(cfg: PlcSettings) -> VerdictOutput:
    if cfg.type == "modbus":
        return ModbusOutput(cfg.modbus)
    if cfg.type == "opcua":
        from inspectd.daemon.opcua import OpcuaOutput  # asyncua loads on OPC UA lines only

        return OpcuaOutput(cfg.opcua)
    return NullOutput()


def _numeric_part(part_id: str | None) -> int | None:
    try:
        return int(part_id) if part_id is not None else None
    except ValueError:
        return None


def next_sequence(seq: int) -> int:
    """1, 2, … 65535, 1, …: 0 stays "nothing written yet"."""
    return seq % 65535 + 1


@dataclass(frozen=True, slots=True)
class Block:
    """One verdict as the PLC receives it."""

    sequence: int
    part: int  # low 16 bits of the numeric part id, 0 when not numeric
    code: int  # VERDICT_CODES
    slot: int  # part id % slots (0 when not numeric)
    reject: bool
    decided_ts: float  # wall clock, from the verdict

    @classmethod
    def of(cls, v: Verdict, sequence: int, slots: int) -> Block:
        part = _numeric_part(v.part_id)
        return cls(sequence, part % 65536 if part is not None else 0, VERDICT_CODES[v.verdict],
                   part % slots if part is not None else 0, not v.passed, v.decided_ts)


class Outage(Exception):
    """The PLC did not answer; the worker reconnects with backoff."""


class Refused(Exception):
    """Connected, but the PLC refused the write (address, node or type): a configuration fault."""


@dataclass
class OutputCounts:
    """Counted on the worker thread (the sink thread counts its own queue-full drops)."""

    written: int = 0  # verdict blocks the PLC acknowledged
    pulses: int = 0  # reject pulses given
    dropped_offline: int = 0  # verdicts not written: PLC unreachable
    dropped_stale: int = 0  # verdicts not written: older than max_age_ms when their turn came
    refused: int = 0  # verdict blocks the PLC refused
    pulses_dropped: int = 0  # rejects without a pulse: stale, unreachable, queue full


class QueuedOutput:
    """The queue, sequence, pulse schedule, maximum age, reconnect backoff and health of an
    output; a subclass adds the transport (see the module's docstring)."""

    kind = "plc"

    def __init__(self, timing: PlcTiming, *, slots: int, block: bool, reject: bool,
                 heartbeat: bool) -> None:
        self.timing = timing
        self.healthy = False
        self.stats = OutputCounts()
        self._slots, self._has_block, self._has_reject, self._has_beat = \
            slots, block, reject, heartbeat
        self._q: queue.Queue[Block] = queue.Queue(QUEUE_SIZE)
        self._event = threading.Event()
        # Sink thread only:
        self._sequence = 0
        self._dropped_full = 0
        self._pulses_dropped_full = 0
        self._full_logged = False
        self._beat_due = time.monotonic()
        self._reported: dict[str, int] = {}
        self._closing = False
        # Set by the sink thread, cleared by the worker once it takes the beat.
        self._beat_wanted = False
        # Worker thread only:
        self._beat = 0
        self._connected = False
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN_S
        self._outage: str | None = "not connected yet"
        self._refusing: dict[str, str] = {}  # channel → why the PLC refuses it
        self._reason: str | None = self._outage
        self._pulses: deque[float] = deque()  # decided_ts of rejects waiting for their pulse
        self._phase: Literal["idle", "on", "gap"] = "idle"
        self._phase_until = 0.0
        self._thread = threading.Thread(target=self._run, name=f"plc-{self.kind}", daemon=True)

    def _start(self) -> None:
        """Start the worker; a subclass calls it once its transport is set up."""
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Verdicts not written: queue full, PLC unreachable, too old, or refused."""
        return (self._dropped_full + self.stats.dropped_offline + self.stats.dropped_stale
                + self.stats.refused)

    def counts(self) -> dict[str, int]:
        """Cumulative counters: `OutputCounts` plus `dropped_full` (see DROP_REASONS)."""
        c = dataclasses.asdict(self.stats)
        c["dropped_full"] = self._dropped_full
        c["pulses_dropped"] += self._pulses_dropped_full
        return c

    def take_drops(self) -> dict[str, int]:
        """Drops since the previous call, by metrics reason (the sink's thread only):
        `for reason, n in output.take_drops().items(): metrics.dropped(reason, n)`."""
        counts = self.counts()
        now = {reason: counts[key] for key, reason in DROP_REASONS.items()}
        new = {r: n - self._reported.get(r, 0) for r, n in now.items()
               if n > self._reported.get(r, 0)}
        self._reported = now
        return new

    # -- sink loop side (never blocks) ---------------------------------------------------
    def send(self, v: Verdict) -> None:
        if self._closing or not (self._has_block or self._has_reject):
            return
        self._sequence = next_sequence(self._sequence)  # dropped or not: the PLC sees the gap
        b = Block.of(v, self._sequence, self._slots)
        try:
            self._q.put_nowait(b)
        except queue.Full:
            self._dropped_full += 1
            self._pulses_dropped_full += b.reject and self._has_reject
            if not self._full_logged:  # once per episode: a stalled PLC would flood the log
                log.warning("plc output queue full, dropping", plc=self._where(),
                            dropped=self.dropped)
                self._full_logged = True
            return
        self._full_logged = False
        self._wake()

    def tick(self) -> None:
        now = time.monotonic()
        if not self._has_beat or self._closing or self._beat_wanted or now < self._beat_due:
            return
        self._beat_due = now + self.timing.heartbeat_s
        self._beat_wanted = True
        self._wake()

    def close(self) -> None:
        """Write what is queued, finish a running pulse, release the reject output, stop."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        t = self.timing
        self._thread.join(timeout=4 * t.timeout_s + t.reject_pulse_ms / 1000 + 1)
        if self._thread.is_alive():  # stuck on a dead peer; it is a daemon thread
            log.warning("plc output did not stop in time", plc=self._where())

    # -- wake-up; an asyncio transport replaces these three --------------------------------
    def _wake(self) -> None:
        """Any thread: the worker has something to do."""
        self._event.set()

    def _arm(self) -> None:
        """Worker: forget earlier wake-ups, before it looks at the work."""
        self._event.clear()

    def _wait(self, timeout: float) -> None:
        """Worker: sleep until woken or `timeout` seconds passed."""
        self._event.wait(timeout)

    # -- transport: the subclass ---------------------------------------------------------
    def _connect(self) -> None:
        raise NotImplementedError

    def _disconnect(self, clean: bool) -> None:
        raise NotImplementedError

    def _write_block(self, b: Block) -> None:
        raise NotImplementedError

    def _write_reject(self, on: bool) -> None:
        raise NotImplementedError

    def _write_heartbeat(self, value: int) -> None:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise Outage when the transport already knows the link is gone."""

    def _where(self) -> str:
        raise NotImplementedError

    # -- worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug: say so rather than fall silent
            log.exception("plc output stopped", plc=self._where())
            self.healthy = False

    def _serve(self) -> None:
        while True:
            self._arm()
            closing = self._closing
            try:
                self._work(closing)
            except Outage as e:
                self._lost(str(e))
            if closing:
                break
            if self._q.empty() and not self._beat_wanted and not self._closing:
                self._wait(max(0.0, self._next_due() - time.monotonic()))
        if self._connected:
            self._disconnect(clean=True)

    def _work(self, closing: bool) -> None:
        if not self._connected:
            if time.monotonic() >= self._retry_at:
                self._try_connect()
            if not self._connected:
                self._drop_offline()
                return
        self._probe()
        if self._beat_wanted:
            self._beat_wanted = False
            self._beat = (self._beat + 1) % 65536
            self._write("heartbeat", self._write_heartbeat, self._beat)
        self._pulse_step()
        while True:
            try:
                b = self._q.get_nowait()
            except queue.Empty:
                break
            self._output(b)
            self._pulse_step()
        if closing:
            self._end_pulses()

    def _output(self, b: Block) -> None:
        pulse = b.reject and self._has_reject
        if self._stale(b.decided_ts):
            self.stats.dropped_stale += 1
            self.stats.pulses_dropped += pulse
            return
        if self._has_block:
            try:
                written = self._write("block", self._write_block, b)
            except Outage:  # lost with the link: counted like the ones still queued
                self.stats.dropped_offline += 1
                self.stats.pulses_dropped += pulse
                raise
            if written:
                self.stats.written += 1
            else:
                self.stats.refused += 1
        if pulse:
            if len(self._pulses) < PULSE_QUEUE:
                self._pulses.append(b.decided_ts)
            else:
                self.stats.pulses_dropped += 1

    def _pulse_step(self) -> None:
        """Advance the reject output: idle → on (pulse) → off (gap) → idle."""
        if not self._has_reject:
            return
        if self._phase == "on" and time.monotonic() >= self._phase_until:
            self._write("reject", self._write_reject, False)
            self._phase, self._phase_until = "gap", time.monotonic() + self.timing.gap_ms / 1000
        if self._phase == "gap" and time.monotonic() >= self._phase_until:
            self._phase = "idle"
        while self._phase == "idle" and self._pulses:
            if self._stale(self._pulses[0]):
                self._pulses.popleft()
                self.stats.pulses_dropped += 1
            elif self._write("reject", self._write_reject, True):  # an Outage drops the queue
                self._pulses.popleft()
                self.stats.pulses += 1
                self._phase = "on"
                self._phase_until = time.monotonic() + self.timing.reject_pulse_ms / 1000
            else:
                self._pulses.popleft()
                self.stats.pulses_dropped += 1

    def _end_pulses(self) -> None:
        """On close: finish the running pulse (the reject output is never left on); the
        pulses still queued are dropped, counted."""
        while self._phase == "on" and (left := self._phase_until - time.monotonic()) > 0:
            self._wait(left)
        self._pulse_step()
        self.stats.pulses_dropped += len(self._pulses)
        self._pulses.clear()

    def _stale(self, decided_ts: float) -> bool:
        age = self.timing.max_age_ms
        return age is not None and time.time() - decided_ts > age / 1000

    def _write(self, channel: str, write: Callable[..., None], *args: object) -> bool:
        """One write; False when the PLC refused it. An Outage propagates."""
        try:
            write(*args)
        except Refused as e:
            self._refusing[channel] = str(e)
            self._update_health()
            return False
        self._refusing.pop(channel, None)
        self._update_health()
        return True

    def _next_due(self) -> float:
        due = [time.monotonic() + 1.0]
        if not self._connected:
            due.append(self._retry_at)
        if self._phase != "idle":
            due.append(self._phase_until)
        return min(due)

    def _try_connect(self) -> None:
        try:
            self._connect()
            self._connected = True
            self._backoff = BACKOFF_MIN_S
            self._outage = None
            self._refusing.clear()
            if self._has_reject:  # a pulse cut off by an outage must not merge with the next
                self._write("reject", self._write_reject, False)
                self._phase = "gap"
                self._phase_until = time.monotonic() + self.timing.gap_ms / 1000
            self._update_health()
        except (Outage, Refused) as e:
            self._lost(str(e))

    def _lost(self, reason: str) -> None:
        self._disconnect(clean=False)
        self._connected = False
        self._outage = reason
        self._update_health()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self.stats.pulses_dropped += len(self._pulses)
        self._pulses.clear()
        self._phase = "idle"

    def _drop_offline(self) -> None:
        self._beat_wanted = False  # the heartbeat stops while the PLC is away
        while True:
            try:
                b = self._q.get_nowait()
            except queue.Empty:
                return
            self.stats.dropped_offline += 1
            self.stats.pulses_dropped += b.reject and self._has_reject

    def _update_health(self) -> None:
        reason = self._outage or next(iter(self._refusing.values()), None)
        if reason != self._reason:  # log state changes only, not every failed write
            if reason is None:
                log.info("plc output working", plc=self._where(), dropped=self.dropped)
            else:
                log.error("plc output failing", reason=reason, dropped=self.dropped)
            self._reason = reason
        self.healthy = reason is None


class ModbusOutput(QueuedOutput):
    """Over Modbus TCP: per verdict one FC16 (write multiple registers) of
    [sequence, part id, verdict code] at verdict_block + 3 × slot, FC5 pulses of the reject
    coil, FC6 heartbeat register."""

    kind = "modbus"

    def __init__(self, cfg: ModbusSettings) -> None:
        super().__init__(cfg, slots=cfg.slots, block=cfg.verdict_block is not None,
                         reject=cfg.reject_coil is not None,
                         heartbeat=cfg.heartbeat_register is not None)
        self.cfg = cfg
        self._client = ModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0)
        self._start()

    def _connect(self) -> None:
        if not self._client.connect():
            raise Outage(f"{self._where()}: cannot connect")

    def _disconnect(self, clean: bool) -> None:
        self._client.close()

    def _write_block(self, b: Block) -> None:
        assert self.cfg.verdict_block is not None
        address = self.cfg.verdict_block + BLOCK_WORDS * b.slot
        self._check(lambda: self._client.write_registers(
            address, [b.sequence, b.part, b.code], device_id=self.cfg.unit),
            f"registers {address}-{address + BLOCK_WORDS - 1}")

    def _write_reject(self, on: bool) -> None:
        coil = self.cfg.reject_coil
        assert coil is not None
        self._check(lambda: self._client.write_coil(coil, on, device_id=self.cfg.unit),
                    f"coil {coil}")

    def _write_heartbeat(self, value: int) -> None:
        register = self.cfg.heartbeat_register
        assert register is not None
        self._check(lambda: self._client.write_register(register, value, device_id=self.cfg.unit),
                    f"register {register}")

    def _check(self, write: Callable[[], ModbusPDU], what: str) -> None:
        try:
            rsp = write()
        except (ModbusException, OSError) as e:
            raise Outage(f"{self._where()}: {e}") from None
        if rsp.isError():
            raise Refused(f"{self._where()}: {what} refused ({rsp})")

    def _where(self) -> str:
        return f"modbus {self.cfg.host}:{self.cfg.port} unit {self.cfg.unit}"
