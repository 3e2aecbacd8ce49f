"""The assembled node: a study sent over DICOM goes quiet, is queued once; results sent back
to it do not re-open it; a restart rebuilds the pending work (bootstrap wiring of issue 2 items 6-8).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from dicom_node.bootstrap import build_node
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Study, StudyEvent
from dicom_node.lifecycle import StudyState
from tests.factory import write_ct_stroke_study
from tests.peers import send_datasets

TIMERS = {"series_quiet_s": 0.4, "study_timeout_s": 6.0}


def _state(node: Any, study_uid: str) -> str | None:
    with node.session_factory() as session:
        return session.execute(select(Study.state).where(Study.study_uid == study_uid)).scalar_one_or_none()


def _wait_state(node: Any, study_uid: str, wanted: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(node, study_uid) == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"study {study_uid} is {_state(node, study_uid)}, expected {wanted}")


def _jobs(node: Any) -> int:
    with node.session_factory() as session:
        return session.execute(select(func.count()).select_from(AnalysisJob)).scalar_one()


def _own_sr(source: pydicom.Dataset) -> pydicom.Dataset:
    """A minimal stand-in for the node's SR: same study, its own series, Manufacturer fpe-node."""
    sr = pydicom.Dataset()
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"):
        if keyword in source:
            setattr(sr, keyword, getattr(source, keyword))
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    sr.SOPInstanceUID = generate_uid(prefix=None)  # 2.25. UUID UIDs: only the Manufacturer tells
    sr.SeriesInstanceUID = generate_uid(prefix=None)
    sr.Modality = "SR"
    sr.Manufacturer = "fpe-node"
    sr.SeriesNumber = 9901
    sr.InstanceNumber = 1
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return sr


def test_study_over_dicom_is_queued_once_and_results_do_not_reopen(make_settings: Any, tmp_path: Path) -> None:
    study = write_ct_stroke_study(
        tmp_path / "study", rows=32, thin_slices=30, with_thick=False, with_cta=False, with_reformats=False,
        with_mips=False, with_dose_report=False,
    )
    datasets = [pydicom.dcmread(path) for path in study.paths()]
    settings = make_settings(completion=TIMERS)
    node = build_node(settings)
    _, port = node.start("127.0.0.1", 0)
    try:
        assert set(send_datasets(port, datasets)) == {0}
        _wait_state(node, study.study_uid, "queued")  # release + quiet, not the 6 s timeout
        job = node.lifecycle.claim_next("test-worker")
        assert job is not None and job.study_uid == study.study_uid and job.live is False  # acquired 2026-01-01
        node.lifecycle.finish(study.study_uid, StudyState.NOT_ANALYSED, "test: no model")

        assert set(send_datasets(port, [_own_sr(datasets[0])])) == {0}  # the PACS routes our result back
        time.sleep(1.5)
        assert _state(node, study.study_uid) == "not_analysed"
        assert _jobs(node) == 1
        with node.session_factory() as session:
            details = [d or "" for d in session.execute(select(StudyEvent.detail).order_by(StudyEvent.id)).scalars()]
        assert any("the node's own result; not re-opened" in d for d in details)
    finally:
        node.stop(grace_s=1.0)


def test_restart_rebuilds_timers_and_queue(make_settings: Any, tmp_path: Path) -> None:
    study = write_ct_stroke_study(
        tmp_path / "study", rows=32, thin_slices=20, with_thick=False, with_cta=False, with_reformats=False,
        with_mips=False, with_dose_report=False, with_localizer=False,
    )
    settings = make_settings(completion={**TIMERS, "release_shortens_wait": False, "series_quiet_s": 30.0,
                                         "study_timeout_s": 60.0})
    node = build_node(settings)
    _, port = node.start("127.0.0.1", 0)
    try:
        assert set(send_datasets(port, [pydicom.dcmread(p) for p in study.paths()])) == {0}
        time.sleep(0.5)
        assert _state(node, study.study_uid) == "received"  # long timers: still waiting
    finally:
        node.stop(grace_s=1.0)

    # Restarted with short timers: the study's timers come back from the index.
    restarted = build_node(make_settings(completion=TIMERS))
    restarted.start("127.0.0.1", 0)
    try:
        _wait_state(restarted, study.study_uid, "queued")
        assert _jobs(restarted) == 1
    finally:
        restarted.stop(grace_s=1.0)
