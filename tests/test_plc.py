"""The Modbus verdict output against a real pymodbus TCP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from inspectd.core.config import LineSettings, ModbusSettings, PlcSettings
from inspectd.core.settings import load_settings
from inspectd.core.wire import Verdict
from inspectd.daemon import plc
from inspectd.daemon.plc import ModbusOutput, NullOutput, next_sequence, open_output
from tests.helpers import free_port, until

WRITE_COIL, WRITE_REGISTER, WRITE_REGISTERS = 5, 6, 16
REGISTERS = 64


class PlcPeer:
    """A Modbus TCP server (unit 1) in its own thread and event loop, logging every write
    request as (function code, address, values, monotonic time).

    SimData addresses are wire addresses: SimData(0) answers requests for address 0.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.writes: list[tuple[int, int, tuple[int, ...], float]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _record(self, fc: int, _start: int, address: int, _count: int, _regs: list[int],
                      values: list[int] | list[bool] | None) -> None:
        if values is not None:
            self.writes.append((fc, address, tuple(int(v) for v in values), time.monotonic()))

    def start(self) -> None:
        device = SimDevice(1, action=self._record, simdata=(
            [SimData(0, count=32, values=False, datatype=DataType.BITS)],
            [SimData(0, values=False, datatype=DataType.BITS)],
            [SimData(0, count=REGISTERS, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, values=0, datatype=DataType.REGISTERS)],
        ))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def serve() -> None:  # the server must be built inside its running loop
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            await self._server.serve_forever(background=True)

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def of(self, fc: int, address: int | None = None) -> list[tuple[int, ...]]:
        """The values of every write with this function code (and address), in order."""
        return [v for f, a, v, _ in list(self.writes) if f == fc and address in (None, a)]

    def coil_writes(self, coil: int) -> list[tuple[int, float]]:
        return [(v[0], t) for f, a, v, t in list(self.writes) if (f, a) == (WRITE_COIL, coil)]

    def registers(self, address: int, count: int) -> list[int]:
        with ModbusTcpClient("127.0.0.1", port=self.port) as c:
            return c.read_holding_registers(address, count=count, device_id=1).registers

    def coil(self, address: int) -> bool:
        with ModbusTcpClient("127.0.0.1", port=self.port) as c:
            return c.read_coils(address, count=1, device_id=1).bits[0]


@pytest.fixture
def peer() -> Iterator[PlcPeer]:
    p = PlcPeer(free_port())
    p.start()
    yield p
    p.stop()


@pytest.fixture
def output_for(peer: PlcPeer) -> Iterator[Callable[..., ModbusOutput]]:
    outputs: list[ModbusOutput] = []

    def make(**kw: object) -> ModbusOutput:
        kw.setdefault("max_age_ms", None)  # a slow shared CPU must not turn into drops
        out = ModbusOutput(ModbusSettings(port=peer.port, timeout_s=0.5, **kw))
        outputs.append(out)
        return out

    yield make
    for out in outputs:
        out.close()


def _verdict(part: str | None, kind: str, age_s: float = 0.0) -> Verdict:
    return Verdict(frame_id=f"f-{part}-{kind}", verdict=kind, sku="A", part_id=part,  # type: ignore[arg-type]
                   decided_ts=time.time() - age_s)


def test_each_verdict_is_one_fc16_block_with_a_rising_sequence(peer, output_for):
    out = output_for(verdict_block=10, slots=4)
    sequence = [("8", "OK"), ("9", "NG"), ("10", "OK"), ("x7", "ERROR"), (None, "TIMEOUT"),
                ("70003", "NG")]
    for part, kind in sequence:
        out.send(_verdict(part, kind))
    until(lambda: len(peer.of(WRITE_REGISTERS)) == len(sequence), "every block")

    blocks = [(a, v) for f, a, v, _ in peer.writes if f == WRITE_REGISTERS]
    assert blocks == [
        (10, (1, 8, 1)),             # part 8 → slot 0: sequence 1, part 8, OK
        (13, (2, 9, 2)),             # part 9 → slot 1, NG
        (16, (3, 10, 1)),            # slot 2
        (10, (4, 0, 3)),             # non-numeric part id → 0, slot 0
        (10, (5, 0, 4)),             # no part id
        (19, (6, 70003 % 65536, 2)),  # part ids keep their low 16 bits; slot 3
    ]
    assert [f for f, *_ in peer.writes] == [WRITE_REGISTERS] * 6  # nothing else: one write each
    assert peer.registers(10, 12) == [5, 0, 4, 2, 9, 2, 3, 10, 1, 6, 4467, 2]
    assert out.counts()["written"] == 6 and out.dropped == 0
    assert out.healthy


def test_sequence_wraps_past_65535_to_1_never_0():
    assert [next_sequence(s) for s in (0, 1, 65534, 65535)] == [1, 2, 65535, 1]


def test_two_rejects_10_ms_apart_give_two_distinct_coil_pulses(peer, output_for):
    out = output_for(verdict_block=0, reject_coil=3, reject_pulse_ms=150, reject_gap_ms=250)
    until(lambda: [v for v, _ in peer.coil_writes(3)] == [0], "the coil released at connect")
    out.send(_verdict("1", "NG"))
    time.sleep(0.01)
    out.send(_verdict("2", "TIMEOUT"))
    until(lambda: len(peer.coil_writes(3)) == 5, "two pulses")

    coil = peer.coil_writes(3)
    assert [v for v, _ in coil] == [0, 1, 0, 1, 0]  # released at connect, then on/off twice
    (_, on1), (_, off1), (_, on2), (_, off2) = coil[1:]
    assert off1 - on1 >= 0.15 and off2 - on2 >= 0.15  # each on for the pulse length
    assert on2 - off1 >= 0.25  # and off for at least the gap before the next
    assert peer.of(WRITE_REGISTERS) == [(1, 1, 2), (2, 2, 4)]
    assert out.counts()["pulses"] == 2 and out.counts()["pulses_dropped"] == 0
    assert peer.coil(3) is False


def test_verdicts_do_not_wait_for_a_running_pulse(peer, output_for):
    out = output_for(verdict_block=0, reject_coil=3, reject_pulse_ms=2000)
    out.send(_verdict("1", "NG"))
    until(lambda: (1,) in peer.of(WRITE_COIL), "the pulse to start")
    out.send(_verdict("2", "OK"))
    until(lambda: len(peer.of(WRITE_REGISTERS)) == 2, "the second block")
    assert peer.coil(3) is True  # written while the first pulse still runs


def test_an_output_older_than_max_age_is_dropped_counted_and_never_written(peer, output_for):
    out = output_for(verdict_block=0, reject_coil=3, max_age_ms=2000)
    until(lambda: out.healthy, "the connection")
    out.send(_verdict("1", "NG", age_s=30.0))  # decided 30 s ago: its part is long past
    out.send(_verdict("2", "OK"))
    until(lambda: peer.of(WRITE_REGISTERS), "the fresh verdict")
    time.sleep(0.3)
    assert peer.of(WRITE_REGISTERS) == [(2, 2, 1)]  # sequence 1 never written: the PLC sees the gap
    assert (1,) not in peer.of(WRITE_COIL)
    c = out.counts()
    assert (c["dropped_stale"], c["pulses_dropped"], c["written"], c["pulses"]) == (1, 1, 1, 0)
    assert out.dropped == 1
    assert out.take_drops() == {"plc max age": 1, "plc reject pulse": 1}
    assert out.take_drops() == {}  # counted once


def test_a_queued_pulse_that_would_start_past_max_age_is_dropped(peer, output_for):
    out = output_for(verdict_block=0, reject_coil=3, reject_pulse_ms=1000, max_age_ms=3000)
    until(lambda: out.healthy, "the connection")
    out.send(_verdict("1", "NG"))
    # Decided 1.5 s ago, behind a pulse and a gap of 1 s each: it could start at 3.5 s at
    # the earliest, past its maximum age. Its block still goes out at once.
    out.send(_verdict("2", "NG", age_s=1.5))
    until(lambda: out.counts()["pulses_dropped"] == 1, "the late pulse dropped")
    until(lambda: len(peer.coil_writes(3)) == 3, "the first pulse to end")
    assert out.counts()["pulses"] == 1
    assert [v for v, _ in peer.coil_writes(3)] == [0, 1, 0]
    assert peer.of(WRITE_REGISTERS) == [(1, 1, 2), (2, 2, 2)]


def test_heartbeat_register_counts_up_while_the_sink_ticks(peer, output_for):
    out = output_for(heartbeat_register=7, heartbeat_s=0.05)
    end = time.monotonic() + 10
    while len(peer.of(WRITE_REGISTER, 7)) < 4 and time.monotonic() < end:
        out.tick()
        time.sleep(0.01)
    assert peer.of(WRITE_REGISTER, 7)[:4] == [(1,), (2,), (3,), (4,)]
    assert peer.registers(7, 1)[0] >= 4


def test_plc_outage_drops_and_counts_without_blocking_and_writes_resume(
    peer, output_for, monkeypatch
):
    monkeypatch.setattr(plc, "BACKOFF_MAX_S", 0.2)
    out = output_for(verdict_block=0)
    until(lambda: out.healthy, "the first connection")

    peer.stop()
    out.send(_verdict("1", "NG"))
    until(lambda: not out.healthy, "healthy to turn False")
    until(lambda: out.counts()["dropped_offline"] >= 1, "the verdict dropped while away")
    start = time.monotonic()
    for i in range(2 * plc.QUEUE_SIZE):  # never blocks: a full queue counts drops
        out.send(_verdict(str(i), "NG"))
    assert time.monotonic() - start < 5  # generous: 2000 sends, no I/O
    until(lambda: out.dropped >= 1 + 2 * plc.QUEUE_SIZE, "every verdict counted as dropped")
    assert out.counts()["written"] == 0

    peer.writes.clear()
    peer.start()
    until(lambda: out.healthy, "the reconnect")
    out.send(_verdict("5", "TIMEOUT"))
    until(lambda: peer.of(WRITE_REGISTERS), "a write after restart")
    seq = 2 + 2 * plc.QUEUE_SIZE  # every verdict sent took a sequence number, dropped or not
    assert peer.of(WRITE_REGISTERS) == [(seq, 5, 4)]
    assert peer.registers(0, 3) == [seq, 5, 4]
    assert out.dropped == 1 + 2 * plc.QUEUE_SIZE


def test_unreachable_plc_at_start_is_unhealthy_and_drops_verdicts():
    out = ModbusOutput(ModbusSettings(port=free_port(), timeout_s=0.2, verdict_block=0))
    try:
        out.send(_verdict("1", "NG"))
        until(lambda: out.dropped == 1, "the verdict to be dropped")
        assert not out.healthy
        assert out.take_drops() == {"plc unreachable": 1}
    finally:
        out.close()


def test_a_refused_block_is_counted_and_unhealthy_while_the_link_stays(peer, output_for):
    out = output_for(verdict_block=REGISTERS, heartbeat_register=0, heartbeat_s=0.01)
    out.send(_verdict("1", "NG"))  # past the server's registers: an exception response
    until(lambda: out.counts()["refused"] == 1, "the refusal")
    assert not out.healthy
    end = time.monotonic() + 10
    while not peer.of(WRITE_REGISTER, 0) and time.monotonic() < end:
        out.tick()  # the heartbeat still goes through the same connection
        time.sleep(0.02)
    assert peer.of(WRITE_REGISTER, 0)


def test_close_finishes_the_running_pulse_and_releases_the_coil(peer, output_for):
    out = output_for(reject_coil=3, reject_pulse_ms=300)
    out.send(_verdict("1", "NG"))
    until(lambda: (1,) in peer.of(WRITE_COIL), "the pulse to start")
    out.close()
    (v_on, on), (v_off, off) = peer.coil_writes(3)[1:]
    assert (v_on, v_off) == (1, 0) and off - on >= 0.3
    assert peer.coil(3) is False


def test_open_output_picks_the_configured_type(peer):
    assert isinstance(open_output(PlcSettings()), NullOutput)
    out = open_output(PlcSettings(type="modbus", modbus={"port": peer.port}))
    try:
        assert isinstance(out, ModbusOutput)
    finally:
        out.close()


@pytest.mark.parametrize("key", ["verdict_register", "part_register"])
def test_the_old_separate_register_keys_say_what_replaced_them(tmp_path, key):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"plc:\n  type: modbus\n  modbus:\n    {key}: 100\n")
    with pytest.raises(Exception, match=rf"{key} was removed: .* at verdict_block"):
        load_settings(LineSettings, cfg)


def test_the_gap_defaults_to_the_pulse_length_and_blocks_fit_the_register_space():
    assert ModbusSettings(reject_pulse_ms=40).gap_ms == 40
    assert ModbusSettings(reject_pulse_ms=40, reject_gap_ms=70).gap_ms == 70
    ModbusSettings(verdict_block=65533)
    with pytest.raises(ValueError, match="within 65536"):
        ModbusSettings(verdict_block=65533, slots=2)
