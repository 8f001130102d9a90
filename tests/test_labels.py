"""Operator labels and the audit queries refit and drift use, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import getpass
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from typer.testing import CliRunner

from inspectd.cli import app
from inspectd.core.wire import Verdict
from inspectd.storage import queries
from inspectd.storage.audit import AuditLog
from inspectd.storage.db import StorageError, upgrade
from inspectd.storage.schema import labels, metadata, verdicts

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()
runner = CliRunner()

# frame id, verdict, score, image ("file", "missing" or None), label, model version.
# Capture times follow the list order (one second apart), so the last is the newest.
WIDGET = [
    ("ok1", "OK", 0.30, "file", None, "v1"),
    ("ok2", "OK", 0.85, "file", None, "v1"),  # ≥ 0.8 × threshold: maybe an unnoticed defect
    ("ok3", "OK", 0.40, "file", "NG", "v1"),  # an escape
    ("ok4", "OK", 0.20, "missing", None, "v1"),  # its image was rotated away
    ("ok5", "OK", 0.10, None, None, "v1"),  # no image kept
    ("ok6", "OK", None, "file", None, None),  # not scored: nothing says it is near
    ("ng1", "NG", 1.50, "file", "OK", "v2"),  # a false reject
    ("ng2", "NG", 2.00, "file", "NG", "v2"),
    ("ng3", "NG", 3.00, "file", None, "v2"),
    ("er1", "ERROR", None, "file", "OK", None),  # a false reject
    ("to1", "TIMEOUT", None, None, "NG", None),
    ("ok7", "OK", 0.50, "file", "OK", "v2"),
    ("ok8", "OK", 0.60, "file", "OK", "v2"),
]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    pg = request.getfixturevalue("postgres_db")
    engine = sa.create_engine(pg.url)
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS labels, verdicts, alembic_version"))
    engine.dispose()
    return pg.url


def record(url: str, spool: Path, items: list[tuple[Verdict, dict[str, str] | None]]) -> None:
    """Write verdicts as the sink does."""
    log = AuditLog(url, spool)
    for v, paths in items:
        log.record(v, paths)
    log.close()


@pytest.fixture
def line(url: str, tmp_path: Path) -> str:
    """WIDGET's frames (images under tmp_path/img, labels set by `qa`) and one gadget frame."""
    img = tmp_path / "img"
    img.mkdir()
    items = []
    for i, (fid, kind, score, image, _, version) in enumerate(WIDGET):
        paths = None
        if image is not None:
            paths = {"image": str(img / f"{fid}.png")}
            if image == "file":
                (img / f"{fid}.png").write_bytes(b"png")
        items.append((Verdict(fid, kind, camera="cam1", sku="widget", capture_ts=T0 + i,
                              score=score, threshold=1.0, model_version=version), paths))
    (img / "g1.png").write_bytes(b"png")
    items.append((Verdict("g1", "OK", camera="cam2", sku="gadget", capture_ts=T0, score=0.1,
                          threshold=1.0), {"image": str(img / "g1.png")}))
    record(url, tmp_path / "spool", items)
    for fid, *_, label, _ in WIDGET:
        if label is not None:
            queries.set_label(url, fid, label, user="qa")
    return url


def at(i: int) -> datetime:
    return datetime.fromtimestamp(T0 + i, UTC)


def ids(frames: list[queries.AuditedFrame]) -> list[str]:
    return [f.frame_id for f in frames]


def label_rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(labels).order_by(labels.c.id))]
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_verdicts_and_adds_labels(url: str) -> None:
    upgrade(url, "0001")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(sa.insert(verdicts).values(
                frame_id="old1", line="l1", camera="cam1", sku="widget", verdict="NG",
                score=2.0, threshold=1.0, capture_time=at(0), decided_time=at(1)))
        with pytest.raises(StorageError, match="no labels table: run `inspectd db upgrade`"):
            queries.set_label(url, "old1", "OK")
        upgrade(url)
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0002"
            assert c.execute(sa.select(verdicts.c.frame_id, verdicts.c.capture_time)).all() == [
                ("old1", at(0))]
            # The package's table definitions are exactly what the migrations build.
            assert compare_metadata(MigrationContext.configure(c), metadata) == []
        assert sa.inspect(engine).get_foreign_keys("labels") == []
    finally:
        engine.dispose()
    frame = queries.set_label(url, "old1", "OK", user="qa")
    assert (frame.frame_id, frame.verdict, frame.score, frame.label) == ("old1", "NG", 2.0, "OK")


def test_set_label_replaces_the_previous_label(url: str, tmp_path: Path) -> None:
    record(url, tmp_path / "spool", [(Verdict("f1", "NG", sku="widget", capture_ts=T0,
                                              score=1.2, threshold=1.0), None)])
    first = queries.set_label(url, "f1", "OK", user="qa")
    assert (first.verdict, first.label, first.capture_time) == ("NG", "OK", at(0))
    queries.set_label(url, "f1", "NG", note="crack at the rim", user="lead")
    [row] = label_rows(url)
    assert (row["frame_id"], row["label"], row["note"], row["labelled_by"]) == (
        "f1", "NG", "crack at the rim", "lead")
    assert row["labelled_time"].tzinfo is not None
    assert (datetime.now(UTC) - row["labelled_time"].astimezone(UTC)).total_seconds() < 3600


def test_set_label_refuses_an_unknown_frame_and_a_bad_label(url: str, tmp_path: Path) -> None:
    record(url, tmp_path / "spool", [(Verdict("f1", "OK", sku="widget", capture_ts=T0), None)])
    with pytest.raises(StorageError, match="no audited frame 'nope'"):
        queries.set_label(url, "nope", "OK")
    with pytest.raises(StorageError, match="expected OK or NG"):
        queries.set_label(url, "f1", "MAYBE")  # type: ignore[arg-type]
    assert label_rows(url) == []


def test_refit_candidates_follow_the_exclusion_rules(line: str) -> None:
    frames = queries.refit_candidates(line, "widget")
    # Newest first: operator-OK frames whatever their verdict; OK frames clear of the
    # threshold, not labelled NG, with an image on disk.
    assert ids(frames) == ["ok8", "ok7", "er1", "ng1", "ok6", "ok1"]
    ng1 = frames[3]
    assert (ng1.verdict, ng1.score, ng1.threshold, ng1.model_version, ng1.label) == (
        "NG", 1.5, 1.0, "v2", "OK")
    assert ng1.capture_time == at(6) and ng1.image_path.endswith("ng1.png")
    assert ids(queries.refit_candidates(line, "widget", near_threshold=0.9)) == [
        "ok8", "ok7", "er1", "ng1", "ok6", "ok2", "ok1"]
    assert ids(queries.refit_candidates(line, "gadget")) == ["g1"]


def test_refit_candidates_since_and_max_images(line: str) -> None:
    assert ids(queries.refit_candidates(line, "widget", since=at(9))) == ["ok8", "ok7", "er1"]
    assert ids(queries.refit_candidates(line, "widget", max_images=2)) == ["ok8", "ok7"]
    # The cap counts frames with images: ok4 (between ok6 and ok1) lost its file.
    assert ids(queries.refit_candidates(line, "widget", since=at(0), max_images=6)) == [
        "ok8", "ok7", "er1", "ng1", "ok6", "ok1"]
    assert queries.refit_candidates(line, "nosuch") == []


def test_refit_candidates_drop_frames_whose_image_is_gone(line: str, tmp_path: Path) -> None:
    (tmp_path / "img" / "ok8.png").unlink()
    assert ids(queries.refit_candidates(line, "widget", max_images=2)) == ["ok7", "er1"]


def test_confirmed_ng_lists_ng_labels_with_images(line: str, tmp_path: Path) -> None:
    # to1 is labelled NG too, but has no image to check a candidate against.
    frames = queries.confirmed_ng(line, "widget")
    assert [(f.frame_id, f.verdict, f.label) for f in frames] == [
        ("ng2", "NG", "NG"), ("ok3", "OK", "NG")]
    (tmp_path / "img" / "ng2.png").unlink()
    assert ids(queries.confirmed_ng(line, "widget")) == ["ok3"]
    assert queries.confirmed_ng(line, "gadget") == []


def test_recent_scores_are_scored_frames_newest_first(line: str) -> None:
    assert queries.recent_scores(line, "widget") == [
        0.6, 0.5, 3.0, 2.0, 1.5, 0.1, 0.2, 0.4, 0.85, 0.3]
    assert queries.recent_scores(line, "widget", limit=3) == [0.6, 0.5, 3.0]
    assert queries.recent_scores(line, "widget", since=at(8)) == [0.6, 0.5, 3.0]
    assert queries.recent_scores(line, "widget", model_version="v1") == [
        0.1, 0.2, 0.4, 0.85, 0.3]
    assert queries.recent_scores(line, "widget", model_version="v3") == []


def test_label_rates_count_false_rejects_and_escapes(line: str) -> None:
    rates = queries.label_rates(line)
    assert list(rates) == ["widget"]  # gadget has no labels
    assert rates["widget"] == {
        "labelled": 7, "labelled_passes": 3, "labelled_rejects": 4, "confirmed_ng": 3,
        "false_rejects": 2, "escapes": 1, "escape_rate": pytest.approx(1 / 3),
        "false_reject_rate": 0.5}
    # Captured in [at(2), at(10)): ok3, ng1, ng2, er1 are labelled.
    window = queries.label_rates(line, "widget", since=at(2), until=at(10))["widget"]
    assert {k: window[k] for k in ("labelled", "escapes", "false_rejects", "escape_rate",
                                   "false_reject_rate")} == {
        "labelled": 4, "escapes": 1, "false_rejects": 2, "escape_rate": 1.0,
        "false_reject_rate": pytest.approx(2 / 3)}
    only_rejects = queries.label_rates(line, "widget", since=at(6), until=at(11))["widget"]
    assert (only_rejects["labelled_passes"], only_rejects["escape_rate"]) == (0, None)
    assert queries.label_rates(line, "gadget") == {}


def test_queries_need_an_existing_database(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(StorageError, match="no audit database at"):
        queries.refit_candidates(missing, "widget")
    assert not (tmp_path / "none.db").exists()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_cli_label_prints_the_frame_and_records_the_os_user(url: str, tmp_path: Path) -> None:
    record(url, tmp_path / "spool", [
        (Verdict("f1", "NG", sku="widget", capture_ts=T0, score=1.25, threshold=1.0), None),
        (Verdict("f2", "OK", sku="widget", capture_ts=T0 + 1, score=0.5, threshold=1.0), None)])
    text = cli("audit", "label", "f1", "--ok", "--db", url)
    assert "f1" in text and "verdict NG" in text and "1.2500" in text
    assert "label OK" in text and "false reject" in text
    text = cli("audit", "label", "f2", "--ng", "--note", "scratch", "--db", url)
    assert "label NG" in text and "escape" in text
    assert [(r["frame_id"], r["label"], r["note"], r["labelled_by"]) for r in label_rows(url)] == [
        ("f1", "OK", None, getpass.getuser()), ("f2", "NG", "scratch", getpass.getuser())]


@pytest.mark.parametrize("flags", [[], ["--ok", "--ng"]])
def test_cli_label_needs_exactly_one_of_ok_and_ng(flags: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "label", "f1", *flags, "--db",
                                 f"sqlite:///{tmp_path / 'audit.db'}"])
    assert result.exit_code == 2
    assert "exactly one of --ok or --ng" in result.output


def test_cli_label_of_an_unknown_frame_is_a_one_line_error(run_cli: Any, url: str,
                                                           tmp_path: Path) -> None:
    record(url, tmp_path / "spool", [(Verdict("f1", "OK", sku="widget", capture_ts=T0), None)])
    proc = run_cli("audit", "label", "nope", "--ng", "--db", url, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and "no audited frame 'nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_query_shows_and_filters_labels(line: str) -> None:
    def query(*args: str) -> list[dict[str, Any]]:
        return json.loads(cli("audit", "query", "--db", line, "--format", "json", "--sku",
                              "widget", *args))

    rows = {r["frame_id"]: r["label"] for r in query()}
    assert rows == {fid: label for fid, *_, label, _ in WIDGET}
    assert [r["frame_id"] for r in query("--label", "ok")] == ["ok8", "ok7", "er1", "ng1"]
    assert [r["frame_id"] for r in query("--label", "NG", "--verdict", "OK")] == ["ok3"]
    assert len(query("--label", "none")) == 6
    text = cli("audit", "query", "--db", line, "--format", "csv", "--label", "NG")
    assert [(r["frame_id"], r["label"]) for r in csv.DictReader(io.StringIO(text))] == [
        ("to1", "NG"), ("ng2", "NG"), ("ok3", "NG")]
    table = cli("audit", "query", "--db", line, "--sku", "widget")
    assert "label" in table
    bad = runner.invoke(app, ["audit", "query", "--db", line, "--label", "maybe"])
    assert bad.exit_code == 2 and "--label" in bad.output


LABEL_KEYS = ("labelled", "false_rejects", "escapes", "escape_pct", "false_reject_pct")


def test_cli_stats_add_label_columns_where_labels_exist(line: str) -> None:
    rows = json.loads(cli("audit", "stats", "--db", line, "--format", "json"))
    by_sku = {r["sku"]: r for r in rows}
    assert {k: by_sku["widget"][k] for k in LABEL_KEYS} == {
        "labelled": 7, "false_rejects": 2, "escapes": 1, "escape_pct": 33.33,
        "false_reject_pct": 50.0}
    assert {k: by_sku["gadget"][k] for k in LABEL_KEYS} == {
        "labelled": 0, "false_rejects": 0, "escapes": 0, "escape_pct": None,
        "false_reject_pct": None}
    table = cli("audit", "stats", "--db", line)  # 160 columns when piped: headers wrap
    assert "labelled" in table and "escape %" in table and "33.33" in table
    text = cli("audit", "stats", "--db", line, "--format", "csv")
    csv_rows = list(csv.DictReader(io.StringIO(text)))
    assert list(csv_rows[0])[-5:] == list(LABEL_KEYS)
    gadget = next(r for r in csv_rows if r["sku"] == "gadget")
    assert (gadget["labelled"], gadget["escape_pct"]) == ("0", "")
