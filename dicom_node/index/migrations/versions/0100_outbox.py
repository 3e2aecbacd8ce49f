"""Outbox: one row per result object and destination (see dicom_node.index.outbox).

Revision ID: 0100_outbox
Revises: 0002_analysis_job
Create Date: 2026-11-26 23:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0100_outbox"
down_revision: str | None = "0002_analysis_job"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the outbox table and its indexes."""
    op.create_table(
        "outbox_item",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("sent_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_try_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_item")),
        sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_item_object_destination"),
    )
    op.create_index(op.f("ix_outbox_item_study_uid"), "outbox_item", ["study_uid"])
    op.create_index(op.f("ix_outbox_item_destination"), "outbox_item", ["destination"])
    op.create_index("ix_outbox_item_state_next_try", "outbox_item", ["state", "next_try_at"])


def downgrade() -> None:
    """Drop the outbox table."""
    op.drop_index("ix_outbox_item_state_next_try", table_name="outbox_item")
    op.drop_index(op.f("ix_outbox_item_destination"), table_name="outbox_item")
    op.drop_index(op.f("ix_outbox_item_study_uid"), table_name="outbox_item")
    op.drop_table("outbox_item")
