"""Who may talk to the line: the line's CURVE key pair, and private ipc sockets.

Every role of a line holds the same key pair (`inspectd keys generate`, copied to each host
of the line). On a tcp:// endpoint the binding side is a CURVE server that admits only
clients presenting the line's public key (a ZAP handler checks it), and every connecting
side is a CURVE client that knows the server by that key: traffic is encrypted, and a
process without the key can neither send a frame or a verdict nor read one. A tcp endpoint
beyond loopback without the keys is refused. ipc:// sockets rely on the file system: the
run directory is created 0700 and each socket file is made 0600 once bound, so only the
line's own user reaches them.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from inspectd.core.config import LineSettings
from inspectd.core.errors import InspectdError

KEY_NAME = "line"
PUBLIC, SECRET = f"{KEY_NAME}.key", f"{KEY_NAME}.key_secret"
_authenticators: dict[int, ThreadAuthenticator] = {}  # per context: one ZAP handler


class KeysError(InspectdError):
    """The line's keys are missing where they are needed, unreadable or unsafe."""


@dataclass(frozen=True)
class LineKeys:
    directory: Path
    public: bytes
    secret: bytes

    @property
    def fingerprint(self) -> str:
        return self.public.decode()[:12]


def generate(directory: Path, force: bool = False) -> LineKeys:
    """A new key pair in `directory` (0700): line.key (public), line.key_secret (0600)."""
    directory = Path(directory)
    if (directory / SECRET).exists() and not force:
        raise KeysError(f"{directory / SECRET} exists; keep it (every host of the line uses "
                        "it) or replace it with --force")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(directory, KEY_NAME)
    finally:
        os.umask(old)
    os.chmod(directory / SECRET, 0o600)
    os.chmod(directory / PUBLIC, 0o644)
    return load(directory)


def load(directory: Path) -> LineKeys:
    """The line's keys; KeysError naming the file when they are missing or not private."""
    directory = Path(directory)
    secret_file = directory / SECRET
    if not secret_file.is_file():
        raise KeysError(f"{secret_file}: no line keys (inspectd keys generate -c CONFIG)")
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o077:
        raise KeysError(f"{secret_file}: readable by others (mode {mode:o}); chmod 600 it")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise KeysError(f"{secret_file}: unreadable key file ({e})") from None
    if not public or not secret:
        raise KeysError(f"{secret_file}: not a CURVE secret key file")
    return LineKeys(directory, public, secret)


def load_if_present(directory: Path) -> LineKeys | None:
    return load(directory) if (Path(directory) / SECRET).exists() else None


def line_keys(settings: LineSettings) -> LineKeys | None:
    """The line's keys when generated, else None (ipc and loopback tcp only)."""
    return load_if_present(settings.keys_dir)


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def is_loopback(endpoint: str) -> bool:
    """tcp://127.x.x.x:P, tcp://[::1]:P or tcp://localhost:P (ipc is local by nature)."""
    if not is_tcp(endpoint):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard: may reach the network


def secure(sock: zmq.Socket, endpoint: str, bind: bool, keys: LineKeys | None) -> None:
    """CURVE on a tcp endpoint when the line has keys; refuse one beyond loopback without."""
    if not is_tcp(endpoint):
        return
    if keys is None:
        if not is_loopback(endpoint):
            raise KeysError(f"{endpoint}: beyond loopback the line needs its CURVE keys "
                            "(inspectd keys generate -c CONFIG, then copy them to each host)")
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    if bind:
        _authenticate(sock.context, keys)
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys.public


def _authenticate(ctx: zmq.Context, keys: LineKeys) -> None:
    """A ZAP handler on this context admitting only clients with the line's public key."""
    if id(ctx) in _authenticators:
        return
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.directory))
    _authenticators[id(ctx)] = auth


def release(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler, if any: its socket would keep `ctx.term()` waiting."""
    auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def private_ipc(endpoint: str) -> None:
    """Before binding an ipc endpoint: its directory exists (created 0700)."""
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def after_bind(endpoint: str) -> None:
    """After binding an ipc endpoint: the socket file is the line user's only (0600)."""
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)
