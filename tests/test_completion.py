"""Completion: series quiet periods, pipeline readiness, study timeout, association release, restart.

Short timers (0.3 s quiet, 1.2 s study timeout) on a real APScheduler BackgroundScheduler.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update

from dicom_node.completion import Completion, SelectionReadiness, SeriesInfo, series_info_of
from dicom_node.index.db import write_session
from dicom_node.index.models import Series, Study, StudyEvent
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.selector import build_selector
from dicom_node.settings import CompletionSettings
from tests import factory as factory_module
from tests.studyindex import COMPREHENSIVE_SR, Index, Stored, add_files, add_instances, index, receive  # noqa: F401

S = StudyState
SHORT = CompletionSettings(series_quiet_s=0.3, study_timeout_s=1.2, release_shortens_wait=True, live_window_s=3600)
pytestmark = pytest.mark.parametrize("index", ["sqlite"], indirect=True)


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    sched.start()
    yield sched
    sched.shutdown(wait=False)


def _completion(index: Index, scheduler: BackgroundScheduler, settings: CompletionSettings = SHORT, **rules: object) -> Completion:
    lifecycle = Lifecycle(index.sessions, settings)
    return Completion(settings, lifecycle, index.sessions, scheduler, data_dir=index.data_dir, **rules)  # type: ignore[arg-type]


def _state(index: Index, study_uid: str) -> str:
    with index.sessions() as session:
        return session.execute(select(Study.state).where(Study.study_uid == study_uid)).scalar_one()


def _wait_for(index: Index, study_uid: str, states: set[str], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _state(index, study_uid) in states:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"study {study_uid} still {_state(index, study_uid)} after {timeout} s")


def _events(index: Index, study_uid: str) -> list[tuple[str, str | None]]:
    with index.sessions() as session:
        return [
            (row.state, row.detail)
            for row in session.execute(
                select(StudyEvent.state, StudyEvent.detail).join(Study).where(Study.study_uid == study_uid).order_by(StudyEvent.id)
            )
        ]


def test_series_quiet_makes_the_study_ready(index: Index, scheduler: BackgroundScheduler) -> None:
    completed: list[str] = []
    completion = _completion(index, scheduler, on_series_complete=[lambda series: completed.append(series.series_uid)])
    receive(index, completion, Stored("1.3.1", "1.3.1.1", "x"), count=5)
    receive(index, completion, Stored("1.3.1", "1.3.1.2", "x", sop_class_uid=COMPREHENSIVE_SR, modality="SR"))
    waited = _wait_for(index, "1.3.1", {"queued"})
    assert 0.2 < waited < 1.0  # the quiet period, not the study timeout
    events = _events(index, "1.3.1")
    assert [state for state, _ in events][-2:] == ["complete", "queued"]
    assert events[-1][1] == "1 usable series complete"
    with index.sessions() as session:
        assert all(at is not None for at in session.execute(select(Series.complete_at)).scalars())
    assert completion.open_studies() == []
    assert completed == ["1.3.1.1"]  # usable series only (not the SR)


def test_a_series_still_arriving_holds_the_study(index: Index, scheduler: BackgroundScheduler) -> None:
    completion = _completion(index, scheduler)
    receive(index, completion, Stored("1.3.2", "1.3.2.1", "x"))
    start = time.monotonic()
    for _ in range(6):  # the second series keeps coming for ~0.9 s
        receive(index, completion, Stored("1.3.2", "1.3.2.2", "x"))
        assert _state(index, "1.3.2") == "received"
        time.sleep(0.15)
    _wait_for(index, "1.3.2", {"queued"})
    assert time.monotonic() - start > 0.9


def test_pipeline_not_ready_waits_for_the_study_timeout(index: Index, scheduler: BackgroundScheduler) -> None:
    def needs_dwi_and_adc(series: Sequence[SeriesInfo]) -> bool:
        return {"DWI", "ADC"} <= {s.series_description for s in series}

    completion = _completion(index, scheduler, pipeline_ready=needs_dwi_and_adc)
    receive(index, completion, Stored("1.3.3", "1.3.3.1", "x", modality="MR", series_description="DWI"))
    waited = _wait_for(index, "1.3.3", {"queued"})
    assert waited > 1.0
    assert _events(index, "1.3.3")[-2][1] == "study timeout (1.2 s after its last instance)"

    receive(index, completion, Stored("1.3.4", "1.3.4.1", "x", modality="MR", series_description="DWI"))
    receive(index, completion, Stored("1.3.4", "1.3.4.2", "x", modality="MR", series_description="ADC"))
    assert _wait_for(index, "1.3.4", {"queued"}) < 1.0


def test_only_unusable_series_end_not_eligible_after_timeout(index: Index, scheduler: BackgroundScheduler) -> None:
    completion = _completion(index, scheduler)
    receive(index, completion, Stored("1.3.5", "1.3.5.1", "x", sop_class_uid=COMPREHENSIVE_SR, modality="SR"))
    _wait_for(index, "1.3.5", {"not_eligible"})
    assert _events(index, "1.3.5")[-1] == ("not_eligible", "no series any pipeline could use (1 received)")


def test_association_release_shortens_the_wait(index: Index, scheduler: BackgroundScheduler) -> None:
    slow = CompletionSettings(series_quiet_s=4, study_timeout_s=8, release_shortens_wait=True, live_window_s=3600)
    completion = _completion(index, scheduler, slow)
    receive(index, completion, Stored("1.3.6", "1.3.6.1", "x"), count=3)
    completion.association_released({"1.3.6.1"})
    assert _wait_for(index, "1.3.6", {"queued"}) < 2.0

    off = slow.model_copy(update={"release_shortens_wait": False})
    completion = _completion(index, scheduler, off)
    receive(index, completion, Stored("1.3.7", "1.3.7.1", "x"))
    completion.association_released({"1.3.7.1"})
    time.sleep(1.5)
    assert _state(index, "1.3.7") == "received"


def test_restart_rebuilds_timers_from_the_index(index: Index, scheduler: BackgroundScheduler) -> None:
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    add_instances(index, "1.3.8", "1.3.8.1", 4, received_at=long_ago)  # node died before the timer fired
    add_instances(index, "1.3.9", "1.3.9.1", 2)  # arrived just now
    with write_session(index.sessions) as session:
        session.execute(update(Study).values(last_received_at=long_ago).where(Study.study_uid == "1.3.8"))
    completion = _completion(index, scheduler)
    assert completion.start() == 2
    assert _wait_for(index, "1.3.8", {"queued"}) < 0.3
    assert _wait_for(index, "1.3.9", {"queued"}) < 1.0
    assert completion.rebuild() == 0  # nothing left open, nothing queued twice
    lifecycle = Lifecycle(index.sessions, SHORT)
    assert {lifecycle.claim_next().study_uid, lifecycle.claim_next().study_uid} == {"1.3.8", "1.3.9"}  # type: ignore[union-attr]
    assert lifecycle.claim_next() is None


def test_selection_rules_decide_which_series_count(index: Index, scheduler: BackgroundScheduler, tmp_path: Path) -> None:
    from inference.selection import Selector
    from tests.factory import write_ct_stroke_study

    study = write_ct_stroke_study(
        tmp_path / "study", rows=32, thin_slices=40, with_thick=False, with_cta=False, with_reformats=False,
        with_mips=False,
    )
    readiness = SelectionReadiness(Selector(), index.sessions, index.data_dir)
    completion = _completion(
        index, scheduler, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready
    )
    stored = {}
    for key in ("localizer", "dose_report", "ncct_thin"):
        series = study.series[key]
        sop_class = COMPREHENSIVE_SR if key == "dose_report" else "1.2.840.10008.5.1.4.1.1.2"
        paths = add_files(index, study.study_uid, series.series_uid, series.paths, modality=series.modality,
                          sop_class_uid=sop_class)
        stored[key] = Stored(study.study_uid, series.series_uid, f"{series.series_uid}.1", sop_class, series.modality,
                             "ACME", series.description, path=paths[0])
    infos = {key: series_info_of(value) for key, value in stored.items()}
    assert not readiness.could_use(infos["localizer"])
    assert readiness.could_use(infos["ncct_thin"])
    assert not readiness.pipeline_ready([infos["localizer"]])
    assert readiness.pipeline_ready([infos["ncct_thin"]])

    for value in stored.values():
        completion.instance_stored(value)
    _wait_for(index, study.study_uid, {"queued"})
    assert _events(index, study.study_uid)[-1][1] == "1 usable series complete"


def test_failing_rules_never_stall_a_study(index: Index, scheduler: BackgroundScheduler) -> None:
    def broken_could_use(series: SeriesInfo) -> bool:
        raise OSError("header unreadable")

    def broken_ready(series: Sequence[SeriesInfo]) -> bool:
        raise ValueError("rules bug")

    completion = _completion(index, scheduler, could_use=broken_could_use, pipeline_ready=broken_ready)
    receive(index, completion, Stored("1.3.10", "1.3.10.1", "x"), count=2)
    assert _wait_for(index, "1.3.10", {"queued"}) > 1.0  # default could_use, then the study timeout
    assert _events(index, "1.3.10")[-2][1] == "study timeout (1.2 s after its last instance)"


def test_a_lost_timer_is_rearmed_by_the_sweeper(index: Index, scheduler: BackgroundScheduler) -> None:
    completion = _completion(index, scheduler)
    completion.start()
    receive(index, completion, Stored("1.3.11", "1.3.11.1", "x"))
    scheduler.remove_job("completion:1.3.11")  # as if the scheduler had dropped it
    assert _wait_for(index, "1.3.11", {"queued"}) < 3.0


# --------------------------------------------------------------------------- issue 9: one judgement, any order


@pytest.fixture(scope="module")
def ge_head_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[factory_module.Series, factory_module.Series]:
    """A GE-style tilted NCCT (4 mm posterior fossa, 7 mm above) and a thin CTA of the same study."""
    folder = tmp_path_factory.mktemp("ge_head_ct")
    ncct = factory_module.write_ct_mixed_thickness(folder, rows=16, study_date=_TODAY[0], study_time=_TODAY[1])
    cta = factory_module.write_ct_series(
        folder, kind="cta", study_uid=ncct.study_uid, rows=16, n_slices=32, slice_spacing=2.0, bottom_mm=-60.0,
        series_number=5, study_date=_TODAY[0], study_time=_TODAY[1],
    )
    return ncct, cta


@pytest.fixture
def bootstrap_readiness(index: Index) -> SelectionReadiness:
    """Completion's readiness rules exactly as the node builds them."""
    from dicom_node.bootstrap import _selection_readiness

    return _selection_readiness(index.settings, index.sessions)


_NOW = dt.datetime.now() - dt.timedelta(minutes=5)
_TODAY = (_NOW.strftime("%Y%m%d"), _NOW.strftime("%H%M%S"))


def _feed(index: Index, completion: Completion, files: Sequence[tuple[factory_module.Series, Path]]) -> None:
    """Index and announce each file, in the order given, as the SCP does for each C-STORE."""
    for series, path in files:
        (stored_path,) = add_files(index, series.study_uid, series.series_uid, [path], modality="CT")
        completion.instance_stored(
            Stored(series.study_uid, series.series_uid, f"{series.series_uid}.x", modality="CT",
                   series_description=series.description, path=stored_path)
        )


def _thick_first(
    files: list[tuple[factory_module.Series, Path]], thin_first: bool = False
) -> list[tuple[factory_module.Series, Path]]:
    """The NCCT's 7 mm slices first (what an Orthanc send did): its first instance is not an NCCT by itself."""
    def thickness(item: tuple[factory_module.Series, Path]) -> float:
        return float(pydicom.dcmread(item[1], stop_before_pixels=True).SliceThickness)

    sign = 1.0 if thin_first else -1.0
    return sorted(files, key=lambda item: (item[0].key != "ncct_mixed", sign * thickness(item)))


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled", "thick_first"])
def test_mixed_thickness_study_is_ready_in_any_arrival_order(
    index: Index, scheduler: BackgroundScheduler, ge_head_ct: tuple[factory_module.Series, factory_module.Series], order: str
) -> None:
    ncct, cta = ge_head_ct
    files = [(s, p) for s in (ncct, cta) for p in s.paths]
    arranged = {
        "sorted": sorted(files, key=lambda item: str(item[1])),
        "reversed": sorted(files, key=lambda item: str(item[1]), reverse=True),
        "shuffled": random.Random(9).sample(files, len(files)),
        "thick_first": _thick_first(files),
    }[order]
    readiness = SelectionReadiness(build_selector(index.settings), index.sessions, index.data_dir)
    completion = _completion(index, scheduler, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready)
    _feed(index, completion, arranged)
    waited = _wait_for(index, ncct.study_uid, {"queued", "not_eligible"})
    assert _state(index, ncct.study_uid) == "queued"
    assert _events(index, ncct.study_uid)[-1][1] == "2 usable series complete"  # not the study timeout
    assert waited < SHORT.study_timeout_s


def test_a_partly_judged_series_never_makes_a_study_not_eligible(
    index: Index, scheduler: BackgroundScheduler, ge_head_ct: tuple[factory_module.Series, factory_module.Series]
) -> None:
    ncct, _ = ge_head_ct
    readiness = SelectionReadiness(build_selector(index.settings), index.sessions, index.data_dir)
    completion = _completion(index, scheduler, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready)
    _feed(index, completion, _thick_first([(ncct, p) for p in ncct.paths]))  # NCCT only, 7 mm slices first
    _wait_for(index, ncct.study_uid, {"queued", "not_eligible"}, timeout=10)
    assert _state(index, ncct.study_uid) == "queued"  # the worker decides (no CTA: not analysed, with the reason)
    assert "no series a pipeline could use" not in (_events(index, ncct.study_uid)[-2][1] or "")


def test_ncct_alone_waits_for_its_cta_with_the_workers_rules(
    index: Index, scheduler: BackgroundScheduler, ge_head_ct: tuple[factory_module.Series, factory_module.Series],
    bootstrap_readiness: SelectionReadiness,
) -> None:
    ncct, cta = ge_head_ct
    readiness = bootstrap_readiness
    completion = _completion(index, scheduler, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready)
    _feed(index, completion, _thick_first([(ncct, p) for p in ncct.paths], thin_first=True))
    before = completion.checks_run
    assert completion.wait_for_checks(before + 2, timeout_s=5)  # the NCCT is complete and was judged
    assert _state(index, ncct.study_uid) == "received"  # not queued on the NCCT alone
    _feed(index, completion, [(cta, p) for p in cta.paths])
    _wait_for(index, ncct.study_uid, {"queued"})
    assert [state for state, _ in _events(index, ncct.study_uid)].count("queued") == 1
    assert _events(index, ncct.study_uid)[-1][1] == "2 usable series complete"


def test_an_unreadable_header_drops_its_instance_and_never_stalls(
    index: Index, scheduler: BackgroundScheduler, ge_head_ct: tuple[factory_module.Series, factory_module.Series],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    ncct, cta = ge_head_ct
    readiness = SelectionReadiness(build_selector(index.settings), index.sessions, index.data_dir)
    completion = _completion(index, scheduler, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready)
    ds = pydicom.dcmread(cta.paths[0])
    ds[0x00200013]._value = "A1"  # InstanceNumber (IS) that is no integer: the header cannot be summarised
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    files = [(ncct, p) for p in sorted(ncct.paths)] + [(cta, broken)] + [(cta, p) for p in cta.paths]
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):
        _feed(index, completion, files)
        assert _wait_for(index, ncct.study_uid, {"queued"}) < SHORT.study_timeout_s
    assert _events(index, ncct.study_uid)[-1][1] == "2 usable series complete"
    assert any("left out of the series' judgement" in r.getMessage() for r in caplog.records)
