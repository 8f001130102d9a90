"""`inspectd db upgrade` and `inspectd audit query|stats|label`: the audit log from a shell.

The questions are `storage.queries`; this module parses options and prints the answers."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from inspectd.cli.common import TIME_HELP, OverrideOpt, line_settings, out, parse_time

db_app = typer.Typer(no_args_is_help=True, help="The audit database: schema migrations.")
audit_app = typer.Typer(no_args_is_help=True,
                        help="The audit log: verdicts, yield and operator labels.")

ConfigOpt = Annotated[
    Path | None, typer.Option("-c", "--config", help="line config; its database is used")
]
DbOpt = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL, e.g. sqlite:///audit.db or "
                             "postgresql+psycopg://user@host/db (overrides -c)")
]
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
    return db or line_settings(config, overrides).database_url()


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
    from inspectd.storage.queries import verdict_rows
    from inspectd.storage.schema import verdicts

    t0, t1 = _times(since, until)
    if verdict is not None:
        verdict = verdict.upper()
        if verdict not in ("OK", "NG", "ERROR", "TIMEOUT"):
            raise typer.BadParameter(f"{verdict!r}: expected OK, NG, ERROR or TIMEOUT",
                                     param_hint="--verdict")
    if label is not None:
        lab = label.upper()
        if lab not in ("OK", "NG", "NONE"):
            raise typer.BadParameter(f"{label!r}: expected OK, NG or none", param_hint="--label")
        label = "none" if lab == "NONE" else lab
    rows = [_plain(r) for r in verdict_rows(
        database_url(config, override, db), sku=sku, since=t0, until=t1, verdict=verdict,
        camera=camera, label=label, limit=limit or None)]
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
    from inspectd.storage.queries import verdict_stats

    t0, t1 = _times(since, until)
    rows = verdict_stats(database_url(config, override, db), sku=sku, since=t0, until=t1,
                         by=by.value)
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


def _times(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    return (parse_time(since, "--since") if since is not None else None,
            parse_time(until, "--until") if until is not None else None)


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

