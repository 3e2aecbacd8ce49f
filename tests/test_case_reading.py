"""One bad file is one bad file: case building reads each instance in isolation.

A file whose header nests sequences deeper than the parser can follow, or whose pixel data
were cut short, drops that instance (named by its SOP Instance UID in the result's warnings),
never the study and never another study of the same patient.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch

from inference.case import dicom_case
from inference.dicom_headers import read_series_headers
from inference.predictor import CaseInput
from inference.result import Prediction
from inference import volumes as V
from tests import factory
from tests.test_predictor import recipe_selector, small_predictor


def _bad_study(folder: Path, patient: factory.Patient) -> tuple[str, str]:
    """A CT study of ``patient`` (NCCT only) holding one deeply nested and one truncated instance."""
    ncct = factory.write_ct_series(folder, patient=patient, rows=32, n_slices=20, study_date="20260101",
                                   study_time="080000")
    nested = factory.write_deeply_nested_copy(ncct.paths[3], folder / "ncct" / "nested.dcm", depth=1000)
    truncated = factory.write_truncated_copy(ncct.paths[4], folder / "ncct" / "truncated.dcm", missing_bytes=300)
    return nested, truncated


def test_bad_instances_of_one_study_spare_the_clean_study_of_the_patient(tmp_path: Path) -> None:
    patient = factory.default_patient(7)
    clean = factory.write_mr_stroke_study(tmp_path / "clean", patient=patient, rows=32, seed=7)
    nested, truncated = _bad_study(tmp_path / "bad", patient)
    with pytest.raises(RecursionError):  # what the parser does with the nested file on its own
        pydicom.dcmread(tmp_path / "bad" / "ncct" / "nested.dcm")

    case = dicom_case([tmp_path / "bad", tmp_path / "clean"], recipe_selector())
    assert isinstance(case, CaseInput), case
    assert case.pipeline == "MR"
    assert {v.study_uid for v in case.volumes.values()} == {clean.study_uid}
    assert any(nested in w and "RecursionError" in w for w in case.warnings)
    assert any(truncated in w and "pixel data truncated" in w for w in case.warnings)
    torch.set_num_threads(1)
    result = small_predictor().predict(case)
    assert isinstance(result, Prediction), result
    assert result.series_used["dwi"] == clean.series["dwi"].series_uid
    assert any(nested in w for w in result.warnings) and any(truncated in w for w in result.warnings)


def test_the_bad_study_itself_keeps_its_sound_series(tmp_path: Path) -> None:
    patient = factory.default_patient(8)
    nested, truncated = _bad_study(tmp_path, patient)
    problems: list[str] = []
    datasets: dict[Path, pydicom.Dataset] = {}
    (header,) = read_series_headers([tmp_path], datasets, problems)
    assert header.n_instances == 20  # the two bad copies dropped, the 20 good slices kept
    assert [nested in p for p in problems].count(True) == 1
    assert [truncated in p for p in problems].count(True) == 1
    assert V.load_volume(header.paths).shape[0] == 20


def test_undecodable_instance_in_a_volume_is_dropped_and_named(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, rows=32, n_slices=20)
    ds = pydicom.dcmread(series.paths[5])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.4242"
    ds.PixelData = ds.PixelData[:-512]  # consistent file, wrong pixel length for 32 x 32
    ds.save_as(tmp_path / "short.dcm")
    volume = V.load_volume([*series.paths, tmp_path / "short.dcm"])
    assert volume.shape[0] == 20
    assert any(note.startswith("instance 2.25.4242 dropped") for note in volume.notes)
    with pytest.raises(V.VolumeError, match="no readable image"):
        V.load_volume([tmp_path / "short.dcm"], min_coverage_mm=0)


def test_a_series_left_with_a_gap_is_refused_naming_the_dropped_instance(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, rows=32, n_slices=20)
    middle = sorted(zip(series.positions, series.paths), key=lambda pair: pair[0][2])[10][1]
    uid = str(pydicom.dcmread(middle).SOPInstanceUID)
    ds = pydicom.dcmread(middle)
    ds.PixelData = ds.PixelData[:-512]
    ds.save_as(middle)
    with pytest.raises(V.MissingSliceError, match=f"missing slice.*after instance {uid} dropped"):
        V.load_volume(series.paths)
