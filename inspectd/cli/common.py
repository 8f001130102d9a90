"""What every command group shares: consoles, option types, progress bars, time parsing and
reading the line config."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from inspectd.core.config import LineSettings
from inspectd.core.settings import load_settings

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

OverrideOpt = Annotated[
    list[str] | None, typer.Option("-o", "--override", help="section.key=value (repeatable)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """A `(stage, done, total)` callback drawing one rich bar per stage."""
    bars = Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not enabled)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def line_settings(config: Path | None, overrides: list[str] | None) -> LineSettings:
    return load_settings(LineSettings, config, overrides or [])


TIME_HELP = "ISO date/time (UTC unless it has an offset) or an age such as 30m, 2h, 1d, 1w"
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """`2h` → two hours ago; `2024-05-01` / `2024-05-01T12:00` → that time, UTC when naive."""
    m = _AGE.fullmatch(text.strip())
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected {TIME_HELP}", param_hint=option) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
