"""The Modbus reject output against a real pymodbus TCP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from inspectd.core.config import ModbusSettings, PlcSettings
from inspectd.core.wire import Verdict
from inspectd.daemon import plc
from inspectd.daemon.plc import ModbusOutput, NullOutput, open_output
from tests.helpers import free_port, until

WRITE_COIL, WRITE_REGISTER = 5, 6


class PlcPeer:
    """A Modbus TCP server (unit 1) in its own thread and event loop, logging every write.

    SimData addresses are wire addresses: SimData(0) answers requests for address 0.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.writes: list[tuple[int, int, int, float]] = []  # (function, address, value, t)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _record(self, fc: int, _start: int, address: int, _count: int, _regs: list[int],
                      values: list[int] | list[bool] | None) -> None:
        if values is not None:
            self.writes.append((fc, address, int(values[0]), time.monotonic()))

    def start(self) -> None:
        device = SimDevice(1, action=self._record, simdata=(
            [SimData(0, count=32, values=False, datatype=DataType.BITS)],
            [SimData(0, values=False, datatype=DataType.BITS)],
            [SimData(0, count=32, values=0, datatype=DataType.REGISTERS)],
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
        out = ModbusOutput(ModbusSettings(port=peer.port, timeout_s=0.5, **kw))
        outputs.append(out)
        return out

    yield make
    for out in outputs:
        out.close()


def _verdict(part: str | None, kind: str) -> Verdict:
    return Verdict(frame_id=f"f-{part}-{kind}", verdict=kind, sku="A", part_id=part)  # type: ignore[arg-type]


def test_verdicts_write_part_ids_slot_codes_and_pulse_the_reject_coil(peer, output_for):
    out = output_for(part_register=0, verdict_register=10, slots=4, reject_coil=3,
                     reject_pulse_ms=500)
    sequence = [("8", "OK"), ("9", "NG"), ("10", "OK"), ("x7", "ERROR"), (None, "TIMEOUT"),
                ("70003", "NG")]
    for part, kind in sequence:
        out.send(_verdict(part, kind))
    until(lambda: (WRITE_COIL, 3, 0) in [w[:3] for w in peer.writes], "the coil reset")

    reg = lambda a, v: (WRITE_REGISTER, a, v)  # noqa: E731
    coil_on = (WRITE_COIL, 3, 1)
    assert [w[:3] for w in peer.writes] == [
        reg(0, 8), reg(10, 1),                          # part 8 → slot 0, OK
        reg(0, 9), reg(11, 2), coil_on,                 # part 9 → slot 1, NG
        reg(0, 10), reg(12, 1),                         # not held back by the running pulse
        reg(0, 0), reg(10, 3), coil_on,                 # non-numeric part → 0, slot 0
        reg(0, 0), reg(10, 4), coil_on,                 # no part id
        reg(0, 70003 % 65536), reg(13, 2), coil_on,     # part ids wrap at 16 bits
        (WRITE_COIL, 3, 0),                             # one reset, after the last pulse
    ]
    last_on = max(t for fc, _, v, t in peer.writes if fc == WRITE_COIL and v)
    reset = next(t for fc, _, v, t in peer.writes if fc == WRITE_COIL and not v)
    assert reset - last_on >= 0.5
    assert peer.registers(10, 4) == [4, 2, 1, 2]
    assert peer.registers(0, 1) == [4467]
    assert peer.coil(3) is False
    assert out.healthy


def test_heartbeat_register_counts_up_while_the_sink_ticks(peer, output_for):
    out = output_for(heartbeat_register=7, heartbeat_s=0.05)
    beats = lambda: [v for fc, a, v, _ in peer.writes if (fc, a) == (WRITE_REGISTER, 7)]  # noqa: E731
    end = time.monotonic() + 10
    while len(beats()) < 4 and time.monotonic() < end:
        out.tick()
        time.sleep(0.01)
    assert beats()[:4] == [1, 2, 3, 4]
    assert peer.registers(7, 1)[0] >= 4


def test_plc_outage_turns_unhealthy_without_blocking_and_writes_resume(
    peer, output_for, monkeypatch
):
    monkeypatch.setattr(plc, "BACKOFF_MAX_S", 0.2)
    out = output_for(verdict_register=0)
    until(lambda: out.healthy, "the first connection")

    peer.stop()
    out.send(_verdict("1", "NG"))
    until(lambda: not out.healthy, "healthy to turn False")
    for i in range(2 * plc.QUEUE_SIZE):  # never blocks: a full queue counts drops
        out.send(_verdict(str(i), "NG"))
    assert out.dropped >= plc.QUEUE_SIZE

    peer.writes.clear()
    peer.start()
    until(lambda: out.healthy, "the reconnect")
    out.send(_verdict("5", "TIMEOUT"))
    until(lambda: (WRITE_REGISTER, 0, 4) in [w[:3] for w in peer.writes], "a write after restart")
    assert peer.registers(0, 1) == [4]


def test_unreachable_plc_at_start_is_unhealthy_and_drops_verdicts():
    out = ModbusOutput(ModbusSettings(port=free_port(), timeout_s=0.2, verdict_register=0))
    try:
        out.send(_verdict("1", "NG"))
        until(lambda: out.dropped == 1, "the verdict to be dropped")
        assert not out.healthy
    finally:
        out.close()


def test_open_output_picks_the_configured_type(peer):
    assert isinstance(open_output(PlcSettings()), NullOutput)
    out = open_output(PlcSettings(type="modbus", modbus={"port": peer.port}))
    try:
        assert isinstance(out, ModbusOutput)
    finally:
        out.close()
