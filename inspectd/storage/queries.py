"""Operator labels, and the audit-log questions that refit, drift, `audit query` and
`audit stats` ask.

Plain functions on a database URL or an Engine (an Engine passed in stays open). They read
an existing, migrated audit database and never create one: a missing SQLite file or table is
a StorageError that says to run `inspectd db upgrade`, as is any database failure.

Label rates, per SKU, over labelled frames only (unlabelled frames say nothing either way):

* escape rate = escapes / labelled passes: of the labelled frames the line passed (verdict
  OK), the share an operator labelled NG.
* false reject rate = false rejects / labelled rejects: of the labelled frames the line
  rejected (verdict NG, ERROR or TIMEOUT), the share an operator labelled OK.

A rate is None when its denominator is 0.
"""

from __future__ import annotations

import getpass
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
from sqlalchemy import Engine, Row, Select, and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from inspectd.core.wire import UNKNOWN_SKU
from inspectd.storage.db import StorageError, existing_database, safe_url
from inspectd.storage.schema import labels, verdicts

log = structlog.get_logger("inspectd.audit")

Label = Literal["OK", "NG"]
Period = Literal["hour", "day", "none"]
LABELS: tuple[Label, ...] = ("OK", "NG")
REJECTS = ("NG", "ERROR", "TIMEOUT")
USER_MAX = 64  # labels.labelled_by is varchar(64)


class LabelError(StorageError):
    """A label that cannot be set: no audited frame has the id, or the label is not OK/NG."""


@dataclass(frozen=True)
class AuditedFrame:
    """An audited frame as refit and operators see it: the verdict and any operator label."""

    frame_id: str
    sku: str
    verdict: str
    score: float | None
    threshold: float | None
    model_version: str | None
    image_path: str | None
    capture_time: datetime | None
    label: str | None  # the operator's OK / NG, None when unlabelled


@dataclass
class LabelCounts:
    """Labelled frames of one group, counted by verdict and label (see the module's rates)."""

    labelled: int = 0
    labelled_passes: int = 0  # verdict OK
    labelled_rejects: int = 0  # verdict NG, ERROR or TIMEOUT
    confirmed_ng: int = 0  # labelled NG, whatever the verdict (escapes included)
    false_rejects: int = 0  # rejected, labelled OK
    escapes: int = 0  # passed, labelled NG

    def add(self, verdict: str, label: str | None) -> None:
        if label is None:
            return
        self.labelled += 1
        passed = verdict == "OK"
        self.labelled_passes += passed
        self.labelled_rejects += not passed
        self.confirmed_ng += label == "NG"
        self.false_rejects += not passed and label == "OK"
        self.escapes += passed and label == "NG"

    @property
    def escape_rate(self) -> float | None:
        return self.escapes / self.labelled_passes if self.labelled_passes else None

    @property
    def false_reject_rate(self) -> float | None:
        return self.false_rejects / self.labelled_rejects if self.labelled_rejects else None

    def as_dict(self) -> dict[str, Any]:
        return {"labelled": self.labelled, "labelled_passes": self.labelled_passes,
                "labelled_rejects": self.labelled_rejects, "confirmed_ng": self.confirmed_ng,
                "false_rejects": self.false_rejects, "escapes": self.escapes,
                "escape_rate": self.escape_rate, "false_reject_rate": self.false_reject_rate}


def frames_query() -> Select:
    """Every verdict row with its label (LEFT JOIN), as columns of AuditedFrame."""
    v = verdicts.c
    return select(v.frame_id, v.sku, v.verdict, v.score, v.threshold, v.model_version,
                  v.image_path, v.capture_time, labels.c.label).select_from(
        verdicts.outerjoin(labels, labels.c.frame_id == v.frame_id))


# Newest capture first; rows without a capture time last, then by insertion.
NEWEST = (verdicts.c.capture_time.desc().nulls_last(), verdicts.c.id.desc())


def set_label(url: str | Engine, frame_id: str, label: Label, note: str | None = None,
              user: str | None = None) -> AuditedFrame:
    """Label an audited frame OK or NG, replacing its previous label; the frame, labelled.

    `user` defaults to the OS user. LabelError when no verdict row has `frame_id`.
    """
    if label not in LABELS:
        raise LabelError(f"label {label!r} for frame {frame_id}: expected OK or NG")
    user = _os_user() if user is None else user
    if not 0 < len(user) <= USER_MAX:
        raise LabelError(f"user name {user!r}: expected 1 to {USER_MAX} characters")
    with existing_database(url) as engine, engine.begin() as conn:
        audited = conn.execute(select(verdicts.c.id).where(verdicts.c.frame_id == frame_id))
        if audited.first() is None:
            raise LabelError(f"no audited frame {frame_id!r} in {safe_url(engine.url)}")
        ins = _insert(engine.dialect.name).values(
            frame_id=frame_id, label=label, note=note, labelled_by=user,
            labelled_time=datetime.now(UTC))
        conn.execute(ins.on_conflict_do_update(
            index_elements=[labels.c.frame_id],
            set_={k: ins.excluded[k] for k in ("label", "note", "labelled_by", "labelled_time")}))
        row = conn.execute(frames_query().where(verdicts.c.frame_id == frame_id)).one()
    log.info("frame labelled", frame_id=frame_id, label=label, verdict=row.verdict, user=user)
    return _frame(row)


def refit_candidates(url: str | Engine, sku: str, since: datetime | None = None,
                     max_images: int | None = None, near_threshold: float | None = 0.8,
                     unjudged: bool = False) -> list[AuditedFrame]:
    """Frames usable as OK training images for `sku`, newest first, at most `max_images`.

    Either the line passed it (verdict OK), no operator labelled it NG, and it scored below
    `near_threshold` × threshold (when both are known; None: whatever it scored — every OK
    frame kept, the unbiased sample refit's gates judge on); or an operator labelled it OK (a
    false reject), whatever its verdict and score. With `unjudged` (a SKU's first model),
    also frames the line could not judge for want of a model (ERROR, reason "unknown SKU…")
    that no operator labelled NG. Only frames whose image file exists count; the others are
    left out and their number logged.
    """
    v, lab = verdicts.c, labels.c
    not_ng = or_(lab.label.is_(None), lab.label != "NG")
    passed = [v.verdict == "OK", not_ng]
    if near_threshold is not None:
        passed.append(or_(v.score.is_(None), v.threshold.is_(None),
                          v.score < v.threshold * near_threshold))
    usable = [and_(*passed), lab.label == "OK"]
    if unjudged:
        usable.append(and_(v.verdict == "ERROR", v.reason.like(f"{UNKNOWN_SKU}%"), not_ng))
    q = frames_query().where(v.sku == sku, v.image_path.is_not(None), or_(*usable))
    if since is not None:
        q = q.where(v.capture_time >= since)
    return _with_image(url, q.order_by(*NEWEST), max_images, "refit candidates", sku)


def confirmed_ng(url: str | Engine, sku: str) -> list[AuditedFrame]:
    """Frames of `sku` an operator labelled NG (confirmed rejects and escapes) whose image
    file exists, newest first."""
    v = verdicts.c
    q = frames_query().where(v.sku == sku, labels.c.label == "NG", v.image_path.is_not(None))
    return _with_image(url, q.order_by(*NEWEST), None, "confirmed NG frames", sku)


def recent_scores(url: str | Engine, sku: str, since: datetime | None = None,
                  limit: int | None = 2000, model_version: str | None = None) -> list[float]:
    """Scores of the newest scored frames of `sku` (verdict OK or NG), newest first, for drift.

    `limit` None means all; non-finite scores are left out.
    """
    v = verdicts.c
    q = select(v.score).where(v.sku == sku, v.verdict.in_(("OK", "NG")), v.score.is_not(None))
    if since is not None:
        q = q.where(v.capture_time >= since)
    if model_version is not None:
        q = q.where(v.model_version == model_version)
    q = q.order_by(*NEWEST)
    if limit is not None:
        q = q.limit(limit)
    with existing_database(url, ("verdicts",)) as engine, engine.connect() as conn:
        return [s for s in conn.execute(q).scalars() if math.isfinite(s)]


def label_rates(url: str | Engine, sku: str | None = None, since: datetime | None = None,
                until: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per SKU with labelled frames captured in [since, until): LabelCounts.as_dict()."""
    v = verdicts.c
    q = select(v.sku, v.verdict, labels.c.label).select_from(
        verdicts.join(labels, labels.c.frame_id == v.frame_id))
    if sku is not None:
        q = q.where(v.sku == sku)
    if since is not None:
        q = q.where(v.capture_time >= since)
    if until is not None:
        q = q.where(v.capture_time < until)
    counts: dict[str, LabelCounts] = {}
    with existing_database(url) as engine, engine.connect() as conn:
        for r in conn.execution_options(yield_per=10_000).execute(q):
            counts.setdefault(r.sku, LabelCounts()).add(r.verdict, r.label)
    return {s: c.as_dict() for s, c in sorted(counts.items())}


def verdict_rows(url: str | Engine, *, sku: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, verdict: str | None = None,
                 camera: str | None = None, label: str | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """Audited verdicts captured in [since, until), each row's columns plus its operator
    `label`, newest capture first, at most `limit` (None: all). `label` "none" selects the
    unlabelled frames."""
    c = verdicts.c
    q = select(verdicts, labels.c.label).select_from(
        verdicts.outerjoin(labels, labels.c.frame_id == c.frame_id)
    ).where(*_between(sku, since, until))
    if verdict is not None:
        q = q.where(c.verdict == verdict)
    if camera is not None:
        q = q.where(c.camera == camera)
    if label is not None:
        q = q.where(labels.c.label.is_(None) if label == "none" else labels.c.label == label)
    q = q.order_by(*NEWEST)
    if limit:
        q = q.limit(limit)
    with existing_database(url) as engine, engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


@dataclass
class _Group:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OK", "NG", "ERROR", "TIMEOUT"), 0))
    scores: list[float] = field(default_factory=list)
    labels: LabelCounts = field(default_factory=LabelCounts)


def verdict_stats(url: str | Engine, *, sku: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, by: Period = "none") -> list[dict[str, Any]]:
    """Per SKU (and capture hour or day, UTC, under the key `by`): frames, verdict counts,
    yield and NG rate %, score p50/p95/p99 of scored frames, and the label counts and rates
    (`escape_pct`, `false_reject_pct`), sorted by SKU and period."""
    c = verdicts.c
    q = select(c.sku, c.capture_time, c.verdict, c.score, labels.c.label).select_from(
        verdicts.outerjoin(labels, labels.c.frame_id == c.frame_id)
    ).where(*_between(sku, since, until))
    groups: dict[tuple[str, str], _Group] = {}
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
        if by != "none":
            row[by] = period
        row |= {"frames": n, **g.counts,
                "yield_pct": round(100 * g.counts["OK"] / n, 2),
                "ng_rate_pct": round(100 * g.counts["NG"] / n, 2),
                "score_p50": p[0], "score_p95": p[1], "score_p99": p[2],
                "labelled": g.labels.labelled, "false_rejects": g.labels.false_rejects,
                "escapes": g.labels.escapes, "escape_pct": _pct(g.labels.escape_rate),
                "false_reject_pct": _pct(g.labels.false_reject_rate)}
        rows.append(row)
    return rows


def _between(sku: str | None, since: datetime | None, until: datetime | None) -> list[Any]:
    c, where = verdicts.c, []
    if sku is not None:
        where.append(c.sku == sku)
    if since is not None:
        where.append(c.capture_time >= since)
    if until is not None:
        where.append(c.capture_time < until)
    return where


def _period(t: datetime | None, by: Period) -> str:
    if by == "none":
        return ""
    if t is None:
        return "unknown"
    if by == "day":
        return t.date().isoformat()
    return t.replace(minute=0, second=0, microsecond=0).isoformat()


def _pct(rate: float | None) -> float | None:
    return None if rate is None else round(100 * rate, 2)


def _with_image(url: str | Engine, q: Select, limit: int | None, what: str,
                sku: str) -> list[AuditedFrame]:
    """The rows of `q` whose image file exists, up to `limit`; the missing ones are logged."""
    found: list[AuditedFrame] = []
    missing = 0
    with (existing_database(url) as engine, engine.connect() as conn,
          conn.execution_options(yield_per=1000).execute(q) as rows):
        for r in rows:
            if limit is not None and len(found) >= limit:
                break
            if Path(r.image_path).is_file():
                found.append(_frame(r))
            else:
                missing += 1
    if missing:
        # OK-sample rotation and NG retention delete images the audit rows still name.
        log.info("audited frames without their image file left out", what=what, sku=sku,
                 missing=missing, kept=len(found))
    return found


def _frame(r: Row) -> AuditedFrame:
    return AuditedFrame(r.frame_id, r.sku, r.verdict, r.score, r.threshold, r.model_version,
                        r.image_path, r.capture_time, r.label)


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(labels)
    if dialect == "sqlite":
        return sqlite.insert(labels)
    raise StorageError(f"unsupported audit database {dialect!r}: use SQLite or PostgreSQL")


def _os_user() -> str:
    try:
        return getpass.getuser()[:USER_MAX]
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return f"uid {os.getuid()}"
