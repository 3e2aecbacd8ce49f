"""Declarative base and reusable column types shared by every table of the index.

Each table module (``models.py``, and the modules other parts of the node add) imports
:class:`Base` from here, so one ``Base.metadata`` describes the whole schema and Alembic
migrations are generated against it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from sqlalchemy import DateTime, Dialect, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations behave the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Timezone-aware current time in UTC (every timestamp of the index is UTC)."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A ``DateTime(timezone=True)`` column that stores UTC and always returns aware UTC values.

    PostgreSQL's ``timestamptz`` hands values back aware, SQLite's text column naive (the driver
    drops the offset when storing). Every value is converted to UTC before it is bound, so both
    store the same instant and SQLite's text comparisons order correctly, and every value read
    back is made aware UTC. A naive value given to the index is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """The value as aware UTC (naive values are taken as UTC)."""
        return None if value is None else _to_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        """The stored value as aware UTC (SQLite returns it naive, in UTC)."""
        return None if value is None else _to_utc(value)


def _to_utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    """Base class of every ORM model of the index."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


IntPK = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
UID = Annotated[str, mapped_column(String(64))]  # PS3.5 9.1: at most 64 characters
AETitle = Annotated[str, mapped_column(String(16))]
# An instant the node records: aware UTC on every backend. (A bare ``Mapped[dt.datetime]`` stays
# a plain DateTime: ``study.acquired_at`` is the scanner's naive local StudyDate/StudyTime.)
Timestamp = Annotated[dt.datetime, mapped_column(UTCDateTime())]
