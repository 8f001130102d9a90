"""Checks of a line config beyond its schema: what the line would trip over on this host.

The schema (`core/config.py`) says whether a config is well-formed; `line_problems` says
whether this host can run it: folders that must exist, the audit database's driver, ZeroMQ
endpoints, and a few legal but suspicious settings (warnings). It looks only — it creates,
connects and binds nothing — so `inspectd validate-config` and the daemon at start can both
call it. Each problem names its key as a path into the config (`Problem.loc`), so the
caller can say where the key was set (`settings.key_origins`).
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
from pathlib import Path
from typing import NamedTuple

from inspectd.core.config import FolderCamera, LineSettings
from inspectd.core.errors import ConfigError
from inspectd.core.settings import read_yaml


class Problem(NamedTuple):
    loc: tuple[str, ...]  # the key, as a path: ("cameras", "cam1", "path")
    message: str
    warning: bool = False  # legal but suspicious; an error otherwise

    @property
    def key(self) -> str:
        return ".".join(self.loc)


# (backend, driver) pairs the audit log runs on, as SQLAlchemy names them.
SUPPORTED_DATABASES = {("sqlite", "pysqlite"), ("postgresql", "psycopg")}
_SUPPORTED_TEXT = "SQLite (sqlite:///FILE) or PostgreSQL with psycopg (postgresql+psycopg://…)"
IPC_PATH_MAX = 107  # bytes: sizeof(sockaddr_un.sun_path) - 1
_TCP = re.compile(r"tcp://(?P<host>\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\*|\d+)")


def line_problems(s: LineSettings) -> list[Problem]:
    """Every problem found, errors and warnings, in the order of the config's sections."""
    found: list[Problem] = []
    msg = _missing_dir(s.data_dir)
    if msg:
        found.append(Problem(("data_dir",), msg))
    for name, cam in s.cameras.items():
        if isinstance(cam, FolderCamera):
            found += _folder(name, cam)
        if cam.deadline_ms <= s.worker.max_wait_ms:
            found.append(Problem(("cameras", name, "deadline_ms"), (
                f"{cam.deadline_ms} ms is not above worker.max_wait_ms ({s.worker.max_wait_ms:g}"
                " ms): a frame can spend its whole deadline waiting for its batch to fill"),
                warning=True))
    found += _endpoints(s)
    if s.sink.database.url is not None:
        found += [Problem(("sink", "database", "url"), m, w)
                  for m, w in _database(s.sink.database.url)]
    if s.refit.model is not None:
        msg = _model_file(s.refit.model)
        if msg:
            found.append(Problem(("refit", "model"), msg))
    return found


def _missing_dir(d: Path) -> str | None:
    """Why folder `d` neither exists nor can be created by this user (None when it can)."""
    try:
        if d.exists():
            return None if d.is_dir() else f"{d} is not a folder"
        parent = d.parent
        if not parent.exists():
            return f"{d} does not exist, nor does its parent {parent}"
        if not parent.is_dir():
            return f"{d} cannot be created: {parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return (f"{d} does not exist and cannot be created: {parent} is not writable by "
                    f"user {getpass.getuser()}")
    except OSError as e:
        return f"{d}: cannot check ({e.strerror})"
    return None


def _folder(name: str, cam: FolderCamera) -> list[Problem]:
    out = []
    path = cam.path.expanduser()
    try:
        if not path.exists():
            out.append(Problem(("cameras", name, "path"), f"folder {path} does not exist"))
        elif not path.is_dir():
            out.append(Problem(("cameras", name, "path"), f"{path} is not a folder"))
        done = cam.done_dir.expanduser() if cam.done_dir else None
        # A done_dir inside a missing `path` is already reported with `path`.
        if done is not None and done.parent != path and not done.parent.is_dir():
            out.append(Problem(("cameras", name, "done_dir"), (
                f"{done} cannot be created: its parent {done.parent} does not exist")))
    except OSError as e:
        out.append(Problem(("cameras", name, "path"), f"{path}: cannot check ({e.strerror})"))
    return out


def _endpoints(s: LineSettings) -> list[Problem]:
    """Every endpoint this host binds: valid, usable by the roles that connect to it, and
    bound once."""
    bound: list[tuple[tuple[str, ...], str, bool]] = [  # (key, endpoint, set in the config)
        (("cameras", n, "endpoint"), s.frames_endpoint(n), c.endpoint is not None)
        for n, c in s.cameras.items()
    ]
    bound.append((("sink_endpoint",), s.sink_address(), s.sink_endpoint is not None))
    bound.append((("events", "endpoint"), s.events_address(), s.events.endpoint is not None))
    out: list[Problem] = []
    keyed = (s.keys_dir / "line.key_secret").is_file()  # inspectd keys generate
    seen: list[tuple[tuple[str, ...], str, tuple[str, ...]]] = []  # (key, endpoint, identity)
    for loc, ep, configured in bound:
        # A default endpoint lives in run_dir: that is the key to change.
        key = loc if configured else ("run_dir",)
        problem, warning, ident = _endpoint(ep, keyed)
        if problem:
            out.append(Problem(key, problem, warning))
            if not warning:
                continue
        for other_loc, other_ep, other in seen:
            if _same_socket(ident, other):
                out.append(Problem(key, f"{ep} is already bound by {'.'.join(other_loc)} "
                                        f"({other_ep}): each endpoint can be bound once"))
                break
        seen.append((loc, ep, ident))
    return out


def _endpoint(ep: str, keyed: bool) -> tuple[str | None, bool, tuple[str, ...]]:
    """(problem, is it only a warning, identity for spotting a second bind) of one endpoint
    that a role binds and others connect to, with the same string; `keyed`: the line has
    its CURVE keys."""
    if ep.startswith("ipc://"):
        path = ep[len("ipc://"):]
        if not path:
            return f"{ep!r}: ipc:// needs a socket path (ipc:///run/inspectd/x.sock)", False, ()
        if len(os.fsencode(path)) > IPC_PATH_MAX:
            return (f"{ep}: the socket path is {len(os.fsencode(path))} bytes, ZeroMQ takes at "
                    f"most {IPC_PATH_MAX}"), False, ()
        return None, False, ("ipc", os.path.normpath(path))
    if ep.startswith("inproc://"):
        # Valid ZeroMQ, but every role is a process of its own: nothing would ever connect.
        return (f"{ep}: inproc:// reaches only the same process, and each role of the line "
                "is a process of its own; use ipc:// (this host) or tcp://"), False, ()
    m = _TCP.fullmatch(ep)
    if not m:
        return (f"{ep!r} is not a ZeroMQ endpoint inspectd can bind: expected "
                "ipc:///path/x.sock or tcp://HOST:PORT"), False, ()
    host, port = m["host"], m["port"]
    if host == "*" or port == "*" or not 0 < int(port) < 65536:
        return (f"{ep}: the roles connect to this same string, so it needs an address and a "
                "port 1-65535 (127.0.0.1 on one host, this host's address across hosts)"
                ), False, ()
    ident = ("tcp", port, host.strip("[]").lower())
    if not _loopback(host) and not keyed:
        return (f"{ep} is reachable from the network: the line needs its CURVE keys there "
                "(inspectd keys generate -c CONFIG, copied to every host), or bind 127.0.0.1"
                ), False, ident
    return None, False, ident


def _loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface name


def _same_socket(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if not a or not b or a[0] != b[0]:
        return False
    if a[0] == "tcp":  # one port, and the same address or one of them on every address
        wild = {"0.0.0.0", "::"}
        return a[1] == b[1] and (a[2] == b[2] or a[2] in wild or b[2] in wild)
    return a == b


def _database(url_text: str) -> list[tuple[str, bool]]:
    """(problem, is it a warning) of the audit database URL, from SQLAlchemy's own parsing
    and dialect loading: nothing connects."""
    import sqlalchemy as sa  # lazily: validate-config and the daemon need it, not all of core

    try:
        url = sa.engine.make_url(url_text)
    except sa.exc.ArgumentError:
        # Not echoed: an unparsable URL cannot have its password hidden.
        return [(f"not a SQLAlchemy URL; expected {_SUPPORTED_TEXT}", False)]
    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except sa.exc.NoSuchModuleError:
        return [(f"{shown}: unknown database driver {url.drivername!r}; inspectd supports "
                 f"{_SUPPORTED_TEXT}", False)]
    if (url.get_backend_name(), url.get_driver_name()) not in SUPPORTED_DATABASES:
        return [(f"{shown}: driver {url.get_backend_name()}+{url.get_driver_name()} is not "
                 f"supported; inspectd supports {_SUPPORTED_TEXT}", False)]
    try:
        dialect.import_dbapi()
    except ImportError as e:
        module = e.name or url.get_driver_name()
        return [(f"{shown}: the driver's Python module {module!r} is not installed"
                 + (" (pip install 'psycopg[binary]')" if module == "psycopg" else ""), False)]
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db in ("", ":memory:"):
            return [(f"{shown}: an in-memory audit log loses every verdict when the sink "
                     "stops", True)]
        if not db.startswith("file:"):
            msg = _missing_dir(Path(db).expanduser().parent)
            if msg:
                return [(f"{shown}: the database's folder: {msg}", False)]
    return []


def _model_file(path: Path) -> str | None:
    path = path.expanduser()
    if not path.is_file():
        return (f"model settings file {path} does not exist" if not path.exists()
                else f"{path} is not a file")
    try:
        read_yaml(path)  # syntax and repeated keys; its keys are checked when refit loads it
    except ConfigError as e:
        return str(e)
    return None
