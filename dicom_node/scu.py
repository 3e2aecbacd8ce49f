"""C-STORE SCU: send result objects to one destination, with SR class fallback.

One association per destination and batch. Presentation contexts are negotiated for every
object of the batch (PS3.8 section 9.3.2.2): each object's own SOP class, plus for a
Comprehensive 3D SR the classes it may fall back to, each offered with the object's own
transfer syntax and the two uncompressed little-endian ones.

SR class fallback (PS3.3 A.35): an archive that refuses Comprehensive 3D SR
(1.2.840.10008.5.1.4.1.1.88.34) gets the same content as Comprehensive SR (...88.33), and one
that refuses that too gets Enhanced SR (...88.22), provided the content fits the narrower IOD:

- Comprehensive SR has no SCOORD3D content items (PS3.3 A.35.3.3 value types);
- Enhanced SR additionally has no by-reference relationships (PS3.3 A.35.2.3.1).

The re-encoding is a :data:`Recoder` passed in (the node uses :func:`reports.sr.reencode_sr`).
A SOP Instance UID names one instance of one SOP class (PS3.3 C.12.1.1.1), so the
re-encoded SR carries a UID *derived deterministically* from the original and the target
class: every retry of the same fallback sends the same UID, and the outcome records both the
class and the UID the archive stored.

A refused presentation context, a refused or aborted association and any status other than
Success or Warning (PS3.4 Annex B.2.3, PS3.7 Annex C) is a failure, never "sent". Warning
statuses (0xB000, 0xB006, 0xB007: stored with coercion or elements discarded) count as stored
and are recorded.

A destination flagged ``tls`` is reached over TLS (PS3.15 Annex B, :mod:`dicom_node.tls`): its
certificate chain is verified against the site CA and its host name against the registered host,
unless its ``tls_verify`` is off (warned about at every association). A failed handshake is a
failed association whose error says why (OpenSSL's reason).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.tls import ClientContexts, handshake_failure

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"

#: The classes an SR may be re-encoded as, in order of preference (issue 4 item 4).
SR_FALLBACK_CHAIN: dict[str, tuple[str, ...]] = {
    COMPREHENSIVE_3D_SR: (COMPREHENSIVE_SR, ENHANCED_SR),
    COMPREHENSIVE_SR: (ENHANCED_SR,),
}

#: C-STORE "Refused: SOP Class not supported" (PS3.4 B.2.3): try the next class as well.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
_WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Destination:
    """A remote Storage SCP (a peer with the destination role)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Send over TLS (PS3.15 Annex B)."""
    tls_verify: bool = True
    """Verify the destination's certificate chain and host name (False: explicit opt-out)."""


@dataclass(frozen=True)
class OutgoingObject:
    """One DICOM file to send."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one object.

    ``sent_sop_class_uid`` / ``sent_sop_instance_uid`` are the class and UID the archive
    stored (after any fallback) when ``ok``.
    ``status`` is the C-STORE status, ``None`` when no response came (refused context, failed
    association, abort, timeout).
    """

    sop_instance_uid: str
    ok: bool
    status: int | None = None
    sent_sop_class_uid: str | None = None
    error: str | None = None
    sent_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class ScuTimeouts:
    """Timeouts of one association, seconds (PS3.8 9.1.5 ARTIM / DIMSE)."""

    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0
    connect_s: float = 10.0


def iter_content_items(items: Sequence[Dataset]) -> Iterator[Dataset]:
    """Every content item of an SR content tree, depth first (PS3.3 C.17.3)."""
    for item in items:
        yield item
        yield from iter_content_items(item.get("ContentSequence", []))


def allowed_sr_classes(dataset: Dataset) -> tuple[str, ...]:
    """The SR classes ``dataset`` may be sent as, its own class first.

    Parameters
    ----------
    dataset:
        An SR document (any SOP class; non-SR objects get their own class only).

    Returns
    -------
    tuple of str
        Its own class, followed by the fallback classes whose IOD can hold its content
        (PS3.3 A.35.3 for Comprehensive SR, A.35.2 for Enhanced SR).
    """
    own = str(dataset.SOPClassUID)
    chain = SR_FALLBACK_CHAIN.get(own, ())
    if not chain:
        return (own,)
    items = list(iter_content_items(dataset.get("ContentSequence", [])))
    has_3d = any(item.get("ValueType") == "SCOORD3D" for item in items)
    by_reference = any("ReferencedContentItemIdentifier" in item for item in items)
    allowed = [own]
    for sop_class in chain:
        if has_3d:
            break
        if sop_class == ENHANCED_SR and by_reference:
            break
        allowed.append(sop_class)
    return tuple(allowed)


#: Re-encodes an SR document as another SR SOP class: ``recoder(dataset, sop_class_uid)``.
#: Raises ``ValueError`` when the content does not fit the class.
Recoder = Callable[[Dataset, str], Dataset]


def no_recoding(dataset: Dataset, sop_class_uid: str) -> Dataset:
    """A :data:`Recoder` that sends objects only as their own class (no SR fallback)."""
    if sop_class_uid != str(dataset.SOPClassUID):
        raise ValueError(f"no SR re-encoding configured for {dataset.SOPInstanceUID}")
    return dataset


def _transfer_syntaxes(dataset: Dataset) -> list[str]:
    own = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    syntaxes = [str(own)] if own else []
    for uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if uid not in syntaxes:
            syntaxes.append(uid)
    if own and own.is_compressed:
        return [str(own)]  # never transcode pixel data on the way out
    return syntaxes


def requested_contexts(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """Presentation contexts for a batch: every object's candidate classes and syntaxes.

    Raises
    ------
    ValueError
        When the batch needs more than 128 contexts (PS3.8 9.3.2.2).
    """
    wanted: dict[str, list[str]] = {}
    for dataset in datasets:
        syntaxes = _transfer_syntaxes(dataset)
        for sop_class in allowed_sr_classes(dataset):
            known = wanted.setdefault(sop_class, [])
            known.extend(ts for ts in syntaxes if ts not in known)
    if len(wanted) > _MAX_CONTEXTS:
        raise ValueError(f"{len(wanted)} SOP classes in one batch; at most {_MAX_CONTEXTS} contexts")
    return [build_context(sop_class, syntaxes) for sop_class, syntaxes in wanted.items()]


def wait_for_reactor(assoc: Association, timeout_s: float = 1.0) -> None:
    """Let the association's reactor thread resume before the next DIMSE request.

    pynetdicom pauses an association's reactor thread around each ``send_c_store`` and
    resumes it afterwards, checking a flag the reactor sets when it pauses. When the
    reactor thread has not run since the previous request (a busy CPU: the node's inference
    worker), that flag is stale, the next request does not wait for the pause, and the
    reactor then takes the next C-STORE response off the queue as an "unexpected C-STORE
    service message": the SCU waits for the DIMSE timeout and the association is aborted
    (pynetdicom issues #842 and #850 describe the symptom). Waiting here until the reactor
    has actually resumed closes that window. Bounded; a no-op where the attribute is absent.
    """
    deadline = time.monotonic() + timeout_s
    while getattr(assoc, "_is_paused", False) and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0001)


def _accepted_classes(assoc: Association) -> set[str]:
    return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}


def _status_text(status: int) -> str:
    return f"0x{status:04X}"


class StoreScu:
    """Sends batches of files to destinations (one association per call).

    Parameters
    ----------
    calling_ae_title:
        The node's AE title when sending (``delivery.calling_ae_title`` or ``network.ae_title``).
    timeouts:
        Association and DIMSE timeouts.
    max_pdu:
        Maximum PDU length the node advertises for the association.
    after_each:
        Called with each object's outcome as soon as it is known (progress, timing).
    recoder:
        Re-encodes an SR for a fallback class; :func:`no_recoding` disables the fallback.
    tls:
        Contexts for destinations flagged ``tls`` (:func:`dicom_node.tls.client_contexts`); without
        them such a destination fails (never sent to in plain).
    """

    def __init__(
        self,
        calling_ae_title: str,
        timeouts: ScuTimeouts | None = None,
        max_pdu: int = 4_194_304,
        after_each: Callable[[StoreOutcome], None] | None = None,
        recoder: Recoder = no_recoding,
        tls: ClientContexts | None = None,
    ) -> None:
        self.calling_ae_title = calling_ae_title
        self.tls = tls
        self.timeouts = timeouts or ScuTimeouts()
        self.max_pdu = max_pdu
        self.after_each = after_each
        self.recoder = recoder

    def _build_ae(self, contexts: list[PresentationContext]) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = self.timeouts.acse_s
        ae.dimse_timeout = self.timeouts.dimse_s
        ae.network_timeout = self.timeouts.network_s
        ae.connection_timeout = self.timeouts.connect_s
        ae.requested_contexts = contexts
        return ae

    def send(self, destination: Destination, objects: Sequence[OutgoingObject]) -> list[StoreOutcome]:
        """Send ``objects`` to ``destination``; one outcome per object, in order.

        Never raises for network or archive failures: each is an outcome with ``ok`` False.
        """
        loaded: list[tuple[OutgoingObject, Dataset | None, str | None]] = []
        for obj in objects:
            try:
                loaded.append((obj, dcmread(obj.path), None))
            except (OSError, InvalidDicomError) as exc:
                loaded.append((obj, None, f"cannot read {obj.path.name}: {exc}"))
        datasets = [ds for _, ds, _ in loaded if ds is not None]
        if not datasets:
            return [StoreOutcome(o.sop_instance_uid, False, error=err) for o, _, err in loaded]
        try:
            tls_args = self._tls_args(destination)
        except ValueError as exc:
            log.warning("delivery to %s: %s", destination.name, exc)
            return [StoreOutcome(o.sop_instance_uid, False, error=err or str(exc)) for o, _, err in loaded]
        ae = self._build_ae(requested_contexts(datasets))
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, max_pdu=self.max_pdu, tls_args=tls_args
        )
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association failed or aborted"
            if tls_args is not None and not assoc.is_rejected:
                why = tls_handshake_error(tls_args[0], destination.host, destination.port, self.timeouts.connect_s)
                reason = reason if why is None else f"TLS handshake failed: {why}"
            log.warning("delivery to %s (%s@%s:%d): %s", destination.name, destination.ae_title,
                        destination.host, destination.port, reason)
            return [StoreOutcome(o.sop_instance_uid, False, error=err or reason) for o, _, err in loaded]
        try:
            outcomes = []
            for obj, dataset, error in loaded:
                if dataset is None:
                    outcomes.append(StoreOutcome(obj.sop_instance_uid, False, error=error))
                    continue
                outcome = self._store_one(assoc, destination, obj, dataset)
                outcomes.append(outcome)
                if self.after_each is not None:
                    self.after_each(outcome)
            return outcomes
        finally:
            if assoc.is_established:
                assoc.release()

    def _tls_args(self, destination: Destination) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for ``destination``: (context, host name to verify), or None for plain."""
        if not destination.tls:
            return None
        if self.tls is None:
            raise ValueError("destination is flagged tls but the node has no TLS client context")
        if not destination.tls_verify:
            log.warning(
                "delivery to %s (%s:%d) over TLS WITHOUT certificate verification (peer tls_verify is off)",
                destination.name, destination.host, destination.port,
            )
            return self.tls.unverified, destination.host
        return self.tls.verified, destination.host

    def _store_one(
        self, assoc: Association, destination: Destination, obj: OutgoingObject, dataset: Dataset
    ) -> StoreOutcome:
        accepted = _accepted_classes(assoc)
        candidates = allowed_sr_classes(dataset)
        last = StoreOutcome(obj.sop_instance_uid, False, error="no presentation context accepted for "
                            + ", ".join(candidates))
        for sop_class in candidates:
            if sop_class not in accepted:
                continue
            if not assoc.is_established:
                return StoreOutcome(obj.sop_instance_uid, False, error="association aborted")
            try:
                to_send = dataset if sop_class == candidates[0] else self.recoder(dataset, sop_class)
            except ValueError as exc:
                last = StoreOutcome(obj.sop_instance_uid, False, error=f"cannot send as {sop_class}: {exc}")
                continue
            status_ds = assoc.send_c_store(to_send)
            wait_for_reactor(assoc)
            if "Status" not in status_ds:
                return StoreOutcome(obj.sop_instance_uid, False, error="no C-STORE response (timeout or abort)")
            status = int(status_ds.Status)
            if status == 0x0000 or status in _WARNING_STATUSES:
                if sop_class != candidates[0]:
                    refused = candidates[: candidates.index(sop_class)]
                    log.info("SR %s sent to %s as %s %s (archive refused %s)", obj.sop_instance_uid,
                             destination.name, sop_class, to_send.SOPInstanceUID, ", ".join(refused))
                return StoreOutcome(obj.sop_instance_uid, True, status, sop_class,
                                    sent_sop_instance_uid=str(to_send.SOPInstanceUID))
            last = StoreOutcome(obj.sop_instance_uid, False, status,
                                error=f"C-STORE status {_status_text(status)} for {sop_class}")
            if status != STATUS_SOP_CLASS_NOT_SUPPORTED:
                break
        if not last.ok:
            log.warning("delivery of %s to %s failed: %s", obj.sop_instance_uid, destination.name, last.error)
        return last


def tls_handshake_error(context: ssl.SSLContext, host: str, port: int, timeout_s: float) -> str | None:
    """Why a TLS handshake with ``host:port`` fails (None when it succeeds).

    pynetdicom reports a failed TLS association only as failed; the node tries the handshake once
    more on its own, after a failure, so the outbox error and the log say why (e.g. an untrusted
    or expired certificate, a host name the certificate does not name).
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls_socket:
            tls_socket.settimeout(timeout_s)
            return None
    except (OSError, ValueError) as exc:
        return handshake_failure(exc)[1]
    finally:
        raw.close()
