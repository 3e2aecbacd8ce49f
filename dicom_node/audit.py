"""The audit trail: who did what, when, from where (``audit_entry``).

Every login, logout and change made through the console, the REST API or the command line is
written here by :func:`record`, in the transaction of the change itself, so a change is never
without its entry. Action names are stable (an ATNA exporter maps them to IHE audit events):

``user.login``, ``user.login_failed``, ``user.logout``, ``user.add``, ``user.change``,
``user.remove``, ``token.add``, ``token.remove``, ``settings.change``, ``api.query``, the
peer registry's ``peer.add``/``peer.update``/``peer.remove``/``peer.echo``, and the study
actions of :mod:`dicom_node.actions` (``study.complete``, ``study.rerun``, ``study.resend``,
``dead_letter.retry``, ``dead_letter.drop``, ``node.suspend``, ``node.resume``).

Details never hold patient names, IDs or birth dates: studies are named by Study Instance UID.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.index.models import AuditEntry

LOCAL_SOURCE = "local"
"""The ``source`` of an entry made by a command on the node's own shell."""

USER_LOGIN = "user.login"
USER_LOGIN_FAILED = "user.login_failed"
USER_LOGOUT = "user.logout"
USER_ADD = "user.add"
USER_CHANGE = "user.change"
USER_REMOVE = "user.remove"
TOKEN_ADD = "token.add"
TOKEN_REMOVE = "token.remove"
SETTINGS_CHANGE = "settings.change"
API_QUERY = "api.query"


def record(session: Session, *, actor: str, action: str, source: str | None, detail: dict[str, Any] | None = None) -> AuditEntry:
    """Add one entry to ``session`` (committed with the caller's transaction).

    Parameters
    ----------
    actor
        A user name (console, API) or ``<command> (<OS user>)`` (command line).
    action
        One of the names listed in this module's documentation.
    source
        The client address of the request, or :data:`LOCAL_SOURCE`.
    detail
        JSON-serialisable description of the change (no patient identifiers).
    """
    entry = AuditEntry(
        actor=actor[:128],
        action=action,
        source=None if source is None else source[:255],
        detail=None if detail is None else json.dumps(detail, default=str, sort_keys=True),
    )
    session.add(entry)
    return entry
