"""Alembic environment: run the index migrations on the engine the node built.

Called programmatically by :func:`dicom_node.index.db.upgrade_to_head`, which puts the engine
into ``config.attributes["engine"]``. There is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, text

import dicom_node.index.models  # noqa: F401 - registers the tables on Base.metadata
from dicom_node.index.base import Base

MIGRATION_LOCK_KEY = 0x6670656E  # "fpen": the advisory lock every process takes to migrate


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
            if connection.dialect.name == "postgresql":
                # Several processes may start at once against one index (fpe-node serve --role ...):
                # the first migrates, the others wait here and then find the schema at head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():  # pragma: no cover
    raise RuntimeError("fpe-node index migrations run online only (fpe-node serve upgrades at start-up)")
run_migrations_online()
