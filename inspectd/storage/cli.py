"""`inspectd db upgrade` and `inspectd audit query|stats|label`: the audit log from a shell."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from inspectd.storage.queries import LabelCounts

db_app = typer.Typer(no_args_is_help=True, help="The audit database: schema migrations.")
audit_app = typer.Typer(no_args_is_help=True,
                        help="The audit log: verdicts, yield and operator labels.")

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
    from inspectd.core.config import LineSettings
    from inspectd.core.settings import load_settings

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
    from inspectd.storage.db import db_errors, safe_url, upgrade

    url = database_url(config, override, db)
    with db_errors(url):
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
    label: Annotated[str | None, typer.Option(
        help="operator label OK or NG, or none for unlabelled frames")] = None,
    limit: Annotated[int, typer.Option(min=0, help="newest N rows (0 = all)")] = 100,
    fmt: FormatOpt = Format.table,
) -> None:
    """Audited verdicts with their operator labels, newest capture first."""
    from sqlalchemy import select

    from inspectd.storage.db import existing_database
    from inspectd.storage.schema import labels, verdicts

    c = verdicts.c
    q = select(verdicts, labels.c.label).select_from(
        verdicts.outerjoin(labels, labels.c.frame_id == c.frame_id)
    ).where(*_filters(sku, since, until))
    if verdict is not None:
        v = verdict.upper()
        if v not in ("OK", "NG", "ERROR", "TIMEOUT"):
            raise typer.BadParameter(f"{verdict!r}: expected OK, NG, ERROR or TIMEOUT",
                                     param_hint="--verdict")
        q = q.where(c.verdict == v)
    if camera is not None:
        q = q.where(c.camera == camera)
    if label is not None:
        lab = label.upper()
        if lab not in ("OK", "NG", "NONE"):
            raise typer.BadParameter(f"{label!r}: expected OK, NG or none", param_hint="--label")
        q = q.where(labels.c.label.is_(None) if lab == "NONE" else labels.c.label == lab)
    q = q.order_by(c.capture_time.desc().nulls_last(), c.id.desc())
    if limit:
        q = q.limit(limit)
    url = database_url(config, override, db)
    with existing_database(url) as engine, engine.connect() as conn:
        rows = [_plain(dict(r._mapping)) for r in conn.execute(q)]
    if fmt is Format.json:
        print(json.dumps(rows))
    elif fmt is Format.csv:
        _write_csv([*(col.name for col in verdicts.columns), "label"], rows)
    else:
        table = Table("capture time (UTC)", "camera", "sku", "part", "verdict", "label", "score",
                      "threshold", "reason", "frame id")
        for r in rows:
            table.add_row(
                (r["capture_time"] or "")[:19].replace("T", " "), r["camera"], r["sku"],
                r["part_id"] or "", _coloured(r["verdict"]), _coloured(r["label"]),
                _num(r["score"]), _num(r["threshold"]), r["reason"] or "", r["frame_id"])
        out.print(table)
        out.print(f"{len(rows)} rows" + (f" (--limit {limit})" if limit == len(rows) else ""))


def _label_counts() -> LabelCounts:
    from inspectd.storage.queries import LabelCounts  # imports SQLAlchemy: not at CLI start

    return LabelCounts()


@dataclass
class _Group:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OK", "NG", "ERROR", "TIMEOUT"), 0))
    scores: list[float] = field(default_factory=list)
    labels: LabelCounts = field(default_factory=_label_counts)


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
    """Per SKU (and hour/day): frames, verdict counts, yield, NG rate, score percentiles and,
    where operators labelled frames, false rejects and escapes."""
    import numpy as np
    from sqlalchemy import select

    from inspectd.storage.db import existing_database
    from inspectd.storage.schema import labels, verdicts

    c = verdicts.c
    q = select(c.sku, c.capture_time, c.verdict, c.score, labels.c.label).select_from(
        verdicts.outerjoin(labels, labels.c.frame_id == c.frame_id)
    ).where(*_filters(sku, since, until))
    groups: dict[tuple[str, str], _Group] = {}
    url = database_url(config, override, db)
    # Aggregated here, streaming, so one code path serves SQLite and PostgreSQL alike.
    with existing_database(url) as engine, engine.connect() as conn:
        for r in conn.execution_options(yield_per=10_000).execute(q):
            g = groups.setdefault((r.sku, _period(r.capture_time, by)), _Group())
            g.counts[r.verdict] = g.counts.get(r.verdict, 0) + 1
            if r.score is not None and math.isfinite(r.score):
                g.scores.append(r.score)
            g.labels.add(r.verdict, r.label)
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
                "score_p50": p[0], "score_p95": p[1], "score_p99": p[2],
                "labelled": g.labels.labelled, "false_rejects": g.labels.false_rejects,
                "escapes": g.labels.escapes, "escape_pct": _pct(g.labels.escape_rate),
                "false_reject_pct": _pct(g.labels.false_reject_rate)}
        rows.append(row)
    if fmt is Format.json:
        print(json.dumps(rows))
        return
    keys = ["sku", *([by.value] if by is not By.none else []), "frames", "OK", "NG", "ERROR",
            "TIMEOUT", "yield_pct", "ng_rate_pct", "score_p50", "score_p95", "score_p99",
            *LABEL_KEYS]
    if fmt is Format.csv:
        _write_csv(keys, rows)
        return
    table = Table(*(k.replace("_pct", " %").replace("_", " ") for k in keys))
    for r in rows:
        table.add_row(*(_stats_cell(k, r) for k in keys))
    out.print(table)
    if not rows:
        out.print("no audited frames match")


LABEL_KEYS = ("labelled", "false_rejects", "escapes", "escape_pct", "false_reject_pct")


def _stats_cell(key: str, row: dict[str, Any]) -> str:
    if key.startswith("score"):
        return _num(row[key])
    if key in LABEL_KEYS:  # blank where nobody labelled; — where a rate has no denominator
        if not row["labelled"]:
            return ""
        return "—" if row[key] is None else str(row[key])
    return str(row[key])


def _pct(rate: float | None) -> float | None:
    return None if rate is None else round(100 * rate, 2)


@audit_app.command("label")
def label_cmd(
    frame_id: Annotated[str, typer.Argument(help="the audited frame's id (see `audit query`)")],
    ok: Annotated[bool, typer.Option("--ok", help="the part is good (a false reject if "
                                     "the line rejected it)")] = False,
    ng: Annotated[bool, typer.Option("--ng", help="the part is defective (an escape if "
                                     "the line passed it)")] = False,
    note: Annotated[str | None, typer.Option(help="free text kept with the label")] = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    db: DbOpt = None,
) -> None:
    """Label an audited frame OK or NG (replaces an earlier label); refit and stats use it."""
    from inspectd.storage.queries import set_label

    if ok == ng:
        raise typer.BadParameter("give exactly one of --ok or --ng", param_hint="--ok/--ng")
    f = set_label(database_url(config, override, db), frame_id, "OK" if ok else "NG", note=note)
    if f.verdict != "OK" and f.label == "OK":
        what = " (a false reject)"
    elif f.verdict == "OK" and f.label == "NG":
        what = " (an escape)"
    else:
        what = ""
    out.print(f"{f.frame_id}  {f.sku}  verdict {_coloured(f.verdict)}  score {_num(f.score)}  "
              f"threshold {_num(f.threshold)}  → label {_coloured(f.label)}{what}",
              highlight=False)


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


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


_COLOURS = {"OK": "green", "NG": "red"}


def _coloured(kind: str | None) -> str:
    return "" if kind is None else f"[{_COLOURS.get(kind, 'yellow')}]{kind}[/]"


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _write_csv(keys: list[str], rows: list[dict[str, Any]]) -> None:
    w = csv.DictWriter(sys.stdout, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)

