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
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.index.base import utcnow
from dicom_node.index.models import STATE_RECEIVED, Instance, Patient, Series, Study, StudyEvent
from dicom_node.storage import InstanceHeader

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
    row = session.execute(
        select(Instance.sha256, Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return None if row is None else StoredCopy(sha256=row.sha256, path=row.path)


def record_instance(session: Session, header: InstanceHeader, facts: FileFacts) -> RecordOutcome:
    """Index one stored instance in ``session`` (insert, or update by the duplicate rule).

    Creates patient, study (with its first timeline event, ``received``) and series as needed
    and flushes, so a unique-constraint conflict surfaces here; the caller commits (see
    :func:`dicom_node.index.db.run_write`, which retries such conflicts).
    """
    return _record(session, header, facts)


def _record(session: Session, header: InstanceHeader, facts: FileFacts) -> RecordOutcome:
    study = _get_or_create_study(session, header, facts)
    series = _get_or_create_series(session, study, header, facts)
    instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid))
    outcome = RecordOutcome.NEW
    if instance is None:
        instance = Instance(sop_instance_uid=header.sop_instance_uid, series=series)
        session.add(instance)
        series.instance_count += 1
    else:
        outcome = RecordOutcome.REPLACED
        if instance.series_pk != series.id:
            instance.series.instance_count -= 1
            instance.series = series
            series.instance_count += 1
    instance.sop_class_uid = header.sop_class_uid
    instance.transfer_syntax_uid = facts.transfer_syntax_uid
    instance.instance_number = header.instance_number
    instance.path = facts.path
    instance.size_bytes = facts.size_bytes
    instance.sha256 = facts.sha256
    instance.received_at = facts.received_at
    instance.calling_ae = facts.calling_ae
    series.last_received_at = facts.received_at
    study.last_received_at = facts.received_at
    study.calling_ae = facts.calling_ae
    study.modalities = _merge_modalities(study.modalities, header.modality)
    session.flush()
    return outcome


def _get_or_create_study(session: Session, header: InstanceHeader, facts: FileFacts) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == header.study_uid))
    if study is not None:
        return study
    study = Study(
        study_uid=header.study_uid,
        patient=_get_or_create_patient(session, header),
        acquired_at=header.acquired_at,
        accession=_cut(header.accession, 16),
        description=_cut(header.study_description, 64),
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


def _get_or_create_series(session: Session, study: Study, header: InstanceHeader, facts: FileFacts) -> Series:
    series = session.scalar(select(Series).where(Series.series_uid == header.series_uid))
    if series is not None:
        if series.study_pk != study.id:
            log.warning("series %s moved to study %s by a later instance", header.series_uid, header.study_uid)
            series.study = study
        return series
    series = Series(
        series_uid=header.series_uid,
        study=study,
        modality=_cut(header.modality, 16),
        description=_cut(header.series_description, 64),
        number=header.series_number,
        manufacturer=_cut(header.manufacturer, 64),
        image_type=_cut("\\".join(header.image_type), 160),
        body_part=_cut(header.body_part, 16),
        frame_of_reference_uid=_cut(header.frame_of_reference_uid, 64),
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


def _cut(value: str | None, length: int) -> str | None:
    """Trim a value to its column's length (tolerant reader: over-long vendor values)."""
    return None if value is None else value[:length]


def record_received_at() -> dt.datetime:
    """The receive timestamp for a new instance (UTC)."""
    return utcnow()
