"""The overlay objects a viewer draws over the source series: Parametric Map and Segmentation.

Built from real predictions (a real MR from ../shared/data, a gantry-tilted CT from the factory),
written, checked with dciodvfy, read back strictly and with highdicom, and compared frame by
frame with the source images they lie on. Then through the node: with both switched on, the SR
lists them as evidence and routing rules send each kind where they say.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from dicom_node.bootstrap import build_node
from dicom_node.lifecycle import StudyState
from dicom_node.settings import load_settings
from inference.case import predict_paths
from inference.result import Prediction
from reports.pmap import DISPLAY_FLOOR, PARAMETRIC_MAP_STORAGE, build_parametric_map
from reports.seg import DECISION_LEVEL, SEGMENTATION_STORAGE, build_segmentation
from reports.sr import ReportContext
from reports.uids import UIDFactory
from tests.archives import StorescpArchive, free_port
from tests.conftest import require_shared_data, wait_study_state
from tests.factory import write_ct_stroke_study, write_flair_for
from tests.test_delivery import SOURCE_AE, _analysed, _send
from tests.test_predictor import recipe_selector, small_predictor
from tests.validators import dciodvfy_errors, dciodvfy_output, read_strict

UIDS = UIDFactory()
CONTEXT = ReportContext(software_version="0.0-test", device_uid=UIDS.for_name("TESTNODE"), device_name="TESTNODE")

# torch's CPU sums are bit-stable per thread count: one thread for every test here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    prediction: Prediction
    folder: Path  # the primary series' files
    headers: list[Dataset]  # every file of the study, no pixels


def _case(study_folder: Path, primary_folder: Path) -> Case:
    prediction = predict_paths([study_folder], small_predictor(), recipe_selector())
    assert isinstance(prediction, Prediction), prediction
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study_folder.rglob("*") if p.is_file()]
    return Case(prediction, primary_folder, headers)


@pytest.fixture(scope="module")
def real_mr(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("mr") / "study"
    shutil.copytree(require_shared_data("mr_siemens_xa30i_classic"), folder)
    write_flair_for(folder, sorted((folder / "13001_TRACEW").iterdir()))
    return _case(folder, folder / "13001_TRACEW")


@pytest.fixture(scope="module")
def tilted_ct(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("ct")
    study = write_ct_stroke_study(folder, rows=64, with_thick=False, with_reformats=False, with_mips=False,
                                  with_localizer=False, with_dose_report=False, tilt_deg=20.0)
    return _case(study.directory, study.directory / "ncct_thin")


def _written(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _check_frames_lie_on_their_sources(obj: Dataset, case: Case) -> list[str]:
    """Each frame's geometry is its source image's; returns the source SOP Instance UIDs by frame."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in case.headers}
    planes = case.prediction.source_planes
    assert int(obj.NumberOfFrames) == len(planes) == len(list(case.folder.iterdir()))
    source = by_uid[planes[0].source.sop_instance_uid]
    assert obj.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert obj.StudyInstanceUID == source.StudyInstanceUID
    shared = obj.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in source.PixelSpacing], atol=1e-6)
    assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = []
    for frame in obj.PerFrameFunctionalGroupsSequence:
        item = frame.DerivationImageSequence[0].SourceImageSequence[0]
        uid = str(item.ReferencedSOPInstanceUID)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)
        referenced.append(uid)
    assert sorted(referenced) == sorted(p.source.sop_instance_uid for p in planes)
    return referenced


def _frames_in_plane_order(frames: np.ndarray, referenced: list[str], case: Case) -> np.ndarray:
    index = {uid: k for k, uid in enumerate(referenced)}
    return np.stack([frames[index[p.source.sop_instance_uid]] for p in case.prediction.source_planes])


@pytest.mark.parametrize("name", ["real_mr", "tilted_ct"])
def test_parametric_map_is_valid_and_lies_on_the_source_slices(name: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path) -> None:
    case: Case = request.getfixturevalue(name)
    path = _written(build_parametric_map(case.prediction, case.headers, UIDS, CONTEXT), tmp_path / "pm.dcm")
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    stored = read_strict(path)
    assert stored.SOPClassUID == PARAMETRIC_MAP_STORAGE
    pm = hd.pm.ParametricMap.from_dataset(stored)
    referenced = _check_frames_lie_on_their_sources(pm, case)
    if name == "tilted_ct":  # the frames keep the gantry-tilted planes
        orientation = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                       .ImageOrientationPatient]
        assert orientation[5] == pytest.approx(-np.sin(np.radians(20.0)), abs=1e-5)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.DoubleFloatRealWorldValueLastValueMapped) == 1.0
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1" and mapping.LUTLabel == "ATTENTION"
    assert int(stored.BitsAllocated) == 32 and "FloatPixelData" in stored  # what OHIF draws
    values = _frames_in_plane_order(stored.pixel_array, referenced, case)
    attention = case.prediction.source_attention
    assert attention is not None
    np.testing.assert_array_equal(values, np.where(attention >= DISPLAY_FLOOR, attention, 0.0).astype(np.float32))
    assert not values[attention == 0].any(), "attention outside the brain"
    assert float(values.max()) == pytest.approx(1.0)


def test_segmentation_marks_the_high_attention_region_on_the_source_slices(real_mr: Case, tmp_path: Path) -> None:
    path = _written(build_segmentation(real_mr.prediction, real_mr.headers, UIDS, CONTEXT), tmp_path / "seg.dcm")
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    stored = read_strict(path)
    assert stored.SOPClassUID == SEGMENTATION_STORAGE
    seg = hd.seg.Segmentation.from_dataset(stored)
    referenced = _check_frames_lie_on_their_sources(seg, real_mr)
    assert seg.SegmentSequence[0].SegmentLabel.startswith("Attention >= 50%")
    frames = _frames_in_plane_order(stored.pixel_array, referenced, real_mr)
    attention = real_mr.prediction.source_attention
    assert attention is not None
    assert np.array_equal(frames.astype(bool), attention >= DECISION_LEVEL)
    assert frames.any()


def test_overlays_go_to_the_destinations_their_kind_is_routed_to(tilted_ct: Case, tmp_path: Path) -> None:
    rules = tmp_path / "routing.yaml"
    rules.write_text("rules:\n  - destinations: [viewer]\n    kinds: [sr, pm]\n"
                     "  - destinations: [legacy]\n    kinds: [sr, seg]\n", encoding="utf-8")
    with StorescpArchive(tmp_path / "viewer", ae_title="VIEWER") as viewer, \
            StorescpArchive(tmp_path / "legacy", ae_title="LEGACY") as legacy:
        settings = load_settings(environ={}, overrides={
            "storage": {"data_dir": str(tmp_path / "data"), "fsync": False},
            "network": {"host": "127.0.0.1", "port": free_port()},
            "delivery": {"retry_initial_s": 0.5, "retry_max_s": 1, "deadline_s": 30, "scan_interval_s": 0.5,
                         "allow_demonstration_results": True, "routing_rules": str(rules)},
            "reports": {"secondary_capture": False, "summary_capture": False, "parametric_map": True,
                        "segmentation": True},
            "inference": {"workers": 0},
            "peers": [
                {"name": "modality", "ae_titles": [SOURCE_AE], "host": "127.0.0.1", "roles": ["source"]},
                {"name": "viewer", "ae_titles": ["VIEWER"], "host": viewer.host, "port": viewer.port,
                 "roles": ["destination"]},
                {"name": "legacy", "ae_titles": ["LEGACY"], "host": legacy.host, "port": legacy.port,
                 "roles": ["destination"]},
            ],
        })
        node = build_node(settings)
        _, port = node.start()
        try:
            study_uid = tilted_ct.prediction.sources[0].study_uid
            _send(sorted(p for p in tilted_ct.folder.parent.rglob("*") if p.is_file()), port, settings.network.ae_title)
            _analysed(node.lifecycle, study_uid)
            report = node.delivery.on_result(study_uid, tilted_ct.prediction)
            assert sorted(f.kind for f in report.files) == ["pm", "seg", "sr"]
            assert wait_study_state(node.lifecycle, study_uid, {StudyState.DELIVERED, StudyState.PARTLY_DELIVERED,
                                                                 StudyState.DEAD_LETTERED}) is StudyState.DELIVERED
        finally:
            node.stop()
        got = {name: {str(pydicom.dcmread(p).SOPClassUID): pydicom.dcmread(p) for p in archive.received_files()}
               for name, archive in (("viewer", viewer), ("legacy", legacy))}
    assert set(got["viewer"]) == {"1.2.840.10008.5.1.4.1.1.88.34", PARAMETRIC_MAP_STORAGE}
    assert set(got["legacy"]) == {"1.2.840.10008.5.1.4.1.1.88.34", SEGMENTATION_STORAGE}
    sr = got["viewer"]["1.2.840.10008.5.1.4.1.1.88.34"]
    evidence = {str(instance.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for instance in series.ReferencedSOPSequence}
    assert str(got["viewer"][PARAMETRIC_MAP_STORAGE].SOPInstanceUID) in evidence
    assert str(got["legacy"][SEGMENTATION_STORAGE].SOPInstanceUID) in evidence


def test_an_overlay_the_sources_cannot_make_leaves_the_sr_going(tilted_ct: Case, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.delivery import report_builder

    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "data")},
        "reports": {"secondary_capture": False, "summary_capture": False, "parametric_map": True, "segmentation": True},
    })
    missing = tilted_ct.prediction.source_planes[3].source.sop_instance_uid
    headers = [ds for ds in tilted_ct.headers if str(ds.SOPInstanceUID) != missing]
    with caplog.at_level("WARNING", logger="dicom_node.delivery"):
        objects = report_builder(settings, UIDS, CONTEXT)(tilted_ct.prediction, headers, [], {})
    assert [kind for kind, _ in objects] == ["sr"]
    assert sum("no pm built" in r.getMessage() or "no seg built" in r.getMessage() for r in caplog.records) == 2
    assert all(missing in r.getMessage() for r in caplog.records if "built" in r.getMessage())
