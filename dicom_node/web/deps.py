"""Who is asking: roles and the FastAPI dependencies that enforce them.

Roles are ordered: a role may do everything the roles below it may.

- ``viewer``: reads studies, peers, dead letters, the dashboard;
- ``operator``: also acts on studies (force complete, re-run, resend, retry or drop a dead
  letter, suspend and resume);
- ``admin``: also manages peers, users, API tokens and reads the effective settings.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status


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


def current_principal(request: Request) -> Principal:
    """The caller of ``request``, or 401."""
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "authentication required", headers={"WWW-Authenticate": "Bearer"})


def require(role: Role) -> Callable[..., Principal]:
    """A dependency admitting callers with ``role`` or above: 401 without credentials, 403 below ``role``."""

    def dependency(principal: Principal = Depends(current_principal)) -> Principal:
        if principal.role < role:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"needs the {role.name} role")
        return principal

    return dependency
