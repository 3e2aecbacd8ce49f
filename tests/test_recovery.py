"""Results lost between analysis and the outbox are recovered at restart, once (dicom_node.recovery).

The crash window is simulated in-process: the :class:`~dicom_node.worker.Analyst` records a
study ``analysed`` (as a worker process does) but its result is never handed to delivery, then
the node stops. A new node over the same data directory re-queues the study at start-up; the
test plays the worker again (Analyst + ``delivery.on_result``, as the result thread does) and a
DCMTK ``storescp`` archive logs every C-STORE request, so a second send would show.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from sqlalchemy import func, select

from dicom_node.bootstrap import Node, build_node
from dicom_node.commands import resend
from dicom_node.delivery import dataset_bytes
from dicom_node.index.analysis import latest_analysis
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study as StudyRow
from dicom_node.index.models import StudyEvent
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import StudyState
from dicom_node.settings import Settings
from dicom_node.worker import Analyst, JobOutcome
from inference.model.checkpoint import ModelCard, save_checkpoint
from inference.model.res25 import Res25, Res25Config, seeded_init_
from inference.recipe import DEFAULT_RECIPE
from inference.result import Prediction
from tests.archives import StorescpArchive
from tests.conftest import TEST_PEER, SettingsFactory
from tests.factory import Study, write_ct_stroke_study
from tests.peers import send_datasets

GRID = (10, 32, 32)
S = StudyState


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    config = Res25Config.reduced(n_slices=GRID[0])
    model = seeded_init_(Res25(config=config), seed=7).eval()
    card = ModelCard(name="res25-recovery-test", version="1", architecture=config, grid=GRID,
                     recipe=DEFAULT_RECIPE.with_grid(GRID).to_dict())
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[StorescpArchive]:
    with StorescpArchive(tmp_path / "archive") as running:
        yield running


@pytest.fixture
def settings(make_settings: SettingsFactory, checkpoint: Path, archive: StorescpArchive) -> Settings:
    return make_settings(
        inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1},
        completion={"series_quiet_s": 0.3, "study_timeout_s": 2.0},
        delivery={"retry_initial_s": 0.5, "retry_max_s": 1, "deadline_s": 30, "scan_interval_s": 0.3},
        reports={"secondary_capture": True, "pdf": False},
        peers=[TEST_PEER, {"name": "archive", "ae_titles": [archive.ae_title], "host": archive.host,
                           "port": archive.port, "roles": ["destination"]}],
    )


def _start(settings: Settings) -> tuple[Node, int]:
    node = build_node(settings)
    _, port = node.start("127.0.0.1", 0)
    return node, port


def _study(folder: Path, seed: int) -> Study:
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    return write_ct_stroke_study(
        folder, rows=32, thin_slices=36, cta_slices=44, with_thick=False, seed=seed, study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
        with_localizer=False, with_dose_report=False, with_reformats=False, with_mips=False,
    )


def _send(port: int, study: Study) -> None:
    assert set(send_datasets(port, [pydicom.dcmread(path) for path in study.paths()])) == {0}


def _wait(node: Node, study_uid: str, wanted: set[StudyState], timeout_s: float = 40.0) -> StudyState:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = node.lifecycle.state_of(study_uid)
        if state in wanted:
            return state
        time.sleep(0.1)
    raise AssertionError(f"study {study_uid} stayed {node.lifecycle.state_of(study_uid)}")


def _analyse(node: Node) -> JobOutcome:
    """What a worker process does: claim, analyse, record (the result is returned, not delivered)."""
    outcome = Analyst(node.settings, session_factory=node.session_factory).run_next()
    assert outcome is not None
    assert outcome.state is S.ANALYSED and isinstance(outcome.result, Prediction)
    return outcome


def _timeline(node: Node, study_uid: str) -> list[tuple[str, str]]:
    with node.session_factory() as session:
        rows = session.execute(
            select(StudyEvent.state, StudyEvent.detail).join(StudyRow).where(StudyRow.study_uid == study_uid)
            .order_by(StudyEvent.id)
        ).all()
    return [(state, detail or "") for state, detail in rows]


def _jobs(node: Node, study_uid: str, states: tuple[str, ...] = ("queued", "running")) -> int:
    with node.session_factory() as session:
        return int(session.scalar(
            select(func.count()).select_from(AnalysisJob).join(StudyRow, StudyRow.id == AnalysisJob.study_pk)
            .where(StudyRow.study_uid == study_uid, AnalysisJob.state.in_(states))
        ) or 0)


def _outbox_states(node: Node, study_uid: str) -> list[str]:
    with node.session_factory() as session:
        return list(session.scalars(select(OutboxItem.state).where(OutboxItem.study_uid == study_uid)))


def _write_unsent_results(node: Node, study_uid: str, result: Any) -> list[Path]:
    """Result files built by a delivery that died before queueing them (never sent)."""
    delivery = node.delivery
    objects = delivery.builder(result, delivery.source_headers(study_uid, result), [], {})
    written = []
    for _, dataset in objects:
        path = node.settings.storage.results_dir / study_uid / dataset.SeriesInstanceUID / f"{dataset.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dataset_bytes(dataset))
        written.append(path)
    return written


def test_results_lost_before_the_outbox_are_sent_once_after_restart(
    settings: Settings, archive: StorescpArchive, tmp_path: Path
) -> None:
    lost, held = _study(tmp_path / "lost", seed=11), _study(tmp_path / "held", seed=12)
    node, port = _start(settings)
    try:
        _send(port, lost)
        _send(port, held)
        _wait(node, lost.study_uid, {S.QUEUED})
        _wait(node, held.study_uid, {S.QUEUED})
        outcomes = {outcome.study_uid: outcome for outcome in (_analyse(node), _analyse(node))}
        # demonstration results are handed to delivery and held in the node (not sent)
        held_result = outcomes[held.study_uid].result
        assert isinstance(held_result, Prediction)
        demo = dataclasses.replace(held_result, model=dataclasses.replace(held_result.model, demonstration=True))
        assert node.delivery.on_result(held.study_uid, demo).sending is False
        # the lost study's delivery died after writing its files, before the outbox
        orphans = _write_unsent_results(node, lost.study_uid, outcomes[lost.study_uid].result)
    finally:
        node.stop(grace_s=1.0)
    assert set(_states_of(settings, [lost.study_uid, held.study_uid]).values()) == {"analysed"}

    node, _ = _start(settings)  # recovery runs in Node.start, before workers
    try:
        assert node.lifecycle.state_of(lost.study_uid) is S.QUEUED
        assert _jobs(node, lost.study_uid) == 1
        assert any(state == "queued" and "recovered at start-up" in detail for state, detail in _timeline(node, lost.study_uid))
        assert not any(path.exists() for path in orphans)  # never sent: no predecessor to supersede
        assert node.lifecycle.state_of(held.study_uid) is S.ANALYSED and _jobs(node, held.study_uid) == 0
        held_rows = _outbox_states(node, held.study_uid)
        assert held_rows and set(held_rows) == {"held"}

        rerun = _analyse(node)
        assert rerun.study_uid == lost.study_uid
        assert isinstance(rerun.result, Prediction)
        assert rerun.result.score == pytest.approx(outcomes[lost.study_uid].result.score)  # type: ignore[union-attr]
        report = node.delivery.on_result(lost.study_uid, rerun.result)  # what the result thread does
        assert report.sending
        assert _wait(node, lost.study_uid, {S.DELIVERED, S.PARTLY_DELIVERED, S.DEAD_LETTERED}) is S.DELIVERED
        sent = {f.sop_instance_uid for f in report.files}
        sr = next(f for f in report.files if f.kind == "sr")
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(sr.path, stop_before_pixels=True)
    finally:
        node.stop(grace_s=1.0)
    requests = archive.store_requests()
    assert sorted(requests) == sorted(sent)  # each object once, nothing of the held study

    node, _ = _start(settings)  # a delivered study is not re-sent, held results stay held
    try:
        time.sleep(3 * settings.delivery.scan_interval_s)
        assert node.lifecycle.state_of(lost.study_uid) is S.DELIVERED and _jobs(node, lost.study_uid) == 0
        assert node.lifecycle.state_of(held.study_uid) is S.ANALYSED and _jobs(node, held.study_uid) == 0
        assert _outbox_states(node, held.study_uid) == held_rows
        with node.session_factory() as session:
            analysis = latest_analysis(session, lost.study_uid)
            assert analysis is not None and analysis.outcome == "analysed"
    finally:
        node.stop(grace_s=1.0)
    assert archive.store_requests() == requests


def test_resend_and_reporting_without_outbox_rows(settings: Settings, tmp_path: Path) -> None:
    lost, stuck = _study(tmp_path / "lost", seed=21), _study(tmp_path / "stuck", seed=22)
    node, port = _start(settings)
    try:
        _send(port, lost)
        _send(port, stuck)
        _wait(node, lost.study_uid, {S.QUEUED})
        _wait(node, stuck.study_uid, {S.QUEUED})
        assert {_analyse(node).study_uid, _analyse(node).study_uid} == {lost.study_uid, stuck.study_uid}
        # a study moved to reporting whose outbox rows never came (simulated)
        node.lifecycle.transition(stuck.study_uid, S.REPORTING, "test: reporting, no rows")
    finally:
        node.stop(grace_s=1.0)

    args = argparse.Namespace(study=lost.study_uid)
    assert resend.run(args, settings) == 0  # no outbox rows: the analysis is queued again
    assert resend.run(args, settings) == 1  # already queued: nothing more, never twice
    assert _states_of(settings, [lost.study_uid])[lost.study_uid] == "queued"

    node, _ = _start(settings)
    try:
        assert node.lifecycle.state_of(lost.study_uid) is S.QUEUED and _jobs(node, lost.study_uid) == 1
        assert any("recovered at resend" in detail for _, detail in _timeline(node, lost.study_uid))
        assert node.lifecycle.state_of(stuck.study_uid) is S.QUEUED and _jobs(node, stuck.study_uid) == 1
        assert any("reporting without results" in detail for _, detail in _timeline(node, stuck.study_uid))
    finally:
        node.stop(grace_s=1.0)
    node, _ = _start(settings)  # a second restart adds nothing
    try:
        assert _jobs(node, lost.study_uid, ("queued", "running", "done")) == 2  # first run + one re-run
        assert _jobs(node, stuck.study_uid, ("queued", "running", "done")) == 2
    finally:
        node.stop(grace_s=1.0)


def _states_of(settings: Settings, study_uids: list[str]) -> dict[str, str]:
    from dicom_node.index.db import build_engine, build_session_factory

    engine = build_engine(settings)
    try:
        with build_session_factory(engine)() as session:
            rows = session.execute(select(StudyRow.study_uid, StudyRow.state).where(StudyRow.study_uid.in_(study_uids)))
            return {uid: state for uid, state in rows}
    finally:
        engine.dispose()
