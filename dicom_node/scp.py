"""The node's DICOM front door: association acceptance, C-ECHO and C-STORE (pynetdicom).

Handlers are thin: a C-STORE is checked, written durably (:mod:`dicom_node.storage`), indexed
(:mod:`dicom_node.index.repository`) and answered; nothing else runs on the network path.
Listeners (:class:`IngestListener`, e.g. completion) are told about stored instances and
released associations afterwards, on one background thread, in arrival order.

Behaviour is documented in ``docs/conformance.md``.
"""

from __future__ import annotations

import functools
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000MCLossless,
    JPEG2000MC,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, Association, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit import INSTANCES_RECEIVED, StudyTally, instances_received_detail, patient_tag
from dicom_node.audit import record as audit_record
from dicom_node.index import repository
from dicom_node.index.db import run_write
from dicom_node.index.repository import FileFacts, RecordOutcome
from dicom_node.peers import ROLE_SOURCE, PeerInfo, PeerRegistry
from dicom_node.settings import NetworkSettings
from dicom_node.sop_classes import is_unknown_storage_class
from dicom_node.status import Status
from dicom_node.storage import DiskFullError, DiskGuard, FileStore, HeaderError, dataset_digest, file_meta_bytes, parse_header
from dicom_node.transport import Connection, FrontDoor, NodeAssociationServer, Refusal
from dicom_node.validation import check_dataset
from inference.dicom_headers import InstanceHeader

log = logging.getLogger(__name__)

# Transfer syntaxes accepted for every storage SOP class; stored as received (PS3.5 section 10).
# pynetdicom accepts, in a presentation context, the first of these the requestor proposed:
# uncompressed first, then lossless compression, lossy last (chosen only if nothing else was
# proposed, i.e. the sender's data is lossy already), so a sender is never asked to degrade.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    JPEG2000MC,
    HTJ2K,
)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"  # PS3.4 Annex A

# A-ASSOCIATE-RJ parameters (PS3.8 section 9.3.4): result, source, diagnostic.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised
_REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # rejected-transient, service-user, no reason given
_REJECT_PERMANENT = (0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason given
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit exceeded

# Threads writing and fsyncing temporary files while the C-STORE threads parse and hash.
_WRITER_THREADS = 8


@dataclass(frozen=True)
class StoredInstance:
    """One instance that is now on disk and in the index (handed to listeners)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    manufacturer: str | None
    manufacturer_model: str | None
    series_description: str | None
    series_number: int | None
    image_type: tuple[str, ...]
    calling_ae: str
    path: Path
    replaced: bool
    """True when it replaced an earlier, different copy of the same SOP Instance UID."""
    header: InstanceHeader | None = None
    """The header as the handler parsed it (the index keeps the same, ``instance.header``)."""


class IngestListener(Protocol):
    """Something that follows arrivals (completion timers, statistics) without touching the SCP.

    Both methods run on the dispatcher thread, after the index commit, in arrival order;
    an exception is logged and does not reach the sender.
    """

    def instance_stored(self, info: StoredInstance) -> None:
        """An instance was stored and indexed (identical duplicates are not reported)."""
        ...

    def association_released(self, series_uids: set[str]) -> None:
        """A sender released its association normally after storing into these series."""
        ...


class ListenerDispatcher:
    """Calls listeners on one background thread, in order, off the C-STORE path."""

    def __init__(self, listeners: Iterable[IngestListener] = ()) -> None:
        self.listeners: list[IngestListener] = list(listeners)
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fpenode-listeners", daemon=True)
        self._thread.start()

    def instance_stored(self, info: StoredInstance) -> None:
        """Queue an ``instance_stored`` call to every listener."""
        for listener in self.listeners:
            self._queue.put(functools.partial(listener.instance_stored, info))

    def association_released(self, series_uids: set[str]) -> None:
        """Queue an ``association_released`` call to every listener."""
        for listener in self.listeners:
            self._queue.put(functools.partial(listener.association_released, set(series_uids)))

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued call has run (bounded)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout_s: float = 30.0) -> None:
        """Run what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            try:
                if call is None:
                    return
                call()
            except Exception:
                log.exception("ingest listener failed")
            finally:
                self._queue.task_done()


@dataclass
class AssociationState:
    """What one association did: its peer, the series it stored into, per study what it carried."""

    peer: PeerInfo | None
    calling_ae: str = ""
    called_ae: str = ""
    address: str = ""
    series_uids: set[str] = field(default_factory=set)
    studies: dict[str, StudyTally] = field(default_factory=dict)
    """Per Study Instance UID: SOP classes and counts, new / replaced / duplicates (audit)."""


class AssociationTracker:
    """Per-association state: the accepted peer, the series it stored into, what it stored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[int, AssociationState] = {}
        self.accepted = 0
        """Associations accepted since start (``/metrics``)."""

    def open(self, assoc: Association, peer: PeerInfo | None) -> None:
        """Remember an accepted association's peer and its requestor."""
        primitive = assoc.requestor.primitive
        state = AssociationState(
            peer,
            calling_ae=str(getattr(primitive, "calling_ae_title", assoc.requestor.ae_title)).strip(),
            called_ae=str(getattr(primitive, "called_ae_title", assoc.acceptor.ae_title)).strip(),
            address=str(assoc.requestor.address),
        )
        with self._lock:
            self._states[id(assoc)] = state
            self.accepted += 1

    def peer(self, assoc: Association) -> PeerInfo | None:
        """The peer of an association (None if unknown)."""
        with self._lock:
            state = self._states.get(id(assoc))
            return None if state is None else state.peer

    def add_series(self, assoc: Association, series_uid: str) -> None:
        """Note that an association stored into a series."""
        with self._lock:
            state = self._states.setdefault(id(assoc), AssociationState(None))
            state.series_uids.add(series_uid)

    def note_instance(self, assoc: Association, header: InstanceHeader, outcome: str) -> None:
        """Count an instance the association stored: ``outcome`` is new, replaced or duplicate."""
        with self._lock:
            state = self._states.setdefault(id(assoc), AssociationState(None))
            tally = state.studies.get(header.study_uid)
            if tally is None:
                tally = state.studies[header.study_uid] = StudyTally(
                    patient_tag(header.patient_id, header.issuer_of_patient_id)
                )
            tally.sop_classes[header.sop_class_uid] += 1
            if outcome == "replaced":
                tally.replaced += 1
            elif outcome == "duplicate":
                tally.duplicates += 1
            else:
                tally.new += 1

    def close(self, assoc: Association) -> AssociationState:
        """Forget an association; returns what it did (empty when it was not tracked)."""
        with self._lock:
            state = self._states.pop(id(assoc), None)
        return AssociationState(None) if state is None else state


class _UIDLocks:
    """Striped locks serialising work on one SOP Instance UID (duplicate rule)."""

    def __init__(self, stripes: int = 256) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def for_uid(self, uid: str) -> threading.Lock:
        return self._locks[hash(uid) % len(self._locks)]


@dataclass
class _PublishState:
    """What one store did to the files, so a failed commit can be undone."""

    published: bool = False
    previous_path: str | None = None
    keys: repository.IndexKeys | None = None
    """Study and series keys the row was written under (remembered once committed)."""


class StoreError(Exception):
    """A known reason to refuse a C-STORE; ``status`` is answered."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class Ingest:
    """Everything a C-STORE needs: files, index, disk guard, listeners, association state."""

    def __init__(
        self,
        *,
        files: FileStore,
        session_factory: sessionmaker[Session],
        disk_guard: DiskGuard,
        dispatcher: ListenerDispatcher,
        tracker: AssociationTracker,
    ) -> None:
        self.files = files
        self.session_factory = session_factory
        self.disk_guard = disk_guard
        self.dispatcher = dispatcher
        self.tracker = tracker
        self.draining = False
        self._locks = _UIDLocks()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=_WRITER_THREADS, thread_name_prefix="fpenode-write")
        self._keys = repository.KeyCache()
        self._statuses: Counter[str] = Counter()
        self._statuses_lock = threading.Lock()

    def count_status(self, status: int) -> None:
        """Count one answered C-STORE by its status (``/metrics``)."""
        name = Status(status).name.lower() if status in Status._value2member_map_ else f"0x{status:04x}"
        with self._statuses_lock:
            self._statuses[name] += 1

    @property
    def statuses(self) -> Counter[str]:
        """C-STOREs answered since start, by status name (``success``, ``out_of_resources``, ...)."""
        with self._statuses_lock:
            return Counter(self._statuses)

    def close(self) -> None:
        """Stop the file-writing threads (after the last C-STORE has been answered)."""
        self._writer.shutdown(wait=True)

    @property
    def in_flight(self) -> int:
        """C-STOREs being handled right now."""
        return self._in_flight

    def store(self, event: Event) -> Status:
        """Handle one C-STORE request (PS3.4 B.2.2): durable file, index row, then status."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._store(event)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _store(self, event: Event) -> Status:
        assoc = event.assoc
        peer = self.tracker.peer(assoc)
        if peer is not None and ROLE_SOURCE not in peer.roles:
            log.warning("C-STORE refused: peer %s is not a source", peer.name)
            return Status.NOT_AUTHORIZED
        if self.draining:
            return Status.OUT_OF_RESOURCES
        calling_ae = assoc.requestor.ae_title.strip()
        request = cast(C_STORE, event.request)
        if request.DataSet is None:
            raise StoreError(Status.CANNOT_UNDERSTAND, "C-STORE request without a data set")
        dataset_bytes = request.DataSet.getvalue()
        if not self.disk_guard.has_room(len(dataset_bytes)):
            log.warning("C-STORE refused: disk above its watermark (%d bytes offered)", len(dataset_bytes))
            return Status.OUT_OF_RESOURCES
        transfer_syntax = str(event.context.transfer_syntax)
        # The file is written and fsynced on a writer thread while this one parses and hashes
        # (both release the GIL for most of their time); its meta header is built from the
        # command's UIDs, which the data set's must equal or the store is refused.
        meta = file_meta_bytes(
            str(request.AffectedSOPClassUID).strip(), str(request.AffectedSOPInstanceUID).strip(), transfer_syntax, calling_ae
        )
        pending = self._writer.submit(self.files.write_temp, (meta, dataset_bytes))
        try:
            # The whole data set is checked before anything else reads it (dicom_node.validation).
            check_dataset(dataset_bytes, transfer_syntax, str(request.AffectedSOPClassUID).strip())
            header = parse_header(dataset_bytes, transfer_syntax)
            self._check_matches_command(event, header)
            digest = dataset_digest(dataset_bytes)
            tmp_path = pending.result()
        except BaseException:
            self._discard_written(pending)
            raise
        size = len(meta) + len(dataset_bytes)
        stored = self._persist(header, tmp_path, size, digest, transfer_syntax, calling_ae)
        outcome = "duplicate" if stored is None else "replaced" if stored.replaced else "new"
        self.tracker.note_instance(assoc, header, outcome)
        if stored is not None:
            self.tracker.add_series(assoc, header.series_uid)
            self.dispatcher.instance_stored(stored)
        return Status.SUCCESS

    def _discard_written(self, pending: Future[Path]) -> None:
        """Wait for the write of a refused store to end, then remove its temporary file."""
        if pending.exception() is None:  # waits; a failed write removed its file itself
            self.files.discard(pending.result())

    def _index_then_publish(
        self, session: Session, header: InstanceHeader, facts: FileFacts, tmp_path: Path, state: _PublishState
    ) -> RecordOutcome | None:
        """Inside the write transaction: duplicate rule, row, then rename into place."""
        existing = repository.stored_copy(session, header.sop_instance_uid)
        if existing is not None and existing.sha256 == facts.sha256 and self.files.absolute(existing.path).is_file():
            return None
        state.previous_path = None if existing is None else existing.path
        outcome = repository.record_instance(session, header, facts, existing, self._keys.get(header.series_uid))
        state.keys = repository.resolved_keys(session)
        self.files.publish(tmp_path, facts.path, sync=False)
        state.published = True
        return outcome

    @staticmethod
    def _check_matches_command(event: Event, header: InstanceHeader) -> None:
        """The data set's SOP Class/Instance UIDs must be the command's (PS3.4 B.2.3, 0xA900)."""
        request = cast(C_STORE, event.request)
        if header.sop_class_uid != str(request.AffectedSOPClassUID).strip():
            raise StoreError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the command's")
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID).strip():
            raise StoreError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from the command's")

    def _persist(
        self,
        header: InstanceHeader,
        tmp_path: Path,
        size_bytes: int,
        digest: str,
        transfer_syntax: str,
        calling_ae: str,
    ) -> StoredInstance | None:
        """Apply the duplicate rule to the fsynced temporary file ``tmp_path``, index and publish.

        Returns ``None`` for an identical duplicate.

        Order: temporary file fsynced (by the caller, before this runs); then, in one index
        transaction holding the instance's lock, the row is written and the file renamed to its
        final name before the commit; then its folder is fsynced. A crash at any point leaves no acknowledged instance
        without its file or row (a row whose rename was lost is repaired by the duplicate
        rule when the unacknowledged sender sends again).
        """
        relative = self.files.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        facts = FileFacts(
            path=relative,
            size_bytes=size_bytes,
            sha256=digest,
            transfer_syntax_uid=transfer_syntax,
            calling_ae=calling_ae,
            received_at=repository.record_received_at(),
        )
        state = _PublishState()
        try:
            with self._locks.for_uid(header.sop_instance_uid):
                outcome = run_write(
                    self.session_factory, lambda session: self._index_then_publish(session, header, facts, tmp_path, state)
                )
        except BaseException:
            if state.published and state.previous_path != relative:
                self.files.remove(relative)
            raise
        finally:
            self.files.discard(tmp_path)
        if state.keys is not None:
            self._keys.remember(state.keys)
        if outcome is None:
            log.info("instance %s received again, identical: kept the stored copy", header.sop_instance_uid)
            return None
        self.files.sync_folder(relative)  # after the commit: see FileStore.publish
        if state.previous_path is not None and state.previous_path != relative:
            self.files.remove(state.previous_path)
        final = self.files.absolute(relative)
        if outcome is RecordOutcome.REPLACED:
            log.warning(
                "instance %s received again with different content: kept the newest (series %s)",
                header.sop_instance_uid,
                header.series_uid,
            )
        return StoredInstance(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=transfer_syntax,
            modality=header.modality or None,
            manufacturer=header.manufacturer or None,
            manufacturer_model=header.manufacturer_model or None,
            series_description=header.series_description or None,
            series_number=header.series_number,
            image_type=header.image_type,
            calling_ae=calling_ae,
            path=final,
            replaced=outcome is RecordOutcome.REPLACED,
            header=replace(header, path=final),
        )


# -- event handlers (dependencies passed as extra arguments) ------------------------------
def handle_store(event: Event, ingest: Ingest) -> int:
    """EVT_C_STORE: answer only once the instance is on disk and indexed; the status is counted."""
    status = _store_status(event, ingest)
    ingest.count_status(status)
    return status


def _store_status(event: Event, ingest: Ingest) -> int:
    """The status of one C-STORE: refusals named by their code, unexpected errors logged (0xC211)."""
    try:
        return int(ingest.store(event))
    except (StoreError, HeaderError) as exc:
        log.warning(
            "C-STORE of %s refused with 0x%04X: %s",
            str(getattr(event.request, "AffectedSOPInstanceUID", "?")),
            exc.status,
            exc,
        )
        return int(exc.status)
    except DiskFullError:
        log.error("C-STORE refused: the data directory's filesystem is full")
        return int(Status.OUT_OF_RESOURCES)
    except Exception:
        log.exception("unexpected error handling a C-STORE; answered 0x%04X", Status.UNEXPECTED_ERROR)
        return int(Status.UNEXPECTED_ERROR)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification (PS3.4 Annex A) always succeeds on an accepted association."""
    return int(Status.SUCCESS)


def handle_association_request(
    event: Event, registry: PeerRegistry, tracker: AssociationTracker, settings: NetworkSettings, door: FrontDoor
) -> None:
    """EVT_REQUESTED: refuse a wrong called AE title, an unknown calling AE title (or a known one
    from the wrong host), a peer that must use TLS arriving on the plain port, and a request over
    the association limits; then add contexts for unknown storage SOP classes.

    Every refusal is counted and logged with its reason (:class:`dicom_node.transport.RefusalLog`).
    Fails closed: if the registry cannot be read the request is rejected (transient).
    """
    assoc = event.assoc
    primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
    calling_ae = str(primitive.calling_ae_title).strip()
    called_ae = str(primitive.called_ae_title).strip()
    address = str(assoc.requestor.address)
    if called_ae != settings.ae_title.strip():
        door.refusals.record(Refusal.CALLED_AE, address, f"association from AE {calling_ae!r} called {called_ae!r}, not this node")
        _reject(assoc, _REJECT_CALLED_AE)
        return
    try:
        decision = registry.authorize(calling_ae, address, check_host=settings.check_calling_host)
    except Exception:
        log.exception("peer registry unavailable")
        door.refusals.record(Refusal.REGISTRY_UNAVAILABLE, address, f"association from AE {calling_ae!r} rejected")
        _reject(assoc, _REJECT_TRANSIENT)
        return
    if not decision.accepted:
        door.refusals.record(Refusal.CALLING_AE, address, f"association from AE {calling_ae!r} rejected: {decision.reason}")
        _reject(assoc, _REJECT_CALLING_AE)
        return
    connection = cast(Connection | None, getattr(assoc, "connection", None))
    if decision.peer is not None and decision.peer.tls and (connection is None or not connection.tls):
        door.refusals.record(
            Refusal.TLS_REQUIRED, address,
            f"association from AE {calling_ae!r} rejected: peer {decision.peer.name} must use TLS (network.tls.port)",
        )
        _reject(assoc, _REJECT_PERMANENT)
        return
    if connection is not None:
        peer_key = decision.peer.name if decision.peer is not None else calling_ae
        refusal = door.admit_association(connection, peer_key)
        if refusal is not None:
            door.refusals.record(refusal[0], address, f"association from AE {calling_ae!r} rejected: {refusal[1]}")
            _reject(assoc, _REJECT_LOCAL_LIMIT)
            return
    tracker.open(assoc, decision.peer)
    add_unknown_storage_contexts(assoc, accept=settings.accept_unknown_storage, door=door)


def add_unknown_storage_contexts(assoc: Association, *, accept: bool, door: FrontDoor) -> None:
    """Support, for this association only, the unknown storage SOP classes its requestor proposes.

    Private and unlisted standard storage classes (:func:`dicom_node.sop_classes.is_unknown_storage_class`)
    get the node's transfer syntaxes, so the instance is stored as received; with ``accept``
    False they stay unsupported (rejected, abstract syntax not supported) and the refusal is logged.
    """
    primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
    supported = list(assoc.acceptor.supported_contexts)
    known = {str(context.abstract_syntax) for context in supported}
    added = False
    for proposed in primitive.presentation_context_definition_list:
        uid = str(proposed.abstract_syntax)
        if uid in known or not is_unknown_storage_class(uid):
            continue
        known.add(uid)
        if not accept:
            door.refusals.record(
                Refusal.UNKNOWN_SOP_CLASS, str(assoc.requestor.address), f"context for unknown SOP class {uid} rejected (accept_unknown_storage off)"
            )
            continue
        supported.append(build_context(uid, list(TRANSFER_SYNTAXES)))
        added = True
    if added:
        assoc.acceptor.supported_contexts = supported


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    """Send A-ASSOCIATE-RJ and wait until it has left (as pynetdicom does for its own rejections)."""
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def handle_released(
    event: Event, tracker: AssociationTracker, dispatcher: ListenerDispatcher, sessions: sessionmaker[Session]
) -> None:
    """EVT_RELEASED: tell listeners which series the sender finished with; audit what it stored."""
    state = tracker.close(event.assoc)
    if state.series_uids:
        dispatcher.association_released(state.series_uids)
    audit_association(sessions, state, aborted=False)


def handle_closed(event: Event, tracker: AssociationTracker, sessions: sessionmaker[Session]) -> None:
    """EVT_ABORTED / EVT_CONN_CLOSE: forget the association (an abort does not shorten waits).

    Instances it stored before the abort are acknowledged and kept, so they are audited too
    (outcome ``aborted``); after a release the tracker no longer holds the association.
    """
    state = tracker.close(event.assoc)
    audit_association(sessions, state, aborted=True)


def audit_association(sessions: sessionmaker[Session], state: AssociationState, *, aborted: bool) -> None:
    """Write the ``dicom.instances_received`` row of an association that stored instances.

    One row per association (:mod:`dicom_node.audit`); a failed write is logged, never raised
    into the network thread.
    """
    if not state.studies:
        return
    detail = instances_received_detail(
        calling_ae=state.calling_ae,
        called_ae=state.called_ae,
        address=state.address,
        peer=None if state.peer is None else state.peer.name,
        studies=state.studies,
        aborted=aborted,
    )
    audit_record(sessions, actor=f"{state.calling_ae}@{state.address}", action=INSTANCES_RECEIVED, detail=detail)


def build_ae(settings: NetworkSettings) -> AE:
    """The Application Entity: Verification and every Storage SOP class, all transfer syntaxes."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    # The front door (dicom_node.transport) counts association slots; pynetdicom counts every
    # acceptor thread, pending connections included, so its own limit is only a backstop.
    ae.maximum_associations = min(4 * (settings.max_associations + settings.max_pending_connections), 10_000)
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), list(TRANSFER_SYNTAXES))
    return ae


class StorageSCP:
    """The running listener: an AE, its server thread and the ingest path."""

    def __init__(
        self,
        settings: NetworkSettings,
        *,
        ingest: Ingest,
        registry: PeerRegistry,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.registry = registry
        self.tls_context = tls_context
        """With a context the TLS listener runs on ``network.tls.port`` (:func:`dicom_node.tls.server_context`)."""
        self.ae = build_ae(settings)
        self.door = FrontDoor(settings)
        self._server: NodeAssociationServer | None = None
        self._tls_server: NodeAssociationServer | None = None

    @property
    def refusals(self) -> Counter[str]:
        """Connections, associations and messages refused so far, by reason (live counter)."""
        return self.door.counts

    def handlers(self) -> list[Any]:
        """pynetdicom event bindings, dependencies passed as extra arguments."""
        tracker = self.ingest.tracker
        sessions = self.ingest.session_factory
        return [
            (evt.EVT_REQUESTED, handle_association_request, [self.registry, tracker, self.settings, self.door]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingest]),
            (evt.EVT_RELEASED, handle_released, [tracker, self.ingest.dispatcher, sessions]),
            (evt.EVT_ABORTED, handle_closed, [tracker, sessions]),
            (evt.EVT_CONN_CLOSE, handle_closed, [tracker, sessions]),
        ]

    def start(self, host: str | None = None, port: int | None = None, tls_port: int | None = None) -> tuple[str, int]:
        """Start listening in background threads (port 0: any free).

        The plain listener runs unless ``network.tls.plain_listener`` is off with TLS on; the TLS
        listener runs on ``tls_port`` (default ``network.tls.port``) when there is a TLS context.
        Both share one front door, so the association limits count them together.

        Returns the plain listener's bound address, or the TLS listener's when it is the only one.
        """
        bind_host = host or self.settings.host
        if self.tls_context is None or self.settings.tls.plain_listener:
            self._server = self._listen((bind_host, self.settings.port if port is None else port), None)
        if self.tls_context is not None:
            tls_address = (bind_host, self.settings.tls.port if tls_port is None else tls_port)
            self._tls_server = self._listen(tls_address, self.tls_context)
        return self.address if self._server is not None else self.tls_address

    def _listen(self, address: tuple[str, int], tls_context: ssl.SSLContext | None) -> NodeAssociationServer:
        server = cast(
            NodeAssociationServer,
            self.ae.make_server(
                address, evt_handlers=self.handlers(), server_class=NodeAssociationServer, door=self.door, tls_context=tls_context
            ),
        )
        # As AE.start_server(block=False), with the node's server class.
        name = "fpenode-acceptor" if tls_context is None else "fpenode-acceptor-tls"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        self.ae._servers.append(server)
        bound = server.server_address
        over = "" if tls_context is None else " over TLS"
        log.info("listening as %s%s on %s:%d", self.settings.ae_title, over, bound[0], bound[1])
        return server

    @property
    def listening(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        """The plain listener's bound (host, port)."""
        if self._server is None:
            raise RuntimeError("the plain listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int]:
        """The TLS listener's bound (host, port)."""
        if self._tls_server is None:
            raise RuntimeError("the TLS listener is not started")
        host, port = self._tls_server.server_address[:2]
        return str(host), int(port)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let in-flight stores finish, then close remaining associations.

        Open associations get ``grace_s`` to end on their own; after that new C-STOREs are
        refused (0xA700), stores being handled finish, and the rest are aborted.
        """
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        if not servers:
            return
        for server in servers:
            server.shutdown()
        self._wait(lambda: not self._server_associations(), grace_s)
        self.ingest.draining = True
        self._wait(lambda: self.ingest.in_flight == 0, 60.0)
        self.ae.shutdown()
        self.ingest.close()
        self.ingest.dispatcher.drain()
        self._server = self._tls_server = None
        log.info("stopped")

    def _server_associations(self) -> Sequence[Association]:
        return [assoc for assoc in self.ae.active_associations if assoc.is_acceptor]

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
