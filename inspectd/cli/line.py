"""The line's commands: `inspectd run` (every role of this host), one role each (`acquire`,
`worker`, `sink`), `validate-config` and `events` (follow the sink's verdicts)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from inspectd.cli.common import OverrideOpt, err, line_settings, out
from inspectd.core.config import LineSettings
from inspectd.core.errors import ConfigError
from inspectd.core.log import configure as configure_logging

LineConfigOpt = Annotated[
    Path, typer.Option("-c", "--config", help="line config, e.g. /etc/inspectd/inspectd.yaml")
]


def configured_line(config: Path, overrides: list[str] | None) -> LineSettings:
    """The line config, logging set up, and what validate-config would say logged: a
    problem (a camera folder not mounted yet) is logged, not fatal — the roles retry."""
    from inspectd.core.config_check import line_problems

    s = line_settings(config, overrides)
    configure_logging(s.log_level)
    log = structlog.get_logger("inspectd.config")
    for p in line_problems(s):
        (log.warning if p.warning else log.error)("line config problem", key=p.key,
                                                  problem=p.message, config=str(config))
    return s


def run_cmd(config: LineConfigOpt, override: OverrideOpt = None) -> None:
    """Run this host's line: one acquisition per camera, the worker(s) and the sink."""
    from inspectd.daemon.supervisor import Supervisor

    sys.exit(Supervisor(configured_line(config, override)).run())


def _single(role: str, config: Path, override: list[str] | None, name: str | None = None) -> None:
    """One role in this process, speaking sd_notify itself when systemd started it (the
    units inspectd-sink.service, inspectd-worker@.service, inspectd-acquire@.service)."""
    from inspectd.daemon.roles import run_role
    from inspectd.daemon.systemd import Notifier, RoleWatchdog

    s = configured_line(config, override)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    structlog.contextvars.bind_contextvars(role=role, name=name)
    watch = RoleWatchdog(Notifier(), stop, s.supervisor.heartbeat_timeout_s,
                         role if name is None else f"{role} {name}")

    def sink_figures(counts: Any) -> None:
        watch.figures = counts.summary  # the sink's live counts, for STATUS

    try:
        run_role(role, s, stop, name, ready=watch.ready,  # type: ignore[arg-type]
                 heartbeat=watch.beat, on_sink_status=sink_figures if role == "sink" else None)
    finally:
        watch.close()


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


def validate_config(
    config: Annotated[Path, typer.Option("-c", "--config", help="line config to check")],
    override: OverrideOpt = None,
) -> None:
    """Check a line config: its keys and values, then what this host needs to run it
    (folders, database driver, endpoints). Every problem is one line naming the key and its
    line; any error exits 2, warnings alone 0, and a good config is summarised."""
    from inspectd.core.config_check import line_problems
    from inspectd.core.settings import key_origins

    # markup off: regexes, URLs and IPv6 addresses hold brackets rich would take for markup.
    try:
        s = line_settings(config, override)
    except ConfigError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    problems = line_problems(s)
    where = key_origins(LineSettings, config, override or [])
    for p in sorted(problems, key=lambda p: p.warning):  # errors first
        origin = where(p.loc)
        err.print(f"{'warning' if p.warning else 'error'}: {config}: '{p.key}': {p.message}"
                  + f" ({origin or 'default'})",
                  markup=False, highlight=False, soft_wrap=True)
    if any(not p.warning for p in problems):
        raise typer.Exit(2)
    try:
        rows = _line_summary(s)
    except ConfigError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"{config}: ok", markup=False, highlight=False)
    for key, value in rows:
        out.print(f"  {key:<9} {value}", markup=False, highlight=False, soft_wrap=True)


def _line_summary(s: Any) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    try:
        db = sa.engine.make_url(s.database_url()).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        raise ConfigError(f"'sink.database.url': not a SQLAlchemy URL "
                          f"(got {s.sink.database.url!r})") from None
    rows = [("line", s.line), ("data_dir", f"{s.data_dir} (run_dir {s.run_dir})"),
            ("sink", s.sink_address())]
    where = {"folder": "path", "opencv": "uri", "aravis": "device", "pylon": "serial"}
    for name, cam in s.cameras.items():
        sku = f"sku {cam.sku}" if cam.sku else f"sku_pattern {cam.sku_pattern!r}"
        source = getattr(cam, where[cam.type]) or getattr(cam, "device_class", None) or "first"
        rows.append(("camera", f"{name}: {cam.type} {source}, {sku} → {s.frames_endpoint(name)}"))
    if not s.cameras:
        rows.append(("camera", "none on this host"))
    w = s.worker
    rows.append(("worker", f"{w.count} × device {w.device}, precision {w.precision}, "
                           f"batch ≤ {w.max_batch}, {s.models_dir}"))
    rows.append(("database", db))
    m = s.plc.modbus
    rows.append(("plc", "none" if s.plc.type == "none" else
                 f"modbus {m.host}:{m.port} unit {m.unit}, reject coil {m.reject_coil}, "
                 f"verdict register {m.verdict_register}"))
    mq = s.events.mqtt
    mqtt = f"mqtt {mq.host}:{mq.port} {mq.topic_prefix}/{s.line}/…" if mq.enabled else "mqtt off"
    rows.append(("events", f"{s.events_address()}; {mqtt}"))
    rows.append(("metrics", f"http://{s.metrics.host}:{s.metrics.port}/metrics"
                 if s.metrics.enabled else "off"))
    return rows


def _event_line(e: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(e.get("decided_ts") or 0).isoformat(timespec="milliseconds")
    score = e.get("score")
    thr = e.get("threshold")
    judged = "-" if score is None else f"{score:.4f}/" + ("-" if thr is None else f"{thr:.4f}")
    paths = e.get("paths") or {}
    fields = (when, e.get("camera") or "-", e.get("sku") or "-",
              f"part {e.get('part_id') or '-'}", f"{e.get('verdict', '?'):<7}", judged,
              e.get("reason") or "-", paths.get("image") or "-")
    return "  ".join(fields)


def events_cmd(
    ng: Annotated[bool, typer.Option("--ng", help="rejects only (NG, ERROR, TIMEOUT)")] = False,
    sku: Annotated[str | None, typer.Option(help="this SKU only")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: Annotated[
        Path | None, typer.Option("-c", "--config", help="line config (for its events endpoint)")
    ] = None,
    override: Annotated[
        list[str] | None, typer.Option("-o", "--override", help="section.key=value")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="PUB endpoint, e.g. tcp://127.0.0.1:5560 (overrides -c)")
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="exit after this many events")] = None,
) -> None:
    """Follow verdicts as the sink judges them: one line per frame (Ctrl-C to stop)."""
    from inspectd.daemon.events import subscribe
    from inspectd.daemon.security import line_keys

    keys = None
    if config is not None:  # the line's keys, for a tcp endpoint with CURVE
        s = line_settings(config, override)
        keys = line_keys(s)
        endpoint = endpoint or s.events_address()
    if endpoint is None:
        raise ConfigError("events: give --endpoint or -c CONFIG")
    seen = 0
    stream = subscribe(endpoint, sku=sku, ng_only=ng, keys=keys)
    try:
        for event in stream:
            print(json.dumps(event) if as_json else _event_line(event), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way out
    finally:
        stream.close()


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("acquire")(acquire_cmd)
    app.command("worker")(worker_cmd)
    app.command("sink")(sink_cmd)
    app.command("validate-config")(validate_config)


def register_events(app: typer.Typer) -> None:
    app.command("events")(events_cmd)
