"""Operator labels (OK / NG) on audited frames.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No foreign key to verdicts: labels must survive the deletion of old verdict rows.
    op.create_table(
        "labels",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("frame_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(2), nullable=False),
        sa.Column("note", sa.Text()),
        sa.Column("labelled_by", sa.String(64), nullable=False),
        sa.Column("labelled_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labels"),
        sa.CheckConstraint("label IN ('OK', 'NG')", name="ck_labels_label"),
    )
    # The unique index is what upserts conflict on (ON CONFLICT (frame_id)).
    op.create_index("ix_labels_frame_id", "labels", ["frame_id"], unique=True)


def downgrade() -> None:
    op.drop_table("labels")
