"""Leases, fencing tokens and the transactional outbox, in-process (dicom_node.leases).

A serving :class:`~dicom_node.worker.Analyst` (what each worker process runs) commits the
analysis, the study's state and the results' outbox rows in one transaction. A job whose lease
ran out is claimed again with a new fencing token, and the first worker's late commit is
refused: nothing of it is recorded and its files are removed. Outbox rows are leased the same
way between senders. A DCMTK ``storescp`` archive logs every C-STORE request, so a second send
would show. The same guarantees across real processes: ``tests/test_roles.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from sqlalchemy import func, select, update

from dicom_node.bootstrap import Node, build_node
from dicom_node.commands import resend
from dicom_node.index.analysis import Analysis
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study as StudyRow
from dicom_node.index.models import StudyEvent
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import StudyState
from dicom_node.outbox import RunReport
from dicom_node.scu import StoreOutcome
from dicom_node.settings import Settings
from dicom_node.worker import Analyst, JobOutcome
from inference.result import Prediction
from tests.archives import StorescpArchive
from tests.conftest import TEST_PEER, SettingsFactory
from tests.factory import Study, write_ct_stroke_study
from tests.peers import send_datasets
from tests.training_support import reduced_checkpoint

S = StudyState


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return reduced_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", name="res25-recovery-test", seed=7)


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


def _serving(node: Node) -> Analyst:
    """A worker process's analyst, in-process: it builds, writes and queues its results itself."""
    return Analyst(node.settings, session_factory=node.session_factory, delivery=node.delivery)


def _expire_lease(node: Node, study_uid: str) -> None:
    """What time does to a worker that stopped renewing: its job's lease ends in the past."""
    with node.session_factory.begin() as session:
        study_pk = session.scalar(select(StudyRow.id).where(StudyRow.study_uid == study_uid))
        session.execute(update(AnalysisJob).where(AnalysisJob.study_pk == study_pk, AnalysisJob.state == "running")
                        .values(lease_until=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))


def _expire_outbox_leases(node: Node, study_uid: str) -> None:
    with node.session_factory.begin() as session:
        session.execute(update(OutboxItem).where(OutboxItem.study_uid == study_uid)
                        .values(lease_until=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))


def _outbox_objects(node: Node, study_uid: str) -> list[str]:
    with node.session_factory() as session:
        return sorted(session.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.study_uid == study_uid)))


def _analyses(node: Node, study_uid: str) -> int:
    with node.session_factory() as session:
        return int(session.scalar(
            select(func.count()).select_from(Analysis).join(StudyRow, StudyRow.id == Analysis.study_pk)
            .where(StudyRow.study_uid == study_uid)) or 0)


def _result_files(node: Node, study_uid: str) -> set[str]:
    folder = node.settings.storage.results_dir / study_uid
    return {path.stem for path in folder.glob("*/*.dcm")} if folder.is_dir() else set()


def test_a_worker_commits_its_analysis_and_results_in_one_transaction(
    settings: Settings, archive: StorescpArchive, tmp_path: Path
) -> None:
    study = _study(tmp_path / "study", seed=11)
    node, port = _start(settings)
    try:
        _send(port, study)
        _wait(node, study.study_uid, {S.QUEUED})
        outcome = _serving(node).run_next()
        assert outcome is not None and outcome.state is S.ANALYSED and not outcome.fenced
        # the moment the worker returns, the analysis, the state and every outbox row are there
        assert node.lifecycle.state_of(study.study_uid) in {S.REPORTING, S.DELIVERED}
        assert _analyses(node, study.study_uid) == 1
        rows = _outbox_states(node, study.study_uid)
        assert rows and _jobs(node, study.study_uid) == 0
        states = [state for state, _ in _timeline(node, study.study_uid)]
        assert states[states.index("analysing"):][:3] == ["analysing", "analysed", "reporting"]
        assert _wait(node, study.study_uid, {S.DELIVERED, S.PARTLY_DELIVERED, S.DEAD_LETTERED}) is S.DELIVERED
        queued = _result_files(node, study.study_uid)
    finally:
        node.stop(grace_s=1.0)
    assert sorted(archive.store_requests()) == sorted(queued)  # each object once


def test_a_worker_whose_lease_ran_out_is_fenced_out(settings: Settings, archive: StorescpArchive, tmp_path: Path) -> None:
    study = _study(tmp_path / "study", seed=12)
    node, port = _start(settings)
    try:
        _send(port, study)
        _wait(node, study.study_uid, {S.QUEUED})
        first, second = _serving(node), _serving(node)
        paused = first.lifecycle.claim_next("worker-a")  # claims, then stops renewing (paused, partitioned)
        assert paused is not None and paused.attempt == 1
        _expire_lease(node, study.study_uid)
        taken = second.lifecycle.claim_next("worker-b")
        assert taken is not None and taken.study_uid == study.study_uid and taken.fence > paused.fence
        assert first.lifecycle.renew(paused) is False  # the paused worker's renewal is refused
        done = second.run_job(taken)
        assert done.state is S.ANALYSED and not done.fenced
        rows_after_second = _outbox_objects(node, study.study_uid)
        files_after_second = _result_files(node, study.study_uid)

        late = first.run_job(paused)  # the paused worker wakes up and finishes its analysis
        assert late.fenced and late.result is None
        assert _analyses(node, study.study_uid) == 1  # its analysis row was rolled back
        assert _outbox_objects(node, study.study_uid) == rows_after_second  # no outbox row of it
        assert _result_files(node, study.study_uid) == files_after_second  # its files removed
        assert any("ran out" in detail for _, detail in _timeline(node, study.study_uid))
        assert _wait(node, study.study_uid, {S.DELIVERED, S.PARTLY_DELIVERED, S.DEAD_LETTERED}) is S.DELIVERED
    finally:
        node.stop(grace_s=1.0)
    assert sorted(archive.store_requests()) == sorted(files_after_second)  # one SR, one set of captures


def test_a_study_whose_workers_keep_dying_ends_not_analysed(settings: Settings, tmp_path: Path) -> None:
    study = _study(tmp_path / "study", seed=13)
    node, port = _start(settings)
    try:
        _send(port, study)
        _wait(node, study.study_uid, {S.QUEUED})
        for attempt in (1, 2):
            job = node.lifecycle.claim_next(f"worker-{attempt}")
            assert job is not None and job.attempt == attempt
            _expire_lease(node, study.study_uid)  # the worker died mid-analysis, twice
        assert node.lifecycle.claim_next("worker-3") is None
        assert node.lifecycle.state_of(study.study_uid) is S.NOT_ANALYSED
        assert "analysis interrupted 2 times" in (_timeline(node, study.study_uid)[-1][1])
        assert _jobs(node, study.study_uid) == 0
    finally:
        node.stop(grace_s=1.0)


def test_restart_takes_back_what_a_dead_local_worker_held_and_keeps_a_live_one(
    settings: Settings, tmp_path: Path
) -> None:
    dead, live = _study(tmp_path / "dead", seed=14), _study(tmp_path / "live", seed=15)
    node, port = _start(settings)
    try:
        _send(port, dead)
        _send(port, live)
        _wait(node, dead.study_uid, {S.QUEUED})
        _wait(node, live.study_uid, {S.QUEUED})
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
        claims = {node.lifecycle.claim_next(f"{socket.gethostname()[:32]}:{gone.stdout.strip()}"),
                  node.lifecycle.claim_next("gpu-node-7:4242")}  # another machine's worker, renewing
        holders = {job.study_uid: job for job in claims if job is not None}
        assert set(holders) == {dead.study_uid, live.study_uid}
    finally:
        node.stop(grace_s=1.0)
    node, _ = _start(settings)  # rebuild_pending at start-up
    try:
        by_dead = next(uid for uid, job in holders.items() if job.token.startswith(socket.gethostname()[:32]))
        by_other = next(uid for uid in holders if uid != by_dead)
        assert node.lifecycle.state_of(by_dead) is S.QUEUED  # its process is gone: queued again at once
        assert node.lifecycle.state_of(by_other) is S.ANALYSING  # a live lease elsewhere: left alone
    finally:
        node.stop(grace_s=1.0)


def test_a_sender_whose_lease_ran_out_does_not_record_its_attempt(
    settings: Settings, archive: StorescpArchive, tmp_path: Path
) -> None:
    study = _study(tmp_path / "study", seed=16)
    node, port = _start(settings)
    try:
        node.delivery.stop()  # this test drives the outbox by hand
        _send(port, study)
        _wait(node, study.study_uid, {S.QUEUED})
        assert _serving(node).run_next() is not None
        outbox = node.delivery.outbox
        stalled = outbox._due(outbox.clock())  # sender A claims the due rows, then stalls
        assert stalled and len({item.claimed_by for item in stalled}) == 1
        assert outbox._due(outbox.clock()) == []  # leased: sender B finds nothing to take
        _expire_outbox_leases(node, study.study_uid)
        taken = outbox._due(outbox.clock())  # B takes them once A's lease ran out
        assert [item.id for item in taken] == [item.id for item in stalled]
        assert all(b.fence == a.fence + 1 for a, b in zip(stalled, taken, strict=True))
        assert outbox.renew(stalled) is False and outbox.renew(taken) is True
        # A wakes up and records a success it never had confirmed: refused by the fence
        outbox._record(stalled, [StoreOutcome(item.sop_instance_uid, True, 0) for item in stalled], RunReport(), None)
        assert set(_outbox_states(node, study.study_uid)) == {"pending"}
        _expire_outbox_leases(node, study.study_uid)  # B stalls too; sender C delivers
        report = outbox.run_once()
        assert report.sent == len(stalled)
        assert node.lifecycle.state_of(study.study_uid) is S.DELIVERED  # settled with its last row
        outbox._record(taken, [StoreOutcome(item.sop_instance_uid, False, error="late") for item in taken],
                       RunReport(), None)
        assert set(_outbox_states(node, study.study_uid)) == {"sent"}  # B's late failure changed nothing
        claimed = stalled
    finally:
        node.stop(grace_s=1.0)
    assert len(archive.store_requests()) == len(claimed)


def test_resend_re_runs_only_a_report_failed_study(settings: Settings, tmp_path: Path) -> None:
    study = _study(tmp_path / "study", seed=21)
    node, port = _start(settings)
    try:
        _send(port, study)
        _wait(node, study.study_uid, {S.QUEUED})
        _analyse(node)  # analysed, results not built (no delivery in this analyst)
    finally:
        node.stop(grace_s=1.0)
    args = argparse.Namespace(study=study.study_uid)
    assert resend.run(args, settings) == 1  # nothing queued and not report_failed: nothing to resend
    assert _states_of(settings, [study.study_uid])[study.study_uid] == "analysed"
    node, _ = _start(settings)  # start-up repairs nothing: no handoff can lose a result any more
    try:
        assert node.lifecycle.state_of(study.study_uid) is S.ANALYSED and _jobs(node, study.study_uid) == 0
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
