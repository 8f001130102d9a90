"""sd_notify(3) in stdlib: tell systemd we are ready, alive, busy with what, and stopping.

Without NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op. A send
that fails is logged once and otherwise ignored: the line must not stop because the service
manager is unreachable.

`Notifier` speaks the protocol; `RoleWatchdog` is what a role run alone (`inspectd sink` …)
tells systemd: READY when the role is up, WATCHDOG only while its main loop beats, STATUS,
STOPPING. (`inspectd run` has its supervisor speak for the whole line instead.)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("inspectd.systemd")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._warned = False
        self.enabled = self._address is not None
        self.watchdog_interval = _watchdog_interval(env) if self.enabled else None

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        self._send(None, text)

    def watchdog(self) -> None:
        if self.watchdog_interval is not None:
            self._send("WATCHDOG=1", None)

    def stopping(self, status: str | None = None) -> None:
        self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more in the current state (start-up, or stop while draining)."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}", None)

    def _send(self, assignment: str | None, status: str | None) -> None:
        if self._address is None:
            return
        lines = [assignment] if assignment else []
        if status is not None:
            # One assignment per line: a newline inside STATUS would start a bogus one.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A manager that stops reading must not freeze the supervisor: drop instead.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify failed; further failures not logged",
                            socket=os.fsdecode(self._address), error=str(e))


class RoleWatchdog:
    """sd_notify for one role run alone. The role calls `ready()` once it is up and `beat()`
    from every turn of its main loop; a thread sends WATCHDOG=1 every half watchdog interval
    while the last beat is fresher than `heartbeat_timeout_s` (a hung loop stops the pings and
    systemd restarts the role), STATUS every STATUS_EVERY_S (`figures()` where the role has
    live figures, and whether its loop is silent), and STOPPING=1 as soon as `stop` is set.
    The thread only reads: the role's signal handlers still only set `stop`."""

    STATUS_EVERY_S = 2.0

    def __init__(self, notifier: Notifier, stop: threading.Event, heartbeat_timeout_s: float,
                 label: str, figures: Callable[[], str] | None = None) -> None:
        self.notifier, self.stop, self.label = notifier, stop, label
        self.timeout = heartbeat_timeout_s
        self.figures = figures
        self.last_beat = time.monotonic()
        self._done = threading.Event()
        self._stopping_sent = False
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def ready(self) -> None:
        self.beat()
        self.notifier.ready(self.status_line())
        if self.notifier.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def status_line(self) -> str:
        silent = time.monotonic() - self.last_beat
        line = f"{self.label}: " + (self.figures() if self.figures is not None else "up")
        if silent > self.timeout:
            line += f"; main loop silent for {silent:.0f} s"
        return line

    def close(self) -> None:
        """The role has returned (or failed): STOPPING=1 if not yet said, and no more pings."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self._stopping()

    def _stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.notifier.stopping(f"{self.label}: stopping")

    def _run(self) -> None:
        ping = self.notifier.watchdog_interval
        tick = min(0.25, ping / 4) if ping else 0.25
        last_ping, last_status = 0.0, time.monotonic()
        while not self._done.wait(tick):
            if self.stop.is_set():
                self._stopping()
                return
            now = time.monotonic()
            if ping and now - self.last_beat <= self.timeout and now - last_ping >= ping / 2:
                self.notifier.watchdog()
                last_ping = now
            if now - last_status >= self.STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = now


def _socket_address(value: str) -> bytes | None:
    if value.startswith("@"):  # abstract namespace: leading NUL instead of "@"
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    if value:
        log.warning("NOTIFY_SOCKET not a unix socket path; systemd notifications off",
                    notify_socket=value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None  # the watchdog belongs to another process (e.g. our parent)
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC not an integer; watchdog pings off", watchdog_usec=raw)
        return None
    return usec / 1_000_000 if usec > 0 else None
