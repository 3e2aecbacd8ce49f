"""Leases and fencing tokens: analysis_job and outbox_item claims, node_lease (completion timers)

Every claim of a job or an outbox row now carries ``lease_until`` (renewed by its holder) and
raises ``fence``; a holder's final write names its token, so a presumed-dead process's late
write changes nothing. ``node_lease`` holds named leases (``completion``).

Revision ID: 0710_leases
Revises: 0700_instance_header
Create Date: 2026-12-02 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0710_leases"
down_revision: str | None = "0700_instance_header"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("analysis_job") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("fence", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("outbox_item") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("fence", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "node_lease",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fence", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_node_lease")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("node_lease")
    with op.batch_alter_table("outbox_item") as batch:
        batch.drop_column("fence")
        batch.drop_column("lease_until")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("analysis_job") as batch:
        batch.drop_column("fence")
        batch.drop_column("lease_until")
