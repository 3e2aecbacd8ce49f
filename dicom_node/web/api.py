"""The REST API (JSON under ``/api/v1``; OpenAPI document at ``/api/openapi.json``, docs at ``/api/docs``).

Callers authenticate with an API token (``Authorization: Bearer fpe_...``, see ``fpe-node tokens
add``) or a session (``POST /api/v1/session`` sets the ``fpenode_session`` cookie; a session's
POST/PUT/PATCH/DELETE also need its CSRF token in ``X-CSRF-Token``). Roles:

- viewer: every ``GET`` but users, tokens, settings and the audit trail;
- operator: also the study actions (complete, rerun, resend, dead letters, suspend/resume);
- admin: also peers (add, change, remove, echo), users, tokens, settings, audit trail.

Every action goes through the functions the command line uses (:mod:`dicom_node.actions`,
:mod:`dicom_node.web.auth`, :class:`dicom_node.peers.PeerRegistry`); refused actions answer 404
(unknown study, dead letter, peer, user, token) or 409 (wrong state, invalid change) with the reason.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from dicom_node import actions, audit
from dicom_node.peers import PeerError, PeerInfo, PeerRegistry, validate_peer
from dicom_node.settings import shown_settings
from dicom_node.web import auth, queries
from dicom_node.web.context import client_address, web_context
from dicom_node.web.deps import Principal, Role, require
from dicom_node.web.models import AuditRecord, Dashboard, DeadLetter, Peer, StudyDetail, StudySummary, Token, User

router = APIRouter(prefix="/api/v1")

viewer = require(Role.viewer)
operator = require(Role.operator)
admin = require(Role.admin)

# -- request and response bodies ------------------------------------------------------------------


class LoginRequest(BaseModel):
    """A user name and password (``POST /api/v1/session``)."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SessionInfo(BaseModel):
    """Who the caller is; for a session also the CSRF token its unsafe requests must carry."""

    name: str
    role: str
    via: str = Field(description="session or token")
    csrf_token: str | None = Field(None, description="Send as X-CSRF-Token with POST/PUT/PATCH/DELETE.")


class ActionResponse(BaseModel):
    """What an action did."""

    message: str
    count: int = Field(1, description="Objects affected (0: nothing to do).")


class SuspendRequest(BaseModel):
    """What to suspend or resume node-wide."""

    what: Literal["analysis", "delivery"]


class Suspended(BaseModel):
    """What is suspended node-wide now."""

    suspended: list[str]


class EchoResponse(BaseModel):
    """The peer's answer to C-ECHO (PS3.7 9.1.5)."""

    peer: str
    ok: bool
    status: int | None = Field(None, description="DICOM status; empty when no association or no answer.")
    message: str


class PeerChange(BaseModel):
    """A peer's new AE titles, host, port and roles (``PUT /api/v1/peers/{name}``)."""

    ae_titles: list[str] = Field(min_length=1)
    host: str = "*"
    port: int | None = Field(None, ge=1, le=65535)
    roles: list[Literal["source", "destination"]] = Field(["source"], min_length=1)


class NewUser(BaseModel):
    """A user to create."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "operator", "admin"]
    password: str = Field(min_length=1, max_length=1024)


class UserChange(BaseModel):
    """Changes to a user; fields left out stay as they are."""

    role: Literal["viewer", "operator", "admin"] | None = None
    password: str | None = Field(None, min_length=1, max_length=1024)
    disabled: bool | None = None
    unlock: bool = Field(False, description="Lift a lock-out after failed logins.")


class NewToken(BaseModel):
    """An API token to make."""

    owner: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "operator", "admin"] | None = Field(None, description="Default: the owner's role.")
    expires_days: float | None = Field(None, gt=0)


class TokenCreated(Token):
    """A new API token with its secret (shown only in this response)."""

    token: str = Field(description="Authorization: Bearer <token>. Not shown again.")


# -- helpers ----------------------------------------------------------------------------------------


@contextmanager
def _refusals() -> Iterator[None]:
    """Refused actions and changes as 404 (unknown thing) or 409 (wrong state, invalid change)."""
    try:
        yield
    except actions.ActionNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, exc.message) from None
    except actions.ActionError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, exc.message) from None
    except (auth.UserError, PeerError) as exc:
        code = status.HTTP_404_NOT_FOUND if str(exc).startswith("no ") else status.HTTP_409_CONFLICT
        raise HTTPException(code, str(exc)) from None


def _action(result: actions.ActionResult) -> ActionResponse:
    return ActionResponse(message=result.message, count=result.count)


def _peer(info: PeerInfo) -> Peer:
    return Peer(name=info.name, ae_titles=list(info.ae_titles), host=info.host, port=info.port, roles=list(info.roles))


def _user(info: auth.UserInfo) -> User:
    return User(name=info.name, role=info.role.name, created_at=info.created_at, disabled=info.disabled,
                locked_until=info.locked_until)


def _token(info: auth.TokenInfo) -> Token:
    return Token(id=info.id, name=info.name, owner=info.owner, role=info.role.name, created_at=info.created_at,
                 last_used_at=info.last_used_at, expires_at=info.expires_at)


# -- session ------------------------------------------------------------------------------------------


@router.post("/session", response_model=SessionInfo, tags=["session"], responses={401: {"description": "Login refused"}})
def open_session(body: LoginRequest, request: Request, response: Response) -> SessionInfo:
    """Log in: sets the session cookie and returns the CSRF token (lock-out after repeated failures)."""
    context = web_context(request)
    try:
        principal, token = auth.login(context, body.username, body.password, client_address(request))
    except auth.LoginRefused as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, exc.reason) from None
    auth.set_session_cookie(response, token, context.settings)
    found = auth.authenticate_session(context, token)
    return SessionInfo(name=principal.name, role=principal.role.name, via="session",
                       csrf_token=None if found is None else found.csrf_token)


@router.get("/session", response_model=SessionInfo, tags=["session"])
def whoami(request: Request, principal: Principal = Depends(viewer)) -> SessionInfo:
    """The caller (and, for a session, its CSRF token)."""
    return SessionInfo(name=principal.name, role=principal.role.name, via=principal.via,
                       csrf_token=auth.csrf_token(request) if principal.via == "session" else None)


@router.delete("/session", status_code=status.HTTP_204_NO_CONTENT, tags=["session"])
def close_session(request: Request, principal: Principal = Depends(viewer)) -> Response:
    """Log out (ends the session of the cookie; a token caller has nothing to end)."""
    token = request.cookies.get(auth.SESSION_COOKIE)
    if principal.via == "session" and token:
        auth.logout(web_context(request), token, client_address(request))
    answer = Response(status_code=status.HTTP_204_NO_CONTENT)
    auth.clear_session_cookie(answer)
    return answer


# -- studies --------------------------------------------------------------------------------------------


def _audit_patient_query(request: Request, principal: Principal, study_uids: list[str]) -> None:
    """``api.query`` with the request path and query string (PS3.15 A.5.3.10), for answers naming patients."""
    from dicom_node.index.db import write_session

    detail = {"path": request.url.path, "query": request.url.query, "studies": study_uids}
    with write_session(web_context(request).session_factory) as session:
        audit.add_entry(session, actor=principal.name, action=audit.API_QUERY, source=client_address(request), detail=detail)


@router.get("/studies", response_model=list[StudySummary], tags=["studies"])
def get_studies(
    request: Request,
    state: str | None = Query(None, description="Only studies in this state (e.g. received, dead_lettered)."),
    since: dt.datetime | None = Query(None, description="Latest arrival at or after this time (ISO 8601)."),
    until: dt.datetime | None = Query(None, description="Latest arrival before this time (ISO 8601)."),
    sender: str | None = Query(None, description="Peer name or calling AE title of the sender."),
    limit: int = Query(50, ge=1, le=1000),
    patient: bool = Query(False, description="Fill patient name and ID (audited as api.query)."),
    principal: Principal = Depends(viewer),
) -> list[StudySummary]:
    """Studies, latest arrival first."""
    context = web_context(request)
    with context.session_factory() as session:
        found = queries.list_studies(session, state=state, since=since, until=until, sender=sender, limit=limit)
        if patient:
            found = queries.fill_patient(session, context.settings.storage.data_dir, found)
    if patient:
        _audit_patient_query(request, principal, [s.study_uid for s in found])
    return found


@router.get("/studies/{study_uid}", response_model=StudyDetail, tags=["studies"])
def get_study(
    study_uid: str,
    request: Request,
    patient: bool = Query(False, description="Fill patient name and ID (audited as api.query)."),
    principal: Principal = Depends(viewer),
) -> StudyDetail:
    """One study: series, timeline, analyses, analysis jobs, deliveries, dead letters, quarantined instances."""
    context = web_context(request)
    with context.session_factory() as session:
        detail = queries.study_detail(session, study_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_uid} is not in the index")
        if patient:
            (detail,) = queries.fill_patient(session, context.settings.storage.data_dir, [detail])
    if patient:
        _audit_patient_query(request, principal, [study_uid])
    return detail


@router.post("/studies/{study_uid}/complete", response_model=ActionResponse, tags=["actions"])
def complete_study(study_uid: str, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Force a study still receiving complete and queue its analysis now."""
    with _refusals():
        return _action(actions.force_complete(web_context(request), study_uid, actor=principal.name, source=client_address(request)))


@router.post("/studies/{study_uid}/rerun", response_model=ActionResponse, tags=["actions"])
def rerun_study(study_uid: str, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Queue a processed study for analysis again."""
    with _refusals():
        return _action(actions.rerun_analysis(web_context(request), study_uid, actor=principal.name, source=client_address(request)))


@router.post("/studies/{study_uid}/resend", response_model=ActionResponse, tags=["actions"])
def resend_study(study_uid: str, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Queue a study's results for delivery again (as ``fpe-node resend``)."""
    with _refusals():
        return _action(actions.resend_results(web_context(request), study_uid, actor=principal.name, source=client_address(request)))


# -- dead letters, suspension, dashboard --------------------------------------------------------------


@router.get("/dead-letters", response_model=list[DeadLetter], tags=["dead letters"])
def get_dead_letters(request: Request, principal: Principal = Depends(viewer)) -> list[DeadLetter]:
    """Every dead-lettered result object, oldest first."""
    with web_context(request).session_factory() as session:
        return queries.dead_letters(session)


@router.post("/dead-letters/{item_id}/retry", response_model=ActionResponse, tags=["dead letters"])
def retry_dead_letter(item_id: int, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Send a dead-lettered result object again with a fresh deadline."""
    with _refusals():
        return _action(actions.retry_dead_letter(web_context(request), item_id, actor=principal.name, source=client_address(request)))


@router.delete("/dead-letters/{item_id}", response_model=ActionResponse, tags=["dead letters"])
def drop_dead_letter(item_id: int, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Give up a dead-lettered result object (noted in its study's timeline)."""
    with _refusals():
        return _action(actions.drop_dead_letter(web_context(request), item_id, actor=principal.name, source=client_address(request)))


@router.get("/suspended", response_model=Suspended, tags=["actions"])
def get_suspended(request: Request, principal: Principal = Depends(viewer)) -> Suspended:
    """What is suspended node-wide."""
    return Suspended(suspended=sorted(actions.suspended(web_context(request))))


@router.post("/suspend", response_model=ActionResponse, tags=["actions"])
def suspend(body: SuspendRequest, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Suspend analysis or delivery node-wide (queued work waits; nothing is lost)."""
    with _refusals():
        return _action(actions.suspend(web_context(request), body.what, actor=principal.name, source=client_address(request)))


@router.post("/resume", response_model=ActionResponse, tags=["actions"])
def resume(body: SuspendRequest, request: Request, principal: Principal = Depends(operator)) -> ActionResponse:
    """Resume analysis or delivery."""
    with _refusals():
        return _action(actions.resume(web_context(request), body.what, actor=principal.name, source=client_address(request)))


@router.get("/dashboard", response_model=Dashboard, tags=["studies"])
def get_dashboard(request: Request, principal: Principal = Depends(viewer)) -> Dashboard:
    """Arrivals, waiting studies and why, deliveries and failures (24 h), disk, queues, workers and model."""
    return queries.dashboard(web_context(request))


# -- peers ------------------------------------------------------------------------------------------


def _registry(request: Request) -> PeerRegistry:
    return PeerRegistry(web_context(request).session_factory)


@router.get("/peers", response_model=list[Peer], tags=["peers"])
def get_peers(request: Request, principal: Principal = Depends(viewer)) -> list[Peer]:
    """Every registered peer, by name."""
    return [_peer(info) for info in _registry(request).list_peers()]


@router.post("/peers", response_model=Peer, status_code=status.HTTP_201_CREATED, tags=["peers"])
def add_peer(body: Peer, request: Request, principal: Principal = Depends(admin)) -> Peer:
    """Register a peer (takes effect at the next association)."""
    with _refusals():
        info = validate_peer(body.model_dump())
        _registry(request).add(info, actor=principal.name, source=client_address(request))
    return _peer(info)


@router.put("/peers/{name}", response_model=Peer, tags=["peers"])
def change_peer(name: str, body: PeerChange, request: Request, principal: Principal = Depends(admin)) -> Peer:
    """Change a peer's AE titles, host, port or roles."""
    registry = _registry(request)
    with _refusals():
        if registry.get(name) is None:
            raise PeerError(f"no peer named {name!r}")
        info = validate_peer({"name": name, **body.model_dump()})
        registry.add(info, actor=principal.name, replace=True, source=client_address(request))
    return _peer(info)


@router.delete("/peers/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["peers"])
def remove_peer(name: str, request: Request, principal: Principal = Depends(admin)) -> Response:
    """Remove a peer."""
    with _refusals():
        _registry(request).remove(name, actor=principal.name, source=client_address(request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/peers/{name}/echo", response_model=EchoResponse, tags=["peers"])
def echo_peer(name: str, request: Request, principal: Principal = Depends(admin)) -> EchoResponse:
    """C-ECHO the peer's SCP (as ``fpe-node peers echo``)."""
    with _refusals():
        result = actions.echo_peer(web_context(request), name, actor=principal.name, source=client_address(request))
    return EchoResponse(peer=result.peer, ok=result.ok, status=result.status, message=result.message)


# -- users and tokens --------------------------------------------------------------------------------


@router.get("/users", response_model=list[User], tags=["users"])
def get_users(request: Request, principal: Principal = Depends(admin)) -> list[User]:
    """Every user, by name."""
    return [_user(info) for info in auth.list_users(web_context(request))]


@router.post("/users", response_model=User, status_code=status.HTTP_201_CREATED, tags=["users"])
def add_user(body: NewUser, request: Request, principal: Principal = Depends(admin)) -> User:
    """Create a user."""
    with _refusals():
        info = auth.add_user(web_context(request), body.name, body.role, body.password, actor=principal.name,
                             source=client_address(request))
    return _user(info)


@router.patch("/users/{name}", response_model=User, tags=["users"])
def change_user(name: str, body: UserChange, request: Request, principal: Principal = Depends(admin)) -> User:
    """Change a user's role or password, disable or enable it, lift a lock-out (a new password or
    lower role ends its sessions)."""
    with _refusals():
        info = auth.change_user(web_context(request), name, role=body.role, password=body.password, disabled=body.disabled,
                                unlock=body.unlock, actor=principal.name, source=client_address(request))
    return _user(info)


@router.delete("/users/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"])
def remove_user(name: str, request: Request, principal: Principal = Depends(admin)) -> Response:
    """Remove a user with its sessions and tokens (never the last admin)."""
    with _refusals():
        auth.remove_user(web_context(request), name, actor=principal.name, source=client_address(request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tokens", response_model=list[Token], tags=["users"])
def get_tokens(request: Request, principal: Principal = Depends(admin)) -> list[Token]:
    """Every API token (never its secret)."""
    return [_token(info) for info in auth.list_tokens(web_context(request))]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED, tags=["users"])
def add_token(body: NewToken, request: Request, principal: Principal = Depends(admin)) -> TokenCreated:
    """Make an API token; its secret is in this response only."""
    with _refusals():
        info, secret = auth.add_token(web_context(request), body.owner, body.name, body.role, expires_days=body.expires_days,
                                      actor=principal.name, source=client_address(request))
    return TokenCreated(**_token(info).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"])
def remove_token(token_id: int, request: Request, principal: Principal = Depends(admin)) -> Response:
    """Revoke an API token."""
    with _refusals():
        auth.remove_token(web_context(request), token_id, actor=principal.name, source=client_address(request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- settings, audit ----------------------------------------------------------------------------------


@router.get("/settings", response_model=dict[str, Any], tags=["settings"])
def get_settings(request: Request, principal: Principal = Depends(admin)) -> dict[str, Any]:
    """The effective settings (as ``fpe-node config show``), secrets shown as ``***``."""
    return shown_settings(web_context(request).settings)


@router.get("/audit", response_model=list[AuditRecord], tags=["settings"])
def get_audit(
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    action: str | None = Query(None, description="Only entries of this action (e.g. user.login_failed)."),
    principal: Principal = Depends(admin),
) -> list[AuditRecord]:
    """The audit trail, newest first: who did what, when, from where."""
    with web_context(request).session_factory() as session:
        return queries.audit_trail(session, limit, action=action)


