"""The throwaway servers of tests/services.py, started here whatever runs on this machine, so
every run proves that `make test` works on a machine with no PostgreSQL or Mosquitto."""

from __future__ import annotations

import queue
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import sqlalchemy as sa

from tests.services import throwaway_mosquitto, throwaway_postgres


def _throwaways() -> list[str]:
    """Command lines of the running processes that serve a throwaway directory."""
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True, check=True)
    return [x for x in ps.stdout.splitlines() if "/inspectd-test-" in x]


def test_throwaway_postgres_and_mosquitto_serve_and_leave_nothing_behind() -> None:
    before = set(_throwaways())  # the session's own throwaways, if it started any
    with throwaway_postgres() as url, throwaway_mosquitto() as (host, port):
        assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert host == "127.0.0.1"
        engine = sa.create_engine(url)
        try:
            with engine.connect() as c:
                assert c.execute(sa.text("SELECT host(inet_server_addr()), current_user")
                                 ).one() == ("127.0.0.1", "postgres")
                data_dir = Path(c.execute(sa.text("SHOW data_directory")).scalar_one())
        finally:
            engine.dispose()

        got: queue.Queue[bytes] = queue.Queue()
        subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.on_subscribe = lambda *_: subscribed.set()
        c.on_message = lambda _c, _u, msg: got.put(msg.payload)
        c.connect(host, port)
        c.loop_start()
        try:
            c.subscribe("inspectd/test/round-trip", qos=1)
            assert subscribed.wait(10), "no SUBACK from the throwaway Mosquitto"
            c.publish("inspectd/test/round-trip", b"hello", qos=1)
            assert got.get(timeout=10) == b"hello"
        finally:
            c.loop_stop()
            c.disconnect()
        ours = set(_throwaways()) - before
        assert len(ours) == 2 and any(f"-D {data_dir} " in x for x in ours), ours

    assert not data_dir.parent.exists()
    assert not ours & set(_throwaways())
