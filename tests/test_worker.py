"""The inference worker: a study sent to the node ends analysed, with its analysis recorded."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch

from dicom_node.bootstrap import Node, build_node
from dicom_node.index.analysis import latest_analysis
from dicom_node.lifecycle import StudyState
from dicom_node.worker import Analyst, InferenceWorkers
from inference.model.checkpoint import ModelCard, save_checkpoint
from inference.model.res25 import Res25, Res25Config, seeded_init_
from inference.recipe import DEFAULT_RECIPE
from inference.result import Prediction
from tests.conftest import SettingsFactory, wait_study_state
from tests.factory import Study, write_ct_stroke_study
from tests.peers import send_datasets

GRID = (10, 32, 32)
_PORTS: dict[int, int] = {}  # node -> the port it listens on


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    config = Res25Config.reduced(n_slices=GRID[0])
    model = seeded_init_(Res25(config=config), seed=5).eval()
    card = ModelCard(name="res25-worker-test", version="1", architecture=config, grid=GRID,
                     recipe=DEFAULT_RECIPE.with_grid(GRID).to_dict())
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture
def running_node(make_settings: SettingsFactory, checkpoint: Path) -> Iterator[Node]:
    settings = make_settings(
        inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1},
        completion={"series_quiet_s": 0.5, "study_timeout_s": 3.0},
    )
    node = build_node(settings)
    _, port = node.start("127.0.0.1", 0)
    _PORTS[id(node)] = port
    try:
        yield node
    finally:
        node.stop(grace_s=1.0)


def _send(node: Node, study: Study) -> None:
    datasets = [pydicom.dcmread(path) for path in study.paths()]
    statuses = send_datasets(_PORTS[id(node)], datasets)
    assert set(statuses) == {0}


def _wait_state(node: Node, study_uid: str, wanted: set[StudyState], timeout_s: float = 60.0) -> StudyState:
    return wait_study_state(node.lifecycle, study_uid, wanted, timeout_s=timeout_s, poll_s=0.2)


def _today_study(folder: Path, **kwargs: Any) -> Study:
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    return write_ct_stroke_study(
        folder, rows=48, study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
        with_dose_report=False, with_reformats=False, **kwargs,
    )


def test_ready_study_is_analysed_and_recorded(running_node: Node, tmp_path: Path) -> None:
    study = _today_study(tmp_path / "study")
    _send(running_node, study)
    _wait_state(running_node, study.study_uid, {StudyState.QUEUED})
    analyst = Analyst(running_node.settings, session_factory=running_node.session_factory)
    outcome = analyst.run_next()
    assert outcome is not None and outcome.study_uid == study.study_uid
    assert outcome.state is StudyState.ANALYSED
    assert isinstance(outcome.result, Prediction)
    assert running_node.lifecycle.state_of(study.study_uid) is StudyState.ANALYSED
    with running_node.session_factory() as session:
        row = latest_analysis(session, study.study_uid)
        assert row is not None
        assert row.outcome == "analysed" and row.pipeline == "CT"
        assert row.score == pytest.approx(outcome.result.score)
        assert row.model_name == "res25-worker-test" and row.demonstration is False
        assert row.series_used_dict() == {"ncct": study.role("ncct").series_uid, "cta": study.role("cta").series_uid}
        assert {"load", "decode", "select", "volume", "register", "preprocess", "infer", "attention"} <= set(row.timings_dict())
    assert analyst.run_next() is None  # nothing runs twice


def test_prior_study_is_not_eligible(running_node: Node, tmp_path: Path) -> None:
    study = write_ct_stroke_study(tmp_path / "prior", rows=32, study_date="20200101", with_cta=False,
                                  with_dose_report=False, with_reformats=False, with_mips=False)
    _send(running_node, study)
    _wait_state(running_node, study.study_uid, {StudyState.QUEUED})
    outcome = Analyst(running_node.settings, session_factory=running_node.session_factory).run_next()
    assert outcome is not None and outcome.state is StudyState.NOT_ELIGIBLE and outcome.result is None
    with running_node.session_factory() as session:
        row = latest_analysis(session, study.study_uid)
        assert row is not None and row.outcome == "not_eligible" and row.score is None
        assert row.reason


def test_worker_process_commits_its_results_through_the_index(running_node: Node, tmp_path: Path) -> None:
    """A spawned worker process (model loaded once there) analyses, builds and records the results
    itself: nothing comes back to this process but the index rows and the files."""
    # The test node runs no workers of its own (tests' default); this test starts one process.
    settings = running_node.settings
    one_worker = settings.model_copy(update={"inference": settings.inference.model_copy(update={"workers": 1})})
    workers = InferenceWorkers(one_worker, poll_s=0.2)
    workers.start()
    try:
        study = _today_study(tmp_path / "study", with_localizer=False, with_mips=False)
        _send(running_node, study)
        done = {StudyState.ANALYSED, StudyState.REPORTING, StudyState.DELIVERED, StudyState.NOT_ANALYSED}
        assert _wait_state(running_node, study.study_uid, done, timeout_s=180) is StudyState.ANALYSED
    finally:
        workers.stop(timeout_s=20)
    assert workers.alive() == 0
    with running_node.session_factory() as session:
        row = latest_analysis(session, study.study_uid)
        assert row is not None and row.outcome == "analysed" and row.model_name == "res25-worker-test"
    # no destination in this node: the results were built and kept, and the timeline says so
    assert any(detail and detail.startswith("results kept in the node") for _, detail in _timeline(running_node, study.study_uid))
    built = list((settings.storage.results_dir / study.study_uid).glob("*/*.dcm"))
    assert len(built) >= 1 + GRID[0]  # the SR and a capture per model slice


# --------------------------------------------------------------------------- issue 9: one judgement


def _today() -> tuple[str, str]:
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _timeline(node: Node, study_uid: str) -> list[tuple[str, str | None]]:
    from sqlalchemy import select

    from dicom_node.index.models import Study as StudyRow, StudyEvent

    with node.session_factory() as session:
        return [(row.state, row.detail) for row in session.execute(
            select(StudyEvent.state, StudyEvent.detail).join(StudyRow).where(StudyRow.study_uid == study_uid)
            .order_by(StudyEvent.id))]


def _analyse_all(node: Node) -> dict[str, Any]:
    analyst = Analyst(node.settings, session_factory=node.session_factory)
    outcomes = {}
    while (outcome := analyst.run_next()) is not None:
        outcomes[outcome.study_uid] = outcome
    return outcomes


def test_completion_and_worker_judge_with_one_selector(running_node: Node) -> None:
    analyst = Analyst(running_node.settings, session_factory=running_node.session_factory)
    assert running_node.selector == analyst.selector
    assert running_node.selector.rules.pipelines["CT"].required == ("ncct", "cta")  # the served recipe's


def test_ge_mixed_thickness_tilted_study_sent_thick_slices_first_is_analysed(running_node: Node, tmp_path: Path) -> None:
    from tests.factory import CTA_TRANSFORM, write_ct_mixed_thickness, write_ct_series

    date, time_ = _today()
    ncct = write_ct_mixed_thickness(tmp_path / "ge", rows=32, study_date=date, study_time=time_)
    cta = write_ct_series(
        tmp_path / "ge", kind="cta", study_uid=ncct.study_uid, study_date=date, study_time=time_, rows=40,
        fov_mm=220.0, n_slices=48, slice_spacing=2.0, bottom_mm=-90.0, world_from_patient=CTA_TRANSFORM,
        series_number=5,
    )
    datasets = [pydicom.dcmread(path) for path in (*ncct.paths, *cta.paths)]
    datasets.sort(key=lambda ds: (ds.SeriesInstanceUID != ncct.series_uid, -float(ds.SliceThickness)))  # 7 mm first
    assert set(send_datasets(_PORTS[id(running_node)], datasets)) == {0}
    _wait_state(running_node, ncct.study_uid, {StudyState.QUEUED, StudyState.NOT_ELIGIBLE})
    assert _timeline(running_node, ncct.study_uid)[-1] == ("queued", "2 usable series complete")
    outcome = _analyse_all(running_node)[ncct.study_uid]
    assert outcome.state is StudyState.ANALYSED, outcome.reason
    assert outcome.result.series_used == {"ncct": ncct.series_uid, "cta": cta.series_uid}


def test_head_study_without_usable_series_is_not_analysed_naming_each(running_node: Node, tmp_path: Path) -> None:
    date, time_ = _today()
    study = write_ct_stroke_study(
        tmp_path / "short", rows=32, thin_slices=10, with_thick=False, with_cta=False, with_dose_report=False,
        with_reformats=False, with_mips=False, study_date=date, study_time=time_,
    )
    _send(running_node, study)
    _wait_state(running_node, study.study_uid, {StudyState.QUEUED, StudyState.NOT_ELIGIBLE})
    outcome = _analyse_all(running_node)[study.study_uid]
    assert outcome.state is StudyState.NOT_ANALYSED
    assert "'HEAD NCCT 2.5mm STD': not ncct: 10 slice positions, needs >= 15" in outcome.reason
    assert "'Surview': localizer / scout" in outcome.reason


def _explain_verdict(node: Node, folder: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    import argparse
    import json

    from dicom_node.commands import explain

    capsys.readouterr()
    assert explain.run(argparse.Namespace(paths=[folder], json=True, now=None, rules_only=False), node.settings) == 0
    (patient,) = json.loads(capsys.readouterr().out)
    return patient["verdict"]  # type: ignore[no-any-return]


def test_explain_verdict_is_the_runs(running_node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.factory import default_patient, write_mr_stroke_study

    date, time_ = _today()
    common = dict(rows=16, study_date=date, study_time=time_)
    cases = {
        # enhanced (multi-frame) DWI and ADC: fewer instances to send
        "coverage_62mm": write_mr_stroke_study(tmp_path / "a", patient=default_patient(11), n_slices=16,
                                               slice_spacing=62.0 / 15, enhanced=True, **common),  # type: ignore[arg-type]
        "few_slices": write_mr_stroke_study(tmp_path / "b", patient=default_patient(12), n_slices=10,
                                            enhanced=True, **common),  # type: ignore[arg-type]
        "missing_b": write_mr_stroke_study(tmp_path / "c", patient=default_patient(13), n_slices=16,
                                           **common),  # type: ignore[arg-type]
    }
    for path in cases["missing_b"].series["dwi"].paths:  # the DWI images carry no b-value anywhere
        ds = pydicom.dcmread(path)
        del ds.DiffusionBValue
        ds.save_as(path)
    for study in cases.values():
        _send(running_node, study)
    for study in cases.values():
        _wait_state(running_node, study.study_uid, {StudyState.QUEUED, StudyState.NOT_ELIGIBLE})
    outcomes = _analyse_all(running_node)
    for name, study in cases.items():
        verdict = _explain_verdict(running_node, study.directory, capsys)
        outcome = outcomes[study.study_uid]
        assert outcome.state is StudyState.NOT_ANALYSED, name
        assert verdict == {"outcome": "not_analysed", "pipeline": verdict["pipeline"], "reason": outcome.reason}, name
    assert "covers 62 mm" in outcomes[cases["coverage_62mm"].study_uid].reason
    assert "10 slice positions" in outcomes[cases["few_slices"].study_uid].reason
    assert "not dwi: highest b-value" in outcomes[cases["missing_b"].study_uid].reason
