"""The PostgreSQL and Mosquitto the tests talk to: the running ones, or throwaway ones.

Where a server runs on its usual loopback port (PostgreSQL at 127.0.0.1:5432 taking user
`postgres` without a password, Mosquitto at 127.0.0.1:1883 taking an anonymous client), the
tests use it. Otherwise the session starts a throwaway one from the Debian package
(`postgresql`, `mosquitto`: the Makefile's DEB_PACKAGES) in a temporary directory, on a free
port of 127.0.0.1 only, and stops and removes it at the end of the session.
INSPECTD_TEST_SERVICES=throwaway starts throwaway ones even when the usual ones run.

A throwaway server is a child of the test process with a parent-death signal (setpriv
--pdeathsig KILL), so it dies with the session even when pytest itself is killed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port

ENV = "INSPECTD_TEST_SERVICES"  # auto (default) | throwaway
HOST = "127.0.0.1"
PG_PORT, MQTT_PORT = 5432, 1883
INSTALL = "apt-get install {pkg} (`make venv` installs it: the Makefile's DEB_PACKAGES)"

# What this session used, for the terminal summary: "PostgreSQL: throwaway at ...".
USED: list[str] = []


def mode() -> str:
    value = os.environ.get(ENV, "auto") or "auto"
    if value not in ("auto", "throwaway"):
        pytest.fail(f"{ENV}={value!r}: expected auto or throwaway", pytrace=False)
    return value


def pg_url(port: int, database: str = "postgres") -> str:
    return f"postgresql+psycopg://postgres@{HOST}:{port}/{database}"


def postgres_accepts(port: int, timeout: int = 2) -> bool:
    """A real connection as user `postgres` (no password) to database `postgres`."""
    try:
        psycopg.connect(host=HOST, port=port, user="postgres", dbname="postgres",
                        connect_timeout=timeout).close()
    except psycopg.Error:
        return False
    return True


def mosquitto_accepts(port: int, timeout: float = 2.0) -> bool:
    """An anonymous MQTT 3.1.1 CONNECT answered by CONNACK 'accepted'."""
    cid = b"inspectd-test-probe"
    connect = (b"\x10" + bytes([12 + len(cid)]) + b"\x00\x04MQTT\x04\x02\x00\x0a"
               + len(cid).to_bytes(2, "big") + cid)
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(connect)
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                if not chunk:
                    return False
                ack += chunk
            s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return ack == b"\x20\x02\x00\x00"


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        pytest.fail("no PostgreSQL server (/usr/lib/postgresql/<version>/bin/initdb) for a "
                    "throwaway one: " + INSTALL.format(pkg="postgresql"), pytrace=False)
    return found[-1].parent


def _system_user(name: str, pkg: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.fail(f"no `{name}` system user (created by the Debian package {pkg}): "
                    + INSTALL.format(pkg=pkg), pytrace=False)


def _wait(proc: subprocess.Popen, log: Path, ready: Callable[[], bool], what: str,
          timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > end:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"throwaway {what} did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.1)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster (trust auth, superuser `postgres`) on a free loopback port;
    yields its admin URL. initdb and postgres refuse to run as root, so root runs them as
    the `postgres` system user on a directory that user owns."""
    bindir = _pg_bindir()
    creds: list[str] = []  # setpriv options: as root, become the postgres user
    tmp = Path(tempfile.mkdtemp(prefix="inspectd-test-pg-"))  # in /tmp: reachable by postgres
    if os.geteuid() == 0:
        u = _system_user("postgres", "postgresql")
        os.chown(tmp, u.pw_uid, u.pw_gid)
        creds = [f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups"]
    as_user = ["setpriv", *creds] if creds else []
    data, log = tmp / "data", tmp / "server.log"
    proc: subprocess.Popen | None = None
    try:
        init = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                               "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                              cwd=tmp, capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        for _attempt in range(3):  # the free port may be taken before postgres binds it
            port = free_port()
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", *creds, str(bindir / "postgres"),
                     "-D", str(data), "-p", str(port), "-k", str(tmp),
                     "-c", f"listen_addresses={HOST}", "-c", "fsync=off",
                     "-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
                    cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                _wait(proc, log, lambda p=port: postgres_accepts(p, timeout=1), "PostgreSQL")
                break
            except RuntimeError:
                _end(proc)
                if "Address already in use" not in log.read_text(errors="replace"):
                    raise
        else:
            raise RuntimeError(f"throwaway PostgreSQL found no free port:\n{log.read_text()}")
        yield pg_url(port)
    finally:
        if proc is not None and proc.poll() is None:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "stop", "-D", str(data),
                            "-m", "immediate", "-w", "-t", "20"],
                           cwd=tmp, capture_output=True, timeout=30)
            _end(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def throwaway_mosquitto() -> Iterator[tuple[str, int]]:
    """A Mosquitto broker (anonymous, no persistence) on a free loopback port; yields
    (host, port). As root it runs as the `mosquitto` system user."""
    binary = Path("/usr/sbin/mosquitto")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no {binary} for a throwaway broker: " + INSTALL.format(pkg="mosquitto"),
                    pytrace=False)
    creds: list[str] = []  # setpriv options: as root, become the mosquitto user
    tmp = Path(tempfile.mkdtemp(prefix="inspectd-test-mqtt-"))
    if os.geteuid() == 0:
        # Not mosquitto's own `user` option: its setuid would clear the parent-death signal.
        u = _system_user("mosquitto", "mosquitto")
        os.chown(tmp, u.pw_uid, u.pw_gid)
        creds = [f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups"]
    conf, log = tmp / "mosquitto.conf", tmp / "broker.log"
    proc: subprocess.Popen | None = None
    try:
        for _attempt in range(3):  # the free port may be taken before mosquitto binds it
            port = free_port()
            conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                            "log_dest stderr\n")
            with open(log, "ab") as out:
                proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", *creds, str(binary),
                                         "-c", str(conf)], cwd=tmp, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT)
            try:
                _wait(proc, log, lambda p=port: mosquitto_accepts(p, timeout=1), "Mosquitto")
                break
            except RuntimeError:
                _end(proc)
                if "Address already in use" not in log.read_text(errors="replace"):
                    raise
        else:
            raise RuntimeError(f"throwaway Mosquitto found no free port:\n{log.read_text()}")
        yield HOST, port
    finally:
        if proc is not None:
            _end(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Admin URL (superuser `postgres`, database `postgres`) of the session's PostgreSQL."""
    if mode() == "auto" and postgres_accepts(PG_PORT):
        USED.append(f"PostgreSQL: the running one at {HOST}:{PG_PORT}")
        yield pg_url(PG_PORT)
        return
    with throwaway_postgres() as url:
        USED.append(f"PostgreSQL: a throwaway at {url.split('@')[1].split('/')[0]}")
        yield url


@pytest.fixture(scope="session")
def mosquitto_server() -> Iterator[tuple[str, int]]:
    """(host, port) of the session's Mosquitto."""
    if mode() == "auto" and mosquitto_accepts(MQTT_PORT):
        USED.append(f"Mosquitto: the running one at {HOST}:{MQTT_PORT}")
        yield HOST, MQTT_PORT
        return
    with throwaway_mosquitto() as address:
        USED.append(f"Mosquitto: a throwaway at {address[0]}:{address[1]}")
        yield address
