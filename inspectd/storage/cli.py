"""`inspectd db upgrade` and `inspectd audit query|stats`: the audit log from a shell."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sqlalchemy import Engine

db_app = typer.Typer(no_args_is_help=True, help="The audit database: schema migrations.")
audit_app = typer.Typer(no_args_is_help=True, help="Query the audit log: verdicts and yield.")

out = Console(width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[
    Path | None, typer.Option("-c", "--config", help="line config; its database is used")
]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("-o", "--override", help="section.key=value (repeatable)")
]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL, e.g. sqlite:///audit.db or "
                             "postgresql+psycopg://user@host/db (overrides -c)")
]
TIME_HELP = "ISO date/time (UTC unless it has an offset) or an age such as 30m, 2h, 1d, 1w"
SinceOpt = Annotated[str | None, typer.Option(help=f"frames captured at or after: {TIME_HELP}")]
UntilOpt = Annotated[str | None, typer.Option(help=f"frames captured before: {TIME_HELP}")]
SkuOpt = Annotated[str | None, typer.Option(help="only this SKU")]


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class By(StrEnum):
    hour = "hour"
    day = "day"
    none = "none"


FormatOpt = Annotated[Format, typer.Option("--format", help="table, csv or json")]


def database_url(config: Path | None, overrides: list[str] | None, db: str | None) -> str:
    """--db, else the line config's database (default: SQLite in data_dir)."""
    if db:
        return db
    from inspectd.daemon.config import LineSettings
    from inspectd.settings import load_settings

    return load_settings(LineSettings, config, overrides or []).database_url()


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


@db_app.command("upgrade")
def upgrade_cmd(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    db: DbOpt = None,
    revision: Annotated[str, typer.Option(help="target Alembic revision")] = "head",
) -> None:
    """Create or migrate the audit schema (safe to re-run)."""
    from inspectd.storage.db import safe_url, upgrade

    url = database_url(config, override, db)
    with _db_errors(url):
        upgrade(url, revision)
    out.print(f"audit schema at {revision}: {safe_url(url)}", highlight=False)


@audit_app.command("query")
def query_cmd(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    db: DbOpt = None,
    sku: SkuOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    verdict: Annotated[str | None, typer.Option(help="OK, NG, ERROR or TIMEOUT")] = None,
    camera: Annotated[str | None, typer.Option(help="only this camera")] = None,
    limit: Annotated[int, typer.Option(min=0, help="newest N rows (0 = all)")] = 100,
    fmt: FormatOpt = Format.table,
) -> None:
    """Audited verdicts, newest capture first."""
    from sqlalchemy import select

    from inspectd.storage.schema import verdicts

    c = verdicts.c
    q = select(verdicts).where(*_filters(sku, since, until))
    if verdict is not None:
        v = verdict.upper()
        if v not in ("OK", "NG", "ERROR", "TIMEOUT"):
            raise typer.BadParameter(f"{verdict!r}: expected OK, NG, ERROR or TIMEOUT",
                                     param_hint="--verdict")
        q = q.where(c.verdict == v)
    if camera is not None:
        q = q.where(c.camera == camera)
    q = q.order_by(c.capture_time.desc().nulls_last(), c.id.desc())
    if limit:
        q = q.limit(limit)
    url = database_url(config, override, db)
    with _reading(url) as engine, engine.connect() as conn:
        rows = [_plain(dict(r._mapping)) for r in conn.execute(q)]
    if fmt is Format.json:
        print(json.dumps(rows))
    elif fmt is Format.csv:
        _write_csv([col.name for col in verdicts.columns], rows)
    else:
        table = Table("capture time (UTC)", "camera", "sku", "part", "verdict", "score",
                      "threshold", "reason", "frame id")
        colour = {"OK": "green", "NG": "red"}
        for r in rows:
            table.add_row(
                (r["capture_time"] or "")[:19].replace("T", " "), r["camera"], r["sku"],
                r["part_id"] or "", f"[{colour.get(r['verdict'], 'yellow')}]{r['verdict']}[/]",
                _num(r["score"]), _num(r["threshold"]), r["reason"] or "", r["frame_id"])
        out.print(table)
        out.print(f"{len(rows)} rows" + (f" (--limit {limit})" if limit == len(rows) else ""))


@dataclass
class _Group:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OK", "NG", "ERROR", "TIMEOUT"), 0))
    scores: list[float] = field(default_factory=list)


@audit_app.command("stats")
def stats_cmd(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    db: DbOpt = None,
    sku: SkuOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    by: Annotated[By, typer.Option(help="also split by capture hour or day (UTC)")] = By.none,
    fmt: FormatOpt = Format.table,
) -> None:
    """Per SKU (and hour/day): frames, verdict counts, yield, NG rate, score percentiles."""
    import numpy as np
    from sqlalchemy import select

    from inspectd.storage.schema import verdicts

    c = verdicts.c
    q = select(c.sku, c.capture_time, c.verdict, c.score).where(*_filters(sku, since, until))
    groups: dict[tuple[str, str], _Group] = {}
    url = database_url(config, override, db)
    # Aggregated here, streaming, so one code path serves SQLite and PostgreSQL alike.
    with _reading(url) as engine, engine.connect() as conn:
        for r in conn.execution_options(yield_per=10_000).execute(q):
            g = groups.setdefault((r.sku, _period(r.capture_time, by)), _Group())
            g.counts[r.verdict] = g.counts.get(r.verdict, 0) + 1
            if r.score is not None and math.isfinite(r.score):
                g.scores.append(r.score)
    rows = []
    for (sku_, period), g in sorted(groups.items()):
        n = sum(g.counts.values())
        p = np.percentile(g.scores, [50, 95, 99]).tolist() if g.scores else [None] * 3
        row: dict[str, Any] = {"sku": sku_}
        if by is not By.none:
            row[by.value] = period
        row |= {"frames": n, **g.counts,
                "yield_pct": round(100 * g.counts["OK"] / n, 2),
                "ng_rate_pct": round(100 * g.counts["NG"] / n, 2),
                "score_p50": p[0], "score_p95": p[1], "score_p99": p[2]}
        rows.append(row)
    if fmt is Format.json:
        print(json.dumps(rows))
        return
    keys = ["sku", *([by.value] if by is not By.none else []), "frames", "OK", "NG", "ERROR",
            "TIMEOUT", "yield_pct", "ng_rate_pct", "score_p50", "score_p95", "score_p99"]
    if fmt is Format.csv:
        _write_csv(keys, rows)
        return
    table = Table(*(k.replace("_pct", " %").replace("_", " ") for k in keys))
    for r in rows:
        table.add_row(*(_num(r[k]) if k.startswith("score") else str(r[k]) for k in keys))
    out.print(table)
    if not rows:
        out.print("no audited frames match")


def _filters(sku: str | None, since: str | None, until: str | None) -> list[Any]:
    from inspectd.storage.schema import verdicts

    c, where = verdicts.c, []
    if sku is not None:
        where.append(c.sku == sku)
    if since is not None:
        where.append(c.capture_time >= parse_time(since, "--since"))
    if until is not None:
        where.append(c.capture_time < parse_time(until, "--until"))
    return where


def _period(t: datetime | None, by: By) -> str:
    if by is By.none:
        return ""
    if t is None:
        return "unknown"
    if by is By.day:
        return t.date().isoformat()
    return t.replace(minute=0, second=0, microsecond=0).isoformat()


@contextmanager
def _db_errors(url: str) -> Iterator[None]:
    """Database failures as one-line StorageErrors naming the (password-less) URL."""
    from sqlalchemy import exc

    from inspectd.storage.db import StorageError, safe_url

    try:
        yield
    except exc.SQLAlchemyError as e:
        orig = getattr(e, "orig", None) or e
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        raise StorageError(f"audit database {safe_url(url)}: {first}") from None


@contextmanager
def _reading(url: str) -> Iterator[Engine]:
    """An engine on an existing, migrated audit database."""
    from sqlalchemy import inspect, make_url

    from inspectd.storage.db import StorageError, make_engine, safe_url

    engine = make_engine(url)
    try:
        u = make_url(url)
        if u.get_backend_name() == "sqlite" and not Path(u.database or "").expanduser().is_file():
            raise StorageError(f"no audit database at {u.database} "
                               f"(start the sink or run `inspectd db upgrade`)")
        with _db_errors(url):
            if not inspect(engine).has_table("verdicts"):
                raise StorageError(f"{safe_url(url)} has no verdicts table: "
                                   f"run `inspectd db upgrade`")
            yield engine
    finally:
        engine.dispose()


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _write_csv(keys: list[str], rows: list[dict[str, Any]]) -> None:
    w = csv.DictWriter(sys.stdout, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)

