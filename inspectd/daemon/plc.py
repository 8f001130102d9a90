"""Reject outputs to the line's PLC. `VerdictOutput` is the seam for more (OPC UA, MQTT, …).

The sink calls `send` and `tick` from its loop, so an output never blocks: Modbus I/O runs on
a worker thread fed through a bounded queue.

Modbus addressing: every address in `ModbusSettings` is the 0-based address on the wire
(the PDU address), e.g. `verdict_register: 0` is what a PLC manual calls 40001. Some server
data stores (pymodbus' deprecated `ModbusSequentialDataBlock`) are 1-based internally; that is
the server's business, the client always speaks wire addresses.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from inspectd.core.config import ModbusSettings, PlcSettings
from inspectd.core.wire import Verdict

log = structlog.get_logger("inspectd.plc")

VERDICT_CODES = {"OK": 1, "NG": 2, "ERROR": 3, "TIMEOUT": 4}
QUEUE_SIZE = 1000
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0


class VerdictOutput(Protocol):
    healthy: bool  # connected and writes succeeding

    def send(self, v: Verdict) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


class NullOutput:
    """No PLC on this line: verdicts go to the audit log and events only."""

    healthy = True

    def send(self, v: Verdict) -> None:
        pass

    def tick(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_output(cfg: PlcSettings) -> VerdictOutput:
    if cfg.type == "modbus":
        return ModbusOutput(cfg.modbus)
    return NullOutput()


def _numeric_part(part_id: str | None) -> int | None:
    try:
        return int(part_id) if part_id is not None else None
    except ValueError:
        return None


class _Heartbeat:
    """Queue item: write the next heartbeat value."""


_CLOSE = object()


class _Outage(Exception):
    """The PLC did not answer; the worker reconnects with backoff."""


class ModbusOutput:
    """Verdict codes, part ids, a reject coil pulse and a heartbeat over Modbus TCP.

    While the PLC is unreachable, verdicts are dropped (counted in `dropped`) rather than
    written late: a reject signal that arrives after its part has passed the ejector would
    act on the wrong part. The stalled heartbeat is the PLC's cue to fail closed.
    """

    def __init__(self, cfg: ModbusSettings) -> None:
        self.cfg = cfg
        self.healthy = False
        self._q: queue.Queue[Verdict | _Heartbeat | object] = queue.Queue(QUEUE_SIZE)
        self._client = ModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0)
        self._dropped_full = 0  # counted on the sink's thread
        self._full_logged = False
        self._dropped_offline = 0  # counted on the worker thread
        self._beat = 0
        self._beat_due = time.monotonic()
        self._beat_queued = False
        self._connected = False
        self._coil_reset_at: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN_S
        self._reason: str | None = "not connected yet"
        self._thread = threading.Thread(target=self._run, name="plc-modbus", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Verdicts not written: queue full, or the PLC unreachable."""
        return self._dropped_full + self._dropped_offline

    # -- sink loop side (never blocks) ---------------------------------------------------
    def send(self, v: Verdict) -> None:
        self._put(v)

    def tick(self) -> None:
        now = time.monotonic()
        if self.cfg.heartbeat_register is None or self._beat_queued or now < self._beat_due:
            return
        self._beat_due = now + self.cfg.heartbeat_s
        self._beat_queued = True  # before the put: the worker clears it once it takes the item
        if not self._put(_Heartbeat()):
            self._beat_queued = False

    def close(self) -> None:
        try:
            self._q.put(_CLOSE, timeout=self.cfg.timeout_s)
        except queue.Full:
            pass  # the worker is stuck on a dead connection; it is a daemon thread
        self._thread.join(timeout=2 * self.cfg.timeout_s + 1)

    def _put(self, item: Verdict | _Heartbeat) -> bool:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._dropped_full += isinstance(item, Verdict)
            if not self._full_logged:  # once per episode: a stalled PLC would flood the log
                log.warning("plc output queue full, dropping", plc=self._where(),
                            dropped=self.dropped)
                self._full_logged = True
            return False
        self._full_logged = False
        return True

    # -- worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self._wait_s())
            except queue.Empty:
                item = None  # a timer is due: coil reset or reconnect
            if item is _CLOSE:
                break
            self._step(item)
        self._finish()

    def _wait_s(self) -> float:
        due = [self._coil_reset_at] if self._coil_reset_at is not None else []
        if not self._connected:
            due.append(self._retry_at)
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    def _step(self, item: Verdict | _Heartbeat | None) -> None:
        if isinstance(item, _Heartbeat):
            self._beat_queued = False
        if not self._connected and not self._connect():
            if isinstance(item, Verdict):
                self._dropped_offline += 1
            return
        try:
            if self._coil_reset_at is not None and time.monotonic() >= self._coil_reset_at:
                self._write_coil(False)
                self._coil_reset_at = None
            if isinstance(item, Verdict):
                self._write_verdict(item)
            elif isinstance(item, _Heartbeat) and self.cfg.heartbeat_register is not None:
                self._beat = (self._beat + 1) % 65536
                self._write_register(self.cfg.heartbeat_register, self._beat)
        except _Outage as e:
            self._client.close()
            self._connected = False
            self._set_health(False, str(e))
            self._schedule_retry()

    def _write_verdict(self, v: Verdict) -> None:
        c = self.cfg
        part = _numeric_part(v.part_id)
        if c.part_register is not None:
            self._write_register(c.part_register, part % 65536 if part is not None else 0)
        if c.verdict_register is not None:
            slot = part % c.slots if part is not None else 0
            self._write_register(c.verdict_register + slot, VERDICT_CODES[v.verdict])
        if c.reject_coil is not None and not v.passed:
            # A reject during a pulse extends it: the coil stays set until the last pulse ends.
            self._write_coil(True)
            self._coil_reset_at = time.monotonic() + c.reject_pulse_ms / 1000

    def _write_register(self, address: int, value: int) -> None:
        self._check(lambda: self._client.write_register(address, value, device_id=self.cfg.unit),
                    f"register {address}")

    def _write_coil(self, value: bool) -> None:
        coil = self.cfg.reject_coil
        assert coil is not None
        self._check(lambda: self._client.write_coil(coil, value, device_id=self.cfg.unit),
                    f"coil {coil}")

    def _check(self, write: Callable[[], ModbusPDU], what: str) -> None:
        try:
            rsp = write()
        except (ModbusException, OSError) as e:
            raise _Outage(f"{self._where()}: {e}") from None
        if rsp.isError():
            # Connected, but the PLC refuses the address: a configuration fault, not an outage.
            self._set_health(False, f"{self._where()}: {what} refused ({rsp})")
        else:
            self._set_health(True, None)

    def _connect(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        self._connected = self._client.connect()
        if self._connected:
            self._backoff = BACKOFF_MIN_S
            self._set_health(True, None)
        else:
            self._set_health(False, f"{self._where()}: cannot connect")
            self._schedule_retry()
        return self._connected

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _set_health(self, healthy: bool, reason: str | None) -> None:
        if reason != self._reason:  # log state changes only, not every failed write
            if healthy:
                log.info("plc output working", plc=self._where(), dropped=self.dropped)
            else:
                log.error("plc output failing", reason=reason, dropped=self.dropped)
        self.healthy = healthy
        self._reason = reason

    def _finish(self) -> None:
        if self._coil_reset_at is not None and self._connected:
            try:
                self._write_coil(False)  # never leave the reject output set behind us
            except _Outage:
                pass
        self._client.close()

    def _where(self) -> str:
        return f"modbus {self.cfg.host}:{self.cfg.port} unit {self.cfg.unit}"
