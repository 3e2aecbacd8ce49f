"""The study life cycle: states, allowed transitions, the per-study timeline and the job queue.

A study moves through these states (issue 2 item 6; later issues add their steps)::

    received -> complete -> queued -> analysing -> analysed | not_analysed | not_eligible
             -> reporting -> delivered | partly_delivered | dead_lettered
    analysed | not_analysed -> report_failed   (building, writing or queueing the results raised)
    report_failed -> queued                    (``fpe-node resend``: the analysis runs again)
    (any processed state) -> purged            (retention removed its files)
    (processed, purged, complete, queued) -> received   (re-opened by a usable new series)

Every transition is a compare-and-set on ``study.state`` (one conditional ``UPDATE``), so two
processes can never both move a study out of the same state; each successful transition
writes a :class:`~dicom_node.index.models.StudyEvent` (state, UTC time, detail) in the same
transaction. Notes that are not transitions (a series went quiet, a result series did not
re-open the study) are timeline entries too, carrying the current state.

The job queue lives in the ``analysis_job`` table (:mod:`dicom_node.index.jobs`):

* :meth:`Lifecycle.enqueue` moves a ready study ``received -> complete -> queued`` and adds one
  job; a partial unique index allows one open job per study.
* :meth:`Lifecycle.claim_next` takes the next job with one conditional ``UPDATE ... WHERE id =
  (SELECT ... FOR UPDATE SKIP LOCKED)``: live studies (acquired within
  ``completion.live_window_s``) before older backlog, first come first served within each.
* :meth:`Lifecycle.finish` records the outcome (analysed, not_analysed with its reason,
  not_eligible).
* :meth:`Lifecycle.rebuild_pending` runs at start-up: studies left ``complete`` get their job,
  ``queued`` ones keep theirs, ``analysing`` ones (their worker died with the node) are queued
  again once; a study whose analysis was interrupted :data:`MAX_ATTEMPTS` times ends
  ``not_analysed`` so that one poisonous study cannot crash the node forever.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study, StudyEvent
from dicom_node.index.users import Suspension
from dicom_node.leases import LeaseLost, holder_is_dead_here, holder_token, rows_changed
from dicom_node.settings import CompletionSettings

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2
"""Times a worker may take a study before an interruption counts as a failure."""

INTERRUPTED_REASON = "analysis interrupted"
"""Start of the ``not_analysed`` reason of a study interrupted :data:`MAX_ATTEMPTS` times (alerts match it)."""


class StudyState(str, enum.Enum):
    """States of a study in the node (stored as their string value in ``study.state``)."""

    RECEIVED = "received"
    COMPLETE = "complete"
    QUEUED = "queued"
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"
    NOT_ELIGIBLE = "not_eligible"
    REPORTING = "reporting"
    DELIVERED = "delivered"
    PARTLY_DELIVERED = "partly_delivered"
    DEAD_LETTERED = "dead_lettered"
    REPORT_FAILED = "report_failed"
    PURGED = "purged"

    def __str__(self) -> str:
        return self.value


S = StudyState

PROCESSED_STATES: frozenset[StudyState] = frozenset(
    {S.ANALYSED, S.NOT_ANALYSED, S.NOT_ELIGIBLE, S.DELIVERED, S.PARTLY_DELIVERED, S.DEAD_LETTERED, S.REPORT_FAILED}
)
"""A worker has finished with the study (retention may purge it; new series may re-open it)."""

WAITING_STATES: frozenset[StudyState] = frozenset({S.COMPLETE, S.QUEUED})
"""Ready but no worker has started: a new usable series pulls the study back to received."""

BUSY_STATES: frozenset[StudyState] = frozenset({S.ANALYSING, S.REPORTING})
"""Work in flight: a re-open waits until it is over."""

FAILURE_STATES: frozenset[StudyState] = frozenset({S.DEAD_LETTERED, S.REPORT_FAILED})
"""Results that did not reach the archive: listed and counted as failures by ``fpe-node studies``,
retried by ``fpe-node resend`` (never automatically in a loop)."""

OUTCOME_STATES: frozenset[StudyState] = frozenset({S.ANALYSED, S.NOT_ANALYSED, S.NOT_ELIGIBLE})
"""What a worker may report with :meth:`Lifecycle.finish`."""

ALLOWED: dict[StudyState, frozenset[StudyState]] = {
    S.RECEIVED: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset({S.QUEUED, S.RECEIVED, S.NOT_ELIGIBLE}),
    S.QUEUED: frozenset({S.ANALYSING, S.RECEIVED}),
    S.ANALYSING: frozenset({S.ANALYSED, S.NOT_ANALYSED, S.NOT_ELIGIBLE, S.QUEUED}),
    S.ANALYSED: frozenset({S.REPORTING, S.REPORT_FAILED, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.NOT_ANALYSED: frozenset({S.REPORTING, S.REPORT_FAILED, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.NOT_ELIGIBLE: frozenset({S.REPORTING, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.REPORTING: frozenset({S.DELIVERED, S.PARTLY_DELIVERED, S.DEAD_LETTERED, S.REPORTING, S.QUEUED}),
    S.DELIVERED: frozenset({S.REPORTING, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.PARTLY_DELIVERED: frozenset({S.REPORTING, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.DEAD_LETTERED: frozenset({S.REPORTING, S.RECEIVED, S.QUEUED, S.PURGED}),
    S.REPORT_FAILED: frozenset({S.RECEIVED, S.QUEUED, S.PURGED}),
    S.PURGED: frozenset({S.RECEIVED}),
}
"""Allowed transitions, ``from -> {to}``. ``reporting -> reporting`` is a re-send;
``reporting -> queued`` re-runs a study whose results were never queued and ``report_failed ->
queued`` one whose results could not be built or queued (:mod:`dicom_node.recovery`)."""


class TransitionError(ValueError):
    """A study cannot go from its current state to the one asked for."""

    def __init__(self, study_uid: str, current: str | None, target: StudyState) -> None:
        self.study_uid = study_uid
        self.current = current
        self.target = target
        where = "is not in the index" if current is None else f"is {current}"
        super().__init__(f"study {study_uid} {where}; cannot go to {target.value}")


def sources_of(target: StudyState) -> frozenset[StudyState]:
    """The states from which ``target`` may be entered."""
    return frozenset(state for state, targets in ALLOWED.items() if target in targets)


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as aware UTC, a naive value taken as UTC.

    Index timestamps already come back aware UTC on every backend
    (:class:`dicom_node.index.base.UTCDateTime`); this is for values from elsewhere.
    """
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def record_event(session: Session, study_pk: int, state: str, detail: str | None, at: dt.datetime | None = None) -> None:
    """Append one entry to a study's timeline (in the caller's transaction)."""
    session.add(StudyEvent(study_pk=study_pk, state=state, detail=detail, at=at or utcnow()))


def transition(
    session: Session,
    study_uid: str,
    target: StudyState,
    detail: str | None = None,
    *,
    expected: Iterable[StudyState] | None = None,
) -> StudyState:
    """Move a study to ``target`` in the caller's transaction and write the timeline entry.

    The move is one conditional ``UPDATE ... WHERE state IN (allowed sources)``, safe against
    concurrent writers on SQLite and PostgreSQL.

    Parameters
    ----------
    session:
        An open write unit of work (commit is the caller's).
    study_uid:
        Study Instance UID (0020,000D).
    target:
        The new state; ``detail`` becomes ``study.state_reason`` and the event's detail.
    expected:
        Restrict the allowed source states further (e.g. only from ``analysing``).

    Returns
    -------
    StudyState
        The state the study left.

    Raises
    ------
    TransitionError
        The study is unknown, or its current state does not allow ``target``.
    """
    sources = sources_of(target)
    if expected is not None:
        sources = sources & frozenset(expected)
    current = session.execute(select(Study.id, Study.state).where(Study.study_uid == study_uid)).one_or_none()
    if current is None or current.state not in {s.value for s in sources}:
        raise TransitionError(study_uid, None if current is None else current.state, target)
    changed = rows_changed(
        session,
        update(Study).where(Study.id == current.id, Study.state == current.state).values(state=target.value, state_reason=detail),
    )
    if changed != 1:  # another process moved it between our read and write
        now_state = session.execute(select(Study.state).where(Study.id == current.id)).scalar_one_or_none()
        raise TransitionError(study_uid, now_state, target)
    record_event(session, current.id, target.value, detail)
    log.info("study %s: %s -> %s%s", study_uid, current.state, target.value, f" ({detail})" if detail else "")
    return StudyState(current.state)


def note_in(session: Session, study_uid: str, detail: str) -> bool:
    """A timeline entry with the study's current state, in the caller's transaction; False when unknown."""
    row = session.execute(select(Study.id, Study.state).where(Study.study_uid == study_uid)).one_or_none()
    if row is None:
        return False
    record_event(session, row.id, row.state, detail)
    return True


def study_state(session: Session, study_uid: str) -> StudyState | None:
    """The current state of a study, ``None`` when it is not in the index."""
    value = session.execute(select(Study.state).where(Study.study_uid == study_uid)).scalar_one_or_none()
    return None if value is None else StudyState(value)


def _priority_at(study: Study) -> dt.datetime:
    """When the study was acquired, in UTC (its first arrival when it has no date).

    ``acquired_at`` holds StudyDate/StudyTime as the scanner wrote them (local time without
    zone, PS3.3 C.7.2.1); they are read in the node's local time zone.
    """
    if study.acquired_at is not None:
        acquired = study.acquired_at
        if acquired.tzinfo is None:
            acquired = acquired.astimezone()  # naive: the machine's local time
        return acquired.astimezone(dt.timezone.utc)
    return study.first_received_at


@dataclass(frozen=True)
class Job:
    """A claimed analysis job, as handed to a worker (picklable: plain values only)."""

    job_id: int
    study_uid: str
    study_pk: int
    attempt: int
    live: bool
    enqueued_at: dt.datetime
    reason: str | None
    fence: int = 0
    """The claim's fencing token (:meth:`Lifecycle.finish_job` checks it)."""
    token: str = ""
    """``claimed_by`` of the claim."""


class Lifecycle:
    """Study transitions and the analysis queue over the index, one unit of work per call.

    Parameters
    ----------
    session_factory:
        The node's session factory (:func:`dicom_node.index.db.build_session_factory`).
    completion:
        ``settings.completion`` (``live_window_s`` orders the queue).
    job_lease_s:
        ``settings.leases.job_s``: how long a claim holds without renewal.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], completion: CompletionSettings, *, job_lease_s: float = 60.0
    ) -> None:
        self._sessions = session_factory
        self._live_window = dt.timedelta(seconds=completion.live_window_s)
        self._lease = dt.timedelta(seconds=job_lease_s)

    # -- transitions --------------------------------------------------------------------

    def transition(
        self, study_uid: str, target: StudyState, detail: str | None = None, *, expected: Iterable[StudyState] | None = None
    ) -> StudyState:
        """:func:`transition` in its own unit of work."""
        with write_session(self._sessions) as session:
            return transition(session, study_uid, target, detail, expected=expected)

    def note(self, study_uid: str, detail: str) -> bool:
        """Add a timeline entry with the study's current state; ``False`` when the study is unknown."""
        with write_session(self._sessions) as session:
            return note_in(session, study_uid, detail)

    def state_of(self, study_uid: str) -> StudyState | None:
        """The current state of a study (``None``: not in the index)."""
        with self._sessions() as session:
            return study_state(session, study_uid)

    # -- the queue ----------------------------------------------------------------------

    def enqueue(self, study_uid: str, reason: str, *, rerun: bool = False) -> bool:
        """Put a ready study in the queue: ``received -> complete -> queued`` (or ``complete -> queued``).

        With ``rerun`` a processed study is queued again directly (a manual re-run); without
        it a processed study is left alone (only a re-open brings it back to ``received``).

        Returns
        -------
        bool
            ``True`` when a job was added; ``False`` when the study is already waiting or
            being worked on (nothing is queued twice).
        """
        with write_session(self._sessions) as session:
            return _enqueue(session, study_uid, reason, rerun=rerun)

    def reopen(self, study_uid: str, reason: str) -> StudyState | None:
        """Pull a study back to ``received`` because a series a pipeline could use arrived.

        A waiting study (``complete``/``queued``) loses its queued job; a processed or purged
        one is re-opened. Returns the state left, or ``None`` when the study is busy
        (``analysing``/``reporting``: re-open later) or already ``received``.
        """
        with write_session(self._sessions) as session:
            state = study_state(session, study_uid)
            if state is None or state is S.RECEIVED or state in BUSY_STATES:
                return None
            if state is S.QUEUED and not _cancel_queued_job(session, study_uid):
                return None  # a worker took it a moment ago: busy
            return transition(session, study_uid, S.RECEIVED, reason)

    def requeue_analysis(self, study_uid: str, reason: str, *, expected: Iterable[StudyState]) -> bool:
        """Queue a study's analysis again from one of the ``expected`` states, in one unit of work.

        Used by :mod:`dicom_node.recovery` for a study whose results were never queued for
        delivery. The move is a compare-and-set and a study with an open job is left alone, so
        a study is re-queued at most once however often this is called.

        Returns
        -------
        bool
            ``True`` when the study was queued; ``False`` when it is unknown, has an open job
            or is no longer in an ``expected`` state.
        """
        with write_session(self._sessions) as session:
            study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
            if study is None or _open_job(session, study.id) is not None:
                return False
            try:
                transition(session, study_uid, S.QUEUED, reason, expected=expected)
            except TransitionError as exc:
                log.info("study %s not re-queued: %s", study_uid, exc)
                return False
            session.expire(study)
            _add_job(session, study, reason)
            return True

    def claim_next(self, worker: str | None = None) -> Job | None:
        """Take the next job for a worker (live studies first), or ``None``.

        A job is claimable when it is ``queued``, or ``running`` with its lease run out (its
        worker died, hung or lost the index: :mod:`dicom_node.leases`). One conditional
        ``UPDATE`` claims the row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the database write
        lock on SQLite), sets the lease and raises the fencing token: two workers never hold the
        same study. A study re-claimed after :data:`MAX_ATTEMPTS` takes ends ``not_analysed``
        instead, so that one poisonous study cannot take every worker down in turn.
        """
        if analysis_suspended(self._sessions):
            return None  # suspended node-wide (dicom_node.actions.suspend): jobs wait in the queue
        while True:
            claimed = self._claim_one(worker)
            if not isinstance(claimed, str):
                return claimed
            # a re-claimed job past its attempts was ended; look for the next one

    def _claim_one(self, worker: str | None) -> Job | str | None:
        token = holder_token() if worker is None else f"{worker[:40]}:{uuid.uuid4().hex[:16]}"
        now = utcnow()
        cutoff = now - self._live_window
        live_first = case((AnalysisJob.priority_at >= cutoff, 0), else_=1)
        claimable = (AnalysisJob.state == "queued") | (
            (AnalysisJob.state == "running") & (AnalysisJob.lease_until.is_not(None)) & (AnalysisJob.lease_until < now)
        )
        next_id = (
            select(AnalysisJob.id)
            .where(claimable)
            .order_by(live_first, AnalysisJob.enqueued_at, AnalysisJob.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with write_session(self._sessions) as session:
            before = session.execute(select(AnalysisJob.id, AnalysisJob.state, AnalysisJob.claimed_by)
                                     .where(AnalysisJob.id == next_id)).one_or_none()
            if before is None:
                return None
            claimed = rows_changed(
                session,
                update(AnalysisJob)
                .where(AnalysisJob.id == before.id, claimable)
                .values(state="running", claimed_at=now, claimed_by=token, attempts=AnalysisJob.attempts + 1,
                        fence=AnalysisJob.fence + 1, lease_until=now + self._lease),
            )
            if claimed != 1:
                return None
            job = session.execute(select(AnalysisJob).where(AnalysisJob.id == before.id)).scalar_one()
            study_uid = session.execute(select(Study.study_uid).where(Study.id == job.study_pk)).scalar_one()
            holder = token.rsplit(":", 1)[0]
            if before.state == "running":  # the lease of a worker that stopped renewing ran out
                previous = (before.claimed_by or "?").rsplit(":", 1)[0]
                if job.attempts > MAX_ATTEMPTS:
                    job.state, job.finished_at, job.outcome, job.lease_until = "done", now, "interrupted", None
                    session.flush()
                    transition(session, study_uid, S.NOT_ANALYSED,
                               f"{INTERRUPTED_REASON} {job.attempts - 1} times (worker {previous} stopped renewing "
                               "its lease); not retried", expected={S.ANALYSING})
                    return study_uid
                record_event(session, job.study_pk, S.ANALYSING.value,
                             f"attempt {job.attempts} by {holder}: the lease of {previous} ran out")
                log.warning("study %s: re-claimed by %s after the lease of %s ran out", study_uid, holder, previous)
            else:
                transition(session, study_uid, S.ANALYSING, f"attempt {job.attempts} by {holder}", expected={S.QUEUED})
            return Job(
                job_id=job.id,
                study_uid=study_uid,
                study_pk=job.study_pk,
                attempt=job.attempts,
                live=job.priority_at >= cutoff,
                enqueued_at=job.enqueued_at,
                reason=job.reason,
                fence=job.fence,
                token=token,
            )

    def renew(self, job: Job) -> bool:
        """Extend a claimed job's lease; False when another worker took it over (fence moved on)."""
        with write_session(self._sessions) as session:
            return rows_changed(session, update(AnalysisJob).where(
                AnalysisJob.id == job.job_id, AnalysisJob.fence == job.fence, AnalysisJob.state == "running"
            ).values(lease_until=utcnow() + self._lease)) == 1

    def finish_job(self, session: Session, job: Job, outcome: StudyState, reason: str | None = None) -> None:
        """A worker's final state change, fenced, in the caller's transaction (with its results).

        Raises
        ------
        dicom_node.leases.LeaseLost
            The job's fence moved on (its lease ran out and another worker claimed it): the
            caller must roll back and drop its work.
        TransitionError
            The study is not being analysed.
        """
        if outcome not in OUTCOME_STATES:
            raise ValueError(f"{outcome} is not an analysis outcome ({', '.join(sorted(OUTCOME_STATES))})")
        fenced = rows_changed(session, update(AnalysisJob).where(
            AnalysisJob.id == job.job_id, AnalysisJob.fence == job.fence, AnalysisJob.state == "running"
        ).values(state="done", finished_at=utcnow(), outcome=outcome.value, lease_until=None))
        if fenced != 1:
            raise LeaseLost(f"job {job.job_id} of study {job.study_uid}: fence {job.fence} is no longer current")
        transition(session, job.study_uid, outcome, reason, expected={S.ANALYSING})

    def finish(self, study_uid: str, outcome: StudyState, reason: str | None = None) -> None:
        """Record a worker's outcome: ``analysing -> analysed | not_analysed | not_eligible``.

        Raises
        ------
        ValueError
            ``outcome`` is not a worker's outcome.
        TransitionError
            The study is not being analysed.
        """
        if outcome not in OUTCOME_STATES:
            raise ValueError(f"{outcome} is not an analysis outcome ({', '.join(sorted(OUTCOME_STATES))})")
        with write_session(self._sessions) as session:
            transition(session, study_uid, outcome, reason, expected={S.ANALYSING})
            study_pk = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
            session.execute(
                update(AnalysisJob)
                .where(AnalysisJob.study_pk == study_pk, AnalysisJob.state == "running")
                .values(state="done", finished_at=utcnow(), outcome=outcome.value, lease_until=None)
                .execution_options(synchronize_session=False)
            )

    def rebuild_pending(self) -> dict[str, int]:
        """After a restart, make sure every unfinished study is in the queue exactly once.

        * ``complete`` without an open job: queued now;
        * ``queued``: its job stays (one is added if it went missing);
        * ``analysing`` whose worker is gone (its lease ran out, or it was a process of this
          host that no longer runs): the job is queued again, unless the study was already
          taken :data:`MAX_ATTEMPTS` times, then it ends ``not_analysed``. A job a live worker
          holds (another machine's, renewing its lease) is kept.

        Returns the number of studies per action, for the start-up log.
        """
        counts = {"queued": 0, "kept": 0, "requeued": 0, "failed": 0}
        with write_session(self._sessions) as session:
            pending = session.execute(
                select(Study.study_uid, Study.state).where(
                    Study.state.in_([S.COMPLETE.value, S.QUEUED.value, S.ANALYSING.value])
                )
            ).all()
            for study_uid, state in pending:
                action = _rebuild_one(session, study_uid, StudyState(state))
                counts[action] += 1
        if any(counts.values()):
            log.info("pending work rebuilt from the index: %s", counts)
        return counts


def analysis_suspended(session_factory: sessionmaker[Session]) -> bool:
    """True while analysis is suspended node-wide (a ``node_suspension`` row, :mod:`dicom_node.actions`)."""
    with session_factory() as session:
        return session.get(Suspension, "analysis") is not None


def enqueue_in(session: Session, study_uid: str, reason: str, *, rerun: bool = False) -> bool:
    """:meth:`Lifecycle.enqueue` in the caller's transaction (an action and its audit entry commit together)."""
    return _enqueue(session, study_uid, reason, rerun=rerun)


def _open_job(session: Session, study_pk: int) -> AnalysisJob | None:
    return session.execute(
        select(AnalysisJob).where(AnalysisJob.study_pk == study_pk, AnalysisJob.state.in_(("queued", "running")))
    ).scalar_one_or_none()


def _add_job(session: Session, study: Study, reason: str, attempts: int = 0) -> None:
    session.add(
        AnalysisJob(study_pk=study.id, state="queued", reason=reason, priority_at=_priority_at(study), attempts=attempts)
    )


def _enqueue(session: Session, study_uid: str, reason: str, *, rerun: bool) -> bool:
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        raise TransitionError(study_uid, None, S.QUEUED)
    state = StudyState(study.state)
    if state is S.RECEIVED:
        transition(session, study_uid, S.COMPLETE, reason)
    elif not (state is S.COMPLETE or (rerun and state in PROCESSED_STATES)):
        log.debug("study %s not queued: it is %s", study_uid, state.value)
        return False
    transition(session, study_uid, S.QUEUED, reason)
    session.expire(study)
    _add_job(session, study, reason)
    return True


def _cancel_queued_job(session: Session, study_uid: str) -> bool:
    study_pk = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
    cancelled = rows_changed(
        session,
        update(AnalysisJob)
        .where(AnalysisJob.study_pk == study_pk, AnalysisJob.state == "queued")
        .values(state="cancelled", finished_at=utcnow()),
    )
    return cancelled == 1


def _abandoned(job: AnalysisJob) -> bool:
    """A running job nobody works on: no lease (an older node), its lease ran out, or its holder
    was a process of this host that is gone (killed with the node)."""
    if job.lease_until is None or job.lease_until < utcnow():
        return True
    return holder_is_dead_here(job.claimed_by, this_process=True)  # start-up: this process holds nothing yet


def _rebuild_one(session: Session, study_uid: str, state: StudyState) -> str:
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
    job = _open_job(session, study.id)
    if state is S.COMPLETE:
        transition(session, study_uid, S.QUEUED, "queued at start-up")
        _add_job(session, study, "queued at start-up")
        return "queued"
    if state is S.QUEUED:
        if job is None:
            _add_job(session, study, "job restored at start-up")
        elif job.state == "running":  # cannot happen through this module; repair rather than wait forever
            job.state, job.claimed_by = "queued", None
        return "kept"
    if job is not None and job.state == "running" and not _abandoned(job):
        return "kept"  # a live worker (this host or another) holds it: its lease says so
    attempts = job.attempts if job is not None else MAX_ATTEMPTS
    if job is not None:
        job.state, job.finished_at, job.outcome = "done", utcnow(), "interrupted"
        session.flush()
    if attempts >= MAX_ATTEMPTS:
        transition(
            session, study_uid, S.NOT_ANALYSED,
            f"{INTERRUPTED_REASON} {attempts} times (node stopped or crashed); not retried",
            expected={S.ANALYSING},
        )
        return "failed"
    transition(session, study_uid, S.QUEUED, "analysis interrupted by a restart; queued again", expected={S.ANALYSING})
    _add_job(session, study, "re-queued at start-up", attempts=attempts)
    return "requeued"
