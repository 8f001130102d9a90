"""Role entry points: the same code runs as a supervised child or alone (`inspectd sink` …).

Thread budget: the roles on one host share its cores, and oversubscribed OpenMP runs several
times slower, so each role sets its torch/OpenMP/faiss/OpenCV thread counts before torch is
imported (`core.resources`): workers split the cores between them, acquisition and the sink
take one each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from inspectd.core.config import LineSettings
from inspectd.core.resources import host_cores, set_threads, torch_threads

Role = Literal["acquire", "worker", "sink"]


def role_threads(settings: LineSettings, role: Role) -> int:
    if role != "worker":
        return 1
    return settings.worker.threads or max(1, host_cores() // settings.worker.count)


def run_role(
    role: Role,
    settings: LineSettings,
    stop: threading.Event,
    name: str | None = None,
    ready: Callable[[], None] = lambda: None,
    heartbeat: Callable[[], None] | None = None,
    on_sink_status: Callable[[object], None] | None = None,
) -> None:
    """Run one role until `stop` is set. `name` is the camera for acquire."""
    n = role_threads(settings, role)
    set_threads(n)
    if role == "acquire":
        from inspectd.daemon.acquire import Acquirer

        if name not in settings.cameras:
            from inspectd.core.errors import ConfigError

            raise ConfigError(f"no camera {name!r} in the config ({sorted(settings.cameras)})")
        Acquirer(settings, name).run(stop, ready, heartbeat or (lambda: None))
    elif role == "worker":
        from inspectd.daemon.worker import Worker

        torch_threads(n)
        w = Worker(settings, heartbeat=heartbeat)
        w.preload()
        ready()
        w.run(stop)
    else:
        from inspectd.daemon.metrics import Metrics
        from inspectd.daemon.sink import Sink

        metrics = Metrics()
        if settings.metrics.enabled:
            metrics.serve(settings.metrics.host, settings.metrics.port)
        sink = Sink(settings, metrics=metrics)
        if on_sink_status is not None or heartbeat is not None:
            beat = heartbeat or (lambda: None)

            def _hb() -> None:
                beat()
                if on_sink_status is not None:
                    on_sink_status(sink.counts)

            sink.heartbeat = _hb
        ready()
        sink.run(stop)
