"""Engine, sessions and schema upgrades of the index.

Bound parameters never appear in SQL logs or exception messages (``hide_parameters``): they
hold patient IDs. One engine and one session factory are built at start-up from the settings
(:func:`build_engine`, :func:`build_session_factory`) and passed down. SQLite (the embedded
default) runs in WAL mode with a busy timeout, foreign keys on, and ``synchronous=FULL`` when
the node fsyncs its files, so an acknowledged C-STORE survives a crash of the process or the
machine. PostgreSQL is used when ``index.url`` names it.

Writers use :func:`write_session`: on SQLite it starts the transaction with
``BEGIN IMMEDIATE``, which takes the write lock up front, so concurrent associations queue on
the busy timeout instead of failing with "database is locked" when a read transaction tries to
upgrade to a write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
_BEGIN_MODE = "fpenode_sqlite_begin"
T = TypeVar("T")


def build_engine(settings: Settings) -> Engine:
    """The index engine for ``settings.index_url`` (SQLite file or PostgreSQL).

    Creates the data directory for the default SQLite file.
    """
    url = make_url(settings.index_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(
            url,
            echo=settings.index.echo,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=40,
        )
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=settings.index.echo,
        hide_parameters=True,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )
    _configure_sqlite(engine, synchronous="FULL" if settings.storage.fsync else "NORMAL")
    return engine


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    """WAL, busy timeout, foreign keys, and explicit BEGIN so writers can take the lock first."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (the driver's implicit BEGIN is deferred only).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def build_session_factory(engine: Engine) -> sessionmaker[Session]:
    """The session factory of the node; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_session(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One write unit of work: commit on success, roll back on error.

    On SQLite the transaction begins with ``BEGIN IMMEDIATE`` (waits on the busy timeout for
    other writers instead of failing later); elsewhere it is an ordinary transaction.
    """
    with factory() as session:
        session.connection(execution_options={_BEGIN_MODE: "IMMEDIATE"})
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def run_write(factory: sessionmaker[Session], work: Callable[[Session], T], *, retries: int = 5) -> T:
    """Run ``work`` in a :func:`write_session`, retrying after a unique-constraint conflict.

    Conflicts happen when two connections create the same row at once (PostgreSQL; on SQLite
    writers are serialised by ``BEGIN IMMEDIATE``). ``work`` must be safe to run again.
    """
    for attempt in range(1, retries + 1):
        try:
            with write_session(factory) as session:
                return work(session)
        except IntegrityError:
            if attempt == retries:
                raise
            log.debug("index write conflict, retrying (%d)", attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration for the bundled migrations, bound to ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Bring the index schema to the newest migration (run at every start-up; idempotent)."""
    command.upgrade(alembic_config(engine), "head")
    log.debug("index schema at head (%s)", engine.url.get_backend_name())
