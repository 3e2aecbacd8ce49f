"""Queries of the read model (:mod:`dicom_node.web.models`): one code path for ``fpe-node studies``,
the REST API and the console.

Each function takes an open session on the index (or the web context, for the dashboard, which
also looks at the disk and the running node) and returns detached pydantic models.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicom_node.index.analysis import Analysis
from dicom_node.index.base import utcnow
from dicom_node.index.jobs import AnalysisJob as JobRow
from dicom_node.index.models import AuditEntry, Instance, Patient, PeerAETitle, Series, Study, StudyEvent
from dicom_node.index.models import Peer as PeerRow
from dicom_node.index.outbox import OPEN_STATES, OutboxItem, OutboxState
from dicom_node.index.users import Suspension
from dicom_node.lifecycle import BUSY_STATES, FAILURE_STATES, StudyState, as_utc
from dicom_node.web.context import WebContext
from dicom_node.web.models import (
    AnalysisJob,
    AnalysisRun,
    AuditRecord,
    Dashboard,
    DeadLetter,
    Delivery,
    DiskUse,
    QuarantinedInstance,
    SeriesSummary,
    StudyDetail,
    StudySummary,
    TimelineEvent,
    WaitingStudy,
    WorkerStatus,
)

log = logging.getLogger(__name__)

S = TypeVar("S", bound=StudySummary)
_DAY = dt.timedelta(hours=24)
_WAITING_STATES = (StudyState.RECEIVED, StudyState.COMPLETE, StudyState.QUEUED, *BUSY_STATES)
_WHY_WAITING = {
    StudyState.RECEIVED: "receiving: waiting for its series to go quiet or the study timeout",
    StudyState.COMPLETE: "complete, about to be queued",
    StudyState.QUEUED: "queued for analysis",
    StudyState.ANALYSING: "being analysed",
    StudyState.REPORTING: "results being sent",
}


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else as_utc(value)


# -- studies ------------------------------------------------------------------------------------


def list_studies(
    session: Session,
    *,
    state: str | None = None,
    since: dt.datetime | None = None,
    sender: str | None = None,
    limit: int | None = 50,
    until: dt.datetime | None = None,
    study_uid: str | None = None,
) -> list[StudySummary]:
    """Studies, latest arrival first.

    Parameters
    ----------
    state
        Only studies in this life-cycle state.
    since, until
        Only studies whose latest instance arrived at or after ``since`` / before ``until``.
    sender
        Only studies sent by this peer (its name) or this calling AE title.
    limit
        At most this many (``None`` or 0: all).
    study_uid
        Only this study.
    """
    series_count = select(func.count(Series.id)).where(Series.study_pk == Study.id).correlate(Study).scalar_subquery()
    instance_count = (
        select(func.coalesce(func.sum(Series.instance_count), 0))
        .where(Series.study_pk == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    query = select(Study, series_count.label("series"), instance_count.label("instances")).order_by(
        Study.last_received_at.desc(), Study.id.desc()
    )
    if state:
        query = query.where(Study.state == state)
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    if until is not None:
        query = query.where(Study.last_received_at < until)
    if sender:
        titles = select(PeerAETitle.ae_title).join(PeerRow).where(PeerRow.name == sender)
        query = query.where(or_(Study.calling_ae == sender, Study.calling_ae.in_(titles)))
    if study_uid:
        query = query.where(Study.study_uid == study_uid)
    if limit:
        query = query.limit(limit)
    rows = session.execute(query).all()
    uids = [study.study_uid for study, _, _ in rows]
    dead = _dead_letters_by_study(session, uids)
    failures = _report_failures_by_study(session, uids)
    return [
        StudySummary(
            study_uid=study.study_uid,
            state=study.state,
            state_reason=study.state_reason,
            accession=study.accession,
            description=study.description,
            modalities=study.modalities,
            acquired_at=study.acquired_at,
            first_received_at=_utc(study.first_received_at),
            last_received_at=_utc(study.last_received_at),
            calling_ae=study.calling_ae,
            series=int(series),
            instances=int(instances),
            dead_letters=dead.get(study.study_uid, 0),
            report_failures=failures.get(study.study_uid, 0),
        )
        for study, series, instances in rows
    ]


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """One study with its series, timeline, analyses, jobs, deliveries, dead letters and
    quarantined instances; ``None`` when it is not in the index."""
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        return None
    (summary,) = list_studies(session, study_uid=study_uid, limit=None)
    series = session.scalars(select(Series).where(Series.study_pk == study.id).order_by(Series.number, Series.id))
    events = session.scalars(select(StudyEvent).where(StudyEvent.study_pk == study.id).order_by(StudyEvent.id))
    jobs = session.scalars(select(JobRow).where(JobRow.study_pk == study.id).order_by(JobRow.id))
    analyses = session.scalars(select(Analysis).where(Analysis.study_pk == study.id).order_by(Analysis.id))
    items = list(session.scalars(select(OutboxItem).where(OutboxItem.study_uid == study_uid).order_by(OutboxItem.id)))
    quarantined = session.execute(
        select(Instance.sop_instance_uid, Series.series_uid, Instance.quarantine_reason)
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk == study.id, Instance.quarantine_reason.is_not(None))
        .order_by(Instance.id)
    ).all()
    return StudyDetail(
        **summary.model_dump(),
        series_list=[
            SeriesSummary(
                series_uid=s.series_uid, number=s.number, modality=s.modality, description=s.description,
                manufacturer=s.manufacturer, instances=s.instance_count, last_received_at=_utc(s.last_received_at),
                complete_at=_utc(s.complete_at),
            )
            for s in series
        ],
        timeline=[TimelineEvent(at=as_utc(e.at), state=e.state, detail=e.detail) for e in events],
        jobs=[
            AnalysisJob(state=j.state, reason=j.reason, enqueued_at=_utc(j.enqueued_at), claimed_at=_utc(j.claimed_at),
                        attempts=j.attempts, outcome=j.outcome)
            for j in jobs
        ],
        analyses=[_analysis_run(a) for a in analyses],
        deliveries=[_delivery(item) for item in items],
        dead_letter_list=[_dead_letter(item, study.state) for item in items if item.state == OutboxState.DEAD.value],
        quarantined=[
            QuarantinedInstance(sop_instance_uid=sop_uid, series_uid=series_uid, reason=reason)
            for sop_uid, series_uid, reason in quarantined
        ],
    )


def fill_patient(session: Session, data_dir: Path, studies: Sequence[S]) -> list[S]:
    """The studies with ``patient_id`` (from the index) and ``patient_name`` (from the header of
    one stored instance: the index never holds names in clear) filled in.

    Only for callers allowed to see them (console and API users); never logged.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    filled = []
    for study in studies:
        row = session.execute(
            select(Patient.patient_id, Instance.path)
            .select_from(Study)
            .outerjoin(Patient, Patient.id == Study.patient_pk)
            .outerjoin(Series, Series.study_pk == Study.id)
            .outerjoin(Instance, Instance.series_pk == Series.id)
            .where(Study.study_uid == study.study_uid)
            .limit(1)
        ).first()
        patient_id, path = (None, None) if row is None else row
        name = None
        if path:
            try:
                header = dcmread(data_dir / path, stop_before_pixels=True, specific_tags=["PatientName"])
                name = str(header.get("PatientName", "")) or None
            except (OSError, InvalidDicomError):
                log.debug("study %s: no readable instance for the patient name", study.study_uid)
        filled.append(study.model_copy(update={"patient_id": patient_id or None, "patient_name": name}))
    return filled


def _analysis_run(row: Analysis) -> AnalysisRun:
    model = json.loads(row.summary or "{}").get("model") or {}  # result_summary's model (precision has no column)
    return AnalysisRun(
        at=as_utc(row.created_at), outcome=row.outcome, reason=row.reason, pipeline=row.pipeline, score=row.score,
        positive=row.positive, threshold=row.threshold, model_name=row.model_name, model_version=row.model_version,
        weights_sha256=row.weights_sha256, demonstration=row.demonstration, precision=model.get("precision"),
        timings=row.timings_dict(), warnings=row.warnings_list(),
    )


def _delivery(item: OutboxItem) -> Delivery:
    return Delivery(
        id=item.id, study_uid=item.study_uid, sop_instance_uid=item.sop_instance_uid, kind=item.kind,
        destination=item.destination, state=item.state, attempts=item.attempts, sop_class_uid=item.sop_class_uid,
        sent_sop_class_uid=item.sent_sop_class_uid, sent_sop_instance_uid=item.sent_sop_instance_uid,
        last_status=item.last_status, last_error=item.last_error, next_try_at=_utc(item.next_try_at),
        deadline_at=_utc(item.deadline_at), sent_at=_utc(item.sent_at),
    )


def _dead_letter(item: OutboxItem, study_state: str | None) -> DeadLetter:
    return DeadLetter(**_delivery(item).model_dump(), study_state=study_state, last_try_at=_utc(item.last_try_at))


def _dead_letters_by_study(session: Session, study_uids: Sequence[str]) -> dict[str, int]:
    if not study_uids:
        return {}
    rows = session.execute(
        select(OutboxItem.study_uid, func.count(OutboxItem.id))
        .where(OutboxItem.state == OutboxState.DEAD.value, OutboxItem.study_uid.in_(list(study_uids)))
        .group_by(OutboxItem.study_uid)
    )
    return {study_uid: int(count) for study_uid, count in rows}


def _report_failures_by_study(session: Session, study_uids: Sequence[str]) -> dict[str, int]:
    """Times each study went to ``report_failed`` (its timeline)."""
    if not study_uids:
        return {}
    rows = session.execute(
        select(Study.study_uid, func.count(StudyEvent.id))
        .join(StudyEvent, StudyEvent.study_pk == Study.id)
        .where(StudyEvent.state == StudyState.REPORT_FAILED.value, Study.study_uid.in_(list(study_uids)))
        .group_by(Study.study_uid)
    )
    return {study_uid: int(count) for study_uid, count in rows}


# -- dead letters, audit --------------------------------------------------------------------------


def dead_letters(session: Session) -> list[DeadLetter]:
    """Every dead-lettered result object, oldest first, with its study's state."""
    rows = session.execute(
        select(OutboxItem, Study.state)
        .outerjoin(Study, Study.study_uid == OutboxItem.study_uid)
        .where(OutboxItem.state == OutboxState.DEAD.value)
        .order_by(OutboxItem.id)
    ).all()
    return [_dead_letter(item, state) for item, state in rows]


def audit_trail(session: Session, limit: int = 100, *, action: str | None = None) -> list[AuditRecord]:
    """The newest audit entries first (optionally of one action)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEntry.action == action)
    return [
        AuditRecord(id=row.id, at=as_utc(row.at), actor=row.actor, action=row.action, source=row.source,
                    detail=_json_or_text(row.detail))
        for row in session.scalars(query)
    ]


def _json_or_text(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def suspended_in(session: Session) -> set[str]:
    """What is suspended node-wide (``analysis``, ``delivery``)."""
    return set(session.scalars(select(Suspension.what)))


# -- dashboard ----------------------------------------------------------------------------------


def dashboard(context: WebContext) -> Dashboard:
    """What arrived, waits (and why), was delivered and failed in the last 24 h; disk, queues, workers."""
    now = utcnow()
    day_ago = now - _DAY
    settings = context.settings
    with context.session_factory() as session:
        arrived = session.scalar(select(func.count(Study.id)).where(Study.first_received_at >= day_ago)) or 0
        delivered = _studies_entering(session, [StudyState.DELIVERED], day_ago)
        failed = _studies_entering(session, list(FAILURE_STATES), day_ago)
        waiting_rows = session.execute(
            select(Study.study_uid, Study.state, Study.state_reason, func.max(StudyEvent.at))
            .outerjoin(StudyEvent, StudyEvent.study_pk == Study.id)
            .where(Study.state.in_([s.value for s in _WAITING_STATES]))
            .group_by(Study.id, Study.study_uid, Study.state, Study.state_reason)
            .order_by(Study.last_received_at.desc())
            .limit(100)
        ).all()
        failed_uids = session.scalars(
            select(Study.study_uid).distinct()
            .join(StudyEvent, StudyEvent.study_pk == Study.id)
            .where(StudyEvent.at >= day_ago, StudyEvent.state.in_([s.value for s in FAILURE_STATES]),
                   Study.state.in_([s.value for s in FAILURE_STATES]))
            .limit(20)
        ).all()
        recent_failures = [study for uid in failed_uids for study in list_studies(session, study_uid=uid, limit=None)]
        dead = session.scalar(select(func.count(OutboxItem.id)).where(OutboxItem.state == OutboxState.DEAD.value)) or 0
        queue_depth = session.scalar(select(func.count(JobRow.id)).where(JobRow.state == "queued")) or 0
        outbox_depth = session.scalar(select(func.count(OutboxItem.id)).where(OutboxItem.state.in_(OPEN_STATES))) or 0
        latest = session.scalars(select(Analysis).where(Analysis.model_name.is_not(None)).order_by(Analysis.id.desc())).first()
        suspended = sorted(suspended_in(session))
    node = context.node
    return Dashboard(
        generated_at=now,
        arrived_24h=int(arrived),
        delivered_24h=delivered,
        failures_24h=failed,
        waiting=[
            WaitingStudy(study_uid=uid, state=state, since=_utc(since), why=reason or _WHY_WAITING[StudyState(state)])
            for uid, state, reason, since in waiting_rows
        ],
        recent_failures=recent_failures,
        dead_letters=int(dead),
        queue_depth=int(queue_depth),
        outbox_depth=int(outbox_depth),
        disk=_disk(context),
        workers=WorkerStatus(
            configured=settings.inference.workers,
            alive=None if node is None else node.workers.alive(),
            checkpoint=None if settings.inference.checkpoint is None else str(settings.inference.checkpoint),
            model_name=None if latest is None else latest.model_name,
            model_version=None if latest is None else latest.model_version,
            weights_sha256=None if latest is None else latest.weights_sha256,
            demonstration=None if latest is None else latest.demonstration,
        ),
        suspended=suspended,
    )


def _studies_entering(session: Session, states: Sequence[StudyState], since: dt.datetime) -> int:
    """Studies that entered one of ``states`` since ``since`` and are still in one of them."""
    count = session.scalar(
        select(func.count(func.distinct(Study.id)))
        .join(StudyEvent, StudyEvent.study_pk == Study.id)
        .where(
            StudyEvent.at >= since,
            StudyEvent.state.in_([s.value for s in states]),
            Study.state.in_([s.value for s in states]),
        )
    )
    return int(count or 0)


def _disk(context: WebContext) -> DiskUse | None:
    from dicom_node.retention import disk_usage

    try:
        usage = disk_usage(context.settings.storage.data_dir)
    except OSError:
        return None
    return DiskUse(
        total_bytes=usage.total,
        used_bytes=usage.used,
        used_pct=round(100.0 * usage.used / usage.total, 2) if usage.total else 0.0,
        high_watermark_pct=context.settings.retention.disk_high_watermark_pct,
    )
