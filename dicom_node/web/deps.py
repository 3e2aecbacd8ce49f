"""Who is asking: roles and the FastAPI dependencies that enforce them.

Roles are ordered: a role may do everything the roles below it may.

- ``viewer``: reads studies, peers, dead letters, the dashboard;
- ``operator``: also acts on studies (force complete, re-run, resend, retry or drop a dead
  letter, suspend and resume);
- ``admin``: also manages peers, users, API tokens and reads the effective settings.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPBearer

from dicom_node.web.context import web_context


class Role(enum.IntEnum):
    """A user's role; a higher value includes the lower ones."""

    viewer = 1
    operator = 2
    admin = 3


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes
    ----------
    name
        The user name (for a token, the token owner's).
    role
        The role that decides what the caller may do.
    via
        ``"session"`` (console cookie) or ``"token"`` (``Authorization: Bearer``).
    """

    name: str
    role: Role
    via: str


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# Declared so the OpenAPI document names both ways in; current_principal reads the request itself.
_bearer_scheme = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer fpe_...`.")
_cookie_scheme = APIKeyCookie(name="fpenode_session", auto_error=False, description="A console session (POST /api/v1/session).")


def _unauthorized(detail: str = "authentication required") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def current_principal(request: Request) -> Principal:
    """The caller of ``request``: an ``Authorization: Bearer`` API token, else the session cookie; or 401.

    A request carrying an ``Authorization`` header is judged by it alone (a bad token is not
    rescued by a cookie). For a session, its CSRF token is kept on ``request.state`` for
    :func:`dicom_node.web.auth.csrf_token` and :func:`require`.
    """
    from dicom_node.web import auth

    cached = getattr(request.state, "fpenode_principal", None)
    if isinstance(cached, Principal):
        return cached
    context = web_context(request)
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise _unauthorized("use Authorization: Bearer <API token>")
        principal = auth.authenticate_token(context, credentials.strip())
        if principal is None:
            raise _unauthorized("unknown, expired or revoked API token")
    else:
        cookie = request.cookies.get(auth.SESSION_COOKIE)
        found = None if not cookie else auth.authenticate_session(context, cookie)
        if found is None:
            raise _unauthorized("authentication required" if not cookie else "session expired; log in again")
        principal = found.principal
        request.state.fpenode_csrf = found.csrf_token
    request.state.fpenode_principal = principal
    return principal


async def check_csrf(request: Request, principal: Principal) -> None:
    """403 unless a session-authenticated unsafe request carries its session's CSRF token.

    The token comes in the ``X-CSRF-Token`` header or the ``csrf_token`` form field. Safe methods
    (RFC 9110 section 9.2.1) and bearer-token requests need none.
    """
    from dicom_node.web import auth

    if principal.via != "session" or request.method in _SAFE_METHODS:
        return
    given = request.headers.get(auth.CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
        value = (await request.form()).get(auth.CSRF_FIELD)  # Starlette keeps the parsed form for the endpoint
        given = value if isinstance(value, str) else None
    if not auth.csrf_matches(getattr(request.state, "fpenode_csrf", ""), given):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token (X-CSRF-Token header or csrf_token field)")


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting callers with ``role`` or above: 401 without credentials, 403 below
    ``role``, 403 for a session's POST/PUT/PATCH/DELETE without its CSRF token."""

    async def dependency(
        request: Request,
        principal: Principal = Depends(current_principal),
        _bearer: object = Depends(_bearer_scheme),
        _cookie: object = Depends(_cookie_scheme),
    ) -> Principal:
        if principal.role < role:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs the {role.name} role")
        await check_csrf(request, principal)
        return principal

    return dependency
