"""From a prediction to results in the archive, with the study's states following.

The node runs in-process (the real SCP, index and life cycle); a synthetic CT study from the
factory is sent to it with a pynetdicom SCU; a prediction with a small fake attention map is
handed to :class:`dicom_node.delivery.Delivery`; a DCMTK ``storescp`` is the archive.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts

from dicom_node.bootstrap import Node, build_node
from dicom_node.delivery import Delivery
from dicom_node.index.models import StudyEvent
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.scu import COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR
from dicom_node.settings import Settings, load_settings
from inference.result import AttentionPeak, AttentionSlice, ModelInfo, Prediction, SourceInstance
from tests.archives import SC_STORAGE, StorescpArchive, free_port
from tests.conftest import wait_study_state
from tests.factory import Study, write_ct_stroke_study

SOURCE_AE = "MODALITY"


@dataclass
class Setup:
    settings: Settings
    node: Node
    lifecycle: Lifecycle
    delivery: Delivery
    archive: StorescpArchive
    study: Study


def _settings(tmp_path: Path, archive: StorescpArchive, pdf: bool = False, **delivery: object) -> Settings:
    values: dict[str, object] = {"retry_initial_s": 0.5, "retry_max_s": 1, "deadline_s": 30, "scan_interval_s": 0.5}
    values.update(delivery)
    return load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "data"), "fsync": False},
        "network": {"host": "127.0.0.1", "port": free_port()},
        "delivery": values,
        "reports": {"secondary_capture": True, "pdf": pdf},
        "inference": {"workers": 0},  # the test hands results to delivery itself
        "peers": [
            {"name": "modality", "ae_titles": [SOURCE_AE], "host": "127.0.0.1", "roles": ["source"]},
            {"name": "archive", "ae_titles": [archive.ae_title], "host": archive.host, "port": archive.port,
             "roles": ["destination"]},
        ],
    })


def _send(paths: list[Path], port: int, called_ae: str) -> None:
    ae = AE(ae_title=SOURCE_AE)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        for path in paths:
            assert int(assoc.send_c_store(path).Status) == 0
    finally:
        assoc.release()


def _prediction(study: Study, *, demonstration: bool = False, n_slices: int = 5) -> Prediction:
    series = study.role("ncct")
    datasets = [dcmread(p) for p in series.paths]
    sources = tuple(
        SourceInstance(study.study_uid, series.series_uid, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets
    )
    picks = np.linspace(0, len(datasets) - 1, n_slices).round().astype(int)
    attention = []
    for model_slice, index in enumerate(picks):
        ds = datasets[index]
        image = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        yy, xx = np.mgrid[: ds.Rows, : ds.Columns]
        heat = np.exp(-((yy - ds.Rows / 2) ** 2 + (xx - ds.Columns / 3) ** 2) / (2 * 8.0**2)).astype(np.float32)
        attention.append(AttentionSlice(
            model_slice=model_slice, source=sources[index], image=image, heat=heat,
            position_patient=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            orientation_patient=tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), slice_weight=1.0 / n_slices,
        ))
    peak_source = attention[n_slices // 2].source
    outline = ((16.0, 28.0), (26.0, 28.0), (26.0, 36.0), (16.0, 36.0), (16.0, 28.0))
    model = ModelInfo(name="res25", version="test", variant="plain", weights_sha256="0" * 64, calibrated=False,
                      threshold=0.5, demonstration=demonstration)
    return Prediction(
        pipeline="CT", score=0.62, positive=True, model=model, primary_role="ncct",
        series_used={"ncct": series.series_uid}, sources=sources, attention=tuple(attention),
        peak=AttentionPeak(model_slice=n_slices // 2, source=peak_source, row=32.0, column=21.0, outline=outline,
                           region="left hemisphere"),
        slice_weights=tuple([1.0 / n_slices] * n_slices),
    )


def _analysed(lifecycle: Lifecycle, study_uid: str) -> None:
    """Walk the study through the queue as the worker would."""
    assert lifecycle.enqueue(study_uid, "test: ready")
    job = lifecycle.claim_next()
    assert job is not None and job.study_uid == study_uid
    lifecycle.finish(study_uid, StudyState.ANALYSED)


@pytest.fixture
def setup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    options = dict(getattr(request, "param", {}))
    study = write_ct_stroke_study(tmp_path / "study", rows=64, thin_slices=12, with_thick=False, with_cta=False,
                                  with_localizer=False, with_dose_report=False, with_reformats=False)
    with StorescpArchive(tmp_path / "archive", sop_classes=options.pop("archive_classes", None)) as archive:
        settings = _settings(tmp_path, archive, **options)
        node = build_node(settings)  # its delivery sends; no worker: the test hands results over itself
        _, port = node.start()
        try:
            _send(study.paths(), port, settings.network.ae_title)
            yield Setup(settings, node, node.lifecycle, node.delivery, archive, study)
        finally:
            node.stop()


@pytest.mark.parametrize("setup", [{"pdf": True}], indirect=True)
def test_prediction_reaches_the_archive_and_the_study_is_delivered(setup: Setup) -> None:
    study_uid = setup.study.study_uid
    _analysed(setup.lifecycle, study_uid)
    report = setup.delivery.on_result(study_uid, _prediction(setup.study))
    assert report.sending
    kinds = sorted(f.kind for f in report.files)
    assert kinds == ["pdf"] + ["sc"] * (5 + 1) + ["sr"]  # 5 slice captures and the summary capture
    assert all(f.path.is_file() and f.path.is_relative_to(setup.settings.storage.results_dir) for f in report.files)
    assert wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED, StudyState.PARTLY_DELIVERED,
                                                         StudyState.DEAD_LETTERED}) is StudyState.DELIVERED
    received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in setup.archive.received_files()}
    assert set(received) == {f.sop_instance_uid for f in report.files}
    assert {ds.StudyInstanceUID for ds in received.values()} == {study_uid}
    with setup.node.session_factory() as session:
        states = [e.state for e in session.query(StudyEvent).order_by(StudyEvent.id)]
    assert states[-2:] == ["reporting", "delivered"]
    # Time to result: writing and queueing are quick (the SR and captures are small here).
    assert report.timings_s["build"] < 10


def test_rerun_sr_names_the_one_it_supersedes(setup: Setup) -> None:
    study_uid = setup.study.study_uid
    _analysed(setup.lifecycle, study_uid)
    first = setup.delivery.on_result(study_uid, _prediction(setup.study))
    wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED})
    second = setup.delivery.on_result(study_uid, _prediction(setup.study))
    wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED})
    first_sr = next(f for f in first.files if f.kind == "sr")
    second_sr = next(f for f in second.files if f.kind == "sr")
    assert second_sr.sop_instance_uid != first_sr.sop_instance_uid
    predecessors = dcmread(second_sr.path).PredecessorDocumentsSequence
    referenced = [
        sop.ReferencedSOPInstanceUID
        for study_item in predecessors for series in study_item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert referenced == [first_sr.sop_instance_uid]


@pytest.mark.parametrize("setup", [{"allow_demonstration_results": False}], indirect=True)
def test_demonstration_results_stay_in_the_node(setup: Setup) -> None:
    study_uid = setup.study.study_uid
    _analysed(setup.lifecycle, study_uid)
    report = setup.delivery.on_result(study_uid, _prediction(setup.study, demonstration=True))
    assert not report.sending and "demonstration" in (report.kept_reason or "")
    assert all(f.path.is_file() for f in report.files)  # kept in the node
    time.sleep(1.0)
    assert setup.archive.store_requests() == []
    assert setup.lifecycle.state_of(study_uid) is StudyState.ANALYSED
    with setup.node.session_factory() as session:
        details = [e.detail or "" for e in session.query(StudyEvent)]
    assert any("kept in the node" in d for d in details)


def test_resend_command_requeues_with_the_same_uids(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    from argparse import Namespace

    from dicom_node.commands import resend

    study_uid = setup.study.study_uid
    _analysed(setup.lifecycle, study_uid)
    report = setup.delivery.on_result(study_uid, _prediction(setup.study))
    wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED})
    assert resend.run(Namespace(study=study_uid), setup.settings) == 0
    assert "queued again" in capsys.readouterr().out
    wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED})
    with setup.node.session_factory() as session:
        states = [e.state for e in session.query(StudyEvent).order_by(StudyEvent.id)]
    assert states[-4:] == ["reporting", "delivered", "reporting", "delivered"]
    counts = Counter(setup.archive.store_requests())
    assert counts == Counter({f.sop_instance_uid: 2 for f in report.files})
    assert resend.run(Namespace(study="2.25.404"), setup.settings) == 1


@pytest.mark.parametrize("setup", [{"archive_classes": [COMPREHENSIVE_SR, SC_STORAGE]}], indirect=True)
def test_archive_without_3d_sr_gets_a_valid_comprehensive_sr(setup: Setup, tmp_path: Path) -> None:
    from tests.validators import dciodvfy_errors

    study_uid = setup.study.study_uid
    _analysed(setup.lifecycle, study_uid)
    report = setup.delivery.on_result(study_uid, _prediction(setup.study))
    assert wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED}) is StudyState.DELIVERED
    (row,) = [r for r in setup.delivery.outbox.rows(study_uid) if r.kind == "sr"]
    assert row.sop_class_uid == COMPREHENSIVE_3D_SR and row.sent_sop_class_uid == COMPREHENSIVE_SR
    assert row.sent_sop_instance_uid not in (None, row.sop_instance_uid)
    received = {str(dcmread(p).SOPInstanceUID): p for p in setup.archive.received_files()}
    stored = dcmread(received[row.sent_sop_instance_uid])
    assert stored.SOPClassUID == COMPREHENSIVE_SR and stored.StudyInstanceUID == study_uid
    assert dciodvfy_errors(received[row.sent_sop_instance_uid]) == []
    # A re-run names both the SR the node built and the copy the archive holds.
    second = setup.delivery.on_result(study_uid, _prediction(setup.study))
    sr = dcmread(next(f.path for f in second.files if f.kind == "sr"))
    named = {
        sop.ReferencedSOPInstanceUID
        for study_item in sr.PredecessorDocumentsSequence for series in study_item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert named == {row.sop_instance_uid, row.sent_sop_instance_uid}
    assert len(report.files) >= 1


# A node without a checkpoint runs demonstration weights: none of its output leaves unless allowed.
@pytest.mark.parametrize("setup", [{"allow_demonstration_results": True}], indirect=True)
def test_not_analysed_study_gets_an_sr_saying_why(setup: Setup) -> None:
    from inference.result import NotAnalysed

    study_uid = setup.study.study_uid
    assert setup.lifecycle.enqueue(study_uid, "test: ready")
    assert setup.lifecycle.claim_next() is not None
    setup.lifecycle.finish(study_uid, StudyState.NOT_ANALYSED, "no CTA series")
    report = setup.delivery.on_result(study_uid, NotAnalysed(reason="no CTA series", pipeline="CT"))
    assert [f.kind for f in report.files] == ["sr"]
    assert wait_study_state(setup.lifecycle, study_uid, {StudyState.DELIVERED}) is StudyState.DELIVERED
    (received,) = setup.archive.received_files()
    sr = dcmread(received)
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == setup.study.patient.patient_id
    texts = [str(getattr(item, "TextValue", "")) for item in _items(sr.ContentSequence)]
    assert any("no CTA series" in text for text in texts)


def _items(items: object) -> Iterator[Any]:
    for item in items:  # type: ignore[attr-defined]
        yield item
        yield from _items(item.get("ContentSequence", []))
