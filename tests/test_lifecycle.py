"""Study life cycle: transitions, timeline, the job queue (live first, claimed once), restart."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select

from dicom_node.index.base import utcnow
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study, StudyEvent
from dicom_node.lifecycle import MAX_ATTEMPTS, Lifecycle, StudyState, TransitionError
from tests.studyindex import Index, add_study, index  # noqa: F401 - fixture

S = StudyState


def _lifecycle(index: Index) -> Lifecycle:
    return Lifecycle(index.sessions, index.settings.completion)


def _timeline(index: Index, study_uid: str) -> list[str]:
    with index.sessions() as session:
        return list(
            session.execute(
                select(StudyEvent.state).join(Study).where(Study.study_uid == study_uid).order_by(StudyEvent.id)
            ).scalars()
        )


def _open_jobs(index: Index) -> int:
    with index.sessions() as session:
        return len(session.execute(select(AnalysisJob).where(AnalysisJob.state.in_(("queued", "running")))).all())


def test_full_path_writes_a_timestamped_timeline(index: Index) -> None:
    lifecycle = _lifecycle(index)
    add_study(index.sessions, "1.2.3.1")
    assert lifecycle.enqueue("1.2.3.1", "series quiet") is True
    job = lifecycle.claim_next("w1")
    assert job is not None and job.study_uid == "1.2.3.1" and job.attempt == 1
    lifecycle.finish("1.2.3.1", S.ANALYSED)
    lifecycle.transition("1.2.3.1", S.REPORTING, "3 objects")
    lifecycle.transition("1.2.3.1", S.PARTLY_DELIVERED, "1 of 2 destinations")
    assert lifecycle.state_of("1.2.3.1") is S.PARTLY_DELIVERED
    assert _timeline(index, "1.2.3.1") == ["complete", "queued", "analysing", "analysed", "reporting", "partly_delivered"]
    with index.sessions() as session:
        times = list(session.execute(select(StudyEvent.at).order_by(StudyEvent.id)).scalars())
        reason = session.execute(select(Study.state_reason)).scalar_one()
    assert times == sorted(times) and all(at is not None for at in times)
    assert reason == "1 of 2 destinations"


def test_forbidden_transitions_are_refused_and_leave_no_event(index: Index) -> None:
    lifecycle = _lifecycle(index)
    add_study(index.sessions, "1.2.3.2")
    with pytest.raises(TransitionError, match="is received; cannot go to delivered"):
        lifecycle.transition("1.2.3.2", S.DELIVERED)
    with pytest.raises(TransitionError, match="not in the index"):
        lifecycle.transition("9.9.9", S.COMPLETE)
    with pytest.raises(ValueError, match="not an analysis outcome"):
        lifecycle.finish("1.2.3.2", S.DELIVERED)
    with pytest.raises(TransitionError):
        lifecycle.finish("1.2.3.2", S.ANALYSED)  # not analysing
    assert _timeline(index, "1.2.3.2") == []
    assert lifecycle.state_of("1.2.3.2") is S.RECEIVED


def test_nothing_is_queued_twice_and_processed_studies_need_a_rerun(index: Index) -> None:
    lifecycle = _lifecycle(index)
    add_study(index.sessions, "1.2.3.3")
    assert lifecycle.enqueue("1.2.3.3", "ready")
    assert not lifecycle.enqueue("1.2.3.3", "ready again")
    assert _open_jobs(index) == 1
    lifecycle.claim_next()
    assert not lifecycle.enqueue("1.2.3.3", "ready while analysing")
    lifecycle.finish("1.2.3.3", S.NOT_ANALYSED, "no DWI")
    assert not lifecycle.enqueue("1.2.3.3", "timer fired late")
    assert lifecycle.state_of("1.2.3.3") is S.NOT_ANALYSED
    assert lifecycle.enqueue("1.2.3.3", "manual re-run", rerun=True)
    assert lifecycle.state_of("1.2.3.3") is S.QUEUED


def test_live_studies_are_claimed_before_older_backlog(index: Index) -> None:
    lifecycle = _lifecycle(index)
    now = dt.datetime.now()  # acquired_at is the scanner's local time
    add_study(index.sessions, "1.2.9.1", acquired_at=now - dt.timedelta(days=30))
    add_study(index.sessions, "1.2.9.2", acquired_at=now - dt.timedelta(days=2))
    add_study(index.sessions, "1.2.9.3", acquired_at=now - dt.timedelta(minutes=5))
    add_study(index.sessions, "1.2.9.4")  # no date: its arrival (now) counts
    for uid in ("1.2.9.1", "1.2.9.2", "1.2.9.3", "1.2.9.4"):
        lifecycle.enqueue(uid, "ready")
    order = []
    while (job := lifecycle.claim_next()) is not None:
        order.append((job.study_uid, job.live))
    assert order == [("1.2.9.3", True), ("1.2.9.4", True), ("1.2.9.1", False), ("1.2.9.2", False)]


def test_concurrent_workers_never_claim_the_same_study(index: Index) -> None:
    lifecycle = _lifecycle(index)
    uids = [f"1.2.7.{n}" for n in range(12)]
    for uid in uids:
        add_study(index.sessions, uid)
        lifecycle.enqueue(uid, "ready")
    claimed: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        mine = Lifecycle(index.sessions, index.settings.completion)
        while (job := mine.claim_next(name)) is not None:
            with lock:
                claimed.append(job.study_uid)
            mine.finish(job.study_uid, S.ANALYSED)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(uids)
    assert all(lifecycle.state_of(uid) is S.ANALYSED for uid in uids)


def test_reopen_pulls_a_queued_study_back_and_cancels_its_job(index: Index) -> None:
    lifecycle = _lifecycle(index)
    add_study(index.sessions, "1.2.3.4")
    lifecycle.enqueue("1.2.3.4", "ready")
    assert lifecycle.reopen("1.2.3.4", "new series 1.2.3.4.9") is S.QUEUED
    assert lifecycle.claim_next() is None
    assert _open_jobs(index) == 0
    assert lifecycle.enqueue("1.2.3.4", "ready again")
    job = lifecycle.claim_next()
    assert job is not None
    assert lifecycle.reopen("1.2.3.4", "busy") is None  # analysing: re-open waits
    lifecycle.finish("1.2.3.4", S.ANALYSED)
    assert lifecycle.reopen("1.2.3.4", "usable series") is S.ANALYSED
    assert lifecycle.state_of("1.2.3.4") is S.RECEIVED


def test_restart_requeues_each_pending_study_exactly_once(index: Index) -> None:
    lifecycle = _lifecycle(index)
    for uid in ("1.5.1", "1.5.2", "1.5.3", "1.5.4"):
        add_study(index.sessions, uid)
    lifecycle.transition("1.5.1", S.COMPLETE, "series quiet")  # node died before queueing
    lifecycle.enqueue("1.5.2", "ready")  # waiting in the queue
    lifecycle.enqueue("1.5.3", "ready")
    claimed = lifecycle.claim_next()  # 1.5.2 taken, then the node dies
    assert claimed is not None and claimed.study_uid == "1.5.2"

    restarted = _lifecycle(index)
    assert restarted.rebuild_pending() == {"queued": 1, "kept": 1, "requeued": 1, "failed": 0}
    assert restarted.rebuild_pending() == {"queued": 0, "kept": 3, "requeued": 0, "failed": 0}
    assert _open_jobs(index) == 3
    order = []
    while (job := restarted.claim_next()) is not None:
        order.append(job.study_uid)
        if job.study_uid != "1.5.2":
            restarted.finish(job.study_uid, S.ANALYSED)
    assert sorted(order) == ["1.5.1", "1.5.2", "1.5.3"]
    assert lifecycle.state_of("1.5.4") is S.RECEIVED  # still receiving: completion's business

    # 1.5.2 interrupted a second time: it ends not_analysed instead of looping forever.
    assert restarted.rebuild_pending()["failed"] == 1
    assert restarted.state_of("1.5.2") is S.NOT_ANALYSED
    assert MAX_ATTEMPTS == 2
    assert _timeline(index, "1.5.2")[-3:] == ["queued", "analysing", "not_analysed"]
    assert restarted.claim_next() is None


def test_note_adds_a_timeline_entry_with_the_current_state(index: Index) -> None:
    lifecycle = _lifecycle(index)
    add_study(index.sessions, "1.2.3.5", received_at=utcnow())
    assert lifecycle.note("1.2.3.5", "series 1.2.3.5.1 complete (3 instances)")
    assert not lifecycle.note("7.7.7", "unknown")
    assert _timeline(index, "1.2.3.5") == ["received"]
