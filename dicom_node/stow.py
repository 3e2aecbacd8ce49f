"""STOW-RS client: store result objects at a DICOMweb destination (PS3.18 section 10.5).

The outbox (:mod:`dicom_node.outbox`) hands each pass's due objects for one destination to
:meth:`StowClient.send`, as it hands DIMSE destinations' objects to the C-STORE SCU. The
client sends **one request per study** of the batch: ``POST {base}/studies`` with a
``multipart/related; type="application/dicom"`` body, one part per instance, each part the
PS3.10 file exactly as the node wrote it (its own transfer syntax, named in its file meta;
never transcoded). One request per study
keeps a request to one study's results (a few MB), and one study's failure apart from
another's.

The response (PS3.18 10.5.3) is read per instance:

- ``200 OK``: every instance stored; ``ReferencedSOPSequence`` (0008,1199) items may carry a
  ``WarningReason`` (0008,1196), recorded as the row's status (stored with coercion).
- ``202 Accepted``: some stored; the others are in ``FailedSOPSequence`` (0008,1198) with a
  ``FailureReason`` (0008,1197), a C-STORE status of PS3.4 Annex B.2.3.
- ``409 Conflict``: none stored, reasons as for 202.
- any other status (``401``/``403`` credentials, ``404`` wrong base URL, ``5xx`` server
  trouble...), a refused connection, a TLS failure or a timeout: nothing stored.

The body may be DICOM JSON (``application/dicom+json``, PS3.18 Annex F) or the Native DICOM Model
XML (``application/dicom+xml``, PS3.19 A.1); both are read.

What is retried: every request-level failure (the same backoff and deadline as a DIMSE
destination, then a dead letter), and per-instance failure reasons that name a passing
condition (0xA7xx out of resources, 0x0110 processing failure, 0x0124 not authorized,
0x0213 resource limitation). Every other per-instance reason (0xA9xx data set does not
match SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported, ...) and a 409
without reasons cannot change by sending the same object again: the outcome is marked
``permanent`` and the outbox dead-letters the row at once, with the reason.

SR class fallback, as for C-STORE (:mod:`dicom_node.scu`): an SR refused with FailureReason
0x0122 (SOP class not supported) is re-encoded as the next class its content fits
(Comprehensive 3D SR -> Comprehensive SR -> Enhanced SR, with a UID derived from the
original's) and posted again in the same delivery; the row records the class and UID stored.

Secrets: the password (basic) or token (bearer) is read at each request from the
environment variable or file the destination names (:class:`dicom_node.settings.DicomWebSettings`);
it is never logged, never stored in the index and never part of an error message.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import ssl
import stat
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.scu import (
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    OutgoingObject,
    Recoder,
    StoreOutcome,
    allowed_sr_classes,
    no_recoding,
)
from dicom_node.settings import DicomWebSettings

log = logging.getLogger(__name__)

#: PS3.18 10.5.1, Table 10.5.1-1: the STOW-RS resource below the service's base URL.
STUDIES_RESOURCE = "/studies"
#: PS3.18 10.5.2: the response media type asked for (an XML answer, PS3.19 A.1, is read as well).
ACCEPT = "application/dicom+json"
_DICM_OFFSET = 128
_MAX_RESPONSE_ERROR_CHARS = 200

#: FailureReason values (C-STORE statuses, PS3.4 B.2.3, PS3.7 C.4) that may pass: sent again later.
_TRANSIENT_REASONS = frozenset({0x0110, 0x0124, 0x0213})


def reason_is_transient(reason: int) -> bool:
    """True when a per-instance FailureReason names a condition a later retry may not meet.

    0xA7xx "Refused: Out of Resources" (PS3.4 B.2.3), 0x0110 Processing failure, 0x0124 Not
    authorized and 0x0213 Resource limitation (PS3.7 C.4) are retried; every other reason is
    about the instance itself and is permanent.
    """
    return 0xA700 <= reason <= 0xA7FF or reason in _TRANSIENT_REASONS


_REASON_TEXT = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0213: "resource limitation",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


def reason_text(reason: int) -> str:
    """``0xA900 (data set does not match SOP class)``: a status and its meaning, when known."""
    meaning = _REASON_TEXT.get(reason)
    if meaning is None and 0xA700 <= reason <= 0xA7FF:
        meaning = "out of resources"
    elif meaning is None and 0xA900 <= reason <= 0xA9FF:
        meaning = "data set does not match SOP class"
    elif meaning is None and 0xC000 <= reason <= 0xCFFF:
        meaning = "cannot understand"
    return f"0x{reason:04X}" + (f" ({meaning})" if meaning else "")


def http_text(status: int) -> str:
    """``HTTP 401 Unauthorized``."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


@dataclass(frozen=True)
class StowDestination:
    """A peer whose results go by STOW-RS (registry kind ``dicomweb``)."""

    name: str
    service: DicomWebSettings

    @property
    def stow_url(self) -> str:
        """``{base}/studies`` (PS3.18 10.5.1, Table 10.5.1-1)."""
        return self.service.url + STUDIES_RESOURCE


class SecretError(RuntimeError):
    """The password or token cannot be read (the message names where it was looked for, not its value)."""


def read_secret(service: DicomWebSettings) -> str | None:
    """The password or token of ``service`` (``None`` when its auth takes none).

    Raises
    ------
    SecretError
        The environment variable is not set, or the file is unreadable or empty.
    """
    if service.secret_env is not None:
        value = os.environ.get(service.secret_env)
        if not value:
            raise SecretError(f"environment variable {service.secret_env} is not set")
        return value
    if service.secret_file is not None:
        try:
            lines = service.secret_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"secret file {service.secret_file} unreadable ({type(exc).__name__})") from None
        if not lines or not lines[0].strip():
            raise SecretError(f"secret file {service.secret_file} is empty")
        _warn_if_shared(service.secret_file)
        return lines[0].strip()
    return None


def _warn_if_shared(path: Path) -> None:
    """A WARNING when a secret file is readable or writable by group or others (as ssh does for keys)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("secret file %s is open to other users (mode %04o): chmod 600 it", path, mode)


def ssl_context(
    service: DicomWebSettings, default_ca_bundle: Path | None = None, minimum_version: str = "1.2"
) -> ssl.SSLContext:
    """The TLS context of ``service``: verification with its CA bundle (else ``default_ca_bundle``,
    else the system's trust store) unless switched off, and its client certificate for
    client-certificate authentication; TLS ``minimum_version`` ("1.2" or "1.3") or later
    (PS3.18 6.1 recommends 1.2 or later, BCP 195)."""
    ca_bundle = service.ca_bundle or default_ca_bundle
    context = ssl.create_default_context(cafile=None if ca_bundle is None else str(ca_bundle))
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if minimum_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if not service.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if service.client_cert is not None:
        key = None if service.client_key is None else str(service.client_key)
        context.load_cert_chain(str(service.client_cert), key)
    return context


@dataclass(frozen=True)
class _Part:
    obj: OutgoingObject
    data: bytes
    study_uid: str


def _load(obj: OutgoingObject) -> _Part | StoreOutcome:
    """The file as a part, or the outcome of a file that cannot be sent."""
    try:
        data = obj.path.read_bytes()
        header = dcmread(obj.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except (OSError, InvalidDicomError) as exc:
        return StoreOutcome(obj.sop_instance_uid, False, error=f"cannot read {obj.path.name}: {exc}")
    if data[_DICM_OFFSET:_DICM_OFFSET + 4] != b"DICM" or "StudyInstanceUID" not in header:
        # PS3.18 10.5.1: an application/dicom part is one PS3.10 instance.
        return StoreOutcome(obj.sop_instance_uid, False, error=f"{obj.path.name} is not a PS3.10 file with a study",
                            permanent=True)
    return _Part(obj, data, str(header.StudyInstanceUID))


def multipart_body(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body (RFC 2387; PS3.18 10.5.1: one part per PS3.10 instance).

    Each part is ``Content-Type: application/dicom`` without a ``transfer-syntax`` parameter:
    the parameter is optional, the file meta names the syntax, and archives exist that refuse
    any part type but the bare one (Orthanc's DICOMweb plugin 1.7: "a part that is not
    application/dicom").

    Parameters
    ----------
    parts:
        One PS3.10 file per instance.

    Returns
    -------
    tuple
        The body and its Content-Type header value.
    """
    boundary = uuid.uuid4().hex
    while any(boundary.encode("ascii") in data for data in parts):
        boundary = uuid.uuid4().hex
    chunks = []
    for data in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


# --- the response -----------------------------------------------------------------------------

_NATIVE_VALUE_INT_VRS = frozenset({"US", "UL", "SS", "SL", "IS", "UV", "SV"})


def _xml_local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_dataset(element: ElementTree.Element) -> Dataset:
    """A Native DICOM Model element (PS3.19 A.1) as a dataset: the attributes a STOW response
    needs (sequences, UIDs, strings, integers)."""
    dataset = Dataset()
    for attribute in element:
        if _xml_local(attribute.tag) != "DicomAttribute":
            continue
        tag = int(attribute.get("tag", "0"), 16)
        vr = attribute.get("vr", "UN")
        if vr == "SQ":
            items = sorted((c for c in attribute if _xml_local(c.tag) == "Item"), key=lambda c: int(c.get("number", "0")))
            dataset.add_new(tag, "SQ", [_xml_dataset(item) for item in items])
            continue
        values = [c.text or "" for c in sorted(
            (c for c in attribute if _xml_local(c.tag) == "Value"), key=lambda c: int(c.get("number", "0")))]
        converted: list[Any] = [int(v) for v in values] if vr in _NATIVE_VALUE_INT_VRS else values
        dataset.add_new(tag, vr, converted[0] if len(converted) == 1 else converted or None)
    return dataset


def parse_response_body(content_type: str, body: bytes) -> Dataset | None:
    """The STOW-RS response dataset (DICOM JSON or Native DICOM Model XML); ``None`` when the
    body is empty or neither (a proxy's HTML error page, for example)."""
    if not body.strip():
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if "xml" in media or body.lstrip().startswith(b"<"):
            root = ElementTree.fromstring(body)
            return _xml_dataset(root) if _xml_local(root.tag) == "NativeDicomModel" else None
        data = json.loads(body)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        return Dataset.from_json(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, ElementTree.ParseError):
        return None


def _items(dataset: Dataset | None, keyword: str) -> dict[str, Dataset]:
    if dataset is None:
        return {}
    found = {}
    for item in dataset.get(keyword, None) or []:
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            found[str(uid)] = item
    return found


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def interpret_response(
    status_code: int, content_type: str, body: bytes, objects: Sequence[OutgoingObject]
) -> list[StoreOutcome]:
    """One outcome per object from a STOW-RS response (PS3.18 10.5.3), in order.

    Parameters
    ----------
    status_code:
        The HTTP status.
    content_type:
        The response's Content-Type.
    body:
        The response body.
    objects:
        What the request carried.
    """
    dataset = parse_response_body(content_type, body)
    stored = _items(dataset, "ReferencedSOPSequence")
    failed = _items(dataset, "FailedSOPSequence")
    http = http_text(status_code)
    outcomes = []
    for obj in objects:
        uid = obj.sop_instance_uid
        if uid in failed:
            reason = _int(failed[uid].get("FailureReason"))
            if reason is None:
                outcomes.append(StoreOutcome(uid, False, error=f"STOW-RS failed without a reason ({http})",
                                             http_status=status_code))
            else:
                outcomes.append(StoreOutcome(
                    uid, False, reason, error=f"STOW-RS FailureReason {reason_text(reason)} ({http})",
                    http_status=status_code, permanent=not reason_is_transient(reason),
                ))
        elif status_code in (200, 202) and (uid in stored or (status_code == 200 and not failed)):
            item = stored.get(uid, Dataset())
            warning = _int(item.get("WarningReason"))
            outcomes.append(StoreOutcome(
                uid, True, 0 if warning is None else warning,
                sent_sop_class_uid=str(item.get("ReferencedSOPClassUID") or obj.sop_class_uid),
                sent_sop_instance_uid=uid, http_status=status_code,
            ))
        elif status_code == 202:
            outcomes.append(StoreOutcome(uid, False, error=f"not listed in the STOW-RS response ({http})",
                                         http_status=status_code))
        elif status_code == 409:
            outcomes.append(StoreOutcome(uid, False, error=f"STOW-RS refused the request ({http})",
                                         http_status=status_code, permanent=True))
        else:
            outcomes.append(StoreOutcome(uid, False, error=_request_error(status_code, content_type, body),
                                         http_status=status_code))
    return outcomes


def _request_error(status_code: int, content_type: str, body: bytes) -> str:
    text = http_text(status_code)
    if content_type.startswith("text/plain") and body.strip():
        snippet = body.decode("utf-8", "replace").strip().splitlines()[0][:_MAX_RESPONSE_ERROR_CHARS]
        text += f": {snippet}"
    return f"STOW-RS {text}"


# --- the client ------------------------------------------------------------------------------


class StowClient:
    """Sends batches to DICOMweb destinations by STOW-RS (one request per study of the batch).

    Parameters
    ----------
    timeout_s:
        Connect, read, write and pool timeout of one request (``delivery.stow_timeout_s``).
    recoder:
        Re-encodes an SR for a fallback class (the node's: :func:`dicom_node.delivery.sr_recoder`);
        :func:`dicom_node.scu.no_recoding` disables the fallback.
    default_ca_bundle:
        CA bundle for destinations without their own (the node's: ``delivery.tls.ca_bundle``, else
        ``network.tls.ca_bundle``, as for DICOM over TLS); ``None``: the system's trust store.
    minimum_tls_version:
        Lowest TLS version offered ("1.2" or "1.3"; the node's: ``delivery.tls.minimum_version``).
    """

    def __init__(
        self, timeout_s: float = 60.0, recoder: Recoder = no_recoding, default_ca_bundle: Path | None = None,
        minimum_tls_version: str = "1.2",
    ) -> None:
        self.timeout_s = timeout_s
        self.recoder = recoder
        self.default_ca_bundle = default_ca_bundle
        self.minimum_tls_version = minimum_tls_version

    def send(self, destination: StowDestination, objects: Sequence[OutgoingObject]) -> list[StoreOutcome]:
        """Send ``objects`` to ``destination``; one outcome per object, in order.

        Never raises for network, TLS, credential or archive failures: each is an outcome with
        ``ok`` False (and ``permanent`` when a retry cannot help).
        """
        service = destination.service
        self._warn_about_transport(destination)
        results: dict[int, StoreOutcome] = {}
        by_study: dict[str, list[tuple[int, _Part]]] = {}
        for position, obj in enumerate(objects):
            loaded = _load(obj)
            if isinstance(loaded, StoreOutcome):
                results[position] = loaded
            else:
                by_study.setdefault(loaded.study_uid, []).append((position, loaded))
        if by_study:
            try:
                client = self._client(service)
            except (SecretError, ssl.SSLError, OSError) as exc:
                error = f"STOW-RS to {destination.name} not attempted: {_safe_error(exc)}"
                log.warning("%s", error)
                for group in by_study.values():
                    results.update((position, StoreOutcome(part.obj.sop_instance_uid, False, error=error))
                                   for position, part in group)
                by_study = {}
            else:
                with client:
                    for study_uid, group in by_study.items():
                        parts = [part for _, part in group]
                        outcomes = self._post(client, destination, study_uid, parts)
                        outcomes = self._fall_back(client, destination, parts, outcomes)
                        results.update((position, outcome) for (position, _), outcome in zip(group, outcomes, strict=True))
        return [results[position] for position in range(len(objects))]

    def _client(self, service: DicomWebSettings) -> httpx.Client:
        secret = read_secret(service)
        headers = {"Accept": ACCEPT}
        auth: httpx.Auth | None = None
        if service.auth == "basic" and secret is not None and service.username is not None:
            auth = httpx.BasicAuth(service.username, secret)
        elif service.auth == "bearer" and secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        verify: ssl.SSLContext | bool = (
            ssl_context(service, self.default_ca_bundle, self.minimum_tls_version)
            if service.url.startswith("https://") else True
        )
        # trust_env off: no proxy or .netrc credentials from the environment reach the archive.
        return httpx.Client(verify=verify, auth=auth, headers=headers, timeout=self.timeout_s,
                            follow_redirects=False, trust_env=False)

    def _post(
        self, client: httpx.Client, destination: StowDestination, study_uid: str, parts: Sequence[_Part]
    ) -> list[StoreOutcome]:
        objects = [part.obj for part in parts]
        body, content_type = multipart_body([part.data for part in parts])
        try:
            response = client.post(destination.stow_url, content=body, headers={"Content-Type": content_type})
        except httpx.HTTPError as exc:
            error = f"STOW-RS to {destination.name}: {_safe_error(exc)}"
            log.warning("delivery of %d objects of study %s to %s failed: %s", len(parts), study_uid,
                        destination.name, error)
            return [StoreOutcome(obj.sop_instance_uid, False, error=error) for obj in objects]
        outcomes = interpret_response(response.status_code, response.headers.get("Content-Type", ""),
                                      response.content, objects)
        stored = sum(outcome.ok for outcome in outcomes)
        level = logging.INFO if stored == len(outcomes) else logging.WARNING
        log.log(level, "STOW-RS to %s: study %s, %d of %d objects stored (%s)%s", destination.name, study_uid,
                stored, len(outcomes), http_text(response.status_code),
                "" if stored == len(outcomes) else ": " + "; ".join(
                    f"{o.sop_instance_uid} {o.error}" for o in outcomes if not o.ok)[:1000])
        return outcomes

    def _fall_back(
        self, client: httpx.Client, destination: StowDestination, parts: Sequence[_Part], outcomes: list[StoreOutcome]
    ) -> list[StoreOutcome]:
        """Outcomes after re-sending each SR refused as "SOP class not supported" in the next class it fits."""
        final = list(outcomes)
        for position, (part, outcome) in enumerate(zip(parts, outcomes, strict=True)):
            if outcome.ok or outcome.status != STATUS_SOP_CLASS_NOT_SUPPORTED:
                continue
            try:
                dataset = dcmread(part.obj.path)
            except (OSError, InvalidDicomError):
                continue
            for sop_class in allowed_sr_classes(dataset)[1:]:
                try:
                    recoded = self.recoder(dataset, sop_class)
                except ValueError as exc:
                    final[position] = dataclasses.replace(outcome, error=f"{outcome.error}; cannot send as {sop_class}: {exc}")
                    break
                uid = str(recoded.SOPInstanceUID)
                (result,) = self._post(client, destination, part.study_uid, [
                    _Part(OutgoingObject(part.obj.path, uid, sop_class), _file_bytes(recoded), part.study_uid)])
                final[position] = dataclasses.replace(result, sop_instance_uid=part.obj.sop_instance_uid)
                if result.ok:
                    log.info("SR %s sent to %s as %s %s (archive refused %s)", part.obj.sop_instance_uid,
                             destination.name, sop_class, uid, part.obj.sop_class_uid)
                    final[position] = dataclasses.replace(final[position], sent_sop_class_uid=sop_class,
                                                          sent_sop_instance_uid=uid)
                    break
                if result.status != STATUS_SOP_CLASS_NOT_SUPPORTED:
                    break
        return final

    @staticmethod
    def _warn_about_transport(destination: StowDestination) -> None:
        service = destination.service
        if service.url.startswith("https://") and not service.verify_tls:
            log.warning("STOW-RS to %s: TLS verification is switched off (verify_tls false): the server is "
                        "not authenticated", destination.name)
        if service.url.startswith("http://") and service.auth in ("basic", "bearer"):
            log.warning("STOW-RS to %s: %s credentials sent over plain HTTP", destination.name, service.auth)


def _file_bytes(dataset: Dataset) -> bytes:
    """A re-encoded SR as a PS3.10 file (strict: an invalid file meta raises)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _safe_error(exc: BaseException) -> str:
    """``ConnectError: ...``: the exception type and message (which never hold the secret: it is
    only ever in the Authorization header)."""
    message = str(exc).strip()
    return type(exc).__name__ + (f": {message[:_MAX_RESPONSE_ERROR_CHARS]}" if message else "")


def probe(destination: StowDestination, timeout_s: float = 10.0) -> tuple[int | None, str]:
    """Check a DICOMweb destination's address and credentials with a QIDO-RS query
    (``GET {base}/studies?limit=1``, PS3.18 10.6), for ``fpe-node peers echo``.

    Returns
    -------
    tuple
        The HTTP status (``None`` when no response came) and a line saying what happened.
    """
    try:
        client = StowClient(timeout_s)._client(destination.service)
    except (SecretError, OSError) as exc:
        return None, f"not attempted: {_safe_error(exc)}"
    url = destination.service.url + STUDIES_RESOURCE
    try:
        with client:
            response = client.get(url, params={"limit": "1"}, headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        return None, f"QIDO-RS {url}: {_safe_error(exc)}"
    return response.status_code, f"QIDO-RS {url}: {http_text(response.status_code)}"
