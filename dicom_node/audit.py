"""Writing the audit table: one :class:`~dicom_node.index.models.AuditEntry` per audited event.

The audit table is the single record of what happened; :mod:`dicom_node.atna` turns each row
into a DICOM PS3.15 A.5 audit message for a syslog collector. This module holds the action
names the node itself writes and the details each carries (JSON in ``AuditEntry.detail``):

``dicom.instances_received``
    One row per association that stored instances (released or aborted): calling and called
    AE titles, the sender's address, and per study its SOP classes with counts, how many
    instances were new, replaced or identical duplicates, and the patient's tag.
``dicom.results_sent``
    One row per outbox pass and destination that stored results: the destination's AE
    title, host and port, and per study the SOP classes the archive stored, with counts.
``node.start`` / ``node.stop``
    The node listening (AE title, address, port, process id) and shutting down.

Patient identifiers never enter a row: a patient appears only as its tag
(:func:`patient_tag`, the keyed hash the node's logs and ``fpe-node explain`` use).
Other writers (peers: :mod:`dicom_node.peers`; users, sessions, settings, queries: the web
API) add rows of their own actions; :data:`dicom_node.atna.EVENTS` maps every action. Their
messages read these detail keys when present (all optional):

``user`` (or ``username``)
    The person's login name (default: the OS user in an actor ``"<command> (<user>)"``, else
    the actor).
``address``
    The client's IP address or host name (NetworkAccessPointID; A.5.3.12 requires it for logins).
``outcome``
    ``"failure"`` / ``"denied"`` / ``"error"`` mark a failed attempt (EventOutcomeIndicator 4).
``reason``
    Why a login failed (EventOutcomeDescription; never the password).
``path``, ``query``
    ``api.query``: the request path and its query string (ParticipantObjectQuery).
``name`` / ``key``
    The subject of a change: the user, token or peer name, the settings key.

Keys naming passwords, secrets, tokens' hashes or keys are never sent.

The console, the REST API and the command line (:mod:`dicom_node.web.auth`,
:mod:`dicom_node.actions`) write ``user.login``, ``user.login_failed``, ``user.logout``,
``user.add``, ``user.change``, ``user.remove``, ``token.add``, ``token.remove``, ``api.query``
and the actions ``study.complete``, ``study.rerun``, ``study.resend``, ``dead_letter.retry``,
``dead_letter.drop``, ``node.suspend``, ``node.resume``, ``peer.echo``; each row's
``source`` says from where (the client address, or :data:`LOCAL_SOURCE` for the node's shell),
and a client address is also the detail's ``address``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.db import write_session
from dicom_node.index.models import AuditEntry, Patient, Study
from dicom_node.logs import short_hash

log = logging.getLogger(__name__)

INSTANCES_RECEIVED = "dicom.instances_received"
RESULTS_SENT = "dicom.results_sent"
NODE_START = "node.start"
NODE_STOP = "node.stop"

LOCAL_SOURCE = "local"
"""The ``source`` of a row written by a command on the node's own shell."""
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


def patient_tag(patient_id: str, issuer: str = "") -> str:
    """The patient's tag in audit rows: the keyed hash of ``(Patient ID, Issuer)`` the logs use.

    The same value as :func:`inference.selection.short_hash` of the selection's patient key, so
    an audit message can be matched with ``fpe-node explain`` and the logs, never read back.
    """
    return short_hash(f"{patient_id.strip()}|{issuer.strip()}")


@dataclass
class StudyTally:
    """What one association (or one outbox pass) carried of one study."""

    patient: str
    sop_classes: Counter[str] = field(default_factory=Counter)
    new: int = 0
    replaced: int = 0
    duplicates: int = 0

    def as_dict(self, study_uid: str) -> dict[str, Any]:
        """The JSON form stored in a row's detail."""
        return {
            "study_uid": study_uid,
            "patient": self.patient,
            "sop_classes": dict(sorted(self.sop_classes.items())),
            "new": self.new,
            "replaced": self.replaced,
            "duplicates": self.duplicates,
        }


def add_entry(
    session: Session, *, actor: str, action: str, detail: Mapping[str, Any] | None = None, source: str | None = None
) -> None:
    """Add one audit row to ``session`` (committed with the caller's unit of work).

    ``source`` is from where (a client address, or :data:`LOCAL_SOURCE`); a client address is
    also put in the detail as ``address``, which the ATNA messages carry (PS3.15 A.5.3.12).
    """
    if source is not None and source != LOCAL_SOURCE:
        detail = {**(detail or {}), "address": source}
    session.add(AuditEntry(
        actor=actor[:128], action=action, source=None if source is None else source[:255],
        detail=None if detail is None else json.dumps(detail, default=str),
    ))


def record(factory: sessionmaker[Session], *, actor: str, action: str, detail: Mapping[str, Any] | None = None) -> bool:
    """Write one audit row in its own transaction; False (logged) when the index refused it.

    Used where the event already happened and must not be undone by a failed audit write
    (an association released, the node stopping).
    """
    try:
        with write_session(factory) as session:
            add_entry(session, actor=actor, action=action, detail=detail)
    except Exception:  # noqa: BLE001 - the event stands; the lost row is logged with its traceback
        log.exception("audit row %s could not be written", action)
        return False
    return True


def instances_received_detail(
    *,
    calling_ae: str,
    called_ae: str,
    address: str,
    peer: str | None,
    studies: Mapping[str, StudyTally],
    aborted: bool,
) -> dict[str, Any]:
    """The detail of a ``dicom.instances_received`` row."""
    return {
        "calling_ae": calling_ae,
        "called_ae": called_ae,
        "address": address,
        "peer": peer,
        "outcome": "aborted" if aborted else "released",
        "instances": sum(sum(t.sop_classes.values()) for t in studies.values()),
        "studies": [tally.as_dict(uid) for uid, tally in sorted(studies.items())],
    }


def study_patient_tags(session: Session, study_uids: Iterable[str]) -> dict[str, str]:
    """The patient tag of each study the index holds (studies without a patient row get ``""``'s tag)."""
    uids = sorted(set(study_uids))
    rows = session.execute(
        select(Study.study_uid, Patient.patient_id, Patient.issuer)
        .join(Patient, Study.patient_pk == Patient.id, isouter=True)
        .where(Study.study_uid.in_(uids))
    )
    tags = {row.study_uid: patient_tag(row.patient_id or "", row.issuer or "") for row in rows}
    return {uid: tags.get(uid, patient_tag("")) for uid in uids}


def results_sent_detail(
    session: Session,
    *,
    destination: str,
    ae_title: str | None,
    host: str | None,
    port: int | None,
    sent: Iterable[tuple[str, str]],
) -> dict[str, Any]:
    """The detail of a ``dicom.results_sent`` row; ``sent`` holds ``(study_uid, sop_class_uid)`` per object."""
    items = list(sent)
    tags = study_patient_tags(session, (study for study, _ in items))
    studies: dict[str, StudyTally] = {}
    for study_uid, sop_class_uid in items:
        tally = studies.setdefault(study_uid, StudyTally(tags[study_uid]))
        tally.sop_classes[sop_class_uid] += 1
    return {
        "destination": destination,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "instances": len(items),
        "studies": [tally.as_dict(uid) for uid, tally in sorted(studies.items())],
    }


def node_detail(ae_title: str, host: str | None, port: int | None, role: str = "all") -> dict[str, Any]:
    """The detail of ``node.start`` / ``node.stop``: the AE, its address (none for a process that
    runs no receiver), the process's role (``fpe-node serve --role``) and its PID."""
    return {"ae_title": ae_title, "host": host, "port": port, "role": role, "pid": os.getpid()}
