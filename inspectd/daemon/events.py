"""Verdict events: a ZeroMQ PUB socket (`inspectd events` subscribes) and optionally MQTT.

ZeroMQ messages are `[b"verdict.<sku>.<VERDICT>", JSON]`, the JSON being the verdict with the
saved image paths merged in as `paths`. Subscriptions are topic prefixes; because SKU names may
hold dots (`verdict.a.` also prefixes `verdict.a.b.NG`), `subscribe` checks each event's SKU
too. Publishing never blocks the sink: a PUB socket drops messages for a subscriber whose
queue is full (libzmq does that silently, per subscriber), and MQTT messages wait in a bounded
paho queue while the broker is away.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import structlog
import zmq

from inspectd.core.config import MqttSettings
from inspectd.core.wire import VERDICTS, Verdict, valid_name
from inspectd.daemon.security import LineKeys
from inspectd.daemon.transport import socket

log = structlog.get_logger("inspectd.events")

PUB_HWM = 1000  # per subscriber
MQTT_QUEUE = 1000
SUB_HWM = 10_000
REJECTS = tuple(k for k in VERDICTS if k != "OK")


def topic(v: Verdict) -> bytes:
    return f"verdict.{v.sku or '_'}.{v.verdict}".encode()


def event_json(v: Verdict, paths: dict[str, str] | None) -> bytes:
    return json.dumps({**v.as_dict(), "paths": paths or {}}, separators=(",", ":")).encode()


class EventPublisher:
    def __init__(self, endpoint: str, line: str, mqtt_cfg: MqttSettings,
                 ctx: zmq.Context | None = None, keys: LineKeys | None = None) -> None:
        self.line = line
        self.dropped = 0
        self._sock = socket(ctx or zmq.Context.instance(), zmq.PUB, endpoint, bind=True,
                            hwm=PUB_HWM, linger_ms=200, keys=keys)
        self._mqtt = _MqttOut(mqtt_cfg, line) if mqtt_cfg.enabled else None

    def publish(self, v: Verdict, paths: dict[str, str] | None = None) -> None:
        payload = event_json(v, paths)
        try:
            self._sock.send_multipart([topic(v), payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._drop(f"zeromq: {e}")
        if self._mqtt is not None and not self._mqtt.publish(v, payload):
            self._drop("mqtt: broker away and queue full (or qos 0)")

    def close(self) -> None:
        if self._mqtt is not None:
            self._mqtt.close()
        self._sock.close()

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:  # bounded log volume under overload
            log.warning("event dropped", reason=why, dropped=self.dropped)


class _MqttOut:
    """paho's network thread (loop_start) connects and reconnects; a down broker never blocks."""

    def __init__(self, cfg: MqttSettings, line: str) -> None:
        self.cfg = cfg
        self.prefix = f"{cfg.topic_prefix}/{line}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="")
        self.client.max_queued_messages_set(MQTT_QUEUE)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._up: bool | None = None
        self.client.connect_async(cfg.host, cfg.port)
        self.client.loop_start()

    def publish(self, v: Verdict, payload: bytes) -> bool:
        if self.cfg.ng_only and v.passed:
            return True
        info = self.client.publish(f"{self.prefix}/{v.sku or '_'}/{v.verdict}", payload,
                                   qos=self.cfg.qos)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            return self.cfg.qos > 0  # qos ≥ 1 stays queued and goes out on reconnect
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _state(self, up: bool, reason: Any) -> None:
        if up != self._up:  # log state changes, not every reconnect attempt
            where = f"{self.cfg.host}:{self.cfg.port}"
            if up:
                log.info("mqtt connected", broker=where)
            else:
                log.warning("mqtt broker unavailable", broker=where, reason=str(reason))
        self._up = up

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._state(not reason.is_failure, reason)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._state(False, reason)


def _prefixes(sku: str | None, ng_only: bool) -> list[bytes]:
    base = f"verdict.{sku}." if sku is not None else "verdict."
    if ng_only and sku is not None:
        return [f"{base}{k}".encode() for k in REJECTS]
    return [base.encode()]  # without a SKU, NG-only is filtered here: no wildcard topics


def subscribe(endpoint: str, sku: str | None = None, ng_only: bool = False,
              stop: threading.Event | None = None, ctx: zmq.Context | None = None,
              keys: LineKeys | None = None) -> Iterator[dict[str, Any]]:
    """Events from a sink's PUB endpoint as dicts, until `stop` is set or the caller stops."""
    if sku is not None:
        valid_name(sku, "sku")
    sock = socket(ctx or zmq.Context.instance(), zmq.SUB, endpoint, bind=False, hwm=SUB_HWM,
                  linger_ms=0, keys=keys)
    for prefix in _prefixes(sku, ng_only):
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    try:
        while stop is None or not stop.is_set():
            if not sock.poll(100):
                continue
            parts = sock.recv_multipart()
            try:
                event = json.loads(parts[-1])
                kind, event_sku = event["verdict"], event["sku"]
            except (ValueError, KeyError, TypeError) as e:
                log.warning("malformed event ignored", endpoint=endpoint, error=str(e))
                continue
            if (sku is None or event_sku == sku) and not (ng_only and kind == "OK"):
                yield event
    finally:
        sock.close(0)
