"""sd_notify(3) in stdlib: tell systemd we are ready, alive, busy with what, and stopping.

Without NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op. A send
that fails is logged once and otherwise ignored: the line must not stop because the service
manager is unreachable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

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
