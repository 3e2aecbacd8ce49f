"""Users, logins, sessions, CSRF tokens and API tokens of the console and REST API.

- Passwords are hashed with argon2id (``argon2-cffi``'s defaults, RFC 9106's second recommended
  option); a hash made with older parameters is replaced at the next successful login.
- A login creates a session: a random 256-bit token in the ``fpenode_session`` cookie (HttpOnly,
  SameSite=Strict, Secure when ``console.secure_cookie``), stored as its SHA-256 digest. It ends
  after ``console.session_idle_min`` without a request or ``console.session_max_h`` after the
  login, at logout, when the user's password or role changes, or when the user is removed.
- Each session has a CSRF token (synchroniser token pattern, OWASP CSRF Prevention Cheat
  Sheet): a session-authenticated POST/PUT/PATCH/DELETE must carry it in the ``X-CSRF-Token``
  header or the ``csrf_token`` form field (:func:`dicom_node.web.deps.require` checks it).
  Bearer-token requests need none: a browser never sends an ``Authorization`` header by itself.
- After ``console.lockout_failures`` failed logins in a row an account is locked for
  ``console.lockout_min`` minutes; while locked even the right password is refused.
- API tokens (``Authorization: Bearer fpe_...``) belong to a user and act with their own role,
  never above the owner's current role; shown once when made, stored as SHA-256 digests.

Every login (success or failure, with the client address) and every change of a user or token
is written to the audit table (:mod:`dicom_node.audit`) in the transaction that makes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from dicom_node import audit
from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.users import ApiToken, WebSession, WebUser
from dicom_node.settings import Settings
from dicom_node.web.context import WebContext, web_context
from dicom_node.web.deps import Principal, Role

if TYPE_CHECKING:
    from fastapi import Request, Response

log = logging.getLogger(__name__)

SESSION_COOKIE = "fpenode_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
TOKEN_PREFIX = "fpe_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOUCH_EVERY = dt.timedelta(seconds=60)  # last_seen_at / last_used_at are written at most this often
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("fpe-node: no such user")  # verified on unknown names, so timing tells nothing


class LoginRefused(Exception):
    """A login that did not succeed (wrong name or password, locked out, disabled).

    ``reason`` is what the user may be told; the audit entry holds the precise cause.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UserError(ValueError):
    """A refused change of a user or token (unknown name, weak password, last admin, ...)."""


@dataclass(frozen=True)
class UserInfo:
    """A user as the CLI and API show it (never its hash)."""

    name: str
    role: Role
    created_at: dt.datetime
    disabled: bool
    locked_until: dt.datetime | None
    failed_attempts: int


@dataclass(frozen=True)
class TokenInfo:
    """An API token as the CLI and API show it (never its secret)."""

    id: int
    name: str
    owner: str
    role: Role
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None


@dataclass(frozen=True)
class SessionPrincipal:
    """The caller of a valid session and that session's CSRF token."""

    principal: Principal
    csrf_token: str


# -- secrets ----------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string format) of ``password``."""
    return _HASHER.hash(password)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def check_name(name: str) -> str:
    """``name`` if it is a valid user or token name (1-64 of letters, digits, ``._@-``)."""
    if not _NAME.fullmatch(name):
        raise UserError(f"invalid name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


def check_password(password: str, settings: Settings) -> str:
    """``password`` if it is long enough (``console.password_min_length``)."""
    least = settings.console.password_min_length
    if len(password) < least:
        raise UserError(f"the password must have at least {least} characters")
    return password


def parse_role(text: str | Role) -> Role:
    """The :class:`Role` named ``text``."""
    if isinstance(text, Role):
        return text
    try:
        return Role[text]
    except KeyError:
        raise UserError(f"unknown role {text!r} (viewer, operator or admin)") from None


# -- login, sessions ---------------------------------------------------------------------------


def login(context: WebContext, username: str, password: str, source: str) -> tuple[Principal, str]:
    """Check the password and open a session.

    Returns
    -------
    The principal and the new session token (for :func:`set_session_cookie`).

    Raises
    ------
    LoginRefused
        Wrong name or password, account locked or disabled; the attempt is audited
        (``user.login_failed``) and counts towards the lock-out.
    """
    console = context.settings.console
    now = utcnow()
    refusal: str | None = None
    with write_session(context.session_factory) as session:
        session.execute(delete(WebSession).where(WebSession.expires_at < now))
        user = session.scalar(select(WebUser).where(WebUser.name == username))
        if user is None or user.disabled_at is not None:
            _verify(_DUMMY_HASH, password)
            cause = "unknown user" if user is None else "disabled user"
            refusal = "wrong user name or password"
        elif user.locked_until is not None and user.locked_until > now:
            cause, refusal = "account locked", "account locked after repeated failures; try again later"
        elif not _verify(user.password_hash, password):
            user.failed_attempts = (0 if user.locked_until is not None else user.failed_attempts) + 1
            user.locked_until = None
            cause, refusal = "wrong password", "wrong user name or password"
            if user.failed_attempts >= console.lockout_failures:
                user.locked_until = now + dt.timedelta(minutes=console.lockout_min)
                user.failed_attempts = 0
                cause += f"; locked for {console.lockout_min:g} min"
        if refusal is not None:
            audit.add_entry(session, actor=username[:64], action=audit.USER_LOGIN_FAILED, source=source,
                         detail={"reason": cause})
        else:
            assert user is not None
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = hash_password(password)
            user.failed_attempts, user.locked_until = 0, None
            token = secrets.token_urlsafe(32)
            session.add(
                WebSession(
                    token_hash=_digest(token),
                    user_pk=user.id,
                    csrf_token=secrets.token_urlsafe(32),
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + dt.timedelta(hours=console.session_max_h),
                    source=source,
                )
            )
            audit.add_entry(session, actor=user.name, action=audit.USER_LOGIN, source=source)
            principal = Principal(user.name, Role[user.role], "session")
    if refusal is not None:
        log.info("console login refused from %s: %s", source, cause)
        raise LoginRefused(refusal)
    log.info("console login of %s from %s", principal.name, source)
    return principal, token


def logout(context: WebContext, token: str, source: str | None = None) -> None:
    """End the session of ``token`` (nothing happens for an unknown or expired token)."""
    with write_session(context.session_factory) as session:
        row = session.scalar(
            select(WebSession).where(WebSession.token_hash == _digest(token)).options(selectinload(WebSession.user))
        )
        if row is None:
            return
        audit.add_entry(session, actor=row.user.name, action=audit.USER_LOGOUT, source=source or row.source)
        session.delete(row)


def authenticate_session(context: WebContext, token: str) -> SessionPrincipal | None:
    """The caller of a live session token, or ``None`` (unknown, expired, idle too long, user disabled)."""
    now = utcnow()
    idle = dt.timedelta(minutes=context.settings.console.session_idle_min)
    digest = _digest(token)
    with context.session_factory() as session:
        row = session.scalar(
            select(WebSession).where(WebSession.token_hash == digest).options(selectinload(WebSession.user))
        )
        if row is None:
            return None
        alive = row.expires_at > now and now - row.last_seen_at <= idle and row.user.disabled_at is None
        found = SessionPrincipal(Principal(row.user.name, Role[row.user.role], "session"), row.csrf_token)
        needs_touch = now - row.last_seen_at >= _TOUCH_EVERY
    if not alive:
        with write_session(context.session_factory) as session:
            session.execute(delete(WebSession).where(WebSession.token_hash == digest))
        return None
    if needs_touch:
        with write_session(context.session_factory) as session:
            touched = session.scalar(select(WebSession).where(WebSession.token_hash == digest))
            if touched is not None:
                touched.last_seen_at = now
    return found


def authenticate_token(context: WebContext, token: str) -> Principal | None:
    """The caller of an API token, or ``None`` (unknown, expired, owner disabled)."""
    now = utcnow()
    with context.session_factory() as session:
        row = session.scalar(
            select(ApiToken).where(ApiToken.token_hash == _digest(token)).options(selectinload(ApiToken.owner))
        )
        if row is None or row.owner.disabled_at is not None or (row.expires_at is not None and row.expires_at <= now):
            return None
        role = min(Role[row.role], Role[row.owner.role])
        principal = Principal(row.owner.name, role, "token")
        token_pk = row.id
        needs_touch = row.last_used_at is None or now - row.last_used_at >= _TOUCH_EVERY
    if needs_touch:
        with write_session(context.session_factory) as session:
            touched = session.get(ApiToken, token_pk)
            if touched is not None:
                touched.last_used_at = now
    return principal


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    """Put the session token in the HttpOnly, SameSite=Strict cookie (Secure per ``console.secure_cookie``)."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.console.session_max_h * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=settings.console.secure_cookie,
    )


def clear_session_cookie(response: Response) -> None:
    """Tell the browser to forget the session cookie."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")


def csrf_token(request: Request) -> str:
    """The CSRF token of the request's session (for templates); ``""`` without a live session."""
    known = getattr(request.state, "fpenode_csrf", None)
    if isinstance(known, str):
        return known
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return ""
    found = authenticate_session(web_context(request), token)
    return "" if found is None else found.csrf_token


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the one a request carried."""
    return bool(given) and hmac.compare_digest(expected.encode("utf-8"), (given or "").encode("utf-8"))


# -- users --------------------------------------------------------------------------------------


def _user_info(row: WebUser) -> UserInfo:
    return UserInfo(row.name, Role[row.role], row.created_at, row.disabled_at is not None, row.locked_until,
                    row.failed_attempts)


def _user_row(session: Session, name: str) -> WebUser:
    row = session.scalar(select(WebUser).where(WebUser.name == name))
    if row is None:
        raise UserError(f"no user named {name!r}")
    return row


def _admins_left(session: Session, without: str) -> int:
    rows = session.scalars(
        select(WebUser).where(WebUser.role == Role.admin.name, WebUser.disabled_at.is_(None), WebUser.name != without)
    )
    return len(list(rows))


def list_users(context: WebContext) -> list[UserInfo]:
    """Every user, by name."""
    with context.session_factory() as session:
        return [_user_info(row) for row in session.scalars(select(WebUser).order_by(WebUser.name))]


def add_user(context: WebContext, name: str, role: Role | str, password: str, *, actor: str, source: str) -> UserInfo:
    """Create a user (audited ``user.add``).

    Raises
    ------
    UserError
        Invalid or taken name, unknown role, password too short.
    """
    check_name(name)
    role = parse_role(role)
    check_password(password, context.settings)
    with write_session(context.session_factory) as session:
        if session.scalar(select(WebUser).where(WebUser.name == name)) is not None:
            raise UserError(f"a user named {name!r} exists")
        row = WebUser(name=name, role=role.name, password_hash=hash_password(password), failed_attempts=0)
        session.add(row)
        audit.add_entry(session, actor=actor, action=audit.USER_ADD, source=source, detail={"name": name, "role": role.name})
        session.flush()
        info = _user_info(row)
    log.info("user %s (%s) added by %s", name, role.name, actor)
    return info


def change_user(
    context: WebContext,
    name: str,
    *,
    actor: str,
    source: str,
    role: Role | str | None = None,
    password: str | None = None,
    disabled: bool | None = None,
    unlock: bool = False,
) -> UserInfo:
    """Change a user's role, password, disabled flag, or lift its lock-out (audited ``user.change``).

    A new password or a lower role or disabling ends the user's sessions. The last enabled admin
    can be neither demoted nor disabled.

    Raises
    ------
    UserError
        Unknown user, unknown role, password too short, the last admin.
    """
    new_role = None if role is None else parse_role(role)
    if password is not None:
        check_password(password, context.settings)
    with write_session(context.session_factory) as session:
        row = _user_row(session, name)
        changes: dict[str, object] = {}
        end_sessions = False
        losing_admin = row.role == Role.admin.name and row.disabled_at is None and (
            (new_role is not None and new_role < Role.admin) or disabled is True
        )
        if losing_admin and _admins_left(session, without=name) == 0:
            raise UserError(f"{name!r} is the last admin; add another admin first")
        if new_role is not None and new_role.name != row.role:
            end_sessions = new_role < Role[row.role]
            changes["role"] = {"from": row.role, "to": new_role.name}
            row.role = new_role.name
        if password is not None:
            row.password_hash = hash_password(password)
            changes["password"] = "changed"
            end_sessions = True
        if disabled is not None and disabled != (row.disabled_at is not None):
            row.disabled_at = utcnow() if disabled else None
            changes["disabled"] = disabled
            end_sessions = end_sessions or disabled
        if unlock and (row.locked_until is not None or row.failed_attempts):
            row.locked_until, row.failed_attempts = None, 0
            changes["unlocked"] = True
        if end_sessions:
            session.execute(delete(WebSession).where(WebSession.user_pk == row.id))
        if changes:
            audit.add_entry(session, actor=actor, action=audit.USER_CHANGE, source=source, detail={"name": name, **changes})
        info = _user_info(row)
    return info


def remove_user(context: WebContext, name: str, *, actor: str, source: str) -> None:
    """Remove a user with its sessions and tokens (audited ``user.remove``); never the last admin."""
    with write_session(context.session_factory) as session:
        row = _user_row(session, name)
        if row.role == Role.admin.name and _admins_left(session, without=name) == 0:
            raise UserError(f"{name!r} is the last admin; add another admin first")
        session.delete(row)
        audit.add_entry(session, actor=actor, action=audit.USER_REMOVE, source=source, detail={"name": name})
    log.info("user %s removed by %s", name, actor)


# -- API tokens ---------------------------------------------------------------------------------


def _token_info(row: ApiToken) -> TokenInfo:
    return TokenInfo(row.id, row.name, row.owner.name, Role[row.role], row.created_at, row.last_used_at, row.expires_at)


def list_tokens(context: WebContext, owner: str | None = None) -> list[TokenInfo]:
    """Every API token (or ``owner``'s), oldest first."""
    with context.session_factory() as session:
        query = select(ApiToken).join(WebUser).options(selectinload(ApiToken.owner)).order_by(ApiToken.id)
        if owner is not None:
            query = query.where(WebUser.name == owner)
        return [_token_info(row) for row in session.scalars(query)]


def add_token(
    context: WebContext,
    owner: str,
    name: str,
    role: Role | str | None = None,
    *,
    expires_days: float | None = None,
    actor: str,
    source: str,
) -> tuple[TokenInfo, str]:
    """Make an API token for ``owner`` (audited ``token.add``); the secret is returned only here.

    ``role`` defaults to the owner's and may not exceed it.

    Raises
    ------
    UserError
        Unknown owner, invalid name, role above the owner's, non-positive lifetime.
    """
    check_name(name)
    if expires_days is not None and expires_days <= 0:
        raise UserError("the token lifetime must be positive")
    with write_session(context.session_factory) as session:
        user = _user_row(session, owner)
        token_role = Role[user.role] if role is None else parse_role(role)
        if token_role > Role[user.role]:
            raise UserError(f"a token of {owner!r} cannot have a role above {user.role}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = None if expires_days is None else utcnow() + dt.timedelta(days=expires_days)
        row = ApiToken(token_hash=_digest(secret), owner_pk=user.id, name=name, role=token_role.name, expires_at=expires)
        row.owner = user
        session.add(row)
        session.flush()
        audit.add_entry(session, actor=actor, action=audit.TOKEN_ADD, source=source,
                     detail={"id": row.id, "name": name, "owner": owner, "role": token_role.name})
        info = _token_info(row)
    log.info("API token %d (%s) of %s added by %s", info.id, name, owner, actor)
    return info, secret


def remove_token(context: WebContext, token_id: int, *, actor: str, source: str) -> None:
    """Revoke an API token (audited ``token.remove``)."""
    with write_session(context.session_factory) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.id == token_id).options(selectinload(ApiToken.owner)))
        if row is None:
            raise UserError(f"no API token {token_id}")
        audit.add_entry(session, actor=actor, action=audit.TOKEN_REMOVE, source=source,
                     detail={"id": token_id, "name": row.name, "owner": row.owner.name})
        session.delete(row)
