"""Results routed back never re-open their study; a new usable image series does (issue 2 item 7).

A PACS that forwards everything it receives would otherwise loop: node result -> PACS ->
node -> new analysis -> new result -> ...
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select

from dicom_node.completion import Completion, SeriesInfo
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study, StudyEvent
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.settings import CompletionSettings
from tests.studyindex import (  # noqa: F401 - index is a fixture
    COMPREHENSIVE_SR,
    GRAYSCALE_PR,
    SECONDARY_CAPTURE,
    Index,
    Stored,
    index,
    receive,
)

S = StudyState
SHORT = CompletionSettings(series_quiet_s=0.25, study_timeout_s=1.0, release_shortens_wait=True, live_window_s=3600)
ROOT = "1.2.826.0.1.999"  # a site's UID root (not a library's example root)
STUDY = "1.4.1"


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    sched.start()
    yield sched
    sched.shutdown(wait=False)


def _no_localizers(series: SeriesInfo) -> bool:
    """A stand-in for the selection rules: localizers are never selected."""
    return "LOCALIZER" not in series.image_type and series.modality not in ("SR", "PR", "OT")


def _state(index: Index) -> str:
    with index.sessions() as session:
        return session.execute(select(Study.state).where(Study.study_uid == STUDY)).scalar_one()


def _jobs(index: Index) -> int:
    with index.sessions() as session:
        return session.execute(select(func.count()).select_from(AnalysisJob)).scalar_one()


def _details(index: Index) -> list[str]:
    with index.sessions() as session:
        return [d or "" for d in session.execute(select(StudyEvent.detail).order_by(StudyEvent.id)).scalars()]


def _wait_state(index: Index, wanted: str, timeout: float = 4.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(index) == wanted:
            return
        time.sleep(0.02)
    raise AssertionError(f"study is {_state(index)}, expected {wanted}")


def _processed_study(index: Index, scheduler: BackgroundScheduler) -> tuple[Completion, Lifecycle]:
    lifecycle = Lifecycle(index.sessions, SHORT)
    completion = Completion(
        SHORT, lifecycle, index.sessions, scheduler, data_dir=index.data_dir, uid_root=ROOT, could_use=_no_localizers
    )
    receive(index, completion, Stored(STUDY, "1.4.1.1", "a", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), 2)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 5)
    _wait_state(index, "queued")
    job = lifecycle.claim_next()
    assert job is not None and job.study_uid == STUDY
    lifecycle.finish(STUDY, S.ANALYSED)
    lifecycle.transition(STUDY, S.REPORTING)
    lifecycle.transition(STUDY, S.DELIVERED)
    return completion, lifecycle


def test_results_routed_back_do_not_reopen(index: Index, scheduler: BackgroundScheduler) -> None:
    completion, _ = _processed_study(index, scheduler)
    routed_back = [
        # the node's own SR (2.25 UIDs, recognised by its Manufacturer) and SCs (under its UID root)
        Stored(STUDY, "2.25.1234", "2.25.1235", COMPREHENSIVE_SR, "SR", "fpe-node"),
        Stored(STUDY, f"{ROOT}.7.1", f"{ROOT}.7.1.1", SECONDARY_CAPTURE, "OT", "ANOTHER NAME"),
        # another vendor's SR, SC and presentation state
        Stored(STUDY, "1.9.9.1", "1.9.9.1.1", COMPREHENSIVE_SR, "SR", "OtherAI"),
        Stored(STUDY, "1.9.9.2", "1.9.9.2.1", SECONDARY_CAPTURE, "OT", "OtherAI"),
        Stored(STUDY, "1.9.9.3", "1.9.9.3.1", GRAYSCALE_PR, "PR", "PACS vendor"),
        # a new image series no pipeline selects
        Stored(STUDY, "1.4.1.9", "x", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        # the PACS re-sends the whole study (differing copies: identical ones never reach completion)
        Stored(STUDY, "1.4.1.2", "a", replaced=True),
        Stored(STUDY, "1.4.1.1", "a", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), replaced=True),
    ]
    for stored in routed_back:
        receive(index, completion, stored, count=2)
    time.sleep(SHORT.study_timeout_s + 0.3)  # every timer that could fire has fired
    assert _state(index) == "delivered"
    assert _jobs(index) == 1
    assert completion.open_studies() == []
    details = _details(index)
    assert "series 2.25.1234 arrived while delivered: the node's own result; not re-opened" in details
    assert f"series {ROOT}.7.1 arrived while delivered: the node's own result; not re-opened" in details
    assert "series 1.9.9.1 arrived while delivered: another system's SR object; not re-opened" in details
    assert "series 1.9.9.3 arrived while delivered: another system's PR object; not re-opened" in details
    assert "series 1.4.1.9 arrived while delivered: no pipeline could use it; not re-opened" in details


def test_a_new_usable_series_reopens_and_queues_again(index: Index, scheduler: BackgroundScheduler) -> None:
    completion, lifecycle = _processed_study(index, scheduler)
    receive(index, completion, Stored(STUDY, "1.4.1.3", "b"), count=3)  # e.g. a CTA acquired later
    assert _state(index) == "received"
    _wait_state(index, "queued")
    assert _jobs(index) == 2
    assert "re-opened by new series 1.4.1.3 (CT)" in _details(index)
    job = lifecycle.claim_next()
    assert job is not None and job.study_uid == STUDY and job.attempt == 1


def test_a_usable_series_during_analysis_reopens_when_it_is_over(index: Index, scheduler: BackgroundScheduler) -> None:
    lifecycle = Lifecycle(index.sessions, SHORT)
    completion = Completion(SHORT, lifecycle, index.sessions, scheduler, data_dir=index.data_dir, uid_root=ROOT)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 3)
    _wait_state(index, "queued")
    assert lifecycle.claim_next() is not None
    receive(index, completion, Stored(STUDY, "1.4.1.5", "c"), 2)
    time.sleep(0.6)
    assert _state(index) == "analysing"  # the running analysis is not disturbed
    lifecycle.finish(STUDY, S.ANALYSED)
    _wait_state(index, "queued", timeout=3.0)
    assert _jobs(index) == 2


def test_late_instances_pull_a_waiting_study_back_but_not_a_processed_one(
    index: Index, scheduler: BackgroundScheduler
) -> None:
    lifecycle = Lifecycle(index.sessions, SHORT)
    completion = Completion(SHORT, lifecycle, index.sessions, scheduler, data_dir=index.data_dir, uid_root=ROOT)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 3)
    _wait_state(index, "queued")
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 2)  # the sender paused longer than the quiet period
    assert _state(index) == "received"
    assert "re-opened by more instances of series 1.4.1.2 (CT)" in _details(index)
    _wait_state(index, "queued")
    job = lifecycle.claim_next()
    assert job is not None
    lifecycle.finish(STUDY, S.ANALYSED)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a", replaced=True), 2)  # re-sent copies: processed stays
    time.sleep(SHORT.study_timeout_s + 0.2)
    assert _state(index) == "analysed"
    assert _jobs(index) == 2  # the first, cancelled when pulled back, and the one that ran


def test_new_instances_of_an_analysed_series_run_it_again_on_all_of_it(
    index: Index, scheduler: BackgroundScheduler
) -> None:
    """A sender that paused longer than the quiet period after the analysis: the result was built
    on part of the series, so the study is analysed again (new SOP instances, not re-sent copies)."""
    completion, _ = _processed_study(index, scheduler)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 3)
    _wait_state(index, "queued")
    assert _jobs(index) == 2
    assert "re-opened by more instances of series 1.4.1.2 (CT)" in _details(index)


def test_a_new_series_is_judged_on_all_of_it_before_it_is_refused(index: Index, scheduler: BackgroundScheduler) -> None:
    """The first instance of a new series is only a first guess (a GE NCCT's 7 mm part first): judged once complete."""
    def whole_series_only(series: SeriesInfo) -> bool:
        return series.complete and _no_localizers(series)  # the first guess is always "no"

    lifecycle = Lifecycle(index.sessions, SHORT)
    completion = Completion(
        SHORT, lifecycle, index.sessions, scheduler, data_dir=index.data_dir, uid_root=ROOT, could_use=whole_series_only
    )
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 3)
    _wait_state(index, "queued")  # judged usable once complete, not refused on its first instance
    assert lifecycle.claim_next() is not None
    lifecycle.finish(STUDY, S.ANALYSED)
    receive(index, completion, Stored(STUDY, "1.4.1.6", "d", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), 2)
    receive(index, completion, Stored(STUDY, "1.4.1.7", "e"), 3)  # e.g. the NCCT's missing part, as a new series
    _wait_state(index, "queued")
    details = _details(index)
    assert "re-opened by new series 1.4.1.7 (CT)" in details
    assert "series 1.4.1.6 arrived while analysed: no pipeline could use it; not re-opened" in details
    assert _jobs(index) == 2


def test_a_purged_study_sent_again_is_not_run_again_by_its_known_series(
    index: Index, scheduler: BackgroundScheduler
) -> None:
    """After retention purged a study, a PACS re-sending it brings back instances of series the
    study had: no new data, so no second analysis (a new series still re-opens, as before)."""
    completion, lifecycle = _processed_study(index, scheduler)
    lifecycle.transition(STUDY, S.PURGED)
    receive(index, completion, Stored(STUDY, "1.4.1.2", "a"), 3)
    time.sleep(SHORT.study_timeout_s + 0.3)  # every timer that could fire has fired
    assert _state(index) == "purged"
    assert _jobs(index) == 1
