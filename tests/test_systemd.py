"""sd_notify against real datagram sockets, and the unit files against systemd's own tools."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from inspectd.core.config import SupervisorSettings
from inspectd.daemon.systemd import Notifier

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "inspectd.service"
SYSUSERS = SYSTEMD_DIR / "inspectd.sysusers.conf"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package `systemd`")
    return path


@pytest.fixture
def notify_sock(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd: (socket, NOTIFY_SOCKET value)."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    yield s, str(path)
    s.close()


def _recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_ready_status_watchdog_stopping_arrive_as_datagrams(notify_sock):
    s, addr = notify_sock
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "30000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval == 30.0
    n.ready("frames 0, ok 0.0%")
    assert _recv(s) == "READY=1\nSTATUS=frames 0, ok 0.0%"
    n.status("frames 1234, ok 99.1%, pending 3, p50 41 ms")
    assert _recv(s) == "STATUS=frames 1234, ok 99.1%, pending 3, p50 41 ms"
    n.watchdog()
    assert _recv(s) == "WATCHDOG=1"
    n.stopping("draining")
    assert _recv(s) == "STOPPING=1\nSTATUS=draining"
    n.extend_timeout(35)
    assert _recv(s) == "EXTEND_TIMEOUT_USEC=35000000"
    n.ready()
    assert _recv(s) == "READY=1"


def test_status_with_newlines_stays_one_assignment(notify_sock):
    s, addr = notify_sock
    Notifier({"NOTIFY_SOCKET": addr}).status("camera lost\nREADY=1")
    assert _recv(s) == "STATUS=camera lost READY=1"


def test_abstract_namespace_socket_receives_notifications():
    name = f"inspectd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert _recv(s) == "READY=1\nSTATUS=up"


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # systemd meant another pid
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_comes_from_watchdog_usec_for_our_pid(env, interval):
    n = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert n.watchdog_interval == interval


def test_watchdog_for_another_pid_sends_no_pings(notify_sock):
    s, addr = notify_sock
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "30000000",
                  "WATCHDOG_PID": str(os.getpid() + 1)})
    n.watchdog()
    n.status("marker")
    assert _recv(s) == "STATUS=marker"  # datagrams arrive in order: no WATCHDOG=1 was sent


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    for n in (Notifier(), Notifier({})):
        assert not n.enabled and n.watchdog_interval is None
        n.ready("x")
        n.status("x")
        n.watchdog()
        n.stopping()
        n.extend_timeout(10)


def test_unreachable_socket_never_raises_and_warns_once(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        n.ready()
        n.status("x")
        n.stopping()
    assert [e["log_level"] for e in logs] == ["warning"]


def _unit_for_this_host(tmp_path: Path) -> Path:
    """The unit with ExecStart at the venv's console script: verify checks it exists."""
    script = Path(sys.executable).parent / "inspectd"
    assert script.is_file(), f"{script} missing: install the project into the venv"
    text, n = re.subn(r"^ExecStart=/usr/bin/inspectd ", f"ExecStart={script} ",
                      UNIT.read_text(), flags=re.M)
    assert n == 1, "the repo's unit must run /usr/bin/inspectd"
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path):
    proc = subprocess.run([_tool("systemd-analyze"), "verify", str(_unit_for_this_host(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def test_unit_is_notify_type_with_state_and_runtime_dirs():
    keys = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), flags=re.M))
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert keys["ExecStart"] == "/usr/bin/inspectd run -c /etc/inspectd/inspectd.yaml"
    # LineSettings reads $STATE_DIRECTORY and $RUNTIME_DIRECTORY for data_dir and run_dir.
    assert keys["StateDirectory"] == keys["RuntimeDirectory"] == "inspectd"
    # systemd must not SIGKILL the line while it drains: cameras 10 s, workers 10 s, the sink
    # drain_s + 20 s, after up to drain_s waiting for pending verdicts.
    assert int(keys["TimeoutStopSec"]) > 2 * SupervisorSettings().drain_s + 40


def test_sysusers_snippet_creates_the_service_user(tmp_path):
    unit = UNIT.read_text()
    user, group = (re.search(rf"^{k}=(\S+)", unit, flags=re.M).group(1) for k in ("User", "Group"))
    proc = subprocess.run([_tool("systemd-sysusers"), "--dry-run", f"--root={tmp_path}", "-"],
                          input=SYSUSERS.read_text(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"Creating user '{user}'" in proc.stderr
    assert f"Creating group '{group}'" in proc.stderr
    assert not re.search(r"(?i)fail|ignor|warn", proc.stderr), proc.stderr
