"""The audit log's tables (SQLAlchemy Core). Changes go through a new Alembic migration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value} for a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
})

# Free-form fields are Text: PostgreSQL enforces VARCHAR lengths, and a row the database
# refuses would have nowhere to go.
verdicts = Table(
    "verdicts", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("frame_id", String(64), nullable=False, unique=True),
    Column("line", String(64), nullable=False),
    Column("camera", String(64), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("part_id", Text),
    Column("origin", Text),
    Column("capture_time", UTCDateTime),
    Column("decided_time", UTCDateTime, nullable=False),
    Column("verdict", String(8), nullable=False),
    Column("reason", Text),
    Column("score", Float),
    Column("threshold", Float),
    Column("pixel_threshold", Float),
    Column("model_version", Text),
    Column("queue_ms", Float),
    Column("decode_ms", Float),
    Column("infer_ms", Float),
    Column("total_ms", Float),
    Column("image_path", Text),
    Column("mask_path", Text),
    Column("overlay_path", Text),
    Column("image_sha256", String(64)),
    Index(None, "sku", "capture_time"),
    Index(None, "verdict", "capture_time"),
    Index(None, "capture_time"),
)

# An operator's word on a frame. No foreign key to verdicts: a label outlives the verdict row
# (audit retention may delete it) and refers to it by frame id only.
labels = Table(
    "labels", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("frame_id", String(64), nullable=False, unique=True, index=True),
    Column("label", String(2), CheckConstraint("label IN ('OK', 'NG')", name="ck_labels_label"),
           nullable=False),
    Column("note", Text),
    Column("labelled_by", String(64), nullable=False),
    Column("labelled_time", UTCDateTime, nullable=False),
)
