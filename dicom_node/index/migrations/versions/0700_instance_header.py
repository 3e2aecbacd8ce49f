"""instance.header: the header the C-STORE handler parsed, kept for completion and the worker

Rows indexed before this revision keep NULL; the node fills each from its file the first time
it needs it (dicom_node.headers.stored_headers).

Revision ID: 0700_instance_header
Revises: 0410_alert
Create Date: 2026-12-02 01:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0700_instance_header"
down_revision: str | None = "0410_alert"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("header", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("header")
