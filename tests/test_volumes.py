"""Volumes: sorting, rescale, tilt and spacing resampling, rejected series, decoding, diffusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference import volumes as V
from tests import factory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XA30 = SHARED / "mr_siemens_xa30_dwi_enh"
SMALL = {"rows": 48}


def _brain_hu(volume: V.Volume) -> float:
    """Median of the voxels the phantom calls brain (away from edges), sampled through the geometry."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    points = np.asarray(volume.origin) + (index * np.asarray(volume.spacing)) @ volume.direction.T
    labels = factory.phantom_labels(points.reshape(*volume.shape, 3), lesion=False, clot=False)
    eroded = labels == factory.BRAIN
    for axis in (1, 2):
        eroded &= np.roll(eroded, 2, axis) & np.roll(eroded, -2, axis)
    return float(np.median(volume.array[eroded]))


def test_sorted_by_position_not_instance_number_and_rescaled(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, n_slices=20, lesion=False, clot=False, rescale=(0.5, -1000.0), **SMALL)
    volume = V.load_volume(series.paths)
    assert volume.shape == (20, 48, 48)
    assert volume.spacing == pytest.approx((5.0, 5.0, 5.0))
    z = volume.slice_positions()[:, 2]
    assert np.all(np.diff(z) > 0)
    # every slice keeps its source instance: the instance written at that position
    by_uid = dict(zip(series.sop_instance_uids, series.positions))
    assert [by_uid[s.sop_instance_uid][2] for s in volume.sources] == pytest.approx(list(z))
    assert 28 < _brain_hu(volume) < 42  # slope 0.5, intercept -1000 applied
    assert volume.to_sitk().GetSize() == (48, 48, 20)


def test_gantry_tilt_resampled_onto_orthogonal_grid(tmp_path: Path) -> None:
    series = factory.write_tilted_ct(tmp_path, tilt_deg=20.0, n_slices=30, lesion=False, clot=False, **SMALL)
    volume = V.load_volume(series.paths)
    assert any("gantry tilt of 20.0 deg corrected" in note for note in volume.notes)
    assert np.allclose(volume.direction, np.eye(3), atol=1e-6)  # orthogonal, axial
    assert 28 < _brain_hu(volume) < 42  # the phantom is where the geometry says
    assert all(s.series_uid == series.series_uid for s in volume.sources)


def test_two_slice_spacings_resampled_to_uniform(tmp_path: Path) -> None:
    series = factory.write_ct_two_spacings(tmp_path, lesion=False, clot=False, **SMALL)
    volume = V.load_volume(series.paths)
    assert volume.spacing[2] == pytest.approx(2.5)
    assert volume.shape[0] == int((11 * 2.5 + 18 * 5.0) / 2.5) + 1
    assert any("spacing varies" in note for note in volume.notes)
    assert 28 < _brain_hu(volume) < 42


@pytest.mark.parametrize(
    ("writer", "error", "words"),
    [
        (factory.write_ct_missing_slice, V.MissingSliceError, "missing slice"),
        (factory.write_ct_duplicated_slice, V.DuplicateSliceError, "duplicated slice"),
        (factory.write_ct_truncated, V.CoverageError, "covers 35 mm"),
    ],
)
def test_unsound_series_rejected_with_reason(tmp_path: Path, writer, error: type, words: str) -> None:  # type: ignore[no-untyped-def]
    series = writer(tmp_path, **SMALL) if writer is factory.write_ct_truncated else writer(tmp_path, n_slices=24, **SMALL)
    with pytest.raises(error) as excinfo:
        V.load_volume(series.paths)
    assert words in excinfo.value.reason
    assert isinstance(excinfo.value, V.VolumeError) and excinfo.value.series_uid == series.series_uid


def test_identical_resent_image_is_ignored(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, n_slices=20, **SMALL)
    ds = pydicom.dcmread(series.paths[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1234"
    ds.save_as(tmp_path / "resent.dcm")
    volume = V.load_volume([*series.paths, tmp_path / "resent.dcm"])
    assert volume.shape[0] == 20 and "1 identical duplicate image(s) ignored" in volume.notes


@pytest.mark.parametrize("transfer_syntax", factory.TRANSFER_SYNTAXES[1:], ids=lambda uid: uid.name)
def test_compressed_series_give_the_same_volume(tmp_path: Path, transfer_syntax: pydicom.uid.UID) -> None:
    reference = factory.write_ct_series(tmp_path / "ref", n_slices=4, rows=32)
    encoded = factory.write_ct_series(tmp_path / "enc", n_slices=4, rows=32, transfer_syntax=transfer_syntax)
    a = V.load_volume(reference.paths, min_coverage_mm=10)
    b = V.load_volume(encoded.paths, min_coverage_mm=10)
    assert np.array_equal(a.array, b.array)


def test_real_transfer_syntaxes_decode_to_identical_pixels() -> None:
    files = sorted((SHARED / "ts_siemens_mr_transfer_syntaxes").glob("*.dcm"))
    assert len(files) == 9
    decoded = [V.decode_dataset(pydicom.dcmread(path)) for path in files]
    for path, pixels in zip(files[1:], decoded[1:]):
        assert np.array_equal(pixels, decoded[0]), path.name


def test_undecodable_pixels_raise_decode_error(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, n_slices=1, rows=32, transfer_syntax=pydicom.uid.RLELossless)
    ds = pydicom.dcmread(series.paths[0])
    ds.PixelData = ds.PixelData[:40]  # truncated fragment
    with pytest.raises(V.DecodeError):
        V.decode_dataset(ds)


def test_real_philips_ct_volume() -> None:
    volume = V.load_volume([SHARED / "ct_philips_headphantom_1mm"])
    assert volume.shape == (140, 512, 512)
    assert volume.spacing[2] == pytest.approx(1.0)
    assert volume.array.min() < -900 and volume.array.max() > 1000  # air and bone in HU
    assert len({s.sop_instance_uid for s in volume.sources}) == 140


def test_directional_dwi_trace_and_adc(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path, dwi="directional", with_adc=False, with_flair=False, **SMALL)
    diffusion = V.load_diffusion(study.series["dwi"].paths)
    assert diffusion.b_values == (0.0, 1000.0) and len(diffusion.by_b_value[1000.0]) == 3
    trace = diffusion.trace()
    b0 = diffusion.b0()
    assert b0 is not None and "geometric mean of 3 directions" in trace.notes[-1]
    adc = V.adc_from_b0_and_trace(b0, trace)
    centre = adc.array[12][adc.array[12] > 0]
    assert 700 < float(np.median(centre)) < 950  # brain ADC about 800e-6 mm2/s
    assert adc.notes[-1].startswith("ADC computed from b0 and trace")


@pytest.mark.parametrize("dwi", ["ge", "philips"])
def test_private_tag_b_values_split(tmp_path: Path, dwi: str) -> None:
    study = factory.write_mr_stroke_study(tmp_path, dwi=dwi, with_adc=False, with_flair=False, rows=32)
    diffusion = V.load_diffusion(study.series["dwi"].paths)
    assert diffusion.b_values == (0.0, 1000.0)
    assert diffusion.trace().shape == (24, 32, 32)


def test_enhanced_multiframe_synthetic_dwi(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path, enhanced=True, with_flair=False, rows=32)
    diffusion = V.load_diffusion(study.series["dwi"].paths)
    assert diffusion.b_values == (0.0, 1000.0)
    trace = diffusion.trace()
    assert trace.shape == (24, 32, 32) and trace.sources[0].frame is not None
    assert V.load_volume(study.series["adc"].paths).shape == (24, 32, 32)


def test_real_enhanced_xa30_trace_and_adc_match_the_scanner() -> None:
    diffusion = V.load_diffusion([XA30 / "10_DWI_dir80_PA"])
    assert diffusion.b_values == (0.0, 2500.0) and len(diffusion.by_b_value[2500.0]) == 20
    scanner_trace = V.load_volume([XA30 / "12_DWI_dir80_PA"])
    scanner_adc = V.load_volume([XA30 / "11_DWI_dir80_PA"])
    assert scanner_trace.shape == scanner_adc.shape == (39, 72, 72)
    assert scanner_trace.sources[0].frame is not None
    trace = diffusion.trace()
    b0 = diffusion.b0()
    assert b0 is not None
    assert np.corrcoef(trace.array.ravel(), scanner_trace.array.ravel())[0, 1] > 0.99
    adc = V.adc_from_b0_and_trace(b0, trace)
    tissue = b0.array > np.percentile(b0.array, 70)
    assert np.corrcoef(adc.array[tissue], scanner_adc.array[tissue])[0, 1] > 0.99
    assert float(np.median(adc.array[tissue])) == pytest.approx(float(np.median(scanner_adc.array[tissue])), rel=0.05)


def test_sitk_geometry_round_trip(tmp_path: Path) -> None:
    series = factory.write_ct_series(tmp_path, n_slices=20, **SMALL)
    volume = V.load_volume(series.paths)
    image = volume.to_sitk()
    point = image.TransformIndexToPhysicalPoint((0, 0, 3))
    assert np.allclose(point, volume.slice_positions()[3])
    assert sitk.GetArrayViewFromImage(image).shape == volume.shape


def test_case_volumes_from_a_selection_plan(tmp_path: Path) -> None:
    from inference.dicom_headers import read_series_headers
    from inference.selection import Selector, case_files

    factory.write_mr_stroke_study(tmp_path, dwi="directional", with_adc=False, rows=32)
    headers = read_series_headers([tmp_path])
    plan = Selector().select(headers)
    assert plan is not None and plan.pipeline == "MR"
    case = V.load_case_volumes(case_files(plan, headers))
    assert set(case.volumes) == {"dwi", "adc", "flair"}
    assert case.volumes["dwi"].b_value == 1000.0
    assert case.volumes["adc"].shape == case.volumes["dwi"].shape
    assert any(w.startswith("ADC computed from b0 and trace") for w in case.warnings)
    assert any("geometric mean of 3 directions" in w for w in case.warnings)
    assert case.volumes["flair"].frame_of_reference_uid != case.volumes["dwi"].frame_of_reference_uid


def test_case_volume_error_names_the_role(tmp_path: Path) -> None:
    series = factory.write_ct_missing_slice(tmp_path, n_slices=24, rows=32)
    with pytest.raises(V.MissingSliceError, match="^ncct: missing slice"):
        V.load_case_volumes({"ncct": (series.paths, "", None)})


def test_compressed_enhanced_multiframe_gives_the_same_volume(tmp_path: Path) -> None:
    plain = factory.write_mr_stroke_study(tmp_path / "a", rows=32, enhanced=True, with_flair=False)
    j2k = factory.write_mr_stroke_study(
        tmp_path / "b", rows=32, enhanced=True, with_flair=False, transfer_syntax=pydicom.uid.JPEG2000Lossless
    )
    assert pydicom.dcmread(j2k.series["dwi"].paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    a = V.load_diffusion(plain.series["dwi"].paths).trace()
    b = V.load_diffusion(j2k.series["dwi"].paths).trace()
    assert np.array_equal(a.array, b.array)


def test_tilted_series_of_two_thicknesses_keeps_each_slice_where_it_was_acquired(tmp_path: Path) -> None:
    # GE: 4 mm slices in the posterior fossa, 7 mm above, gantry tilted. Before, the tilt
    # correction assumed one step between slices and placed the planes of the 7 mm part wrongly
    # (mean difference 78 HU between the volume and the acquired pixels at their own places).
    series = factory.write_ct_mixed_thickness(tmp_path, parts=((8, 4.0), (12, 7.0)), tilt_deg=15.0,
                                              lesion=False, clot=False, **SMALL)
    volume = V.load_volume(series.paths)
    assert any("spacing varies 3.86-6.76 mm" in note for note in volume.notes)  # along the normal
    assert any("gantry tilt of 15.0 deg corrected" in note for note in volume.notes)
    image = volume.to_sitk()
    differences = []
    for path in series.paths:  # every acquired pixel, looked up in the volume at its patient position
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        row_dir, col_dir = (np.asarray(ds.ImageOrientationPatient[a:a + 3], dtype=float) for a in (0, 3))
        origin = np.asarray(ds.ImagePositionPatient, dtype=float)
        for row in range(4, ds.Rows - 4, 3):
            for col in range(4, ds.Columns - 4, 3):
                point = origin + col * float(ds.PixelSpacing[1]) * row_dir + row * float(ds.PixelSpacing[0]) * col_dir
                index = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
                if all(0 <= index[a] <= image.GetSize()[a] - 1 for a in range(3)):
                    differences.append(abs(image.EvaluateAtPhysicalPoint(tuple(float(v) for v in point)) - hu[row, col]))
    assert len(differences) > 3000
    assert float(np.mean(differences)) < 55.0  # in-plane interpolation at the skull's edges only (42 HU)
