"""DICOMweb destinations: peer_dicomweb (STOW-RS service of a peer) and outbox_item.last_http_status

Revision ID: 0510_peer_dicomweb
Revises: 0520_audit_export_cursor (written against 0300; chained after main's 0500 and 0520)
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0510_peer_dicomweb"
down_revision: str | None = "0520_audit_export_cursor"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "peer_dicomweb",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("peer_pk", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=1024), nullable=False),
        sa.Column("auth", sa.String(length=32), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=True),
        sa.Column("secret_env", sa.String(length=255), nullable=True),
        sa.Column("secret_file", sa.String(length=1024), nullable=True),
        sa.Column("client_cert", sa.String(length=1024), nullable=True),
        sa.Column("client_key", sa.String(length=1024), nullable=True),
        sa.Column("ca_bundle", sa.String(length=1024), nullable=True),
        sa.Column("verify_tls", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["peer_pk"], ["peer.id"], name=op.f("fk_peer_dicomweb_peer_pk_peer"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_peer_dicomweb")),
        sa.UniqueConstraint("peer_pk", name=op.f("uq_peer_dicomweb_peer_pk")),
    )
    with op.batch_alter_table("outbox_item") as batch:
        batch.add_column(sa.Column("last_http_status", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("outbox_item") as batch:
        batch.drop_column("last_http_status")
    op.drop_table("peer_dicomweb")
