"""The verdicts table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Written out rather than imported from schema.py: a migration is frozen history.
    op.create_table(
        "verdicts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("frame_id", sa.String(64), nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("part_id", sa.Text()),
        sa.Column("origin", sa.Text()),
        sa.Column("capture_time", sa.DateTime(timezone=True)),
        sa.Column("decided_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("score", sa.Float()),
        sa.Column("threshold", sa.Float()),
        sa.Column("pixel_threshold", sa.Float()),
        sa.Column("model_version", sa.Text()),
        sa.Column("queue_ms", sa.Float()),
        sa.Column("decode_ms", sa.Float()),
        sa.Column("infer_ms", sa.Float()),
        sa.Column("total_ms", sa.Float()),
        sa.Column("image_path", sa.Text()),
        sa.Column("mask_path", sa.Text()),
        sa.Column("overlay_path", sa.Text()),
        sa.Column("image_sha256", sa.String(64)),
        sa.PrimaryKeyConstraint("id", name="pk_verdicts"),
        sa.UniqueConstraint("frame_id", name="uq_verdicts_frame_id"),
    )
    op.create_index("ix_verdicts_sku_capture_time", "verdicts", ["sku", "capture_time"])
    op.create_index("ix_verdicts_verdict_capture_time", "verdicts", ["verdict", "capture_time"])
    op.create_index("ix_verdicts_capture_time", "verdicts", ["capture_time"])


def downgrade() -> None:
    op.drop_table("verdicts")
