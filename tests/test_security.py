"""Who may talk to the line: the line's CURVE keys on tcp endpoints, private ipc sockets."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import zmq

from inspectd.core.config import LineSettings
from inspectd.core.wire import VERDICT, FrameHeader, Verdict, new_frame_id
from inspectd.daemon import security
from inspectd.daemon.sink import Sink
from inspectd.daemon.transport import TransportError, socket
from tests.helpers import audit_rows, free_port, wait_rows
from tests.test_acquire import Line, _goods, drop, settings  # noqa: F401 (fixture)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_generate_and_list(tmp_path, run_cli):
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    proc = run_cli("keys", "list", "-c", str(cfg), check=False)
    assert proc.returncode == 1 and "no line keys (inspectd keys generate" in proc.stderr
    run_cli("keys", "generate", "-c", str(cfg))
    keys = tmp_path / "data" / "keys"
    assert _mode(keys) == 0o700 and _mode(keys / "line.key_secret") == 0o600
    public = security.load(keys).public.decode()
    assert public in run_cli("keys", "list", "-c", str(cfg)).stdout
    again = run_cli("keys", "generate", "-c", str(cfg), check=False)
    assert again.returncode == 1 and "exists" in again.stderr  # never replaced by accident
    os.chmod(keys / "line.key_secret", 0o644)
    proc = run_cli("keys", "list", "-c", str(cfg), check=False)
    assert proc.returncode == 1 and "readable by others" in proc.stderr


def test_ipc_sockets_are_private_to_the_line_user(tmp_path):
    run_dir = tmp_path / "run"
    ctx = zmq.Context()
    try:
        sock = socket(ctx, zmq.ROUTER, f"ipc://{run_dir}/x.sock", bind=True, hwm=10)
        assert _mode(run_dir) == 0o700 and _mode(run_dir / "x.sock") == 0o600
        sock.close(0)
    finally:
        ctx.term()


class _NoNetwork:
    """A context whose sockets only record: the refusal must come before any bind or
    connect, so this test never opens a port or sends a packet beyond loopback."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def socket(self, kind: int) -> _NoNetwork:
        return self

    def setsockopt(self, *_: object) -> None:
        pass

    def bind(self, ep: str) -> None:
        self.opened.append(ep)

    connect = bind

    def close(self, *_: object) -> None:
        pass


def test_a_network_endpoint_without_the_keys_is_refused(tmp_path):
    ctx = _NoNetwork()
    with pytest.raises(TransportError, match="beyond loopback the line needs its CURVE"):
        socket(ctx, zmq.ROUTER, "tcp://0.0.0.0:0", bind=True, hwm=10)
    with pytest.raises(TransportError, match="beyond loopback"):
        socket(ctx, zmq.DEALER, "tcp://10.0.0.7:5555", bind=False, hwm=10)
    assert ctx.opened == []


def _tcp_line(settings: LineSettings, tmp_path: Path) -> LineSettings:  # noqa: F811
    cams = {"cam1": settings.cameras["cam1"].model_copy(
        update={"endpoint": f"tcp://127.0.0.1:{free_port()}"})}
    return settings.model_copy(update={
        "cameras": cams, "sink_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "events": settings.events.model_copy(
            update={"endpoint": f"tcp://127.0.0.1:{free_port()}"})})


def test_a_line_over_tcp_with_curve_judges_and_admits_no_one_without_the_key(
        settings, synth_root, tmp_path):  # noqa: F811
    s = _tcp_line(settings, tmp_path)
    keys = security.generate(s.keys_dir)
    intruders = zmq.Context()
    # Without the key: a worker-like thief on the frames endpoint, a forger at the sink.
    thief = intruders.socket(zmq.PULL)
    thief.connect(s.frames_endpoint("cam1"))
    forger = intruders.socket(zmq.DEALER)
    other = zmq.curve_keypair()  # a key pair that is not the line's
    forger.curve_publickey, forger.curve_secretkey = other
    forger.curve_serverkey = keys.public  # it even knows the sink's public key
    forger.connect(s.sink_address())
    line = Line(s)
    try:
        time.sleep(0.5)
        img = _goods(synth_root)[0].read_bytes()
        for i in range(6):
            drop(s.cameras["cam1"].path, f"part_{i}.png", img)
        now = time.time()
        h = FrameHeader(new_frame_id(), "cam1", "obj", now, now + 30, (8, 8, 3), "uint8",
                        "rgb8", line=s.line)
        try:  # the handshake fails (wrong key): no connection to queue for, at best
            forger.send_multipart([VERDICT, Verdict.for_frame(h, "OK", score=0.0,
                                                              threshold=1.0).encode()],
                                  zmq.NOBLOCK)
        except zmq.Again:
            pass
        rows = wait_rows(s.database_url(), 6)
        time.sleep(1.0)
        assert thief.poll(0) == 0  # never got a frame
    finally:
        line.close()
        thief.close(0)
        forger.close(0)
        intruders.term()
    rows = audit_rows(s.database_url())
    assert len(rows) == 6 and {r["verdict"] for r in rows} <= {"OK", "NG"}
    assert h.frame_id not in {r["frame_id"] for r in rows}


def test_the_sink_over_curve_refuses_a_client_without_curve(settings, tmp_path):  # noqa: F811
    s = _tcp_line(settings, tmp_path)
    security.generate(s.keys_dir)
    ctx = zmq.Context()
    sink = Sink(s, ctx)
    plain = ctx.socket(zmq.DEALER)
    plain.connect(s.sink_address())
    try:
        now = time.time()
        h = FrameHeader(new_frame_id(), "cam1", "obj", now, now + 1, (8, 8, 3), "uint8",
                        "rgb8", line=s.line)
        plain.send_multipart([b"announce", h.encode()], zmq.NOBLOCK)
        poller = zmq.Poller()
        poller.register(sink.inbox, zmq.POLLIN)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            sink.step(poller, 50)
        assert sink.counts.pending == 0 and sink.counts.frames == 0
    finally:
        plain.close(0)
        sink.close()
        security.release(ctx)
        ctx.term()
    assert audit_rows(s.database_url()) == []
