"""`inspectd db upgrade` and `inspectd audit query|stats` on populated SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from inspectd.cli import app
from inspectd.core.wire import Verdict
from inspectd.storage.audit import AuditLog

H10 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()
H11 = H10 + 3600
NOW = time.time()

runner = CliRunner()


def line_frames() -> list[Verdict]:
    """widget: 10 frames at 10:xx (one NG, one ERROR) and 5 at 11:xx (one TIMEOUT);
    gadget: 2 frames at 10:xx from cam2; fresh: one frame captured half an hour ago."""
    out = []
    for i in range(15):
        kind = {3: "NG", 7: "ERROR", 14: "TIMEOUT"}.get(i, "OK")
        scored = kind in ("OK", "NG")
        out.append(Verdict(f"w{i:02d}", kind, camera="cam1", sku="widget", line="l1",
                           capture_ts=(H10 if i < 10 else H11) + 60 * (i % 10),
                           score=(2.0 if kind == "NG" else 0.1 * i) if scored else None,
                           threshold=1.0, reason=None if scored else f"{kind.lower()} reason"))
    out.append(Verdict("g00", "OK", camera="cam2", sku="gadget", capture_ts=H10 + 5, score=0.2))
    out.append(Verdict("g01", "NG", camera="cam2", sku="gadget", capture_ts=H10 + 9, score=3.0,
                       part_id="P-7"))
    out.append(Verdict("n00", "OK", camera="cam1", sku="fresh", capture_ts=NOW - 1800, score=0.5))
    return out


def populate(url: str, spool: Path) -> str:
    log = AuditLog(url, spool)
    for v in line_frames():
        log.record(v, {"image": f"/img/{v.frame_id}.png"} if v.verdict == "NG" else None)
    log.close()
    return url


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("audit")
    return populate(f"sqlite:///{d}/audit.db", d / "spool")


@pytest.fixture(scope="module")
def postgres_url(postgres_db: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    engine = sa.create_engine(postgres_db.url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS labels, verdicts, alembic_version"))
    engine.dispose()
    return populate(postgres_db.url, tmp_path_factory.mktemp("pg-spool"))


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def query(url: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(cli("audit", "query", "--db", url, "--format", "json", *args))


def stats(url: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(cli("audit", "stats", "--db", url, "--format", "json", *args))


def test_query_json_lists_newest_first_with_every_column(sqlite_url: str) -> None:
    rows = query(sqlite_url, "--sku", "widget")
    assert [r["frame_id"] for r in rows] == [f"w{i:02d}" for i in range(14, -1, -1)]
    ng = rows[-4]
    assert ng["verdict"] == "NG" and ng["score"] == 2.0 and ng["image_path"] == "/img/w03.png"
    assert ng["capture_time"] == "2024-05-01T10:03:00+00:00"
    assert {"id", "line", "camera", "part_id", "origin", "decided_time", "reason", "threshold",
            "pixel_threshold", "model_version", "queue_ms", "decode_ms", "infer_ms", "total_ms",
            "mask_path", "overlay_path", "image_sha256"} <= set(ng)


def test_query_filters_combine(sqlite_url: str) -> None:
    def ids(*args: str) -> list[str]:
        return sorted(r["frame_id"] for r in query(sqlite_url, *args))

    assert ids("--verdict", "ng") == ["g01", "w03"]
    assert ids("--camera", "cam2") == ["g00", "g01"]
    assert ids("--since", "2024-05-01T11:00", "--until", "2024-05-01T11:03") == [
        "w10", "w11", "w12"]
    assert ids("--since", "2024-05-01T12:00+02:00", "--until", "2024-05-01") == []
    assert ids("--since", "1h") == ["n00"]
    assert ids("--sku", "widget", "--limit", "2") == ["w13", "w14"]


def test_query_csv_and_table(sqlite_url: str) -> None:
    text = cli("audit", "query", "--db", sqlite_url, "--sku", "gadget", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["frame_id"], r["verdict"], r["part_id"]) for r in rows] == [
        ("g01", "NG", "P-7"), ("g00", "OK", "")]
    assert rows[0]["capture_time"] == "2024-05-01T10:00:09+00:00"
    table = cli("audit", "query", "--db", sqlite_url, "--verdict", "ERROR")
    assert "w07" in table and "error reason" in table and "2024-05-01 10:07:00" in table
    assert "1 rows" in table


def test_stats_count_verdicts_yield_and_score_percentiles(sqlite_url: str) -> None:
    [widget] = stats(sqlite_url, "--sku", "widget")
    scores = [0.1 * i for i in range(14) if i not in (3, 7)] + [2.0]
    p50, p95, p99 = np.percentile(scores, [50, 95, 99])
    assert {k: widget[k] for k in ("frames", "OK", "NG", "ERROR", "TIMEOUT")} == {
        "frames": 15, "OK": 12, "NG": 1, "ERROR": 1, "TIMEOUT": 1}
    assert (widget["yield_pct"], widget["ng_rate_pct"]) == (80.0, 6.67)
    assert (widget["score_p50"], widget["score_p95"], widget["score_p99"]) == (
        pytest.approx(p50), pytest.approx(p95), pytest.approx(p99))


def test_stats_by_hour_split_per_sku_and_hour(sqlite_url: str) -> None:
    rows = stats(sqlite_url, "--until", "2024-05-02", "--by", "hour")
    assert [(r["sku"], r["hour"], r["frames"], r["NG"]) for r in rows] == [
        ("gadget", "2024-05-01T10:00:00+00:00", 2, 1),
        ("widget", "2024-05-01T10:00:00+00:00", 10, 1),
        ("widget", "2024-05-01T11:00:00+00:00", 5, 0),
    ]
    [day] = stats(sqlite_url, "--sku", "widget", "--by", "day")
    assert (day["day"], day["frames"]) == ("2024-05-01", 15)


def test_stats_table_and_csv(sqlite_url: str) -> None:
    text = cli("audit", "stats", "--db", sqlite_url, "--by", "hour", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:4] == ["sku", "hour", "frames", "OK"]
    assert [(r["sku"], r["frames"], r["yield_pct"]) for r in rows] == [
        ("fresh", "1", "100.0"), ("gadget", "2", "50.0"), ("widget", "10", "80.0"),
        ("widget", "5", "80.0")]
    table = cli("audit", "stats", "--db", sqlite_url)
    assert "widget" in table and "yield %" in table and "score p99" in table


def test_audit_commands_agree_on_postgres_and_sqlite(sqlite_url: str, postgres_url: str) -> None:
    def without_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("id", "decided_time")} for r in rows]

    assert without_ids(query(postgres_url, "--limit", "0")) == without_ids(
        query(sqlite_url, "--limit", "0"))
    for by in ("none", "hour"):
        pg, lite = stats(postgres_url, "--by", by), stats(sqlite_url, "--by", by)
        assert [{k: pytest.approx(v) if isinstance(v, float) else v for k, v in r.items()}
                for r in pg] == lite


def test_db_upgrade_uses_the_line_config(tmp_path: Path) -> None:
    cfg = tmp_path / "line.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\n")
    assert "audit schema at head" in cli("db", "upgrade", "-c", str(cfg))
    assert "audit schema at head" in cli("db", "upgrade", "-c", str(cfg))  # re-runnable
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'audit.db'}")
    assert sa.inspect(engine).has_table("verdicts")
    engine.dispose()
    assert "no audited frames match" in cli("audit", "stats", "-c", str(cfg))


@pytest.mark.parametrize(("args", "message"), [
    (["audit", "query", "--db", "sqlite:///{tmp}/missing.db"], "no audit database at"),
    (["audit", "stats", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none"],
     "audit database postgresql+psycopg://postgres@127.0.0.1:1/none:"),
    (["db", "upgrade", "--db", "nosuchdb://x"], "bad database URL"),
])
def test_database_problems_are_one_line_errors(run_cli: Any, tmp_path: Path, args: list[str],
                                               message: str) -> None:
    proc = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in args), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unparsable_time_is_a_usage_error(sqlite_url: str) -> None:
    result = runner.invoke(app, ["audit", "query", "--db", sqlite_url, "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since" in result.output
