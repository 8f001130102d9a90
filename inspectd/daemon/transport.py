"""ZeroMQ socket handling for the roles; the wire format lives in `core.wire`.

Every socket gets a bounded high-water mark and a short linger; transport failures become
`TransportError`s that name the endpoint.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from inspectd.core.errors import InspectdError


class TransportError(InspectdError):
    """A socket could not bind, connect or send."""


def _ipc_dir(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)


def socket(
    ctx: zmq.Context,
    kind: int,
    endpoints: str | list[str],
    *,
    bind: bool,
    hwm: int,
    linger_ms: int = 1000,
    send_timeout_ms: int | None = None,
) -> zmq.Socket:
    """A socket bound to, or connected to, each endpoint, with bounded queues."""
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
    for ep in [endpoints] if isinstance(endpoints, str) else endpoints:
        try:
            if bind:
                _ipc_dir(ep)
                sock.bind(ep)
            else:
                sock.connect(ep)
        except zmq.ZMQError as e:
            sock.close(0)
            raise TransportError(f"{ep}: cannot {'bind' if bind else 'connect'} ({e})") from None
    return sock
