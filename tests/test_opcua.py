"""The OPC UA verdict output against a real asyncua server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asyncua import Server, ua
from asyncua.common.callback import CallbackType

from inspectd.core.config import OpcuaSettings, PlcSettings
from inspectd.core.wire import Verdict
from inspectd.daemon import plc
from inspectd.daemon.opcua import OpcuaOutput
from inspectd.daemon.plc import open_output
from tests.helpers import free_port, until

NS = "urn:inspectd:test-plc"
# name → the variable's type on the server (Verdict as Int16: an IEC 61131 INT)
VARIABLES = {"Sequence": ua.VariantType.UInt16, "Part": ua.VariantType.UInt16,
             "Verdict": ua.VariantType.Int16, "Reject": ua.VariantType.Boolean,
             "Heartbeat": ua.VariantType.UInt32}


class UaPeer:
    """An asyncua server in its own thread and event loop with the nodes the output writes,
    logging every Write request as ({name: value}, monotonic time)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self.writes: list[tuple[dict[str, Any], float]] = []
        self.ns = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._names: dict[str, str] = {}

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s=Line1.{name}"

    async def _record(self, event: Any, _dispatcher: Any) -> None:
        values = {self._names.get(w.NodeId.to_string(), w.NodeId.to_string()): w.Value.Value.Value
                  for w in event.request_params.NodesToWrite}
        self.writes.append((values, time.monotonic()))

    async def _serve(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = await server.register_namespace(NS)
        line = await server.nodes.objects.add_object(self.ns, "Line1")
        for name, vtype in VARIABLES.items():
            node_id = ua.NodeId(f"Line1.{name}", self.ns)
            var = await line.add_variable(node_id, name, ua.Variant(
                False if vtype == ua.VariantType.Boolean else 0, vtype))
            await var.set_writable()
            self._names[node_id.to_string()] = name
        server.subscribe_server_callback(CallbackType.PostWrite, self._record)
        await server.start()
        self._server = server

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(60)

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def value(self, name: str) -> Any:
        node = self._server.get_node(self.node_id(name))
        return asyncio.run_coroutine_threadsafe(node.read_value(), self._loop).result(10)

    def of(self, *names: str) -> list[tuple[Any, ...]]:
        """The values of every Write request that wrote exactly these nodes, in order."""
        return [tuple(w[n] for n in names) for w, _ in list(self.writes) if set(w) == set(names)]

    def reject_writes(self) -> list[tuple[bool, float]]:
        return [(w["Reject"], t) for w, t in list(self.writes) if set(w) == {"Reject"}]


@pytest.fixture(scope="module")
def peer() -> Iterator[UaPeer]:
    p = UaPeer(free_port())
    p.start()
    yield p
    p.stop()


@pytest.fixture
def output_for(peer: UaPeer) -> Iterator[Callable[..., OpcuaOutput]]:
    outputs: list[OpcuaOutput] = []

    def make(block: bool = True, **kw: Any) -> OpcuaOutput:
        if block:
            kw.update(sequence_node=peer.node_id("Sequence"), part_node=peer.node_id("Part"),
                      verdict_node=peer.node_id("Verdict"))
        kw.setdefault("max_age_ms", None)  # a slow shared CPU must not turn into drops
        kw.setdefault("timeout_s", 2.0)
        out = OpcuaOutput(OpcuaSettings(endpoint=peer.endpoint, **kw))
        outputs.append(out)
        return out

    peer.writes.clear()
    yield make
    for out in outputs:
        out.close()


def _verdict(part: str | None, kind: str, age_s: float = 0.0) -> Verdict:
    return Verdict(frame_id=f"f-{part}-{kind}", verdict=kind, sku="A", part_id=part,  # type: ignore[arg-type]
                   decided_ts=time.time() - age_s)


def test_each_verdict_is_one_write_of_part_code_then_sequence(peer, output_for):
    out = output_for()
    for part, kind in [("8", "OK"), ("9", "NG"), ("x", "ERROR"), ("40000", "TIMEOUT")]:
        out.send(_verdict(part, kind))
    until(lambda: len(peer.of("Part", "Verdict", "Sequence")) == 4, "four verdict writes", 30)

    assert peer.of("Part", "Verdict", "Sequence") == [(8, 1, 1), (9, 2, 2), (0, 3, 3),
                                                      (40000, 4, 4)]
    assert [list(w) for w, _ in peer.writes] == [["Part", "Verdict", "Sequence"]] * 4
    assert [peer.value(n) for n in ("Sequence", "Part", "Verdict")] == [4, 40000, 4]
    assert out.counts()["written"] == 4 and out.healthy


def test_two_rejects_10_ms_apart_give_two_distinct_pulses(peer, output_for):
    out = output_for(reject_node=peer.node_id("Reject"), reject_pulse_ms=150, reject_gap_ms=250)
    until(lambda: [v for v, _ in peer.reject_writes()] == [False], "the reset at connect", 30)
    out.send(_verdict("1", "NG"))
    time.sleep(0.01)
    out.send(_verdict("2", "NG"))
    until(lambda: len(peer.reject_writes()) == 5, "two pulses")

    writes = peer.reject_writes()
    assert [v for v, _ in writes] == [False, True, False, True, False]
    (_, on1), (_, off1), (_, on2), (_, off2) = writes[1:]
    assert off1 - on1 >= 0.15 and off2 - on2 >= 0.15 and on2 - off1 >= 0.25
    assert peer.of("Part", "Verdict", "Sequence") == [(1, 2, 1), (2, 2, 2)]
    assert out.counts()["pulses"] == 2


def test_an_output_older_than_max_age_is_dropped_and_counted(peer, output_for):
    out = output_for(reject_node=peer.node_id("Reject"), max_age_ms=2000)
    until(lambda: out.healthy, "the connection", 30)
    out.send(_verdict("1", "NG", age_s=30.0))
    out.send(_verdict("2", "OK"))
    until(lambda: peer.of("Part", "Verdict", "Sequence"), "the fresh verdict", 30)
    time.sleep(0.3)
    assert peer.of("Part", "Verdict", "Sequence") == [(2, 1, 2)]
    assert (True,) not in peer.of("Reject")
    c = out.counts()
    assert (c["dropped_stale"], c["pulses_dropped"], c["written"]) == (1, 1, 1)


def test_heartbeat_node_counts_while_the_sink_ticks(peer, output_for):
    out = output_for(block=False, heartbeat_node=peer.node_id("Heartbeat"), heartbeat_s=0.05)
    end = time.monotonic() + 30
    while len(peer.of("Heartbeat")) < 3 and time.monotonic() < end:
        out.tick()
        time.sleep(0.01)
    assert peer.of("Heartbeat")[:3] == [(1,), (2,), (3,)]


def test_a_node_of_the_wrong_type_keeps_the_output_unhealthy(peer, output_for):
    out = output_for(block=False, reject_node=peer.node_id("Part"))  # UInt16, not Boolean
    out.send(_verdict("1", "NG"))
    until(lambda: out.dropped == 1, "the verdict dropped", 30)
    assert not out.healthy and not peer.writes


def test_server_outage_drops_and_counts_without_blocking_and_writes_resume(
    output_for, monkeypatch
):
    monkeypatch.setattr(plc, "BACKOFF_MAX_S", 0.5)
    own = UaPeer(free_port())  # this test stops its server: not the module's
    own.start()
    try:
        out = OpcuaOutput(OpcuaSettings(
            endpoint=own.endpoint, timeout_s=2.0, max_age_ms=None,
            sequence_node=own.node_id("Sequence"), part_node=own.node_id("Part"),
            verdict_node=own.node_id("Verdict")))
        until(lambda: out.healthy, "the first connection", 30)
        out.send(_verdict("1", "OK"))
        until(lambda: own.of("Part", "Verdict", "Sequence"), "the first write", 30)

        own.stop()
        until(lambda: not out.healthy, "healthy to turn False", 30)
        start = time.monotonic()
        for i in range(2 * plc.QUEUE_SIZE):
            out.send(_verdict(str(i), "NG"))
        assert time.monotonic() - start < 5  # generous: the sink never waits on the server
        until(lambda: out.dropped == 2 * plc.QUEUE_SIZE, "every verdict counted as dropped", 30)

        own.writes.clear()
        own.start()
        until(lambda: out.healthy, "the reconnect", 60)
        out.send(_verdict("5", "TIMEOUT"))
        until(lambda: own.of("Part", "Verdict", "Sequence"), "a write after restart", 30)
        assert own.of("Part", "Verdict", "Sequence") == [(5, 4, 2 + 2 * plc.QUEUE_SIZE)]
        out.close()
        assert not out._thread.is_alive()
    finally:
        own.stop()


def test_unreachable_server_at_start_is_unhealthy_and_drops_verdicts():
    out = OpcuaOutput(OpcuaSettings(endpoint=f"opc.tcp://127.0.0.1:{free_port()}",
                                    timeout_s=0.5, sequence_node="ns=2;s=a",
                                    part_node="ns=2;s=b", verdict_node="ns=2;s=c"))
    try:
        out.send(_verdict("1", "NG"))
        until(lambda: out.dropped == 1, "the verdict to be dropped")
        assert not out.healthy
    finally:
        out.close()
    assert not out._thread.is_alive()


def test_open_output_picks_opcua(peer):
    out = open_output(PlcSettings(type="opcua", opcua={"endpoint": peer.endpoint}))
    try:
        assert isinstance(out, OpcuaOutput)
    finally:
        out.close()


@pytest.mark.parametrize(("kw", "message"), [
    ({"sequence_node": "ns=2;s=a"}, "set sequence_node, part_node and verdict_node together"),
    ({"reject_node": "Line1.Reject"}, "not an OPC UA node id"),
    ({"endpoint": "tcp://127.0.0.1:4840"}, "expected opc.tcp://"),
])
def test_opcua_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        OpcuaSettings(**kw)
