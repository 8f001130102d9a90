"""`inspectd events`: follow a sink's verdicts live."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from inspectd.core.errors import ConfigError


def _line(e: dict[str, Any]) -> str:
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

    if endpoint is None:
        if config is None:
            raise ConfigError("events: give --endpoint or -c CONFIG")
        from inspectd.core.config import LineSettings
        from inspectd.core.settings import load_settings

        endpoint = load_settings(LineSettings, config, override or []).events_address()
    seen = 0
    stream = subscribe(endpoint, sku=sku, ng_only=ng)
    try:
        for event in stream:
            print(json.dumps(event) if as_json else _line(event), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way out
    finally:
        stream.close()
