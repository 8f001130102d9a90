"""sd_notify against real datagram sockets, and the unit files against systemd's own tools."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from inspectd.core.config import SupervisorSettings
from inspectd.daemon.systemd import Notifier, RoleWatchdog
from tests.helpers import until

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "inspectd.service"
SYSUSERS = SYSTEMD_DIR / "inspectd.sysusers.conf"
# Each role alone (a line split across hosts): unit file → an instance to verify, its command.
SPLIT_UNITS = {
    "inspectd-sink.service": ("inspectd-sink.service", "sink -c /etc/inspectd/inspectd.yaml"),
    "inspectd-worker@.service": ("inspectd-worker@0.service",
                                 "worker -c /etc/inspectd/inspectd.yaml"),
    "inspectd-acquire@.service": ("inspectd-acquire@cam1.service",
                                  "acquire --camera %i -c /etc/inspectd/inspectd.yaml"),
}


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


# -- every unit file in systemd/, and the units of roles run alone ---------------------------

def _unit_keys(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for k, v in re.findall(r"^(\w+)=(.*)$", path.read_text(), flags=re.M):
        keys.setdefault(k, []).append(v)
    return keys


def test_every_unit_file_is_known_to_these_tests():
    assert {p.name for p in SYSTEMD_DIR.glob("*.service")} == {UNIT.name, *SPLIT_UNITS}


def test_every_unit_passes_systemd_analyze_verify_without_warnings(tmp_path):
    """Every unit in systemd/ (templates as an instance), ExecStart at the venv's script."""
    script = Path(sys.executable).parent / "inspectd"
    assert script.is_file(), f"{script} missing: install the project into the venv"
    instances = []
    for unit in sorted(SYSTEMD_DIR.glob("*.service")):
        text, n = re.subn(r"^ExecStart=/usr/bin/inspectd ", f"ExecStart={script} ",
                          unit.read_text(), flags=re.M)
        assert n == 1, f"{unit.name} must run /usr/bin/inspectd"
        (tmp_path / unit.name).write_text(text)
        instances.append(SPLIT_UNITS.get(unit.name, (unit.name,))[0])
    for name in instances:  # one at a time: an error names its unit
        proc = subprocess.run([_tool("systemd-analyze"), "verify", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (0, ""), f"{name}: {proc.stderr}"


@pytest.mark.parametrize("name", sorted(SPLIT_UNITS))
def test_split_role_unit_is_notify_watched_and_hardened_like_the_line(name):
    line, unit = _unit_keys(UNIT), _unit_keys(SYSTEMD_DIR / name)
    assert unit["ExecStart"] == [f"/usr/bin/inspectd {SPLIT_UNITS[name][1]}"]
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert int(unit["WatchdogSec"][0]) > SupervisorSettings().heartbeat_timeout_s
    # The same user, directories and sandbox as inspectd.service; devices per role.
    differ = {"Description", "ExecStart", "SyslogIdentifier", "WatchdogSec", "TimeoutStartSec",
              "TimeoutStopSec", "SupplementaryGroups", "DeviceAllow", "After", "Wants",
              "WantedBy", "Conflicts", "RuntimeDirectoryPreserve"}
    for key in line.keys() - differ:
        assert unit.get(key) == line[key], key
    assert set(unit.get("DeviceAllow", [])) <= set(line["DeviceAllow"])
    # /run/inspectd holds the ipc sockets of every role of the host: one unit stopping must
    # not remove it under the others.
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert unit["Conflicts"] == ["inspectd.service"]  # that one runs every role itself
    assert int(unit["TimeoutStopSec"][0]) > SupervisorSettings().drain_s + 20
    if name != "inspectd-sink.service":
        assert "inspectd-sink.service" in unit["After"][0].split()


def test_role_watchdog_pings_only_while_the_loop_beats(notify_sock):
    """A role's main loop that stops beating (the process otherwise alive) stops the pings;
    they come back when it beats again; STOPPING=1 follows the stop flag."""
    s, addr = notify_sock
    s.settimeout(0.05)
    got: list[tuple[float, str]] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            try:
                got.append((time.monotonic(), _recv(s)))
            except TimeoutError:
                pass

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    stop, beating = threading.Event(), threading.Event()
    watch = RoleWatchdog(Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000"}), stop,
                         heartbeat_timeout_s=0.5, label="sink", figures=lambda: "frames 7")

    def loop() -> None:  # the role's main loop: beats while `beating`
        while not stop.is_set():
            if beating.is_set():
                watch.beat()
            time.sleep(0.02)

    def pings_since(t: float) -> int:
        return sum(1 for at, m in list(got) if at >= t and m == "WATCHDOG=1")

    beating.set()
    role = threading.Thread(target=loop, daemon=True)
    role.start()
    try:
        watch.ready()
        until(lambda: any(m.startswith("READY=1\nSTATUS=sink: frames 7") for _, m in got),
              "READY=1 with the sink's figures")
        start = time.monotonic()
        until(lambda: pings_since(start) >= 3, "pings while the loop beats")
        beating.clear()
        time.sleep(1.0)  # the last beat is now older than heartbeat_timeout_s
        silent_from = time.monotonic()
        time.sleep(1.0)
        assert pings_since(silent_from) == 0
        assert any("main loop silent" in m for _, m in got)  # and STATUS says so
        beating.set()
        back = time.monotonic()
        until(lambda: pings_since(back) >= 2, "pings once the loop beats again")
        stop.set()
        until(lambda: any(m.startswith("STOPPING=1") for _, m in got), "STOPPING=1")
    finally:
        stop.set()
        watch.close()
        done.set()
        collector.join()
    assert [m for _, m in got].count("STOPPING=1\nSTATUS=sink: stopping") == 1


class NotifyLog:
    """A fake NOTIFY_SOCKET that keeps each datagram with its arrival time (monotonic)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data))

    def times(self, line: str, since: float = 0.0) -> list[float]:
        """Arrival times of the datagrams holding `line` (e.g. "WATCHDOG=1")."""
        return [at for at, m in list(self.got) if at >= since and line in m.splitlines()]

    def messages(self) -> list[str]:
        return [m for _, m in list(self.got)]

    def close(self) -> None:
        self._done.set()
        self._t.join()
        self.sock.close()


def test_sink_alone_speaks_sd_notify_and_its_pings_follow_its_loop(tmp_path):
    """`inspectd sink` as its unit runs it: READY once up, WATCHDOG while its loop runs
    (none while the process is stopped, again after SIGCONT), STATUS with its counts,
    STOPPING=1 on SIGTERM, exit 0."""
    run_dir = Path(tempfile.mkdtemp(prefix="ids", dir="/tmp"))  # ipc paths stay short
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({
        "line": "split", "data_dir": str(tmp_path / "data"), "run_dir": str(run_dir),
        "metrics": {"enabled": False}, "supervisor": {"heartbeat_timeout_s": 1.0}}))
    notes = NotifyLog(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "sink.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "inspectd", "sink", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)

    def alive() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sink exited {proc.returncode}:\n"
                                 + (tmp_path / "sink.log").read_text()[-4000:])
        return True

    try:
        until(lambda: alive() and notes.times("READY=1"), "READY=1", timeout=60)
        (ready,) = notes.times("READY=1")
        until(lambda: alive() and len(notes.times("WATCHDOG=1", ready)) >= 2,
              "WATCHDOG=1 after READY=1")
        until(lambda: any(m.startswith("STATUS=sink: frames 0,") for m in notes.messages()),
              "STATUS with the sink's counts")
        # A stopped process cannot ping: systemd's watchdog sees it.
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # what it sent just before has arrived
        frozen = time.monotonic()
        time.sleep(3.0)
        assert notes.times("WATCHDOG=1", frozen) == []
        thawed = time.monotonic()
        proc.send_signal(signal.SIGCONT)
        until(lambda: alive() and len(notes.times("WATCHDOG=1", thawed)) >= 2,
              "pings again after SIGCONT")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        until(lambda: notes.times("STOPPING=1"), "STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        log.close()
        notes.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    (stopping,) = notes.times("STOPPING=1")
    assert notes.times("WATCHDOG=1", stopping) == []  # no pings once stopping


# -- the supervisor's watchdog verdict, child by child (simulated children and clock) -------

class _FakeProc:
    pid = 4242

    def __init__(self, killable: bool = True) -> None:
        self.alive, self.killable, self.exitcode = True, killable, None

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        if self.killable:
            self.alive, self.exitcode = False, -9

    def join(self, timeout: float | None = None) -> None:
        pass


class _Beat:
    def __init__(self, value: float) -> None:
        self.value = value  # the child's last heartbeat (monotonic); its start, at first


def _supervised_worker(tmp_path: Path, monkeypatch, killable: bool = True, **supervisor):
    """A Supervisor whose children are fakes on a simulated clock: (check, its worker, the
    start times so far); check(t) is the supervisor's verdict on the worker at time t."""
    from types import SimpleNamespace

    from inspectd.core.config import LineSettings
    from inspectd.daemon import supervisor as sup_mod

    clock = [0.0]
    monkeypatch.setattr(sup_mod, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    s = LineSettings(line="l1", data_dir=tmp_path, cameras={}, supervisor=supervisor)
    sup = sup_mod.Supervisor(s, Notifier({}))
    starts: list[float] = []

    def start(c) -> None:
        c.proc, c.ready, c.beat = _FakeProc(killable), threading.Event(), _Beat(clock[0])
        c.started_at, c.ready_at = clock[0], None
        starts.append(clock[0])

    monkeypatch.setattr(sup, "_start", start)
    (worker,) = [c for c in sup.children if c.role == "worker"]
    start(worker)

    def check(now: float) -> bool | None:
        clock[0] = now
        return sup._check(worker, now)

    check.status = sup._status_line  # type: ignore[attr-defined]
    return check, worker, starts


def test_a_child_whose_restarts_all_fail_reaches_the_limit_however_slowly(tmp_path, monkeypatch):
    """The worst case: a worker that comes up, beats a little, hangs; restarted, the same again,
    each cycle far longer than restart_window_s. The supervisor pings while it restarts it (in
    hand), but the restarts are never forgiven, so the limit ends it: no pinging forever."""
    check, w, starts = _supervised_worker(tmp_path, monkeypatch, restart_limit=3,
                                          restart_window_s=10.0, heartbeat_timeout_s=5.0)
    for cycle in range(4):
        t = starts[-1]
        assert check(t + 1) is True  # starting: in hand
        w.ready.set()
        w.beat.value = t + 2
        assert check(t + 2) is True  # up and beating
        w.beat.value = t + 4  # …then its loop hangs, a few seconds in
        assert check(t + 8) is True  # silent, but not yet past heartbeat_timeout_s
        verdict = check(t + 1000)  # hung: killed, and restarted while in budget
        if cycle < 3:
            assert verdict is True and len(w.restarts) == cycle + 1
        else:
            assert verdict is None and w.past_limit  # the line stops; exit code 1
    assert "worker:0 past its restart limit (3/3)" in check.status()


def test_a_restart_is_forgiven_once_the_child_ran_a_whole_window(tmp_path, monkeypatch):
    check, w, starts = _supervised_worker(tmp_path, monkeypatch, restart_limit=1,
                                          restart_window_s=10.0, heartbeat_timeout_s=5.0)
    for _ in range(3):  # dies after running healthy for 30 s, each time
        t = starts[-1]
        w.ready.set()
        assert check(t + 1) is True
        w.beat.value = t + 31
        w.proc.alive, w.proc.exitcode = False, 1
        assert check(t + 32) is True and len(w.restarts) == 1
    assert len(starts) == 4


def test_a_child_stuck_starting_is_restarted_and_an_unkillable_one_stops_the_pings(
        tmp_path, monkeypatch):
    from inspectd.daemon.supervisor import START_TIMEOUT_S

    check, w, starts = _supervised_worker(tmp_path, monkeypatch, killable=False)
    assert check(START_TIMEOUT_S - 1) is True  # still starting: in hand
    # Not ready after START_TIMEOUT_S: killed, but it will not die (D state): nothing the
    # supervisor can do, so no more pings (False) and no second process beside it.
    assert check(START_TIMEOUT_S + 1) is False and len(starts) == 1
    assert check(START_TIMEOUT_S + 2) is False
    assert "worker:0 hung and cannot be killed" in check.status()
    w.proc.alive, w.proc.exitcode = False, -9  # it finally went: restarted, in hand again
    assert check(START_TIMEOUT_S + 3) is True and len(starts) == 2
    assert "worker:0 restarting (1/5)" in check.status()


def test_acquisition_alone_is_ready_once_it_runs_and_pings_while_it_loops(tmp_path):
    """`inspectd acquire --camera cam1` as inspectd-acquire@cam1 runs it (no sink needed to
    start: announcements wait for it): READY, WATCHDOG, STATUS naming the camera, then
    STOPPING=1 on SIGTERM and exit 0."""
    run_dir = Path(tempfile.mkdtemp(prefix="ida", dir="/tmp"))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({
        "line": "split", "data_dir": str(tmp_path / "data"), "run_dir": str(run_dir),
        "cameras": {"cam1": {"type": "folder", "path": str(inbox), "sku": "obj"}},
        "supervisor": {"heartbeat_timeout_s": 1.0, "drain_s": 0.5}}))
    notes = NotifyLog(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "acquire.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inspectd", "acquire", "--camera", "cam1", "-c", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env)

    def alive() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"acquire exited {proc.returncode}:\n"
                                 + (tmp_path / "acquire.log").read_text()[-4000:])
        return True

    try:
        until(lambda: alive() and notes.times("READY=1"), "READY=1", timeout=60)
        (ready,) = notes.times("READY=1")
        until(lambda: alive() and len(notes.times("WATCHDOG=1", ready)) >= 2, "WATCHDOG=1")
        until(lambda: any(m.startswith("STATUS=acquire cam1: ") for m in notes.messages()),
              "STATUS naming the camera")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        until(lambda: notes.times("STOPPING=1"), "STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        notes.close()
        shutil.rmtree(run_dir, ignore_errors=True)
