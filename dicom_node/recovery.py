"""Re-running a study whose results could not be built or queued (``report_failed``).

What is left of start-up recovery now that a worker commits its analysis, the study's state
and its results' outbox rows in one transaction (:mod:`dicom_node.worker`, the transactional
outbox) and a sender settles the study in the transaction that records its last row
(:mod:`dicom_node.outbox`): no handoff between processes can lose a result any more, so there
is nothing to repair at start-up. A study in ``report_failed`` stays: building or writing its
results raised (an unreadable source header, a full disk), and it fails the same way until the
cause is fixed. ``fpe-node resend`` (and the console's and API's resend) is its retry.

How: re-run, not rebuild. The ``analysis`` table holds the score, decision, series and model
identity, but not the attention maps nor the source references the captures need, so the
results cannot be rebuilt from it. The study's analysis is queued again instead
(:meth:`dicom_node.lifecycle.Lifecycle.requeue_analysis`, one compare-and-set: at most once).
The model is deterministic, so an unchanged case gives the same score and decision. Result
files of the failed run that no outbox row refers to were never sent anywhere; they are removed
first, so the re-run's SR does not name them as predecessors (PS3.3 C.17.2.3): no archive ever
saw them. A re-run after results *were* queued (a real new version) still names the earlier
SR, from the outbox. Every action is recorded in the study's timeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.delivery import discard_result_files
from dicom_node.index.models import Study
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """What recovery decided for one study: ``action`` ``"requeue"`` (re-run) or ``"none"`` (``why``)."""

    study_uid: str
    state: StudyState
    action: str
    why: str


def examine(study: Study) -> Finding:
    """Whether ``study`` is a ``report_failed`` study to re-run."""
    state = StudyState(study.state)
    if state is StudyState.REPORT_FAILED:
        return Finding(study.study_uid, state, "requeue", f"report_failed ({study.state_reason or 'no reason recorded'})")
    return Finding(study.study_uid, state, "none", f"state {state.value}")


def _unsent_result_files(session_factory: sessionmaker[Session], results_dir: Path, study_uid: str) -> list[Path]:
    """Result files of the study that no outbox row refers to (built, never queued, never sent)."""
    folder = results_dir / study_uid
    if not folder.is_dir():
        return []
    with session_factory() as session:
        queued = set(session.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.study_uid == study_uid)))
    return [path for path in sorted(folder.glob("*/*.dcm")) if path.stem not in queued]


def recover_study(
    session_factory: sessionmaker[Session], lifecycle: Lifecycle, settings: Settings, study_uid: str, *, by: str
) -> Finding | None:
    """Queue a ``report_failed`` study's analysis again (``fpe-node resend``); the finding acted on, else ``None``.

    ``by`` names who asked in the timeline (``"resend"``).
    """
    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
        finding = None if study is None else examine(study)
    if finding is None or finding.action != "requeue":
        return None
    removed = discard_result_files(_unsent_result_files(session_factory, settings.storage.results_dir, study_uid), study_uid)
    discarded = f"; {removed} unsent result files discarded" if removed else ""
    detail = f"recovered at {by}: {finding.why} (results failed){discarded}; analysis queued again"
    if not lifecycle.requeue_analysis(study_uid, detail, expected=[finding.state]):
        return None
    log.warning("study %s: %s", study_uid, detail)
    return finding


def count_report_failed(session_factory: sessionmaker[Session]) -> int:
    """Studies waiting in ``report_failed`` (logged at start-up: ``fpe-node resend`` retries them)."""
    with session_factory() as session:
        return int(session.scalar(
            select(func.count()).select_from(Study).where(Study.state == StudyState.REPORT_FAILED.value)
        ) or 0)
