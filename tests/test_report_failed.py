"""Results that cannot be built or queued end in the visible state ``report_failed`` (issue 9).

Index level (SQLite and PostgreSQL): the real report builder refuses a source header, or the
peer registry fails while the results are queued; the study is ``report_failed`` with the step
and the error in its timeline, ``fpe-node studies`` lists and counts it, start-up leaves it
alone and ``fpe-node resend``'s recovery queues its analysis again, once.

End to end (SQLite): the node in-process, a synthetic CT study sent over C-STORE, the analysis
run as a worker does; the first build raises, the study shows ``report_failed`` in
``fpe-node studies`` (table and JSON), and after ``fpe-node resend`` the re-run's results reach
a DCMTK ``storescp`` archive.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from dicom_node.commands import resend, studies
from dicom_node.delivery import Delivery, report_builder, report_context
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study, StudyEvent
from dicom_node.lifecycle import FAILURE_STATES, Lifecycle, StudyState
from dicom_node.outbox import Outbox, ResultKind
from dicom_node.recovery import count_report_failed, recover_study
from dicom_node.scu import Destination, StoreScu
from dicom_node.settings import Settings
from dicom_node.delivery import Result
from inference.result import NotAnalysed
from reports.sr import PriorReport
from reports.uids import UIDFactory
from tests import factory
from tests.studyindex import Index, add_instances, index  # noqa: F401 - fixture
from tests.test_leases import _analyse, _send, _start, _study, archive, checkpoint, settings  # noqa: F401 - fixtures

S = StudyState


def _delivery(index: Index, destinations: object = None) -> Delivery:
    settings = index.settings
    lifecycle = Lifecycle(index.sessions, settings.completion)

    def no_destinations() -> list[Destination]:
        return []

    outbox = Outbox(index.sessions, settings.delivery, settings.storage.data_dir, StoreScu("FPENODE"),
                    destinations or no_destinations)  # type: ignore[arg-type]
    uids = UIDFactory(None)
    return Delivery(settings, index.sessions, lifecycle, outbox, report_builder(settings, uids, report_context(settings, uids)))


def _analysed_study(index: Index, study_uid: str, tmp_path: Path, change: object = None) -> None:
    """A study with one real CT header on disk, walked to ``not_analysed`` as a worker would."""
    (path,) = add_instances(index, study_uid, f"{study_uid}.1", 1)
    series = factory.write_ct_series(tmp_path / study_uid, n_slices=1, rows=16)
    source = pydicom.dcmread(series.paths[0])
    if callable(change):
        change(source)
    source.save_as(path, enforce_file_format=False)
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    assert lifecycle.enqueue(study_uid, "test: ready")
    assert lifecycle.claim_next("test-worker") is not None
    lifecycle.finish(study_uid, S.NOT_ANALYSED, "no usable series")


def _timeline(index: Index, study_uid: str) -> list[tuple[str, str]]:
    with index.sessions() as session:
        rows = session.execute(
            select(StudyEvent.state, StudyEvent.detail).join(Study).where(Study.study_uid == study_uid).order_by(StudyEvent.id)
        ).all()
    return [(state, detail or "") for state, detail in rows]


def _open_jobs(index: Index, study_uid: str) -> int:
    with index.sessions() as session:
        return int(session.scalar(
            select(func.count()).select_from(AnalysisJob).join(Study, Study.id == AnalysisJob.study_pk)
            .where(Study.study_uid == study_uid, AnalysisJob.state.in_(("queued", "running")))
        ) or 0)


def test_a_failed_build_or_queue_is_visible_counted_and_retried_only_by_resend(index: Index, tmp_path: Path) -> None:
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    result = NotAnalysed(reason="no usable series", pipeline="CT")
    _analysed_study(index, "1.9.1", tmp_path, change=lambda ds: delattr(ds, "StudyInstanceUID"))
    report = _delivery(index).on_result("1.9.1", result)  # the real builder refuses the header: no raise
    assert report.failed_reason is not None and lifecycle.state_of("1.9.1") is S.REPORT_FAILED
    state, detail = _timeline(index, "1.9.1")[-1]
    assert state == "report_failed" and "building the results failed: ValueError" in detail and "StudyInstanceUID" in detail

    def registry_down() -> list[Destination]:
        raise OSError("peer registry unreadable")

    _analysed_study(index, "1.9.2", tmp_path)
    _delivery(index, registry_down).on_result("1.9.2", result)
    assert lifecycle.state_of("1.9.2") is S.REPORT_FAILED
    assert "queueing the results failed: OSError: peer registry unreadable" in _timeline(index, "1.9.2")[-1][1]

    with index.sessions() as session:
        rows = {row["study_uid"]: row for row in studies.study_rows(session)}
        only_failed = studies.study_rows(session, state="report_failed")
    assert rows["1.9.1"]["state"] == "report_failed" and rows["1.9.1"]["report_failures"] == 1
    assert "StudyInstanceUID" in rows["1.9.1"]["state_reason"]
    assert {row["study_uid"] for row in only_failed} == {"1.9.1", "1.9.2"}
    table = studies.format_list(list(rows.values())).splitlines()
    assert table[0].split()[-2:] == ["DEAD", "FAILED"]
    assert any(line.split()[:2] == ["1.9.1", "report_failed"] and line.split()[-1] == "1" for line in table)
    assert S.REPORT_FAILED in FAILURE_STATES

    for _ in range(2):  # start-up, twice: never re-run by itself (no loop), only counted
        assert lifecycle.rebuild_pending()["queued"] == 0
        assert count_report_failed(index.sessions) == 2
    assert lifecycle.state_of("1.9.1") is S.REPORT_FAILED and _open_jobs(index, "1.9.1") == 0

    finding = recover_study(index.sessions, lifecycle, index.settings, "1.9.1", by="resend")
    assert finding is not None and finding.action == "requeue"
    assert lifecycle.state_of("1.9.1") is S.QUEUED and _open_jobs(index, "1.9.1") == 1
    assert "recovered at resend: report_failed" in _timeline(index, "1.9.1")[-1][1]
    assert recover_study(index.sessions, lifecycle, index.settings, "1.9.1", by="resend") is None  # never twice


# -- end to end ------------------------------------------------------------------------------------------


class FailsOnce:
    """The node's own builder, raising the first time (as highdicom did on a missing attribute)."""

    def __init__(self, builder: object) -> None:
        self.builder = builder
        self.calls = 0

    def __call__(
        self, result: Result, sources: Sequence[Dataset], predecessors: Sequence[PriorReport], timings: dict[str, float]
    ) -> list[tuple[ResultKind, Dataset]]:
        self.calls += 1
        if self.calls == 1:
            raise AttributeError("'FileDataset' object has no attribute 'PatientBirthDate'")
        return self.builder(result, sources, predecessors, timings)  # type: ignore[operator,no-any-return]


def _studies_output(settings: Settings, capsys: pytest.CaptureFixture[str], **options: object) -> str:
    capsys.readouterr()
    values: dict[str, object] = {"study": None, "state": None, "limit": 50, "json": False}
    values.update(options)
    assert studies.run(argparse.Namespace(**values), settings) == 0
    return capsys.readouterr().out


def test_report_failed_study_is_listed_and_resend_delivers_it(
    settings: Settings, archive: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import wait_study_state

    study = _study(tmp_path / "study", seed=31)
    node, port = _start(settings)
    try:
        node.delivery.builder = FailsOnce(node.delivery.builder)
        _send(port, study)
        wait_study_state(node.lifecycle, study.study_uid, {S.QUEUED})
        outcome = _analyse(node)
        report = node.delivery.on_result(study.study_uid, outcome.result)  # type: ignore[arg-type]
        assert report.failed_reason is not None and "PatientBirthDate" in report.failed_reason
        assert node.lifecycle.state_of(study.study_uid) is S.REPORT_FAILED
        assert archive.store_requests() == []  # type: ignore[attr-defined]

        table = _studies_output(settings, capsys).splitlines()
        (line,) = [line for line in table if line.startswith(study.study_uid)]
        assert line.split()[1] == "report_failed" and line.split()[-1] == "1"
        (row,) = json.loads(_studies_output(settings, capsys, json=True, state="report_failed"))
        assert row["study_uid"] == study.study_uid and row["report_failures"] == 1
        assert "building the results failed: AttributeError" in row["state_reason"]
        detail = json.loads(_studies_output(settings, capsys, json=True, study=study.study_uid))
        assert detail["timeline"][-1]["state"] == "report_failed"

        assert resend.run(argparse.Namespace(study=study.study_uid), settings) == 0
        assert node.lifecycle.state_of(study.study_uid) is S.QUEUED
        rerun = _analyse(node)
        node.delivery.on_result(study.study_uid, rerun.result)  # type: ignore[arg-type]
        assert wait_study_state(node.lifecycle, study.study_uid, {S.DELIVERED}, timeout_s=60) is S.DELIVERED
    finally:
        node.stop(grace_s=1.0)
    received = [pydicom.dcmread(path, stop_before_pixels=True) for path in archive.received_files()]  # type: ignore[attr-defined]
    assert {str(ds.StudyInstanceUID) for ds in received} == {study.study_uid}
    assert "1.2.840.10008.5.1.4.1.1.88.34" in {str(ds.SOPClassUID) for ds in received}
