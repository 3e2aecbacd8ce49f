"""Declarative base and reusable column types shared by every table of the index.

Each table module (``models.py``, and the modules other parts of the node add) imports
:class:`Base` from here, so one ``Base.metadata`` describes the whole schema and Alembic
migrations are generated against it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from sqlalchemy import DateTime, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, mapped_column

# Stable constraint names, so migrations behave the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Base class of every ORM model of the index."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> dt.datetime:
    """Timezone-aware current time in UTC (every timestamp of the index is UTC)."""
    return dt.datetime.now(dt.timezone.utc)


IntPK = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
UID = Annotated[str, mapped_column(String(64))]  # PS3.5 9.1: at most 64 characters
AETitle = Annotated[str, mapped_column(String(16))]
Timestamp = Annotated[dt.datetime, mapped_column(DateTime(timezone=True))]
