"""audit_export_cursor: how far the syslog audit exporter has delivered the audit table (dicom_node.atna)

Revision ID: 0520_audit_export_cursor
Revises: 0500_peer_tls
Create Date: 2026-12-02 00:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0520_audit_export_cursor"
down_revision: str | None = "0500_peer_tls"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the cursor table."""
    op.create_table(
        "audit_export_cursor",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audit_export_cursor")),
    )


def downgrade() -> None:
    """Drop the cursor table."""
    op.drop_table("audit_export_cursor")
