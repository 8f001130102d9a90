"""ZeroMQ socket handling for the roles; the wire format lives in `core.wire`.

Every socket gets a bounded high-water mark and a short linger; transport failures become
`TransportError`s that name the endpoint. Security (`security`): CURVE with the line's keys
on tcp endpoints, private ipc sockets.
"""

from __future__ import annotations

import zmq

from inspectd.core.errors import InspectdError
from inspectd.daemon import security
from inspectd.daemon.security import LineKeys


class TransportError(InspectdError):
    """A socket could not bind, connect or send."""


def socket(
    ctx: zmq.Context,
    kind: int,
    endpoints: str | list[str],
    *,
    bind: bool,
    hwm: int,
    linger_ms: int = 1000,
    send_timeout_ms: int | None = None,
    keys: LineKeys | None = None,
) -> zmq.Socket:
    """A socket bound to, or connected to, each endpoint, with bounded queues; CURVE with
    `keys` on tcp endpoints (one socket's endpoints are all tcp or all not)."""
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if keys is not None and len({security.is_tcp(ep) for ep in eps}) > 1:
        raise TransportError(f"{', '.join(eps)}: tcp and non-tcp endpoints on one socket")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if send_timeout_ms is not None:
        sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    if kind == zmq.PUSH:
        # Queue only for peers that are actually connected: with no worker up, a send fails
        # at once (and the frame is audited as a reject) instead of waiting in a pipe.
        sock.setsockopt(zmq.IMMEDIATE, 1)
    for ep in eps:
        try:
            security.secure(sock, ep, bind, keys)
            if bind:
                security.private_ipc(ep)
                sock.bind(ep)
                security.after_bind(ep)
            else:
                sock.connect(ep)
        except (zmq.ZMQError, OSError, security.KeysError) as e:
            sock.close(0)
            raise TransportError(f"{ep}: cannot {'bind' if bind else 'connect'} ({e})") from None
    return sock
