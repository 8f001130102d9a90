"""Verdict events: ZeroMQ PUB → subscribe() and `inspectd events`; MQTT through Mosquitto."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import zmq

from inspectd.core.config import MqttSettings
from inspectd.core.wire import Verdict
from inspectd.daemon.events import EventPublisher, subscribe
from tests.helpers import free_port, until

NO_MQTT = MqttSettings()


def _v(fid: str, kind: str, sku: str = "A", **kw: object) -> Verdict:
    return Verdict(frame_id=fid, verdict=kind, sku=sku, camera="cam1", line="line1", **kw)  # type: ignore[arg-type]


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[tuple[EventPublisher, str]]:
    endpoint = f"ipc://{tmp_path}/run/events.sock"  # run/ does not exist yet
    ctx = zmq.Context()
    pub = EventPublisher(endpoint, "line1", NO_MQTT, ctx)
    yield pub, endpoint
    pub.close()
    ctx.term()


class Collector:
    """subscribe() in a thread, collecting events until stopped."""

    def __init__(self, endpoint: str, **filters: object) -> None:
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint, filters), daemon=True)
        self.thread.start()

    def _run(self, endpoint: str, filters: dict) -> None:
        for e in subscribe(endpoint, stop=self.stop, **filters):
            self.events.append(e)

    def ids(self) -> list[str]:
        return [e["frame_id"] for e in self.events if e["frame_id"] != "probe"]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def _join(pub: EventPublisher, collectors: list[Collector]) -> None:
    """Past the slow-joiner window: publish probes until every subscriber has one."""
    end = time.monotonic() + 10
    while not all(c.events for c in collectors):
        assert time.monotonic() < end, "subscribers never received a probe"
        pub.publish(_v("probe", "NG"))
        time.sleep(0.05)


def test_subscribe_filters_by_sku_and_rejects(publisher):
    pub, endpoint = publisher
    every = Collector(endpoint)
    sku_a = Collector(endpoint, sku="A")
    a_rejects = Collector(endpoint, sku="A", ng_only=True)
    rejects = Collector(endpoint, ng_only=True)
    collectors = [every, sku_a, a_rejects, rejects]
    try:
        _join(pub, collectors)
        sent = [_v("a-ok", "OK", score=0.1, threshold=0.5), _v("a-ng", "NG", part_id="17"),
                _v("b-ng", "NG", sku="B"), _v("ax-ng", "NG", sku="A.x"),  # dotted SKU
                _v("a-timeout", "TIMEOUT", reason="no verdict by the deadline"),
                _v("b-ok", "OK", sku="B"), _v("a-error", "ERROR"), _v("end", "NG")]
        for v in sent:
            pub.publish(v, {"image": f"/img/{v.frame_id}.png"} if v.verdict == "NG" else None)
        until(lambda: all(c.ids()[-1:] == ["end"] for c in collectors), "the end marker")
    finally:
        for c in collectors:
            c.close()

    assert every.ids() == [v.frame_id for v in sent]
    assert sku_a.ids() == ["a-ok", "a-ng", "a-timeout", "a-error", "end"]
    assert a_rejects.ids() == ["a-ng", "a-timeout", "a-error", "end"]
    assert rejects.ids() == ["a-ng", "b-ng", "ax-ng", "a-timeout", "a-error", "end"]
    got = {e["frame_id"]: e for e in every.events}
    assert got["a-ng"]["paths"] == {"image": "/img/a-ng.png"}
    assert got["a-ok"]["paths"] == {}
    assert Verdict.decode(json.dumps(got["a-timeout"]).encode()) == sent[4]


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inspectd", "events", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _follow(proc: subprocess.Popen, pub: EventPublisher, real: list[Verdict]) -> list[str]:
    """Probe until the CLI prints, then publish `real`; return its lines once it exits."""
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    end = time.monotonic() + 20
    while lines.empty():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"inspectd events printed nothing: {proc.stderr.read()}")
        pub.publish(_v("probe", "NG", part_id="probe"))
        time.sleep(0.1)
    for v in real:
        pub.publish(v)
    try:
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        proc.kill()
    reader.join(5)
    return list(lines.queue)


def test_events_cli_prints_json_lines_and_exits_after_count(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub = EventPublisher(endpoint, "line1", NO_MQTT)
    try:
        proc = _cli("--endpoint", endpoint, "--sku", "A", "--json", "--count", "5")
        real = [_v(f"r{i}", kind, part_id=str(i)) for i, kind in
                enumerate(("OK", "NG", "ERROR", "TIMEOUT", "NG"))]
        lines = _follow(proc, pub, [_v("other-sku", "NG", sku="B"), *real])
    finally:
        pub.close()
    events = [json.loads(x) for x in lines]
    probes = sum(e["frame_id"] == "probe" for e in events)
    assert len(events) == 5 and 1 <= probes < 5
    assert [e["frame_id"] for e in events[probes:]] == [v.frame_id for v in real[:5 - probes]]
    assert events[-1]["verdict"] == real[4 - probes].verdict


def test_events_cli_reads_the_endpoint_from_the_line_config(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"line: line1\ndata_dir: {tmp_path}\nrun_dir: {run_dir}\n")
    pub = EventPublisher(f"ipc://{run_dir}/events.sock", "line1", NO_MQTT)
    try:
        proc = _cli("-c", str(cfg), "--ng", "--count", "3")
        ng = _v("r1", "NG", part_id="42", score=0.9, threshold=0.5)
        lines = _follow(proc, pub, [_v("ok", "OK"), ng, _v("r2", "TIMEOUT", reason="late"),
                                    _v("r3", "NG")])
    finally:
        pub.close()
    real = [x for x in lines if "part probe" not in x]
    assert len(lines) == 3 and real
    assert real[0].split()[1:7] == ["cam1", "A", "part", "42", "NG", "0.9000/0.5000"]
    assert real[1].split()[5:] == ["TIMEOUT", "-", "late", "-"]


@pytest.fixture
def mosquitto(mosquitto_server: tuple[str, int]) -> tuple[str, int]:
    """The session's broker: the running Mosquitto or a throwaway (tests/services.py)."""
    return mosquitto_server


def _mqtt_listener(host: str, port: int, topic: str) -> tuple[mqtt.Client, queue.Queue]:
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = lambda _c, _u, msg: got.put(msg)
    c.connect(host, port)
    c.loop_start()
    assert subscribed.wait(10), "no SUBACK from Mosquitto"
    return c, got


def test_mqtt_publishes_per_line_sku_and_verdict(tmp_path, mosquitto):
    host, port = mosquitto
    prefix = f"inspectd/test-{uuid.uuid4().hex[:8]}"
    listener, got = _mqtt_listener(host, port, f"{prefix}/#")
    pubs = [EventPublisher(f"ipc://{tmp_path}/{name}.sock", "line1",
                           MqttSettings(enabled=True, host=host, port=port,
                                        topic_prefix=f"{prefix}/{name}", ng_only=ng_only))
            for name, ng_only in (("all", False), ("ng", True))]
    try:
        for pub in pubs:
            pub.publish(_v("m-ok", "OK"))
            pub.publish(_v("m-ng", "NG", score=0.8), {"image": "/img/m-ng.png"})
        # One client's messages arrive in order: a stray OK from the NG-only publisher would
        # come before its NG, among these three.
        msgs = [got.get(timeout=10) for _ in range(3)]
    finally:
        for pub in pubs:
            pub.close()
        listener.loop_stop()
        listener.disconnect()
    by_topic = {m.topic: json.loads(m.payload) for m in msgs}
    assert set(by_topic) == {f"{prefix}/all/line1/A/OK", f"{prefix}/all/line1/A/NG",
                             f"{prefix}/ng/line1/A/NG"}
    ng = by_topic[f"{prefix}/ng/line1/A/NG"]
    assert (ng["frame_id"], ng["score"], ng["paths"]) == ("m-ng", 0.8, {"image": "/img/m-ng.png"})


def test_unreachable_mqtt_broker_does_not_block_the_sink(tmp_path):
    pub = EventPublisher(f"ipc://{tmp_path}/e.sock", "line1",
                         MqttSettings(enabled=True, port=free_port(), qos=1))
    try:
        for i in range(5):
            pub.publish(_v(f"f{i}", "NG"))  # queued by paho until the broker returns
        assert pub.dropped == 0
    finally:
        pub.close()
