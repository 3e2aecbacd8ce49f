"""Units of work on the index used by the SCP and the command line.

Recording an instance is one transaction: patient, study and series are found or created,
the instance row inserted or updated by the duplicate rule, counters and receive times moved
on. The rule for a SOP Instance UID already in the index (see docs/conformance.md):

* identical data set bytes (same SHA-256): success, nothing written, no second row;
* different bytes: the newest wins; the file is replaced atomically and the row updated;

never a crash and never a second row. The SCP serialises stores of one SOP Instance UID
in-process; concurrent creation of the same study or series by two associations is resolved
by retrying the transaction after a unique-constraint conflict
(:func:`dicom_node.index.db.run_write`).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, CursorResult, Result, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from dicom_node.index.base import utcnow
from dicom_node.index.models import STATE_RECEIVED, Instance, Patient, Series, Study, StudyEvent
from inference.dicom_headers import InstanceHeader, header_to_json

log = logging.getLogger(__name__)

class RecordOutcome(enum.Enum):
    """What recording an instance did to the index."""

    NEW = "new"
    REPLACED = "replaced"


@dataclass(frozen=True)
class StoredCopy:
    """What the index knows of an instance already received."""

    sha256: str
    path: str
    instance_pk: int
    series_pk: int


@dataclass(frozen=True)
class FileFacts:
    """Facts about the file written for an instance."""

    path: str
    size_bytes: int
    sha256: str
    transfer_syntax_uid: str
    calling_ae: str | None
    received_at: dt.datetime


def stored_copy(session: Session, sop_instance_uid: str) -> StoredCopy | None:
    """The digest and path of an instance already in the index, or ``None``."""
    row = session.connection().execute(_SELECT_COPY, {"b_uid": sop_instance_uid}).first()
    if row is None:
        return None
    return StoredCopy(sha256=row.sha256, path=row.path, instance_pk=row.id, series_pk=row.series_pk)


@dataclass(frozen=True)
class IndexKeys:
    """Primary keys an instance was recorded under, remembered to skip two look-ups next time."""

    study_uid: str
    study_pk: int
    modalities: str
    series_uid: str
    series_pk: int


class KeyCache:
    """Study and series keys of recent instances, by Series Instance UID (bounded, thread-safe).

    Only a hint: :func:`record_instance` checks it with the UPDATEs it runs anyway (their
    WHERE clauses repeat the UIDs, the study's modalities and the series' study), and falls
    back to the look-ups when a row changed or went (a study deleted, a series moved). Keys
    are remembered only after their transaction committed (:meth:`remember`).
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._keys: dict[str, IndexKeys] = {}
        self._lock = threading.Lock()

    def get(self, series_uid: str) -> IndexKeys | None:
        """The keys last committed for ``series_uid``, if remembered."""
        with self._lock:
            return self._keys.get(series_uid)

    def remember(self, keys: IndexKeys) -> None:
        """Remember committed keys (the cache starts afresh when full)."""
        with self._lock:
            if len(self._keys) >= self._capacity and keys.series_uid not in self._keys:
                self._keys.clear()
            self._keys[keys.series_uid] = keys


_RESOLVED = "fpenode_index_keys"


def resolved_keys(session: Session) -> IndexKeys | None:
    """The keys :func:`record_instance` last used in ``session`` (remember them after commit)."""
    keys = session.info.get(_RESOLVED)
    return keys if isinstance(keys, IndexKeys) else None


def record_instance(
    session: Session,
    header: InstanceHeader,
    facts: FileFacts,
    existing: StoredCopy | None = None,
    known: IndexKeys | None = None,
) -> RecordOutcome:
    """Index one stored instance in ``session`` (insert, or update by the duplicate rule).

    Creates patient, study (with its first timeline event, ``received``) and series as needed,
    so a unique-constraint conflict surfaces here; the caller commits (see
    :func:`dicom_node.index.db.run_write`, which retries such conflicts). ``existing`` is the
    result of :func:`stored_copy` when the caller already looked it up in this transaction;
    ``known`` the keys a :class:`KeyCache` holds for the instance's series (checked here).
    The keys used are left for :func:`resolved_keys`.

    The common case (a known series) is a handful of Core statements: this runs once per
    received instance, while the sender waits for its C-STORE response.
    """
    if existing is None:
        existing = stored_copy(session, header.sop_instance_uid)
    connection = session.connection()
    keys = _touch_known(connection, header, facts, existing, known)
    if keys is None:
        study_pk, modalities = _study_key(session, header, facts)
        series_pk = _series_key(session, study_pk, header, facts)
        merged = _merge_modalities(modalities, header.modality)
        connection.execute(
            _UPDATE_STUDY,
            {"b_id": study_pk, "last_received_at": facts.received_at, "calling_ae": facts.calling_ae, "modalities": merged},
        )
        keys = IndexKeys(header.study_uid, study_pk, merged, header.series_uid, series_pk)
        if not _count_into_series(connection, keys, existing, facts):
            raise RuntimeError(f"series {header.series_uid} vanished while recording an instance")
    values = {
        "series_pk": keys.series_pk,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": facts.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": facts.path,
        "size_bytes": facts.size_bytes,
        "sha256": facts.sha256,
        "received_at": facts.received_at,
        "calling_ae": facts.calling_ae,
        "quarantine_reason": None,  # a new copy gets its own later check
        "header": header_to_json(header),  # parsed once, at the door: completion and the worker read it here
    }
    session.info[_RESOLVED] = keys
    if existing is None:
        connection.execute(_INSERT_INSTANCE, {"sop_instance_uid": header.sop_instance_uid, **values})
        return RecordOutcome.NEW
    connection.execute(_UPDATE_INSTANCE, {"b_id": existing.instance_pk, **values})
    if existing.series_pk != keys.series_pk:
        connection.execute(_UNCOUNT_FROM_SERIES, {"b_id": existing.series_pk})
    return RecordOutcome.REPLACED


def _touch_known(
    connection: Connection, header: InstanceHeader, facts: FileFacts, existing: StoredCopy | None, known: IndexKeys | None
) -> IndexKeys | None:
    """With cached keys: move the study's and series' receive times and count; ``None`` if stale.

    Nothing needs undoing when the keys turn out stale: the study UPDATE sets the same values
    the look-up path sets again.
    """
    if known is None or known.study_uid != header.study_uid or known.series_uid != header.series_uid:
        return None
    if header.modality and header.modality not in known.modalities.split("\\"):
        return None  # the study's modalities change: read them afresh
    touched = _rowcount(connection.execute(
        _TOUCH_STUDY,
        {"b_id": known.study_pk, "b_uid": known.study_uid, "b_modalities": known.modalities,
         "last_received_at": facts.received_at, "calling_ae": facts.calling_ae},
    ))
    if touched != 1 or not _count_into_series(connection, known, existing, facts):
        return None
    return known


def _count_into_series(connection: Connection, keys: IndexKeys, existing: StoredCopy | None, facts: FileFacts) -> bool:
    """Count the instance into its series (unless it was already there); False if no such row."""
    delta = 1 if existing is None or existing.series_pk != keys.series_pk else 0
    changed = _rowcount(connection.execute(
        _COUNT_INTO_SERIES,
        {"b_id": keys.series_pk, "b_uid": keys.series_uid, "b_study": keys.study_pk, "b_delta": delta,
         "b_at": facts.received_at},
    ))
    return changed == 1


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


# Statements of the hot path, built once (Core, no ORM unit of work).
_INSTANCE = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_STUDY = cast(Table, Study.__table__)
_SELECT_COPY = select(_INSTANCE.c.sha256, _INSTANCE.c.path, _INSTANCE.c.id, _INSTANCE.c.series_pk).where(
    _INSTANCE.c.sop_instance_uid == bindparam("b_uid")
)
_SELECT_STUDY = select(_STUDY.c.id, _STUDY.c.modalities).where(_STUDY.c.study_uid == bindparam("b_uid"))
_SELECT_SERIES = select(_SERIES.c.id, _SERIES.c.study_pk).where(_SERIES.c.series_uid == bindparam("b_uid"))
_INSERT_INSTANCE = insert(_INSTANCE)
_UPDATE_INSTANCE = update(_INSTANCE).where(_INSTANCE.c.id == bindparam("b_id"))
_COUNT_INTO_SERIES = (
    update(_SERIES)
    .where(
        _SERIES.c.id == bindparam("b_id"),
        _SERIES.c.series_uid == bindparam("b_uid"),
        _SERIES.c.study_pk == bindparam("b_study"),
    )
    .values(instance_count=_SERIES.c.instance_count + bindparam("b_delta"), last_received_at=bindparam("b_at"))
)
_UNCOUNT_FROM_SERIES = (
    update(_SERIES).where(_SERIES.c.id == bindparam("b_id")).values(instance_count=_SERIES.c.instance_count - 1)
)
_UPDATE_STUDY = update(_STUDY).where(_STUDY.c.id == bindparam("b_id"))
_TOUCH_STUDY = update(_STUDY).where(
    _STUDY.c.id == bindparam("b_id"),
    _STUDY.c.study_uid == bindparam("b_uid"),
    _STUDY.c.modalities == bindparam("b_modalities"),
)
_MOVE_SERIES = update(_SERIES).where(_SERIES.c.id == bindparam("b_id")).values(study_pk=bindparam("b_study"))


def _study_key(session: Session, header: InstanceHeader, facts: FileFacts) -> tuple[int, str]:
    """(primary key, modalities) of the instance's study, created when new."""
    row = session.connection().execute(_SELECT_STUDY, {"b_uid": header.study_uid}).first()
    if row is not None:
        return int(row.id), str(row.modalities)
    study = _create_study(session, header, facts)
    return study.id, study.modalities


def _series_key(session: Session, study_pk: int, header: InstanceHeader, facts: FileFacts) -> int:
    """Primary key of the instance's series, created when new (moved if its study changed)."""
    row = session.connection().execute(_SELECT_SERIES, {"b_uid": header.series_uid}).first()
    if row is None:
        study = session.get_one(Study, study_pk)
        return _create_series(session, study, header, facts).id
    if row.study_pk != study_pk:
        log.warning("series %s moved to study %s by a later instance", header.series_uid, header.study_uid)
        session.connection().execute(_MOVE_SERIES, {"b_id": row.id, "b_study": study_pk})
    return int(row.id)


def _create_study(session: Session, header: InstanceHeader, facts: FileFacts) -> Study:
    study = Study(
        study_uid=header.study_uid,
        patient=_get_or_create_patient(session, header),
        acquired_at=header.study_datetime,
        accession=_cut(_given(header.accession), 16),
        description=_cut(_given(header.study_description), 64),
        modalities="",
        state=STATE_RECEIVED,
        first_received_at=facts.received_at,
        last_received_at=facts.received_at,
        calling_ae=facts.calling_ae,
    )
    session.add(study)
    session.add(StudyEvent(study=study, at=facts.received_at, state=STATE_RECEIVED, detail=None))
    session.flush()
    return study


def _get_or_create_patient(session: Session, header: InstanceHeader) -> Patient:
    patient_id = _cut(header.patient_id, 64) or ""
    issuer = _cut(header.issuer_of_patient_id, 64) or ""
    patient = session.scalar(select(Patient).where(Patient.patient_id == patient_id, Patient.issuer == issuer))
    if patient is None:
        patient = Patient(patient_id=patient_id, issuer=issuer)
        session.add(patient)
        session.flush()
    return patient


def _create_series(session: Session, study: Study, header: InstanceHeader, facts: FileFacts) -> Series:
    series = Series(
        series_uid=header.series_uid,
        study=study,
        modality=_cut(_given(header.modality), 16),
        description=_cut(_given(header.series_description), 64),
        number=header.series_number,
        manufacturer=_cut(_given(header.manufacturer), 64),
        image_type=_cut("\\".join(header.image_type), 160),
        body_part=_cut(_given(header.body_part), 16),
        frame_of_reference_uid=_cut(_given(header.frame_of_reference_uid), 64),
        instance_count=0,
        last_received_at=facts.received_at,
    )
    session.add(series)
    session.flush()
    return series


def _merge_modalities(current: str, modality: str | None) -> str:
    """Add a modality to the sorted backslash-separated list (at most 64 characters)."""
    if not modality:
        return current
    merged = sorted({m for m in current.split("\\") if m} | {modality})
    return _cut("\\".join(merged), 64) or ""


def _given(value: str) -> str | None:
    """A header value as the index keeps it: ``None`` when the attribute was absent or empty."""
    return value or None


def _cut(value: str | None, length: int) -> str | None:
    """Trim a value to its column's length (tolerant reader: over-long vendor values)."""
    return None if value is None else value[:length]


def record_received_at() -> dt.datetime:
    """The receive timestamp for a new instance (UTC)."""
    return utcnow()
