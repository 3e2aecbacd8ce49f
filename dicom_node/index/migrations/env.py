"""Alembic environment: run the index migrations on the engine the node built.

Called programmatically by :func:`dicom_node.index.db.upgrade_to_head`, which puts the engine
into ``config.attributes["engine"]``. There is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

import dicom_node.index.models  # noqa: F401 - registers the tables on Base.metadata
from dicom_node.index.base import Base


def run_migrations_online() -> None:
    """Run every pending migration in one transaction on the node's engine."""
    engine: Engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():  # pragma: no cover
    raise RuntimeError("fpe-node index migrations run online only (fpe-node serve upgrades at start-up)")
run_migrations_online()
