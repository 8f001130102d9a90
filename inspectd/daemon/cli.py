"""Daemon commands: `inspectd run` (all roles of one host) and one role each."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import structlog
import typer

from inspectd.core.config import LineSettings
from inspectd.core.log import configure as configure_logging
from inspectd.core.settings import load_settings

LineConfigOpt = Annotated[
    Path, typer.Option("-c", "--config", help="line config, e.g. /etc/inspectd/inspectd.yaml")
]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("-o", "--override", help="section.key=value (repeatable)")
]


def line_settings(config: Path, overrides: list[str] | None) -> LineSettings:
    s = load_settings(LineSettings, config, overrides or [])
    configure_logging(s.log_level)
    return s


def run_cmd(config: LineConfigOpt, override: OverrideOpt = None) -> None:
    """Run this host's line: one acquisition per camera, the worker(s) and the sink."""
    from inspectd.daemon.supervisor import Supervisor

    sys.exit(Supervisor(line_settings(config, override)).run())


def _single(role: str, config: Path, override: list[str] | None, name: str | None = None) -> None:
    from inspectd.daemon.roles import run_role

    s = line_settings(config, override)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    structlog.contextvars.bind_contextvars(role=role, name=name)
    run_role(role, s, stop, name)  # type: ignore[arg-type]


def acquire_cmd(
    config: LineConfigOpt,
    camera: Annotated[str, typer.Option(help="camera name from the config")],
    override: OverrideOpt = None,
) -> None:
    """Run one camera's acquisition alone (frames to the workers, announcements to the sink)."""
    _single("acquire", config, override, camera)


def worker_cmd(config: LineConfigOpt, override: OverrideOpt = None) -> None:
    """Run one scoring worker alone (connects to every camera's frames endpoint)."""
    _single("worker", config, override)


def sink_cmd(config: LineConfigOpt, override: OverrideOpt = None) -> None:
    """Run the sink alone: audit log, images, PLC, events, metrics."""
    _single("sink", config, override)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("acquire")(acquire_cmd)
    app.command("worker")(worker_cmd)
    app.command("sink")(sink_cmd)
