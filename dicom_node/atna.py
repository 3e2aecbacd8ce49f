"""IHE ATNA audit messages: the audit table as DICOM PS3.15 A.5 messages over syslog.

The audit table (:class:`~dicom_node.index.models.AuditEntry`, written by
:mod:`dicom_node.audit`, :mod:`dicom_node.peers` and the web API) is the single source. An
:class:`AuditExporter` thread in ``fpe-node serve`` tails it by id and sends each row to the
collector (an IHE Audit Record Repository) configured in the ``audit`` settings:

- **Message**: a PS3.15 A.5.1 ``AuditMessage`` (XML) built per action from :data:`EVENTS`,
  the one table of action -> A.5.3 event, with the participants each A.5.3 table asks for.
- **Framing**: RFC 5424, PRI ``<85>`` (facility 10 security/authorization, severity 5),
  APP-NAME ``fpe-node``, MSGID ``DICOM+RFC3881`` (PS3.15 A.6 / A.7), the XML as UTF-8 MSG.
- **Transport**: ``tls`` RFC 5425 (PS3.15 A.6), ``tcp`` RFC 6587 octet counting, ``udp``
  RFC 5426 (PS3.15 A.7), one message per datagram.
- **Delivery**: at least once over TCP and TLS. The durable cursor
  (:class:`~dicom_node.index.models.AuditExportCursor`) moves past a message only once it was
  written to a connection that was still open at the next pass (syslog has no acknowledgement;
  a collector that restarts closes the connection and what it may not have read is sent again
  from the cursor). While the collector is unreachable the exporter retries with doubling
  waits; rows wait in the index meanwhile, so a restart of the node or of the collector loses
  nothing. Over UDP a message is counted as delivered once sent (RFC 5426 has no answer).

Patient data: a message never carries patient names or birth dates. Where A.5 requires a
Patient participant (DICOM Instances Transferred, A.5.3.7) its ParticipantObjectID is the
patient's tag (:func:`dicom_node.audit.patient_tag`, the keyed hash the logs use), not the
Patient ID itself; see ``docs/conformance.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import ipaddress
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.models import AuditEntry, AuditExportCursor
from dicom_node.settings import AuditSettings, Settings, redact_url

log = logging.getLogger(__name__)

APP_NAME = "fpe-node"
MSGID = "DICOM+RFC3881"  # PS3.15 A.6 and A.7
PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice): "<85>"
CURSOR_NAME = "syslog"
_BATCH = 200
_BACKLOG_PAUSE_S = 0.05  # between full batches: a backlog drains at once, not one batch per poll
_GAP_GRACE_S = 10.0
"""An id missing in the audit table (a transaction still open, or rolled back after taking a
PostgreSQL sequence value) holds the export back this long before it is skipped."""
_DESCRIPTION_LIMIT = 2000
_SECRET_KEYS = re.compile(r"pass|secret|token_hash|hash|key|credential", re.IGNORECASE)
_ACTOR_RE = re.compile(r"^(?P<command>.*) \((?P<user>[^()]*)\)$")


# --- coded values (PS3.16 CID 400-405, RFC 3881) ----------------------------------------------


@dataclass(frozen=True)
class Code:
    """A coded value as the A.5.1 schema writes it (csd-code, codeSystemName, originalText)."""

    value: str
    scheme: str
    meaning: str

    def attributes(self) -> dict[str, str]:
        """The XML attributes of the coded value."""
        return {"csd-code": self.value, "codeSystemName": self.scheme, "originalText": self.meaning}


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")

ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")

ID_STUDY_UID = Code("110180", "DCM", "Study Instance UID")
ID_NODE = Code("110182", "DCM", "Node ID")
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_USER = Code("11", "RFC-3881", "User Identifier")
ID_URI = Code("12", "RFC-3881", "URI")

AUDIT_SOURCE_APPLICATION_SERVER = Code("4", "DCM", "Application Server process tier in a multi-tier system")

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881 5.5.1, 5.5.2).
_PERSON, _SYSTEM = "1", "2"
_ROLE_PATIENT, _ROLE_REPORT, _ROLE_SECURITY_USER, _ROLE_SECURITY_RESOURCE = "1", "3", "11", "13"

# EventOutcomeIndicator (PS3.15 A.5.1): success, minor failure.
OUTCOME_SUCCESS, OUTCOME_MINOR_FAILURE = "0", "4"


# --- what a row is, who the node is ---------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One audit table row, detached from the session; ``detail`` decoded (``{}`` if not JSON)."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    detail: Mapping[str, Any]

    @classmethod
    def from_entry(cls, entry: AuditEntry) -> AuditRow:
        """From an ORM row."""
        try:
            detail = json.loads(entry.detail) if entry.detail else {}
        except ValueError:
            detail = {"text": entry.detail}
        return cls(entry.id, entry.at, entry.actor, entry.action, detail if isinstance(detail, dict) else {"value": detail})


@dataclass(frozen=True)
class AuditContext:
    """The node as every message names it (AuditSourceIdentification, its own participant)."""

    ae_title: str
    sending_ae_title: str
    hostname: str
    pid: int
    source_id: str
    enterprise_site_id: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditContext:
        """From the node's settings (``audit.source_id`` defaults to ``AE@host``)."""
        hostname = socket.gethostname()
        ae_title = settings.network.ae_title
        return cls(
            ae_title=ae_title,
            sending_ae_title=settings.delivery.calling_ae_title or ae_title,
            hostname=hostname,
            pid=os.getpid(),
            source_id=settings.audit.source_id or f"{ae_title}@{hostname}",
            enterprise_site_id=settings.audit.enterprise_site_id,
        )


# --- building messages (PS3.15 A.5.1 schema) -------------------------------------------------


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, code.attributes())


def _access_point_type(address: str) -> str:
    """NetworkAccessPointTypeCode (A.5.1): 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return "1"
    return "2"


def _timestamp(at: dt.datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class _Message:
    """One AuditMessage under construction, in the schema's element order."""

    def __init__(
        self, row: AuditRow, event_id: Code, action_code: str, outcome: str, type_code: Code | None,
        outcome_description: str | None = None,
    ) -> None:
        self.root = ET.Element("AuditMessage")
        attributes = {"EventActionCode": action_code, "EventDateTime": _timestamp(row.at), "EventOutcomeIndicator": outcome}
        event = ET.SubElement(self.root, "EventIdentification", attributes)
        _coded(event, "EventID", event_id)
        if type_code is not None:
            _coded(event, "EventTypeCode", type_code)
        if outcome_description:
            ET.SubElement(event, "EventOutcomeDescription").text = outcome_description[:_DESCRIPTION_LIMIT]
        self._participants: list[ET.Element] = []
        self._objects: list[ET.Element] = []

    def participant(
        self, user_id: str, *, requestor: bool, role: Code | None = None, alternative: str | None = None,
        name: str | None = None, access_point: str | None = None,
    ) -> None:
        """An ActiveParticipant (A.5.1, A.5.2.1-2)."""
        attributes = {"UserID": user_id or "unknown"}
        if alternative:
            attributes["AlternativeUserID"] = alternative
        if name:
            attributes["UserName"] = name
        attributes["UserIsRequestor"] = "true" if requestor else "false"
        if access_point:
            attributes["NetworkAccessPointID"] = access_point
            attributes["NetworkAccessPointTypeCode"] = _access_point_type(access_point)
        element = ET.Element("ActiveParticipant", attributes)
        if role is not None:
            _coded(element, "RoleIDCode", role)
        self._participants.append(element)

    def participant_object(
        self, object_id: str, *, type_code: str, role: str, id_type: Code, query: str | None = None,
        details: Sequence[tuple[str, str]] = (), sop_classes: Mapping[str, int] | None = None,
    ) -> None:
        """A ParticipantObjectIdentification (A.5.1); details are (type, text) pairs, base64-encoded."""
        element = ET.Element(
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code, "ParticipantObjectTypeCodeRole": role},
        )
        _coded(element, "ParticipantObjectIDTypeCode", id_type)
        if query is not None:
            ET.SubElement(element, "ParticipantObjectQuery").text = _b64(query)
        for kind, text in details:
            ET.SubElement(element, "ParticipantObjectDetail", {"type": kind, "value": _b64(text)})
        for uid, count in (sop_classes or {}).items():
            ET.SubElement(element, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
        self._objects.append(element)

    def node(self, context: AuditContext, *, requestor: bool, role: Code | None, ae_title: str | None = None) -> None:
        """The node itself as a participant: its AE title, process id and host."""
        self.participant(
            ae_title or context.ae_title, requestor=requestor, role=role, alternative=str(context.pid),
            access_point=context.hostname,
        )

    def xml(self, context: AuditContext) -> str:
        """The finished message as text (participants, audit source, objects)."""
        self.root.extend(self._participants)
        source_attributes = {"AuditSourceID": context.source_id}
        if context.enterprise_site_id:
            source_attributes = {"AuditEnterpriseSiteID": context.enterprise_site_id, **source_attributes}
        source = ET.SubElement(self.root, "AuditSourceIdentification", source_attributes)
        _coded(source, "AuditSourceTypeCode", AUDIT_SOURCE_APPLICATION_SERVER)
        self.root.extend(self._objects)
        return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(self.root, encoding="unicode")


def _person(row: AuditRow) -> tuple[str, str | None]:
    """(UserID, command) of the person behind a row: ``detail.user`` or the OS user in the actor."""
    user = row.detail.get("user") or row.detail.get("username")
    match = _ACTOR_RE.match(row.actor)
    if user:
        return str(user), match.group("command") if match else None
    if match:
        return match.group("user"), match.group("command")
    return row.actor, None


def _address(row: AuditRow) -> str | None:
    for key in ("address", "client", "remote_addr", "ip"):
        value = row.detail.get(key)
        if value:
            return str(value)
    return None


def _failed(row: AuditRow) -> bool:
    outcome = str(row.detail.get("outcome", "")).lower()
    return outcome in {"failure", "failed", "denied", "error", "aborted"}


def _sanitised(detail: Mapping[str, Any]) -> str:
    """The detail as text without secrets (keys naming passwords, tokens, keys) or URL passwords."""
    kept = {key: value for key, value in detail.items() if not _SECRET_KEYS.search(str(key))}
    return redact_url(json.dumps(kept, sort_keys=True, default=str))[:_DESCRIPTION_LIMIT]


# --- one builder per A.5.3 message ------------------------------------------------------------

Builder = Callable[[AuditRow, "EventSpec", AuditContext], list[str]]


def _application_activity(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.1 Application Activity: the application started or stopped, and who launched it."""
    message = _Message(row, spec.event_id, "E", OUTCOME_SUCCESS, spec.type_code)
    ae_title = str(row.detail.get("ae_title") or context.ae_title)
    pid = row.detail.get("pid", context.pid)
    message.participant(
        str(pid), requestor=False, role=ROLE_APPLICATION, alternative=f"AETITLES={ae_title}", access_point=context.hostname
    )
    user, _command = _person(row)
    message.participant(user, requestor=True, role=ROLE_APPLICATION_LAUNCHER)
    return [message.xml(context)]


def _by_patient(studies: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for study in studies:
        groups.setdefault(str(study.get("patient", "")), []).append(study)
    return groups


def _transfer_objects(message: _Message, patient: str, studies: Sequence[Mapping[str, Any]]) -> None:
    """A.5.3.7 participant objects: each study with its SOP classes, then the one patient."""
    for study in studies:
        classes = {str(uid): int(count) for uid, count in dict(study.get("sop_classes", {})).items()}
        message.participant_object(
            str(study["study_uid"]), type_code=_SYSTEM, role=_ROLE_REPORT, id_type=ID_STUDY_UID, sop_classes=classes
        )
    message.participant_object(patient, type_code=_PERSON, role=_ROLE_PATIENT, id_type=ID_PATIENT_NUMBER)


def _received_action(studies: Sequence[Mapping[str, Any]]) -> str:
    """A.5.3.7 EventActionCode for the receiver: C new copies, U replaced ones, R only identical copies."""
    if any(int(study.get("replaced", 0)) for study in studies):
        return "U"
    if any(int(study.get("new", 0)) for study in studies):
        return "C"
    return "R"


def _instances_received(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.7 DICOM Instances Transferred, the node receiving: one message per patient."""
    aborted = row.detail.get("outcome") == "aborted"
    outcome = OUTCOME_MINOR_FAILURE if aborted else OUTCOME_SUCCESS
    description = "association aborted after these instances were stored" if aborted else None
    calling = str(row.detail.get("calling_ae", ""))
    messages = []
    for patient, studies in _by_patient(list(row.detail.get("studies", []))).items():
        message = _Message(row, spec.event_id, _received_action(studies), outcome, None, description)
        message.participant(
            calling, requestor=True, role=ROLE_SOURCE, alternative=f"AETITLES={calling}",
            access_point=str(row.detail.get("address") or "") or None,
        )
        message.node(context, requestor=False, role=ROLE_DESTINATION, ae_title=str(row.detail.get("called_ae") or context.ae_title))
        _transfer_objects(message, patient, studies)
        messages.append(message.xml(context))
    return messages


def _results_sent(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.7 DICOM Instances Transferred, the node sending results: "R" (it is not the receiver)."""
    destination = str(row.detail.get("ae_title") or row.detail.get("destination") or "")
    messages = []
    for patient, studies in _by_patient(list(row.detail.get("studies", []))).items():
        message = _Message(row, spec.event_id, "R", OUTCOME_SUCCESS, None)
        message.node(context, requestor=True, role=ROLE_SOURCE, ae_title=context.sending_ae_title)
        message.participant(
            destination, requestor=False, role=ROLE_DESTINATION, alternative=f"AETITLES={destination}",
            access_point=str(row.detail.get("host") or "") or None,
        )
        _transfer_objects(message, patient, studies)
        messages.append(message.xml(context))
    return messages


def _user_authentication(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.12 User Authentication: the person (with the address it came from) and the node."""
    failed = spec.outcome == OUTCOME_MINOR_FAILURE or _failed(row)
    reason = row.detail.get("reason")
    message = _Message(
        row, spec.event_id, "E", OUTCOME_MINOR_FAILURE if failed else OUTCOME_SUCCESS, spec.type_code,
        None if reason is None else redact_url(str(reason)),
    )
    user, _command = _person(row)
    message.participant(user, requestor=True, access_point=_address(row))
    message.node(context, requestor=False, role=ROLE_APPLICATION)
    return [message.xml(context)]


def _query(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.10 Query: the console/API user asking (source), the node answering (destination).

    A REST query has no SOP class: the object is the request path (``URI``) and
    ParticipantObjectQuery carries the query string, as given, base64-encoded.
    """
    message = _Message(row, spec.event_id, "E", OUTCOME_MINOR_FAILURE if _failed(row) else OUTCOME_SUCCESS, None)
    user, _command = _person(row)
    message.participant(user, requestor=True, role=ROLE_SOURCE, access_point=_address(row))
    message.node(context, requestor=False, role=ROLE_DESTINATION)
    query = row.detail.get("query")
    if not isinstance(query, str):
        query = json.dumps(query if query is not None else {}, sort_keys=True, default=str)
    path = str(row.detail.get("path") or row.detail.get("endpoint") or "api")
    message.participant_object(path, type_code=_SYSTEM, role=_ROLE_REPORT, id_type=ID_URI, query=query)
    return [message.xml(context)]


def _subject(row: AuditRow, spec: EventSpec) -> tuple[str, str, str, Code]:
    """(ID, type code, role, ID type) of what a Security Alert's change was made to."""
    detail = row.detail
    if row.action.startswith("peer."):
        return str(detail.get("name", "")), _SYSTEM, _ROLE_SECURITY_RESOURCE, ID_NODE
    if row.action.startswith("user."):
        who = detail.get("name") or detail.get("username") or detail.get("user") or ""
        return str(who), _PERSON, _ROLE_SECURITY_USER, ID_USER
    if row.action.startswith("token."):
        token = detail.get("name") or detail.get("id") or detail.get("token_id") or ""
        return f"fpe-node:token:{token}", _SYSTEM, _ROLE_SECURITY_RESOURCE, ID_URI
    if row.action.startswith("settings."):
        key = detail.get("key") or detail.get("section") or ""
        return f"fpe-node:settings:{key}".rstrip(":"), _SYSTEM, _ROLE_SECURITY_RESOURCE, ID_URI
    return f"fpe-node:{row.action}", _SYSTEM, _ROLE_SECURITY_RESOURCE, ID_URI


def _security_alert(row: AuditRow, spec: EventSpec, context: AuditContext) -> list[str]:
    """A.5.3.11 Security Alert: the node reporting, the person who made the change, its subject.

    The subject's ParticipantObjectDetail "Alert Description" names the action and its detail
    (without secrets).
    """
    message = _Message(row, spec.event_id, "E", OUTCOME_MINOR_FAILURE if _failed(row) else OUTCOME_SUCCESS, spec.type_code)
    message.node(context, requestor=False, role=ROLE_APPLICATION)
    user, command = _person(row)
    address = _address(row)
    message.participant(
        user, requestor=True, alternative=f"{user}@{context.hostname}" if command and address is None else None,
        name=command, access_point=address,
    )
    object_id, type_code, role, id_type = _subject(row, spec)
    description = f"{row.action}: {_sanitised(row.detail)}"
    message.participant_object(
        object_id or "unknown", type_code=type_code, role=role, id_type=id_type, details=[("Alert Description", description)]
    )
    return [message.xml(context)]


@dataclass(frozen=True)
class EventSpec:
    """How one audit action becomes an A.5.3 message."""

    event_id: Code
    type_code: Code | None
    build: Builder
    outcome: str = OUTCOME_SUCCESS


EVENTS: dict[str, EventSpec] = {
    # A.5.3.1 Application Activity
    audit.NODE_START: EventSpec(APPLICATION_ACTIVITY, APPLICATION_START, _application_activity),
    audit.NODE_STOP: EventSpec(APPLICATION_ACTIVITY, APPLICATION_STOP, _application_activity),
    # A.5.3.7 DICOM Instances Transferred
    audit.INSTANCES_RECEIVED: EventSpec(INSTANCES_TRANSFERRED, None, _instances_received),
    audit.RESULTS_SENT: EventSpec(INSTANCES_TRANSFERRED, None, _results_sent),
    # A.5.3.12 User Authentication
    "user.login": EventSpec(USER_AUTHENTICATION, LOGIN, _user_authentication),
    "user.login_failed": EventSpec(USER_AUTHENTICATION, LOGIN, _user_authentication, OUTCOME_MINOR_FAILURE),
    "user.logout": EventSpec(USER_AUTHENTICATION, LOGOUT, _user_authentication),
    # A.5.3.10 Query
    "api.query": EventSpec(QUERY, None, _query),
    # A.5.3.11 Security Alert
    "peer.add": EventSpec(SECURITY_ALERT, SECURITY_CONFIGURATION, _security_alert),
    "peer.update": EventSpec(SECURITY_ALERT, SECURITY_CONFIGURATION, _security_alert),
    "peer.remove": EventSpec(SECURITY_ALERT, SECURITY_CONFIGURATION, _security_alert),
    "user.add": EventSpec(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, _security_alert),
    "user.change": EventSpec(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, _security_alert),
    "user.remove": EventSpec(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, _security_alert),
    "token.add": EventSpec(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, _security_alert),
    "token.remove": EventSpec(SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, _security_alert),
    "settings.change": EventSpec(SECURITY_ALERT, SOFTWARE_CONFIGURATION, _security_alert),
}
"""Every audit action and its A.5.3 message. The peers' ``echo`` and any action not listed
become :data:`UNKNOWN_EVENT`."""

UNKNOWN_EVENT = EventSpec(SECURITY_ALERT, USE_OF_RESTRICTED_FUNCTION, _security_alert)
"""Any action not in :data:`EVENTS` (a new writer, a later version's row): a Security Alert,
"Use of Restricted Function", whose Alert Description names the action."""


def render(row: AuditRow, context: AuditContext) -> list[str]:
    """The A.5 message(s) of one row (one per patient for transfers; none for a transfer of nothing).

    A row whose detail its builder cannot read (a bug, a hand-edited row) is sent as
    :data:`UNKNOWN_EVENT`, so one bad row never stops the export.
    """
    spec = EVENTS.get(row.action, UNKNOWN_EVENT)
    try:
        return spec.build(row, spec, context)
    except (KeyError, TypeError, ValueError, AttributeError):
        log.exception("audit row %d (%s) does not have the detail its message needs; sent as a security alert", row.id, row.action)
        return UNKNOWN_EVENT.build(row, UNKNOWN_EVENT, context)


def syslog_message(xml: str, at: dt.datetime, context: AuditContext) -> bytes:
    """One RFC 5424 SYSLOG-MSG: header, no structured data, the XML as a UTF-8 MSG (with BOM)."""
    hostname = re.sub(r"[^\x21-\x7e]", "", context.hostname)[:255] or "-"
    header = f"<{PRI}>1 {_timestamp(at)} {hostname} {APP_NAME} {context.pid} {MSGID} - "
    return header.encode("ascii") + b"\xef\xbb\xbf" + xml.encode("utf-8")


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 section 3.4.1 / RFC 5425 section 4.3 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


# --- transports --------------------------------------------------------------------------------


class Transport(Protocol):
    """A connection to the collector."""

    acknowledged_on_send: bool
    """True when a send that returned counts as delivered (UDP: nothing better is known)."""

    def send(self, message: bytes) -> None:
        """Send one SYSLOG-MSG; raises OSError when it cannot."""
        ...

    def peer_closed(self) -> bool:
        """True when the collector has closed or reset the connection."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class UdpTransport:
    """RFC 5426: one message per datagram."""

    acknowledged_on_send = True

    def __init__(self, host: str, port: int) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, kind, proto, _name, address = infos[0]
        self._socket = socket.socket(family, kind, proto)
        self._address = address

    def send(self, message: bytes) -> None:
        """Send one datagram; one larger than UDP can carry is dropped and logged (RFC 5426 section 3.2)."""
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            log.error("audit message of %d bytes is too large for UDP and was dropped; use tcp or tls", len(message))

    def peer_closed(self) -> bool:
        """UDP has no connection."""
        return False

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


class StreamTransport:
    """RFC 6587 (TCP) or RFC 5425 (TLS) with octet-counting framing."""

    acknowledged_on_send = False

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock

    @classmethod
    def connect(cls, settings: AuditSettings, tls: ssl.SSLContext | None = None) -> StreamTransport:
        """Open a TCP connection to the collector, wrapped in ``tls`` when given (RFC 5425)."""
        assert settings.host is not None
        raw = socket.create_connection((settings.host, settings.collector_port), timeout=settings.timeout_s)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if tls is None:
            return cls(raw)
        try:
            return cls(tls.wrap_socket(raw, server_hostname=settings.host))
        except BaseException:
            raw.close()
            raise

    def send(self, message: bytes) -> None:
        """Write one octet-counted message."""
        self._socket.sendall(octet_counted(message))

    def peer_closed(self) -> bool:
        """True when the collector closed (EOF, TLS close_notify) or reset the connection.

        A syslog collector never writes, so anything readable is the end of the connection.
        """
        pending = isinstance(self._socket, ssl.SSLSocket) and self._socket.pending() > 0
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable and not pending:
            return False
        timeout = self._socket.gettimeout()
        self._socket.setblocking(False)
        try:
            data = self._socket.recv(4096)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self._socket.settimeout(timeout)
        return data == b""

    def close(self) -> None:
        """Close the connection."""
        try:
            self._socket.close()
        except OSError:
            pass


class AuditConfigError(ValueError):
    """The audit settings name files that cannot be used (start-up stops, naming the field)."""


def tls_context(settings: AuditSettings) -> ssl.SSLContext:
    """The client TLS context (PS3.15 A.6: TLS 1.2 or later; the collector's certificate and host
    name checked against ``ca_file`` or the system's CAs; ``cert_file``/``key_file`` for node
    authentication).

    Raises
    ------
    AuditConfigError
        Naming the field whose file is missing or unreadable.
    """
    try:
        context = ssl.create_default_context(cafile=None if settings.ca_file is None else str(settings.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise AuditConfigError(f"audit.ca_file: {settings.ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise AuditConfigError(f"audit.cert_file / audit.key_file: {settings.cert_file}: {exc}") from None
    return context


def connector_for(settings: AuditSettings) -> Callable[[], Transport]:
    """Opens transports to the configured collector; the TLS context is built (and checked) now."""
    host = settings.host
    assert host is not None
    if settings.transport == "udp":
        return lambda: UdpTransport(host, settings.collector_port)
    tls = tls_context(settings) if settings.transport == "tls" else None
    return lambda: StreamTransport.connect(settings, tls)


# --- the exporter ------------------------------------------------------------------------------


class AuditExporter:
    """Tails the audit table by id and sends each row's A.5 messages to the collector.

    Parameters
    ----------
    settings:
        ``settings.audit`` (enabled, collector, transport, retry waits).
    context:
        The node as the messages name it.
    session_factory:
        The index's session factory (rows and the durable cursor).

    Raises
    ------
    AuditConfigError
        When the TLS files cannot be used (at construction, so start-up stops).
    """

    def __init__(
        self,
        settings: AuditSettings,
        context: AuditContext,
        session_factory: sessionmaker[Session],
    ) -> None:
        self.settings = settings
        self.context = context
        self._sessions = session_factory
        self._connector = connector_for(settings)
        self._transport: Transport | None = None
        self._confirmed: int | None = None  # the durable cursor
        self._sent_through = 0  # last id written to the current connection
        self._gap: tuple[int, float] | None = None
        self._failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._when: Callable[[], bool] | None = None
        self.messages_sent = 0
        """Messages written to a collector since start (resends included)."""

    # -- running ----------------------------------------------------------------------
    def start(self, *, when: Callable[[], bool] | None = None) -> None:
        """Start the exporter thread.

        ``when``: export only while it says so (several receivers: the holder of the
        ``completion`` lease alone, so the shared cursor has one reader); a process that stops
        exporting reads the durable cursor again when it resumes.
        """
        self._when = when
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fpenode-atna", daemon=True)
        self._thread.start()
        log.info(
            "audit messages go to %s:%d over %s", self.settings.host, self.settings.collector_port, self.settings.transport
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread, then send what is left (e.g. ``node.stop``) if the collector is up.

        What is not confirmed by then is sent again at the next start (at least once).
        """
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        self._thread = None
        if self._failures == 0:
            try:
                if self.run_pass():
                    time.sleep(min(0.2, self.settings.poll_interval_s))
                    self.run_pass()
            except Exception as exc:  # noqa: BLE001 - shutting down; sent again at the next start
                log.warning("audit messages left for the next start: %s", exc)
        with self._lock:
            self._drop()

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            if self._when is not None and not self._when():
                with self._lock:
                    self._drop()
                    self._confirmed = None  # another process exports meanwhile: re-read its cursor
                delay = self.settings.poll_interval_s
                continue
            try:
                sent = self.run_pass()
            except (OSError, ssl.SSLError) as exc:
                self._failures += 1
                delay = self._backoff_s()
                if self._failures == 1:
                    log.warning("audit collector %s:%d unavailable (%s); retrying, entries wait in the index",
                                self.settings.host, self.settings.collector_port, exc)
                continue
            except Exception:  # noqa: BLE001 - the exporter must outlive a bad pass; logged with traceback
                self._failures += 1
                delay = self._backoff_s()
                log.exception("audit export pass failed; retrying in %.1f s", delay)
                continue
            if self._failures:
                log.info("audit collector reachable again")
            self._failures = 0
            delay = _BACKLOG_PAUSE_S if sent >= _BATCH else self.settings.poll_interval_s

    def _backoff_s(self) -> float:
        exponent = min(self._failures - 1, 30)
        return float(min(self.settings.retry_initial_s * 2**exponent, self.settings.retry_max_s))

    # -- one pass -----------------------------------------------------------------------
    def run_pass(self) -> int:
        """Confirm what the open connection took, then send the rows after it; returns rows sent.

        Raises
        ------
        OSError
            When the collector cannot be reached or a send fails (the rows are sent again).
        """
        with self._lock:
            if self._confirmed is None:
                self._confirmed = self._load_cursor()
                self._sent_through = self._confirmed
            self._confirm_or_rewind()
            rows = self._rows_after(self._sent_through)
            if not rows:
                return 0
            transport = self._connected()
            try:
                for row in rows:
                    for xml in render(row, self.context):
                        transport.send(syslog_message(xml, row.at, self.context))
                        self.messages_sent += 1
                    self._sent_through = row.id
            except OSError:
                self._drop()
                raise
            finally:
                if transport.acknowledged_on_send and self._sent_through > self._confirmed:
                    self._save_cursor(self._sent_through)
            return len(rows)

    @property
    def delivered_through(self) -> int:
        """The durable cursor: every row up to this id has reached the collector."""
        with self._sessions() as session:
            row = session.get(AuditExportCursor, CURSOR_NAME)
            return 0 if row is None else int(row.last_id)

    def backlog(self) -> int:
        """Audit rows not yet delivered (after the durable cursor), e.g. for a metric or an alert."""
        cursor = self.delivered_through
        with self._sessions() as session:
            count = session.scalar(sql_select(func.count()).select_from(AuditEntry).where(AuditEntry.id > cursor))
        return int(count or 0)

    def _confirm_or_rewind(self) -> None:
        """A connection still open confirms what was written to it; a closed one rewinds to the cursor."""
        assert self._confirmed is not None
        if self._transport is None:
            self._sent_through = self._confirmed
            return
        if self._transport.peer_closed():
            log.info("audit collector closed the connection; re-sending from entry %d", self._confirmed + 1)
            self._drop()
            return
        if self._sent_through > self._confirmed:
            self._save_cursor(self._sent_through)

    def _connected(self) -> Transport:
        if self._transport is None:
            self._transport = self._connector()
        return self._transport

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._confirmed is not None:
            self._sent_through = self._confirmed

    def _rows_after(self, after: int) -> list[AuditRow]:
        """Rows after ``after`` in id order, stopping at a missing id until it is given up on."""
        with self._sessions() as session:
            entries = session.scalars(
                sql_select(AuditEntry).where(AuditEntry.id > after).order_by(AuditEntry.id).limit(_BATCH)
            ).all()
            rows = [AuditRow.from_entry(entry) for entry in entries]
        kept: list[AuditRow] = []
        expected = after + 1
        for row in rows:
            if row.id != expected and not self._gap_given_up(expected):
                break
            kept.append(row)
            expected = row.id + 1
        return kept

    def _gap_given_up(self, missing: int) -> bool:
        now = time.monotonic()
        if self._gap is None or self._gap[0] != missing:
            self._gap = (missing, now)
            return False
        if now - self._gap[1] < _GAP_GRACE_S:
            return False
        log.info("audit entry %d never appeared (a rolled-back transaction); skipped", missing)
        return True

    def _load_cursor(self) -> int:
        return self.delivered_through

    def _save_cursor(self, last_id: int) -> None:
        with write_session(self._sessions) as session:
            row = session.get(AuditExportCursor, CURSOR_NAME)
            if row is None:
                session.add(AuditExportCursor(name=CURSOR_NAME, last_id=last_id, updated_at=utcnow()))
            else:
                row.last_id = last_id
                row.updated_at = utcnow()
        self._confirmed = last_id


def build_exporter(settings: Settings, session_factory: sessionmaker[Session]) -> AuditExporter | None:
    """The node's exporter, or ``None`` when ``audit.enabled`` is off."""
    if not settings.audit.enabled:
        return None
    return AuditExporter(settings.audit, AuditContext.from_settings(settings), session_factory)
