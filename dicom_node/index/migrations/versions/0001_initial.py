"""Initial schema: patients, studies, series, instances, peers, audit, study timeline.

Revision ID: 0001_initial
Revises: (none)
Create Date: 2026-11-26 23:10:28.449932
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001_initial'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('audit_entry',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_entry'))
    )
    op.create_index(op.f('ix_audit_entry_at'), 'audit_entry', ['at'])

    op.create_table('patient',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=64), nullable=False),
    sa.Column('name_hash', sa.String(length=16), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patient')),
    sa.UniqueConstraint('patient_id', 'issuer', name='uq_patient_patient_id_issuer')
    )
    op.create_table('peer',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=True),
    sa.Column('roles', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_peer')),
    sa.UniqueConstraint('name', name=op.f('uq_peer_name'))
    )
    op.create_table('peer_ae_title',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('peer_pk', sa.Integer(), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['peer_pk'], ['peer.id'], name=op.f('fk_peer_ae_title_peer_pk_peer'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_peer_ae_title')),
    sa.UniqueConstraint('ae_title', name=op.f('uq_peer_ae_title_ae_title'))
    )
    op.create_index(op.f('ix_peer_ae_title_peer_pk'), 'peer_ae_title', ['peer_pk'])

    op.create_table('study',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_pk', sa.Integer(), nullable=True),
    sa.Column('acquired_at', sa.DateTime(), nullable=True),
    sa.Column('accession', sa.String(length=16), nullable=True),
    sa.Column('description', sa.String(length=64), nullable=True),
    sa.Column('modalities', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['patient_pk'], ['patient.id'], name=op.f('fk_study_patient_pk_patient'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_study')),
    sa.UniqueConstraint('study_uid', name=op.f('uq_study_study_uid'))
    )
    op.create_index(op.f('ix_study_last_received_at'), 'study', ['last_received_at'])
    op.create_index(op.f('ix_study_patient_pk'), 'study', ['patient_pk'])
    op.create_index(op.f('ix_study_state'), 'study', ['state'])

    op.create_table('series',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('description', sa.String(length=64), nullable=True),
    sa.Column('number', sa.Integer(), nullable=True),
    sa.Column('manufacturer', sa.String(length=64), nullable=True),
    sa.Column('image_type', sa.String(length=160), nullable=True),
    sa.Column('body_part', sa.String(length=16), nullable=True),
    sa.Column('frame_of_reference_uid', sa.String(length=64), nullable=True),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('complete_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_pk'], ['study.id'], name=op.f('fk_series_study_pk_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_series')),
    sa.UniqueConstraint('series_uid', name=op.f('uq_series_series_uid'))
    )
    op.create_index(op.f('ix_series_study_pk'), 'series', ['study_pk'])

    op.create_table('study_event',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['study_pk'], ['study.id'], name=op.f('fk_study_event_study_pk_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_study_event'))
    )
    op.create_index(op.f('ix_study_event_study_pk'), 'study_event', ['study_pk'])

    op.create_table('instance',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_pk', sa.Integer(), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['series_pk'], ['series.id'], name=op.f('fk_instance_series_pk_series'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_instance_sop_instance_uid'))
    )
    op.create_index(op.f('ix_instance_series_pk'), 'instance', ['series_pk'])



def downgrade() -> None:
    """Revert this revision."""
    op.drop_index(op.f('ix_instance_series_pk'), table_name='instance')

    op.drop_table('instance')
    op.drop_index(op.f('ix_study_event_study_pk'), table_name='study_event')

    op.drop_table('study_event')
    op.drop_index(op.f('ix_series_study_pk'), table_name='series')

    op.drop_table('series')
    op.drop_index(op.f('ix_study_state'), table_name='study')
    op.drop_index(op.f('ix_study_patient_pk'), table_name='study')
    op.drop_index(op.f('ix_study_last_received_at'), table_name='study')

    op.drop_table('study')
    op.drop_index(op.f('ix_peer_ae_title_peer_pk'), table_name='peer_ae_title')

    op.drop_table('peer_ae_title')
    op.drop_table('peer')
    op.drop_table('patient')
    op.drop_index(op.f('ix_audit_entry_at'), table_name='audit_entry')

    op.drop_table('audit_entry')
