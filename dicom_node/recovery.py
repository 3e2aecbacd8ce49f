"""Start-up recovery of results that were never queued for delivery (issue 2 item 7, issue 4 item 4).

The inference worker records a study's analysis and moves it to ``analysed`` /
``not_analysed`` in its own process, then hands the result to
:meth:`dicom_node.delivery.Delivery.on_result` in the node process through a queue; delivery
builds the SR and captures, writes them and adds the outbox rows in the same transaction as
the study's move to ``reporting``. A node that dies between the two loses the result: the
study is processed, but nothing is in the outbox, so neither the outbox runner nor
``fpe-node resend`` would ever send it, and :meth:`dicom_node.lifecycle.Lifecycle.rebuild_pending`
only looks at ``complete`` / ``queued`` / ``analysing`` studies.

What is recovered
-----------------
A study whose **latest** analysis (:func:`dicom_node.index.analysis.latest_analysis`) ended
``analysed`` or ``not_analysed`` and that has

* no outbox row created since that analysis (``held`` rows of demonstration weights count:
  those results were deliberately kept), and
* no "results kept in the node" timeline note since that analysis (no destination, no
  routing rule matched: deliberately kept), and
* a result that delivery would have handled: not a study whose case was analysed with
  another study (its result belongs there), not a ``not_analysed`` study while
  ``reports.sr_for_not_analysed`` is off;

and a study left ``reporting`` without an outbox row since its latest analysis.

A study in ``report_failed`` (building, writing or queueing its results raised, see
:meth:`dicom_node.delivery.Delivery.on_result`) is recovered the same way, but only by
``fpe-node resend``: start-up leaves it alone (and logs how many wait), so a result that fails
every time it is built cannot send the node round a loop. Resend is the retry.

How: re-run, not rebuild
------------------------
The ``analysis`` table holds the score, decision, series and model identity, but not the
attention maps nor the source references the secondary captures need, so the results cannot
be rebuilt from it. The study's analysis is queued again instead
(:meth:`dicom_node.lifecycle.Lifecycle.requeue_analysis`, one compare-and-set: at most once);
a worker re-runs it and hands the result to delivery as usual. The model is deterministic, so
an unchanged case gives the same score and decision. Result files of the lost run that no
outbox row refers to were never sent anywhere; they are removed first, so the re-run's SR does
not name them as predecessors (PS3.3 C.17.2.3, Predecessor Documents Sequence): no archive
ever saw them, so there is no earlier version to supersede. A re-run after results *were*
queued (a real new version) still names the earlier SR, from the outbox.

A study left ``reporting`` whose rows since its latest analysis are all settled (the node
died between the last row settling and the study's state change) is moved to its delivery
outcome instead.

Every action is recorded in the study's timeline (the transition's detail).

Limit: ``fpe-node resend`` runs beside a live node. A study whose result the node is building
at that very moment (a second or two after its analysis, before its rows exist) looks lost and
is re-run; the archive then gets a second SR version naming the first. At start-up there is no
such window (no worker and no result thread run yet).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.analysis import Analysis
from dicom_node.index.models import Study, StudyEvent
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import Lifecycle, StudyState, TransitionError
from dicom_node.outbox import StudyDelivery, study_delivery_outcome
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

KEPT_NOTE = "results kept in the node"
"""Prefix of the timeline note :meth:`dicom_node.delivery.Delivery.on_result` writes when nothing is sent."""

_CANDIDATE_STATES = (StudyState.ANALYSED, StudyState.NOT_ANALYSED, StudyState.REPORTING)
_SETTLED_STATE = {
    StudyDelivery.DELIVERED: StudyState.DELIVERED,
    StudyDelivery.PARTLY_DELIVERED: StudyState.PARTLY_DELIVERED,
    StudyDelivery.DEAD_LETTERED: StudyState.DEAD_LETTERED,
}


@dataclass(frozen=True)
class Finding:
    """What recovery decided for one study.

    ``action`` is ``"requeue"`` (results lost: re-run the analysis), ``"settle"`` (all rows
    settled, state not moved; ``settled`` says to what) or ``"none"`` (nothing to do; ``why``).
    """

    study_uid: str
    state: StudyState
    action: str
    why: str
    analysed_at: dt.datetime | None = None
    settled: StudyState | None = None


def _latest_analysis(session: Session, study_pk: int) -> Analysis | None:
    return session.scalars(
        select(Analysis).where(Analysis.study_pk == study_pk).order_by(Analysis.id.desc()).limit(1)
    ).first()


def _rows_since(session: Session, study_uid: str, since: dt.datetime | None) -> list[str]:
    query = select(OutboxItem.state).where(OutboxItem.study_uid == study_uid)
    if since is not None:
        query = query.where(OutboxItem.created_at >= since)
    return list(session.scalars(query))


def _kept_since(session: Session, study_pk: int, since: dt.datetime) -> bool:
    return session.scalars(
        select(StudyEvent.id).where(
            StudyEvent.study_pk == study_pk, StudyEvent.at >= since, StudyEvent.detail.startswith(KEPT_NOTE)
        ).limit(1)
    ).first() is not None


def examine(session: Session, study: Study, sr_for_not_analysed: bool, *, retry_failed: bool = False) -> Finding:
    """Decide whether ``study``'s results were lost between analysis and the outbox.

    Parameters
    ----------
    session:
        A read unit of work.
    study:
        The study row.
    sr_for_not_analysed:
        ``settings.reports.sr_for_not_analysed`` (without it a ``not_analysed`` study has no
        result to deliver).
    retry_failed:
        Re-run a ``report_failed`` study (``fpe-node resend``; never at start-up).
    """
    state = StudyState(study.state)
    analysis = _latest_analysis(session, study.id)
    since = None if analysis is None else analysis.created_at
    if state is StudyState.REPORT_FAILED and retry_failed:
        return Finding(study.study_uid, state, "requeue", f"report_failed ({study.state_reason or 'no reason recorded'})",
                       since)
    if state not in _CANDIDATE_STATES:
        return Finding(study.study_uid, state, "none", f"state {state.value}")
    if state is StudyState.REPORTING:
        rows = _rows_since(session, study.study_uid, since)
        if not rows:
            return Finding(study.study_uid, state, "requeue", "reporting without results in the outbox", since)
        outcome = study_delivery_outcome(rows)
        settled = _SETTLED_STATE.get(outcome) if outcome is not None else None
        if outcome is not None and settled is not None:
            return Finding(study.study_uid, state, "settle", f"all results settled ({outcome.value})", since, settled)
        return Finding(study.study_uid, state, "none", "results in the outbox")
    if analysis is None:
        return Finding(study.study_uid, state, "none", "no analysis recorded")
    if analysis.outcome != state.value:
        return Finding(study.study_uid, state, "none", f"latest analysis ended {analysis.outcome}")
    if analysis.primary_study_uid is not None and analysis.primary_study_uid != study.study_uid:
        return Finding(study.study_uid, state, "none", "case analysed with another study")
    if state is StudyState.NOT_ANALYSED and not sr_for_not_analysed:
        return Finding(study.study_uid, state, "none", "no SR for studies not analysed")
    if _rows_since(session, study.study_uid, since):
        return Finding(study.study_uid, state, "none", "results queued or held since the analysis")
    if _kept_since(session, study.id, analysis.created_at):
        return Finding(study.study_uid, state, "none", "results deliberately kept in the node")
    return Finding(study.study_uid, state, "requeue", f"{state.value} but its results were never queued", since)


def find_lost(
    session_factory: sessionmaker[Session], settings: Settings, study_uid: str | None = None, *,
    retry_failed: bool = False,
) -> list[Finding]:
    """Findings that need an action (``requeue`` or ``settle``), for one study or all candidates.

    ``retry_failed`` makes a ``report_failed`` study a ``requeue`` finding (``fpe-node resend``).
    """
    query = select(Study).where(Study.state.in_([s.value for s in _CANDIDATE_STATES]))
    if study_uid is not None:
        query = select(Study).where(Study.study_uid == study_uid)
    with session_factory() as session:
        findings = [examine(session, study, settings.reports.sr_for_not_analysed, retry_failed=retry_failed)
                    for study in session.scalars(query)]
    return [finding for finding in findings if finding.action != "none"]


def _unsent_result_files(session_factory: sessionmaker[Session], results_dir: Path, study_uid: str) -> list[Path]:
    """Result files of the study that no outbox row refers to (built, never queued, never sent)."""
    folder = results_dir / study_uid
    if not folder.is_dir():
        return []
    with session_factory() as session:
        queued = set(session.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.study_uid == study_uid)))
    return [path for path in sorted(folder.glob("*/*.dcm")) if path.stem not in queued]


def _discard(paths: Sequence[Path], study_uid: str) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("study %s: unsent result file %s not removed: %s", study_uid, path.name, exc)
    for folder in {path.parent for path in paths}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def apply(
    finding: Finding, session_factory: sessionmaker[Session], lifecycle: Lifecycle, settings: Settings, *, by: str
) -> bool:
    """Carry out one finding; ``True`` when the study was re-queued or settled.

    ``by`` names who recovered it in the timeline (``"start-up"``, ``"resend"``).
    """
    if finding.action == "settle" and finding.settled is not None:
        try:
            lifecycle.transition(finding.study_uid, finding.settled, f"recovered at {by}: {finding.why}",
                                 expected=[StudyState.REPORTING])
        except TransitionError as exc:
            log.info("study %s not settled: %s", finding.study_uid, exc)
            return False
        return True
    if finding.action != "requeue":
        return False
    removed = _discard(_unsent_result_files(session_factory, settings.storage.results_dir, finding.study_uid),
                       finding.study_uid)
    discarded = f"; {removed} unsent result files discarded" if removed else ""
    cause = "results failed" if finding.state is StudyState.REPORT_FAILED else "node stopped before delivery"
    detail = f"recovered at {by}: {finding.why} ({cause}){discarded}; analysis queued again"
    queued = lifecycle.requeue_analysis(finding.study_uid, detail, expected=[finding.state])
    if queued:
        log.warning("study %s: %s", finding.study_uid, detail)
    return queued


def recover_lost_results(
    session_factory: sessionmaker[Session], lifecycle: Lifecycle, settings: Settings, *, by: str = "start-up"
) -> dict[str, int]:
    """At start-up (before workers start): re-queue every study whose results were lost; settle stuck ones.

    ``report_failed`` studies are left for ``fpe-node resend`` and only counted.

    Returns the number of studies per action (and ``report_failed``, those waiting for a
    resend), for the start-up log.
    """
    counts = {"requeue": 0, "settle": 0}
    for finding in find_lost(session_factory, settings):
        if apply(finding, session_factory, lifecycle, settings, by=by):
            counts[finding.action] += 1
    if any(counts.values()):
        log.info("results lost before delivery recovered: %s", counts)
    with session_factory() as session:
        failed = session.scalar(
            select(func.count()).select_from(Study).where(Study.state == StudyState.REPORT_FAILED.value)
        ) or 0
    if failed:
        log.warning("%d studies are report_failed (results could not be built or queued); "
                    "`fpe-node studies --state report_failed` lists them, `fpe-node resend STUDY` retries", failed)
    return {**counts, "report_failed": int(failed)}


def recover_study(
    session_factory: sessionmaker[Session], lifecycle: Lifecycle, settings: Settings, study_uid: str, *, by: str
) -> Finding | None:
    """Recover one study if its results were lost (``fpe-node resend``); the finding acted on, else ``None``."""
    for finding in find_lost(session_factory, settings, study_uid, retry_failed=True):
        if apply(finding, session_factory, lifecycle, settings, by=by):
            return finding
    return None
