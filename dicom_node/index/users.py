"""Tables of the console and REST API: users, their sessions, API tokens, node-wide suspensions.

Secrets are never stored in clear: passwords as argon2id hashes (``dicom_node.web.auth``),
session and API tokens as SHA-256 digests of random 256-bit values (a digest of a high-entropy
token needs no salt or slow hash: it cannot be guessed, only stolen from the request). The CSRF
token of a session is stored as given: it is useless without the session cookie.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dicom_node.index.base import Base, IntPK, Timestamp, UTCDateTime, utcnow


class WebUser(Base):
    """A person who may log into the console or own API tokens.

    ``role`` is ``viewer``, ``operator`` or ``admin`` (:class:`dicom_node.web.deps.Role`).
    After ``console.lockout_failures`` failed logins in a row ``locked_until`` is set and every
    login is refused until then. A disabled user (``disabled_at`` set) keeps its audit trail.
    """

    __tablename__ = "web_user"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)

    sessions: Mapped[list[WebSession]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )
    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="owner", cascade="all, delete-orphan", passive_deletes=True
    )


class WebSession(Base):
    """A console login: the cookie's token digest, its CSRF token, when it ends, from where."""

    __tablename__ = "web_session"

    id: Mapped[IntPK]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    last_seen_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    """The absolute end (login + ``console.session_max_h``); idle sessions end earlier."""
    source: Mapped[str | None] = mapped_column(String(255), default=None)

    user: Mapped[WebUser] = relationship(back_populates="sessions")


class ApiToken(Base):
    """A bearer token for scripts; it acts with ``role``, never above its owner's current role."""

    __tablename__ = "api_token"

    id: Mapped[IntPK]
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner_pk: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)

    owner: Mapped[WebUser] = relationship(back_populates="tokens")


class Suspension(Base):
    """Analysis or delivery suspended node-wide (``dicom_node.actions.suspend``); no row: running."""

    __tablename__ = "node_suspension"

    what: Mapped[str] = mapped_column(String(16), primary_key=True)
    """``analysis`` (workers claim no job) or ``delivery`` (the outbox sends nothing)."""
    since: Mapped[Timestamp] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
