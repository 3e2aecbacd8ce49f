"""The web console: server-rendered pages for administrators, operators and viewers.

Pages are Jinja2 templates (``dicom_node/web/templates``) with one stylesheet and one small
script (``dicom_node/web/static``), served by the node itself: nothing is fetched from a CDN or
any other host. The pages work without JavaScript: every change is a plain HTML form POST that
carries the session's ``csrf_token`` field and answers with a redirect back to a page (the
outcome shown once, from a short-lived cookie). The script only asks before destructive actions
and refreshes the dashboard.

Who may do what is decided twice: the templates hide or disable the buttons a role may not use,
and every POST route depends on :func:`dicom_node.web.deps.require`, so the server refuses them
(403) whatever the page showed. A page asked for without a session redirects to ``/login``.

State is read only through the read model (:mod:`dicom_node.web.queries`) and changed only
through :mod:`dicom_node.actions` and :class:`dicom_node.peers.PeerRegistry`, the code the CLI
and the REST API use. Patient names and IDs appear in page bodies for logged-in roles allowed to
see them, never in URLs (studies are addressed by Study Instance UID) and never in the log.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from dicom_node import __version__, actions
from dicom_node.lifecycle import StudyState
from dicom_node.peers import PeerError, PeerInfo, PeerRegistry, validate_peer
from dicom_node.web import auth, queries
from dicom_node.web.context import client_address, web_context
from dicom_node.web.deps import Principal, Role, current_principal, require
from dicom_node.web.models import StudySummary

log = logging.getLogger(__name__)

S = TypeVar("S", bound=StudySummary)

router = APIRouter(include_in_schema=False)

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png", ".svg": "image/svg+xml"}

FLASH_COOKIE = "fpenode_flash"
"""A message for the next page (the outcome of a POST); never holds patient data."""

NAV: tuple[tuple[str, str, Role], ...] = (
    ("/", "Dashboard", Role.viewer),
    ("/studies", "Studies", Role.viewer),
    ("/dead-letters", "Dead letters", Role.viewer),
    ("/peers", "Peers", Role.viewer),
    ("/alerts", "Alerts", Role.viewer),
    ("/users", "Users", Role.admin),
)

QUIET_STATES = frozenset({StudyState.DELIVERED.value, StudyState.ANALYSED.value})
"""States whose reason only repeats the state ("delivery delivered"): pages show the reason of the others."""

# Pages carry patient data and CSRF tokens: never cached, never framed, scripts only from here.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


# -- plumbing ----------------------------------------------------------------------------------


def page_principal(request: Request) -> Principal | None:
    """The logged-in caller of a page, or ``None`` (the page then redirects to the login form)."""
    try:
        return current_principal(request)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            return None
        raise


def to_login(request: Request) -> RedirectResponse:
    """Redirect to the login form, coming back to this page's path (never its query) afterwards."""
    return RedirectResponse(f"/login?next={quote(request.url.path)}", status.HTTP_303_SEE_OTHER)


def local_path(candidate: str | None, default: str = "/") -> str:
    """``candidate`` when it is a path on this server (``/...``, not ``//host``), else ``default``.

    Keeps the login's ``next`` and the forms' ``back`` from sending the browser elsewhere.
    """
    if candidate and candidate.startswith("/") and not candidate.startswith("//") and "\\" not in candidate:
        return candidate
    return default


def _encode_flash(level: str, text: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"level": level, "text": text}).encode("utf-8")).decode("ascii")


def _decode_flash(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeError):
        return None
    if not isinstance(data, dict) or data.get("level") not in ("info", "error") or not isinstance(data.get("text"), str):
        return None
    return {"level": data["level"], "text": data["text"]}


def back_to(path: str, text: str, *, error: bool = False) -> RedirectResponse:
    """Post/Redirect/Get: go to ``path`` and show ``text`` once there."""
    response = RedirectResponse(path, status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        FLASH_COOKIE, _encode_flash("error" if error else "info", text), max_age=60, path="/", httponly=True, samesite="strict"
    )
    return response


def render(
    request: Request, template: str, principal: Principal | None, *, title: str, current: str = "", **values: Any
) -> HTMLResponse:
    """A page of the console: ``template`` with the layout's values (who, CSRF token, the flash)."""
    context = web_context(request)
    flash = _decode_flash(request.cookies.get(FLASH_COOKIE))
    page_values = {
        "title": title,
        "principal": principal,
        "current": current,
        "nav": NAV,
        "Role": Role,
        "csrf_token": auth.csrf_token(request) if principal is not None and principal.via == "session" else "",
        "flash": flash,
        "version": __version__,
        "node_ae": context.settings.network.ae_title,
        "can_operate": principal is not None and principal.role >= Role.operator,
        "is_admin": principal is not None and principal.role >= Role.admin,
        "quiet_states": QUIET_STATES,
        **values,
    }
    response = TEMPLATES.TemplateResponse(request, template, page_values)
    response.headers.update(SECURITY_HEADERS)
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def not_found(request: Request, principal: Principal, text: str) -> HTMLResponse:
    """A 404 page saying what is missing."""
    page = render(request, "message.html", principal, title="Not found", text=text)
    page.status_code = status.HTTP_404_NOT_FOUND
    return page


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """The console's stylesheet and script (shipped with the package; no CDN)."""
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND)
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "max-age=3600"})


# -- login and logout ---------------------------------------------------------------------------

LOGIN_REFUSED = "Log-in refused: the user name or password is wrong, or the account is locked. Ask an administrator if this persists."


LOGIN_CSRF_COOKIE = "fpenode_login_csrf"
"""The login form's own CSRF token (double-submit cookie: there is no session yet to hold one)."""
LOGIN_EXPIRED = "The login form expired; please log in again."


def _login_page(request: Request, *, next_path: str, error: str | None, username: str = "", code: int = 200) -> HTMLResponse:
    """The login form with its CSRF token (the one in the browser's cookie, or a new one set here)."""
    known = request.cookies.get(LOGIN_CSRF_COOKIE)
    token = known if known and len(known) >= 32 else secrets.token_urlsafe(32)
    page = render(request, "login.html", None, title="Log in", next=next_path, error=error, username=username,
                  csrf_token=token)
    page.status_code = code
    if token != known:
        page.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, path="/login", httponly=True, samesite="strict",
                        secure=web_context(request).settings.console.secure_cookie)
    return page


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    """The login form (straight to ``next`` when already logged in)."""
    if page_principal(request) is not None:
        return RedirectResponse(local_path(next), status.HTTP_303_SEE_OTHER)
    return _login_page(request, next_path=local_path(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, username: str = Form(""), password: str = Form(""), next: str = Form("/"),
    csrf_token: str = Form(""),
) -> Response:
    """Check the credentials (:func:`dicom_node.web.auth.login`), set the session cookie, go to ``next``.

    A refusal does not say whether the name or the password was wrong (nor whether the account
    exists); :func:`auth.login` records it in the audit trail. The form must carry the token of
    the login CSRF cookie (no other site can log a browser in to an account of its choosing).
    """
    context = web_context(request)
    next_path = local_path(next)
    if not auth.csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token):
        return _login_page(request, next_path=next_path, error=LOGIN_EXPIRED, username=username,
                           code=status.HTTP_403_FORBIDDEN)
    try:
        _, token = auth.login(context, username, password, client_address(request))
    except auth.LoginRefused:
        return _login_page(request, next_path=next_path, error=LOGIN_REFUSED, username=username,
                           code=status.HTTP_401_UNAUTHORIZED)
    response = RedirectResponse(next_path, status.HTTP_303_SEE_OTHER)
    auth.set_session_cookie(response, token, context.settings)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, principal: Principal = Depends(require(Role.viewer))) -> Response:
    """End the session and go back to the login form."""
    token = request.cookies.get(auth.SESSION_COOKIE)
    if token:
        auth.logout(web_context(request), token)
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    auth.clear_session_cookie(response)
    return response


# -- peers ----------------------------------------------------------------------------------------


def _registry(request: Request) -> PeerRegistry:
    return PeerRegistry(web_context(request).session_factory)


def _actor(principal: Principal) -> str:
    """The audit actor of a console change (the user; the audit row's source says from where)."""
    return principal.name


def _peer_from_form(name: str, ae_titles: str, host: str, port: str, roles: list[str]) -> PeerInfo:
    """A validated peer from the form's fields (AE titles separated by commas or spaces)."""
    port_text = port.strip()
    if port_text and not port_text.isdigit():
        raise PeerError(f"invalid peer: port {port_text!r} is not a number")
    return validate_peer(
        {
            "name": name.strip(),
            "ae_titles": [title for title in ae_titles.replace(",", " ").split() if title],
            "host": host.strip() or "*",
            "port": int(port_text) if port_text else None,
            "roles": roles or ["source"],
        }
    )


@router.get("/peers", response_class=HTMLResponse)
def peers_page(request: Request) -> Response:
    """Every peer; admins get the add/change/remove forms and the C-ECHO buttons (as in the REST API)."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    return render(request, "peers.html", principal, title="Peers", current="/peers", peers=_registry(request).list_peers(),
                  editing=None)


@router.get("/peers/{name}", response_class=HTMLResponse)
def peer_page(request: Request, name: str) -> Response:
    """One peer, with the form changing it (for admins)."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    peer = _registry(request).get(name)
    if peer is None:
        return not_found(request, principal, f"No peer named {name!r}.")
    return render(request, "peers.html", principal, title=f"Peer {name}", current="/peers",
                  peers=_registry(request).list_peers(), editing=peer)


@router.post("/peers")
def add_peer(
    request: Request,
    principal: Principal = Depends(require(Role.admin)),
    name: str = Form(""),
    ae_titles: str = Form(""),
    host: str = Form("*"),
    port: str = Form(""),
    roles: list[str] = Form([]),
) -> Response:
    """Register a peer (:meth:`PeerRegistry.add`, audited)."""
    try:
        peer = _peer_from_form(name, ae_titles, host, port, roles)
        _registry(request).add(peer, actor=_actor(principal), source=client_address(request))
    except PeerError as exc:
        return back_to("/peers", str(exc), error=True)
    return back_to("/peers", f"peer {peer.name} added")


@router.post("/peers/{name}")
def change_peer(
    request: Request,
    name: str,
    principal: Principal = Depends(require(Role.admin)),
    ae_titles: str = Form(""),
    host: str = Form("*"),
    port: str = Form(""),
    roles: list[str] = Form([]),
) -> Response:
    """Change a peer's AE titles, host, port or roles (:meth:`PeerRegistry.add` with ``replace``)."""
    registry = _registry(request)
    if registry.get(name) is None:
        return back_to("/peers", f"no peer named {name!r}", error=True)
    try:
        registry.add(
            _peer_from_form(name, ae_titles, host, port, roles), actor=_actor(principal), replace=True,
            source=client_address(request),
        )
    except PeerError as exc:
        return back_to(f"/peers/{quote(name)}", str(exc), error=True)
    return back_to("/peers", f"peer {name} changed")


@router.post("/peers/{name}/remove")
def remove_peer(request: Request, name: str, principal: Principal = Depends(require(Role.admin))) -> Response:
    """Remove a peer (:meth:`PeerRegistry.remove`, audited)."""
    try:
        _registry(request).remove(name, actor=_actor(principal), source=client_address(request))
    except PeerError as exc:
        return back_to("/peers", str(exc), error=True)
    return back_to("/peers", f"peer {name} removed")


@router.post("/peers/{name}/echo")
def echo_peer(request: Request, name: str, principal: Principal = Depends(require(Role.admin))) -> Response:
    """C-ECHO a peer (:func:`dicom_node.actions.echo_peer`, audited) and show the answer."""
    try:
        result = actions.echo_peer(web_context(request), name, actor=_actor(principal), source=client_address(request))
    except actions.ActionError as exc:
        return back_to("/peers", exc.message, error=True)
    outcome = "success" if result.ok else "failed"
    return back_to("/peers", f"C-ECHO {result.peer}: {outcome} ({result.message})", error=not result.ok)


# -- users ----------------------------------------------------------------------------------------


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request) -> Response:
    """Every user with role, lock-out and state; forms to add, change and remove (admins only)."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    if principal.role < Role.admin:
        page = render(request, "refused.html", principal, title="Users", current="/users", needed=Role.admin)
        page.status_code = status.HTTP_403_FORBIDDEN
        return page
    context = web_context(request)
    return render(request, "users.html", principal, title="Users", current="/users", users=auth.list_users(context),
                  roles=[role.name for role in Role])


@router.post("/users")
def add_user(
    request: Request,
    principal: Principal = Depends(require(Role.admin)),
    name: str = Form(""),
    role: str = Form("viewer"),
    password: str = Form(""),
) -> Response:
    """Create a user (:func:`dicom_node.web.auth.add_user`, audited)."""
    try:
        auth.add_user(web_context(request), name.strip(), role, password, actor=principal.name, source=client_address(request))
    except auth.UserError as exc:
        return back_to("/users", str(exc), error=True)
    return back_to("/users", f"user {name.strip()} added")


@router.post("/users/{name}")
def change_user(
    request: Request,
    name: str,
    principal: Principal = Depends(require(Role.admin)),
    role: str = Form(""),
    password: str = Form(""),
    disabled: str = Form(""),
    unlock: str = Form(""),
) -> Response:
    """Change a user's role or password, disable or enable it, lift its lock-out (:func:`auth.change_user`)."""
    try:
        auth.change_user(
            web_context(request), name, actor=principal.name, source=client_address(request),
            role=role or None, password=password or None,
            disabled={"yes": True, "no": False}.get(disabled), unlock=unlock == "yes",
        )
    except auth.UserError as exc:
        return back_to("/users", str(exc), error=True)
    return back_to("/users", f"user {name} changed")


@router.post("/users/{name}/remove")
def remove_user(request: Request, name: str, principal: Principal = Depends(require(Role.admin))) -> Response:
    """Remove a user with its sessions and tokens (:func:`auth.remove_user`)."""
    try:
        auth.remove_user(web_context(request), name, actor=principal.name, source=client_address(request))
    except auth.UserError as exc:
        return back_to("/users", str(exc), error=True)
    return back_to("/users", f"user {name} removed")


# -- dashboard, studies, dead letters, alerts -------------------------------------------------------

STUDY_ACTIONS = {
    "complete": (actions.force_complete, "Force complete"),
    "rerun": (actions.rerun_analysis, "Re-run analysis"),
    "resend": (actions.resend_results, "Resend results"),
}
"""The study page's buttons: route suffix -> (action, label)."""

DASHBOARD_LATEST = 10
"""Studies listed under "Latest arrivals" on the dashboard."""

DEAD_LETTER_ACTIONS = {"retry": actions.retry_dead_letter, "drop": actions.drop_dead_letter}


def _with_patients(request: Request, session: Session, studies: list[S]) -> list[S]:
    """``studies`` with patient name and ID filled in, for the logged-in roles allowed to see them
    (every console role: the console is for the PACS team; never in URLs nor logs)."""
    return queries.fill_patient(session, web_context(request).settings.storage.data_dir, studies)


@router.get("/", response_class=HTMLResponse)
def dashboard_page(request: Request) -> Response:
    """What arrived, what waits and why, what was delivered and what failed (24 h); disk, queues,
    workers, model; the node-wide suspension flags with their buttons."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    context = web_context(request)
    board = queries.dashboard(context)
    with context.session_factory() as session:
        failures = _with_patients(request, session, list(board.recent_failures))
        latest = _with_patients(request, session, queries.list_studies(session, limit=DASHBOARD_LATEST))
    return render(request, "dashboard.html", principal, title="Dashboard", current="/", board=board, failures=failures,
                  latest=latest, suspendable=actions.SUSPENDABLE, refresh_s=30)


def _parse_day(text: str | None) -> dt.datetime | None:
    """The start (UTC) of a ``YYYY-MM-DD`` day from the filter form, ``None`` for empty or bad input."""
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


@router.get("/studies", response_class=HTMLResponse)
def studies_page(
    request: Request, state: str = "", since: str = "", sender: str = "", limit: int = 50
) -> Response:
    """Studies, latest arrival first, filtered by state, arrival day and sender."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    limit = min(max(limit, 1), 1000)
    states = [value.value for value in StudyState]
    with web_context(request).session_factory() as session:
        studies = queries.list_studies(
            session, state=state if state in states else None, since=_parse_day(since), sender=sender.strip() or None,
            limit=limit,
        )
        studies = _with_patients(request, session, studies)
    filters = {"state": state, "since": since if _parse_day(since) else "", "sender": sender, "limit": limit}
    return render(request, "studies.html", principal, title="Studies", current="/studies", studies=studies,
                  states=states, filters=filters)


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str) -> Response:
    """One study: series, timeline, analyses, jobs, deliveries, dead letters and the action buttons."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    with web_context(request).session_factory() as session:
        detail = queries.study_detail(session, study_uid)
        if detail is None:
            return not_found(request, principal, f"Study {study_uid} is not in the index (never received, or purged).")
        (detail,) = _with_patients(request, session, [detail])
    return render(request, "study.html", principal, title=f"Study {study_uid}", current="/studies", study=detail,
                  study_actions=STUDY_ACTIONS)


@router.post("/studies/{study_uid}/{what}")
def study_action(
    request: Request, study_uid: str, what: str, principal: Principal = Depends(require(Role.operator))
) -> Response:
    """Force complete, re-run or resend (:mod:`dicom_node.actions`, audited) and go back to the study."""
    if what not in STUDY_ACTIONS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study action {what!r}")
    action, _ = STUDY_ACTIONS[what]
    page = f"/studies/{quote(study_uid)}"
    try:
        result = action(web_context(request), study_uid, actor=principal.name, source=client_address(request))
    except actions.ActionError as exc:
        return back_to(page, exc.message, error=True)
    return back_to(page, result.message)


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters_page(request: Request) -> Response:
    """Result objects not stored before their deadline, with retry and drop buttons."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    with web_context(request).session_factory() as session:
        letters = queries.dead_letters(session)
    return render(request, "dead_letters.html", principal, title="Dead letters", current="/dead-letters",
                  letters=letters)


@router.post("/dead-letters/{item_id}/{what}")
def dead_letter_action(
    request: Request, item_id: int, what: str, principal: Principal = Depends(require(Role.operator)),
    back: str = Form("/dead-letters"),
) -> Response:
    """Retry or drop one dead letter (:mod:`dicom_node.actions`, audited)."""
    if what not in DEAD_LETTER_ACTIONS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead-letter action {what!r}")
    page = local_path(back, "/dead-letters")
    try:
        result = DEAD_LETTER_ACTIONS[what](web_context(request), item_id, actor=principal.name, source=client_address(request))
    except actions.ActionError as exc:
        return back_to(page, exc.message, error=True)
    return back_to(page, result.message)


@router.post("/suspend")
def suspend(request: Request, principal: Principal = Depends(require(Role.operator)), what: str = Form("")) -> Response:
    """Suspend analysis or delivery node-wide (:func:`dicom_node.actions.suspend`)."""
    return _suspension(request, principal, what, actions.suspend)


@router.post("/resume")
def resume(request: Request, principal: Principal = Depends(require(Role.operator)), what: str = Form("")) -> Response:
    """Resume analysis or delivery node-wide (:func:`dicom_node.actions.resume`)."""
    return _suspension(request, principal, what, actions.resume)


def _suspension(request: Request, principal: Principal, what: str, action: Callable[..., actions.ActionResult]) -> Response:
    if what not in actions.SUSPENDABLE:
        return back_to("/", f"cannot suspend or resume {what!r} (analysis or delivery)", error=True)
    try:
        result = action(web_context(request), what, actor=principal.name, source=client_address(request))
    except actions.ActionError as exc:
        return back_to("/", exc.message, error=True)
    return back_to("/", result.message)


@router.get("/alerts", response_class=HTMLResponse)
def alerts_page(request: Request) -> Response:
    """The alerts the node sent (or failed to send), newest first (:func:`dicom_node.alerts.recent`)."""
    principal = page_principal(request)
    if principal is None:
        return to_login(request)
    from dicom_node import alerts

    with web_context(request).session_factory() as session:
        recent = alerts.recent(session, 200)
    return render(request, "alerts.html", principal, title="Alerts", current="/alerts", alerts=recent)
