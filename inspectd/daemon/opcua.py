"""The OPC UA verdict output: an asyncua client writing the same contract as Modbus.

Per verdict one Write request with three values, in this order: part id, verdict code, then
the sequence (servers apply a Write's values in order, so a PLC that acts on a new sequence
finds the part id and code of that verdict already there). The reject node (Boolean) is
pulsed like the coil, the heartbeat node counts; queue, pulse schedule, maximum age,
backoff and health are `QueuedOutput`'s.

asyncua's event loop belongs to the output's worker thread: the worker runs it for every
request and while it waits for work, so the client's own tasks (the server-state watchdog,
the secure-channel renewal) run whenever the worker is idle. The sink thread only puts to the
queue and wakes the loop with `call_soon_threadsafe`.

Integer nodes take the type the server declares (read at connect): UInt16, UInt32, UInt64,
Int32, Int64, or Int16, which gets the same 16 bits as a Modbus register (values above 32767
arrive negative). Security policy None, anonymous session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from asyncua import Client, Node, ua
from asyncua.client.ua_client import UaClientState

from inspectd.core.config import OpcuaSettings
from inspectd.daemon.plc import Block, Outage, QueuedOutput, Refused

T = TypeVar("T")

INT_TYPES = {ua.VariantType.UInt16, ua.VariantType.UInt32, ua.VariantType.UInt64,
             ua.VariantType.Int32, ua.VariantType.Int64, ua.VariantType.Int16}

# Status codes that mean the session or the link is gone (reconnect), not a refused write.
LINK_CODES = {getattr(ua.StatusCodes, n) for n in (
    "BadSessionIdInvalid", "BadSessionClosed", "BadSessionNotActivated", "BadSecureChannelClosed",
    "BadSecureChannelIdInvalid", "BadSecureChannelTokenUnknown", "BadConnectionClosed",
    "BadCommunicationError", "BadNotConnected", "BadServerNotConnected", "BadServerHalted",
    "BadShutdown", "BadTimeout", "BadRequestTimeout", "BadTooManySessions", "BadDisconnect",
    "BadTcpInternalError", "BadTcpServerTooBusy", "BadNoCommunication",
)}


def _value(value: int | bool, vtype: ua.VariantType) -> ua.DataValue:
    """A DataValue without timestamps (some PLC servers refuse to have them written)."""
    if vtype == ua.VariantType.Int16 and isinstance(value, int) and value > 32767:
        value -= 65536
    return ua.DataValue(ua.Variant(value, vtype))


class OpcuaOutput(QueuedOutput):
    kind = "opcua"

    def __init__(self, cfg: OpcuaSettings) -> None:
        super().__init__(cfg, slots=1, block=cfg.sequence_node is not None,
                         reject=cfg.reject_node is not None,
                         heartbeat=cfg.heartbeat_node is not None)
        self.cfg = cfg
        self._loop = asyncio.new_event_loop()  # runs on the worker thread only
        self._wakeup = asyncio.Event()
        self._client: Client | None = None
        self._nodes: dict[str, tuple[Node, ua.VariantType]] = {}
        self._start()

    # -- wake-up through the loop ----------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the loop is closed: the worker has stopped
            pass

    def _arm(self) -> None:
        self._wakeup.clear()

    def _wait(self, timeout: float) -> None:
        async def wait() -> None:
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

        self._loop.run_until_complete(wait())

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            super()._run()
        finally:
            self._disconnect(clean=False)  # no-op when already closed
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    # -- transport -----------------------------------------------------------------------
    def _call(self, aw: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """Run one request on the loop, within a deadline; map its failure."""
        try:
            return self._loop.run_until_complete(
                asyncio.wait_for(aw, timeout or self.cfg.timeout_s + 0.5))
        except ua.UaStatusCodeError as e:
            if e.code in LINK_CODES:
                raise Outage(f"{self._where()}: {what}: {e}") from None
            raise Refused(f"{self._where()}: {what} refused ({e})") from None
        except (OSError, TimeoutError, ua.UaError) as e:
            raise Outage(f"{self._where()}: {what}: {type(e).__name__} {e}") from None

    def _connect(self) -> None:
        client = Client(self.cfg.endpoint, timeout=self.cfg.timeout_s)

        async def lost(_exc: Exception) -> None:  # the client's watchdog saw the server go
            self._wakeup.set()

        client.connection_lost_callback = lost
        self._client = client
        self._call(client.connect(), "connect", 3 * self.cfg.timeout_s + 0.5)
        c = self.cfg
        self._nodes = {}
        for name, node_id in (("sequence", c.sequence_node), ("part", c.part_node),
                              ("verdict", c.verdict_node), ("reject", c.reject_node),
                              ("heartbeat", c.heartbeat_node)):
            if node_id is None:
                continue
            node = client.get_node(node_id)
            vtype = self._call(node.read_data_type_as_variant_type(), f"node {node_id}")
            wanted = {ua.VariantType.Boolean} if name == "reject" else INT_TYPES
            if vtype not in wanted:
                raise Refused(f"{self._where()}: node {node_id} ({name}) is {vtype.name}, "
                              f"expected {'Boolean' if name == 'reject' else 'an integer type'}")
            self._nodes[name] = (node, vtype)

    def _disconnect(self, clean: bool) -> None:
        client, self._client = self._client, None
        if client is None or self._loop.is_closed():
            return

        async def close() -> None:
            try:
                await client.close_session()  # stops the client's own tasks first
                if clean:
                    await client.close_secure_channel()
            except Exception:  # noqa: BLE001 - the link may be gone already; nothing to save
                pass

        try:
            self._loop.run_until_complete(asyncio.wait_for(close(), self.cfg.timeout_s))
        except TimeoutError:
            pass
        finally:
            client.disconnect_socket()

    def _write_values(self, names: tuple[str, ...], values: tuple[Any, ...], what: str) -> None:
        client = self._client
        if client is None:
            raise Outage(f"{self._where()}: not connected")
        nodes = [self._nodes[n][0] for n in names]
        data = [_value(v, self._nodes[n][1]) for n, v in zip(names, values, strict=True)]
        self._call(client.write_values(nodes, data), what)

    def _write_block(self, b: Block) -> None:
        self._write_values(("part", "verdict", "sequence"), (b.part, b.code, b.sequence),
                           "verdict nodes")

    def _write_reject(self, on: bool) -> None:
        self._write_values(("reject",), (on,), "reject node")

    def _write_heartbeat(self, value: int) -> None:
        self._write_values(("heartbeat",), (value,), "heartbeat node")

    def _probe(self) -> None:
        client = self._client
        if client is not None and client.uaclient.state is not UaClientState.CONNECTED:
            raise Outage(f"{self._where()}: connection lost")

    def _where(self) -> str:
        return f"opcua {self.cfg.endpoint}"
