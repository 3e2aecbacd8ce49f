"""The synthetic-study factory writes readable DICOM with the geometry and content it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests import factory


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_ct_stroke_study_series_and_geometry(tmp_path: Path) -> None:
    study = factory.write_ct_stroke_study(tmp_path, thin_slices=30, cta_slices=30, with_reformats=False)
    assert set(study.series) == {"localizer", "ncct_thin", "ncct_thick", "cta", "cta_mip", "dose_report"}
    thin = study.series["ncct_thin"]
    datasets = [pydicom.dcmread(p) for p in thin.paths]
    assert {ds.SeriesInstanceUID for ds in datasets} == {thin.series_uid}
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)
    assert np.allclose(np.diff(z), 2.5)
    # files are not in slice order, InstanceNumber neither: readers must sort by position
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] != z
    assert all(ds.PatientID == study.patient.patient_id and ds.IssuerOfPatientID for ds in datasets)
    cta = study.series["cta"]
    assert cta.frame_of_reference_uid != thin.frame_of_reference_uid
    assert not np.allclose(cta.world_from_patient, np.eye(4))
    cta_ds = pydicom.dcmread(cta.paths[0])
    assert cta_ds.ContrastBolusAgent and cta_ds.Rows != datasets[0].Rows
    assert pydicom.dcmread(study.series["localizer"].paths[0]).ImageType[2] == "LOCALIZER"
    assert pydicom.dcmread(study.series["dose_report"].paths[0]).SOPClassUID == factory.XRAY_DOSE_SR_STORAGE
    assert "MIP" in pydicom.dcmread(study.series["cta_mip"].paths[0]).ImageType


def test_ct_content_is_a_head_in_hounsfield_units(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, offsets=[20.0], shuffle=False, lesion=False, clot=False)
    hu = _hu(series.paths[0])
    centre = hu[28:36, 20:28]  # right hemisphere brain, away from ventricles
    assert 25 < float(np.median(centre)) < 45
    assert hu[0, 0] < -900  # air
    assert hu.max() > 900  # skull


@pytest.mark.parametrize("transfer_syntax", factory.TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_transfer_syntaxes_decode_to_the_same_pixels(tmp_path: Path, transfer_syntax: pydicom.uid.UID) -> None:
    reference = factory.write_ct_series(tmp_path / "ref", n_slices=2, shuffle=False)
    encoded = factory.write_ct_series(tmp_path / "enc", n_slices=2, shuffle=False, transfer_syntax=transfer_syntax)
    ds = pydicom.dcmread(encoded.paths[0])
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(reference.paths[0]).pixel_array)


def test_tilted_ct_has_tilted_orientation_and_z_stepping(tmp_path: Path) -> None:
    series = factory.write_tilted_ct(tmp_path, tilt_deg=20.0, n_slices=4, shuffle=False)
    datasets = [pydicom.dcmread(p) for p in series.paths]
    assert float(datasets[0].GantryDetectorTilt) == 20.0
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    assert np.degrees(np.arccos(abs(normal[2]))) == pytest.approx(20.0, abs=1e-3)
    steps = np.diff([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets], axis=0)
    assert np.allclose(steps[:, :2], 0.0) and np.allclose(steps[:, 2], 5.0)


@pytest.mark.parametrize("dwi", ["public", "ge", "siemens", "philips", "directional"])
def test_mr_study_b_values_where_claimed(tmp_path: Path, dwi: str) -> None:
    study = factory.write_mr_stroke_study(tmp_path, dwi=dwi, n_slices=4, with_adc=False, with_flair=False)
    datasets = [pydicom.dcmread(p) for p in study.series["dwi"].paths]
    public = [ds.get("DiffusionBValue") for ds in datasets]
    if dwi in ("public", "directional"):
        assert sorted({float(b) for b in public}) == [0.0, 1000.0]
    else:
        assert public == [None] * len(datasets)
        group = {"ge": 0x0043, "siemens": 0x0019, "philips": 0x2001}[dwi]
        elements = [ds.get((group, 0x1000 + {"ge": 0x39, "siemens": 0x0C, "philips": 0x03}[dwi])) for ds in datasets]
        assert all(el is not None for el in elements)
    if dwi == "directional":
        assert {ds.DiffusionDirectionality for ds in datasets} == {"NONE", "DIRECTIONAL"}
        assert len(datasets) == 4 * 4


def test_enhanced_mr_and_flair_in_other_frame(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path, enhanced=True, n_slices=6)
    dwi = pydicom.dcmread(study.series["dwi"].paths[0])
    assert dwi.SOPClassUID == factory.ENHANCED_MR_IMAGE_STORAGE
    assert int(dwi.NumberOfFrames) == 12 and dwi.pixel_array.shape == (12, 64, 64)
    b_values = [float(f.MRDiffusionSequence[0].DiffusionBValue) for f in dwi.PerFrameFunctionalGroupsSequence]
    assert b_values == [0.0] * 6 + [1000.0] * 6
    assert study.series["flair"].frame_of_reference_uid != study.series["dwi"].frame_of_reference_uid


def test_split_studies_share_the_patient(tmp_path: Path) -> None:
    ncct, cta = factory.write_split_ct_studies(tmp_path, with_reformats=False, thin_slices=10)
    assert ncct.study_uid != cta.study_uid
    a = pydicom.dcmread(ncct.series["ncct_thin"].paths[0])
    b = pydicom.dcmread(cta.series["cta"].paths[0])
    assert (a.PatientID, a.IssuerOfPatientID) == (b.PatientID, b.IssuerOfPatientID)
    assert "cta" not in ncct.series


def test_factory_is_deterministic(tmp_path: Path) -> None:
    one = factory.write_ct_series(tmp_path / "a", n_slices=3)
    two = factory.write_ct_series(tmp_path / "b", n_slices=3)
    assert [p.read_bytes() for p in one.paths] == [p.read_bytes() for p in two.paths]


def test_written_objects_pass_dciodvfy_and_strict_reading(tmp_path: Path) -> None:
    from tests.validators import dciodvfy_errors, read_strict

    ct = factory.write_ct_stroke_study(tmp_path / "ct", rows=32, thin_slices=3, cta_slices=3, with_thick=False)
    mr = factory.write_mr_stroke_study(tmp_path / "mr", rows=32, n_slices=3, dwi="ge")
    enhanced = factory.write_mr_stroke_study(
        tmp_path / "enh", rows=32, n_slices=3, enhanced=True, dwi="directional", with_flair=False
    )
    paths = [ct.series[key].paths[0] for key in ("localizer", "ncct_thin", "cta", "cta_mip", "ncct_coronal", "dose_report")]
    paths += [mr.series[key].paths[0] for key in ("dwi", "adc", "flair")]
    paths += [enhanced.series[key].paths[0] for key in ("dwi", "adc")]
    paths += factory.write_ai_result_sc(tmp_path / "ct", ct).paths
    for path in paths:
        assert dciodvfy_errors(path) == [], path
        read_strict(path)


def test_copy_into_study_and_series_built_on_a_real_geometry(tmp_path: Path) -> None:
    source = factory.write_mr_stroke_study(tmp_path / "source", rows=32, n_slices=12, with_flair=False, seed=3)
    before = [p.read_bytes() for p in source.series["dwi"].paths]
    identity = factory.StudyIdentity("2.25.42", factory.Patient(name="ÅSTRÖM^ÖRJAN", patient_id="COPY1"), "20260301",
                                     "101500", character_set="ISO_IR 192")
    copies = factory.copy_into_study(source.series["dwi"].paths, tmp_path / "copy", identity)
    assert [p.read_bytes() for p in source.series["dwi"].paths] == before  # inputs untouched
    header = pydicom.dcmread(copies[0])
    assert (header.StudyInstanceUID, header.PatientID, str(header.PatientName)) == ("2.25.42", "COPY1", "ÅSTRÖM^ÖRJAN")
    assert (header.StudyDate, header.SeriesDate, header.SeriesInstanceUID) == (
        "20260301", "20260301", source.series["dwi"].series_uid)
    flair = factory.write_flair_for(tmp_path / "copy", copies)
    flair_header = pydicom.dcmread(flair.paths[0])
    assert flair_header.FrameOfReferenceUID == header.FrameOfReferenceUID
    assert flair_header.StudyInstanceUID == "2.25.42" and str(flair_header.PatientName) == "ÅSTRÖM^ÖRJAN"
    geometry, built = factory.series_geometry(copies), factory.series_geometry(flair.paths)
    assert np.allclose(geometry.centre(), built.centre(), atol=1.0)
    private = factory.write_private_object(tmp_path / "copy", copies[0])
    assert pydicom.dcmread(private.paths[0]).SOPClassUID == factory.PHILIPS_PRIVATE_EXAMCARD


def test_tilted_mixed_thickness_ct_and_rewrite_files(tmp_path: Path) -> None:
    series = factory.write_tilted_mixed_thickness_ct(tmp_path, rows=16, first=(4, 2.5), second=(6, 5.0))
    datasets = [pydicom.dcmread(p) for p in series.paths]
    assert {round(float(ds.SliceThickness) / np.cos(np.radians(15.0)), 3) for ds in datasets} == {2.5, 5.0}
    assert all(float(ds.GantryDetectorTilt) == 15.0 and "SpacingBetweenSlices" not in ds for ds in datasets)
    factory.rewrite_files(series.paths, remove=("PatientBirthDate", "StudyID", "PatientComments"), patient_name="山田^太郎",
                          character_set="ISO_IR 192")
    ds = pydicom.dcmread(series.paths[0])
    assert "PatientBirthDate" not in ds and "StudyID" not in ds and str(ds.PatientName) == "山田^太郎"
