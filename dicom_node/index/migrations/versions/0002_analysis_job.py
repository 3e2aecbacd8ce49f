"""analysis job queue (dicom_node.lifecycle)

Revision ID: 0002_analysis_job
Revises: 0001_initial
Create Date: 2026-11-26 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_analysis_job"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "analysis_job",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("priority_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["study.id"], name=op.f("fk_analysis_job_study_pk_study"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analysis_job")),
    )
    op.create_index("ix_analysis_job_state", "analysis_job", ["state"], unique=False)
    op.create_index(op.f("ix_analysis_job_study_pk"), "analysis_job", ["study_pk"], unique=False)
    op.create_index(
        "uq_analysis_job_open_study",
        "analysis_job",
        ["study_pk"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("uq_analysis_job_open_study", table_name="analysis_job")
    op.drop_index(op.f("ix_analysis_job_study_pk"), table_name="analysis_job")
    op.drop_index("ix_analysis_job_state", table_name="analysis_job")
    op.drop_table("analysis_job")
