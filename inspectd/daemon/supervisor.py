"""`inspectd run`: one host's roles as child processes, supervised, and systemd told about it.

Children are spawned (not forked: no torch or ZeroMQ state is shared) in the order sink,
workers, acquisition, so every socket a child connects to is already bound. A child that
dies is restarted, at most `restart_limit` times per `restart_window_s`; past that the
supervisor stops the line and exits non-zero so systemd's Restart= takes over. A child whose
heartbeat is older than `heartbeat_timeout_s` is hung, and one not ready START_TIMEOUT_S after
its start is stuck starting: either is killed and restarted. A restart is forgiven only once
the child has then run a whole `restart_window_s` ready and beating, so a child whose restarts
all fail (it hangs again, never comes up) reaches the limit however slowly it fails.

The systemd watchdog tells the truth about the line: WATCHDOG=1 goes out from this loop while
every child is healthy or being handled within budget (restarting, starting up, a finite
source that ended). It stops when the loop stops, when a hung child cannot be killed, and
when the restart limit stops the line.

Signal handlers only set a flag; the main loop acts. Shutdown order: acquisition stops taking
frames, audits the ones it still holds as TIMEOUT and waits up to `drain_s` for the outcomes
of those with a worker; workers get the rest of `drain_s`; then the sink audits what is still
pending as TIMEOUT and closes the audit log.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from typing import Any

import structlog

from inspectd.core.config import LineSettings
from inspectd.core.log import configure as configure_logging
from inspectd.daemon.roles import Role, run_role
from inspectd.daemon.systemd import Notifier

log = structlog.get_logger("inspectd.supervisor")
_CTX = mp.get_context("spawn")
STATUS_FIELDS = ("frames", "OK", "NG", "ERROR", "TIMEOUT", "late", "pending")
START_TIMEOUT_S = 300.0  # a child not ready this long after its start is stuck starting
KILL_WAIT_S = 5.0  # a killed child still alive after this cannot be killed


def _child_main(role: Role, settings: LineSettings, name: str | None, stop: Any, ready: Any,
                beat: Synchronized, stats: SynchronizedArray, log_level: str) -> None:
    # Ctrl-C reaches the whole process group; only the supervisor decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (sent directly, or by the kernel when the supervisor dies) stops this child
    # gracefully. The handler must not set the Event itself: it may interrupt the main
    # thread inside stop.wait(), holding the lock set() needs.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop.set).start())
    _die_with_parent(signal.SIGTERM)
    configure_logging(log_level)
    structlog.contextvars.bind_contextvars(role=role, name=name)

    def heartbeat() -> None:
        beat.value = time.monotonic()

    def sink_status(c: Any) -> None:
        stats[:] = [c.frames, *(c.by_verdict[k] for k in STATUS_FIELDS[1:5]), c.late, c.pending]

    # A multiprocessing Event has threading.Event's interface (is_set, wait, set).
    run_role(role, settings, stop, name, ready.set, heartbeat, sink_status)


def _die_with_parent(sig: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): children do not outlive a killed supervisor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        log.warning("cannot tie this process's life to the supervisor's (no prctl)")


@dataclass
class Child:
    role: Role
    name: str | None
    proc: Any = None
    stop: Any = None
    ready: Any = None
    beat: Any = None
    restarts: deque = field(default_factory=deque)
    finished: bool = False
    started_at: float = 0.0  # monotonic
    ready_at: float | None = None  # when the supervisor saw it ready, since its last start
    unkillable: bool = False  # killed, yet alive: nothing the supervisor can do
    past_limit: bool = False  # died once more than restart_limit allows: the line stops

    @property
    def label(self) -> str:
        return f"{self.role}:{self.name}" if self.name is not None else self.role


class Supervisor:
    def __init__(self, settings: LineSettings, notifier: Notifier | None = None) -> None:
        self.s = settings
        self.notifier = notifier or Notifier()
        self.stats = _CTX.Array("q", len(STATUS_FIELDS), lock=False)
        self.children = [Child("sink", None)]
        self.children += [Child("worker", str(i)) for i in range(settings.worker.count)]
        self.children += [Child("acquire", cam) for cam in settings.cameras]
        self._signal: int | None = None

    def status(self) -> dict[str, int]:
        return dict(zip(STATUS_FIELDS, self.stats[:], strict=True))

    def _start(self, c: Child) -> None:
        c.stop, c.ready = _CTX.Event(), _CTX.Event()
        c.beat = _CTX.Value("d", time.monotonic(), lock=False)
        c.started_at, c.ready_at = time.monotonic(), None
        c.proc = _CTX.Process(
            target=_child_main, name=f"inspectd-{c.label}", daemon=False,
            args=(c.role, self.s, c.name, c.stop, c.ready, c.beat, self.stats, self.s.log_level))
        c.proc.start()
        log.info("started", child=c.label, pid=c.proc.pid)

    def _wait_ready(self, group: list[Child], timeout: float = START_TIMEOUT_S) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._signal is None:
            if all(c.ready.is_set() for c in group):
                return True
            for c in group:
                if not c.proc.is_alive():
                    log.error("child exited during start", child=c.label,
                              exitcode=c.proc.exitcode)
                    return False
            time.sleep(0.05)
        return False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        order = [[c for c in self.children if c.role == r] for r in ("sink", "worker", "acquire")]
        for group in order:
            for c in group:
                self._start(c)
            if not self._wait_ready(group):
                self._shutdown()
                return 0 if self._signal is not None else 1
        self.notifier.ready(self._status_line())
        log.info("line up", children=[c.label for c in self.children])
        code = self._loop()
        self._shutdown()
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _loop(self) -> int:
        ping = self.notifier.watchdog_interval
        last_ping = last_status = 0.0
        while self._signal is None:
            now = time.monotonic()
            handled = True
            for c in self.children:
                state = self._check(c, now)
                if state is None:
                    return 1  # restart limit: the line stops, systemd's Restart= takes over
                handled = handled and state
            # WATCHDOG from this loop only, while every child is healthy or in hand: a stuck
            # loop, or a child hung beyond repair, gets the line restarted by systemd.
            if handled and ping and now - last_ping >= ping / 2:
                self.notifier.watchdog()
                last_ping = now
            if now - last_status >= 2.0:
                self.notifier.status(self._status_line())
                last_status = now
            time.sleep(0.1)
        return 0

    def _check(self, c: Child, now: float) -> bool | None:
        """Look after one child: True if it is healthy or being handled within budget, False
        if it is hung beyond what the supervisor can fix, None if the restart limit is hit."""
        if c.finished:
            return True
        if c.unkillable:
            if c.proc.is_alive():
                return False
            c.unkillable = False
            log.warning("hung child finally gone", child=c.label, exitcode=c.proc.exitcode)
        if not c.proc.is_alive():
            if c.role == "acquire" and c.proc.exitcode == 0:
                # A finite source (a video file) has ended: nothing to restart.
                log.info("camera source ended", child=c.label)
                c.finished = True
                return True
            return self._restart(c, f"exited with code {c.proc.exitcode}") or None
        if c.ready.is_set():
            if c.ready_at is None:
                c.ready_at = now
                if c.restarts:
                    log.info("child ready", child=c.label, restarts=len(c.restarts),
                             start_s=round(now - c.started_at, 1))
            silent = now - c.beat.value
            if silent <= self.s.supervisor.heartbeat_timeout_s:
                return True
            reason = f"no heartbeat for {silent:.1f} s"
        elif now - c.started_at > START_TIMEOUT_S:
            reason = f"not ready {now - c.started_at:.0f} s after its start"
        else:
            return True  # starting (importing, loading models): in hand until START_TIMEOUT_S
        c.proc.kill()
        c.proc.join(KILL_WAIT_S)
        if c.proc.is_alive():
            c.unkillable = True
            log.error("hung child cannot be killed; watchdog pings stop", child=c.label,
                      pid=c.proc.pid, reason=reason)
            return False
        return self._restart(c, reason) or None

    def _restart(self, c: Child, reason: str) -> bool:
        now = time.monotonic()
        window = self.s.supervisor.restart_window_s
        # Earlier restarts are forgiven only if the child then ran a whole window ready and
        # beating; a child that never gets there (hangs again, dies starting) keeps them.
        if c.ready_at is not None and c.beat.value - c.ready_at >= window:
            c.restarts.clear()
        if len(c.restarts) >= self.s.supervisor.restart_limit:
            log.error("restart limit reached; stopping the line", child=c.label, reason=reason,
                      restarts=len(c.restarts), window_s=window)
            c.past_limit = True
            return False
        c.restarts.append(now)
        log.warning("restarting child", child=c.label, reason=reason, restarts=len(c.restarts))
        self._start(c)
        self.notifier.status(self._status_line())
        return True

    def _status_line(self) -> str:
        st = self.status()
        ok = st["OK"] / st["frames"] * 100 if st["frames"] else 0.0
        line = (f"frames {st['frames']}, ok {ok:.1f}%, ng {st['NG']}, error {st['ERROR']}, "
                f"timeout {st['TIMEOUT']}, pending {st['pending']}")
        limit = self.s.supervisor.restart_limit
        for c in self.children:
            if c.past_limit:
                line += f"; {c.label} past its restart limit ({len(c.restarts)}/{limit})"
            elif c.unkillable:
                line += f"; {c.label} hung and cannot be killed"
            elif c.proc is not None and c.restarts and c.ready_at is None and not c.finished:
                line += f"; {c.label} restarting ({len(c.restarts)}/{limit})"
        return line

    def _shutdown(self) -> None:
        self.notifier.stopping(self._status_line())
        drain = self.s.supervisor.drain_s
        self.notifier.extend_timeout(drain + 30)
        log.info("stopping", status=self._status_line())
        self._stop_group("acquire", drain + 10)  # each waits ≤ drain_s for its outcomes
        end = time.monotonic() + drain
        while self.status()["pending"] and time.monotonic() < end and self._sink_alive():
            time.sleep(0.05)
        self._stop_group("worker", 10)
        self._stop_group("sink", drain + 20)
        log.info("stopped", status=self._status_line())

    def _sink_alive(self) -> bool:
        return any(c.proc is not None and c.proc.is_alive() for c in self.children
                   if c.role == "sink")

    def _stop_group(self, role: str, timeout: float) -> None:
        group = [c for c in self.children if c.role == role and c.proc is not None]
        for c in group:
            c.stop.set()
        for c in group:
            c.proc.join(timeout)
            if c.proc.is_alive():
                log.warning("child did not stop in time; killing", child=c.label)
                c.proc.kill()
                c.proc.join(5)
