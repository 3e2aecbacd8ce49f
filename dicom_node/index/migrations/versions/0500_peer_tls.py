"""peer.tls and peer.tls_verify: DICOM over TLS per peer (PS3.15 Annex B secure transport)

Revision ID: 0500_peer_tls
Revises: 0300_instance_quarantine
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0500_peer_tls"
down_revision: str | None = "0300_instance_quarantine"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision: existing peers keep plain DICOM, verification on."""
    with op.batch_alter_table("peer") as batch:
        batch.add_column(sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("tls_verify", sa.Boolean(), nullable=False, server_default=sa.true()))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("peer") as batch:
        batch.drop_column("tls_verify")
        batch.drop_column("tls")
