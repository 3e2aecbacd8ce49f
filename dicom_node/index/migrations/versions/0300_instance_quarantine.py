"""instance.quarantine_reason: instances that failed the later check (dicom_node.validation)

Revision ID: 0300_instance_quarantine
Revises: 0200_analysis
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0300_instance_quarantine"
down_revision: str | None = "0200_analysis"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("quarantine_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("quarantine_reason")
