"""Attention-map secondary captures: one per model slice, valid, burned-in text, same study."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from reports.capture import ATTENTION_FLOOR, caption_lines, display_window, source_window
from reports.sc import (
    DEMO_WARNING,
    DISCLAIMER,
    MULTIFRAME_TRUE_COLOR_SC_STORAGE,
    SC_STORAGE,
    build_secondary_captures,
    capture_set,
)
from reports.sr import ReportContext
from reports.uids import UIDFactory
from tests import factory
from tests.validators import dciodvfy_errors, dciodvfy_output, fake_prediction, model_info, read_strict, sorted_by_position

UIDS = UIDFactory("1.2.3.999")
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"), institution_name="Test Hospital")


@pytest.fixture(scope="module")
def ct_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    series = factory.write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=10, rows=64)
    return sorted_by_position([pydicom.dcmread(p) for p in series.paths])


def _save_valid(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    return read_strict(path)


def test_one_capture_per_model_slice_in_a_new_series_of_the_study(ct_sources: list[Dataset], tmp_path: Path) -> None:
    prediction = fake_prediction(ct_sources, score=0.73)
    captures = build_secondary_captures(prediction, ct_sources, UIDS, CONTEXT)
    assert len(captures) == 25
    source = ct_sources[0]
    assert len({c.SeriesInstanceUID for c in captures}) == 1
    assert captures[0].SeriesInstanceUID != source.SeriesInstanceUID
    assert len({c.SOPInstanceUID for c in captures}) == 25
    assert [int(c.InstanceNumber) for c in captures] == list(range(1, 26))
    assert all(c.SOPInstanceUID.startswith("1.2.3.999.") for c in captures)

    peak_capture = captures[prediction.peak.model_slice]  # type: ignore[union-attr]
    back = _save_valid(peak_capture, tmp_path / "peak.dcm")
    assert back.SOPClassUID == SC_STORAGE
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber"):
        assert back.get(keyword) == source.get(keyword), keyword
    assert back.BurnedInAnnotation == "YES"
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert "research use" in back.SeriesDescription
    assert back.InstitutionName == "Test Hospital"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == prediction.peak.source.sop_instance_uid  # type: ignore[union-attr]
    equipment = {(e.Manufacturer, e.PurposeOfReferenceCodeSequence[0].CodeValue) for e in back.ContributingEquipmentSequence}
    assert ("fpe-node", "109103") in equipment
    np.testing.assert_array_equal(back.pixel_array, peak_capture.pixel_array)
    # A clone elsewhere in the series is valid too, with its own pixels and source.
    other = _save_valid(captures[3], tmp_path / "other.dcm")
    assert other.SourceImageSequence[0].ReferencedSOPInstanceUID == prediction.attention[3].source.sop_instance_uid
    assert not np.array_equal(other.pixel_array, back.pixel_array)
    assert captures[0].SOPInstanceUID != captures[1].SOPInstanceUID  # the template was not changed by cloning


def test_capture_is_the_resampled_source_with_colour_where_the_attention_is(ct_sources: list[Dataset]) -> None:
    """Without a brain mask (a prediction built outside the predictor) the whole plane is framed."""
    prediction = fake_prediction(ct_sources)
    captures = capture_set(prediction, ct_sources)
    peak = prediction.attention[prediction.peak.model_slice - 1]  # type: ignore[union-attr]  # no peak marks
    pixels = captures.capture(peak)
    frame = captures.frame
    assert min(frame.rows, frame.columns) >= 512 and frame.rows == frame.columns  # square plane, square pixels
    assert pixels.shape[1] == frame.columns and pixels.shape[2] == 3
    picture = pixels[: frame.rows].astype(int)
    # Where the attention is below the floor the source shows through in grey, resampled.
    relative = frame.resample(peak.heat / max(float(s.heat.max()) for s in prediction.attention), cubic=False, outside=0)
    cold = relative < ATTENTION_FLOOR
    assert cold.mean() > 0.5
    assert np.array_equal(picture[..., 0][cold], picture[..., 2][cold])
    low = captures.window.centre - captures.window.width
    expected = captures.window.apply(frame.resample(peak.image, cubic=True, outside=low))
    assert np.abs(picture[..., 1][cold] - expected[cold].astype(int)).max() <= 1
    # At the hot spot the overlay is red.
    hot_row, hot_col = np.unravel_index(np.argmax(relative), relative.shape)
    red, _, blue = picture[hot_row, hot_col]
    assert red > blue + 50
    # The band below holds white and red (disclaimer) text and the colour scale, in less room than the image.
    band = pixels[frame.rows :].astype(int)
    assert band.shape[0] * band.shape[1] <= frame.rows * frame.columns
    assert ((band[..., 0] > 200) & (band[..., 1] < 120) & (band[..., 2] < 120)).sum() > 20
    assert (band.min(axis=-1) > 200).sum() > 50
    assert ((band[..., 2] > 120) & (band[..., 0] < 60)).sum() > 100  # the blue end of the scale


def test_captions_say_what_a_reader_needs(ct_sources: list[Dataset]) -> None:
    calibrated = fake_prediction(ct_sources, score=0.73)
    lines = caption_lines(calibrated, calibrated.attention[0])
    assert lines[0] == "FPE 73% (research use)"
    assert "FPE likely at threshold 50%" in lines
    assert "Model res25 1.2.0 (nonlocal)" in lines
    assert "Slice 1 of 25, slice weight 0.040 (peak: slice 13)" in lines
    assert "Slice 13 of 25, slice weight 0.040 - PEAK ATTENTION" in caption_lines(calibrated, calibrated.attention[12])
    assert DISCLAIMER in lines and DEMO_WARNING not in lines
    demo = fake_prediction(ct_sources, score=0.2, model=model_info(calibrated=False, demonstration=True, threshold=0.4),
                           n_slices=5)
    demo_lines = caption_lines(demo, demo.attention[0])
    assert demo_lines[0] == "FPE score 0.20 DEMO (research use)"
    assert "FPE unlikely at threshold 0.40 (uncalibrated score)" in demo_lines
    assert DEMO_WARNING in demo_lines
    captures = build_secondary_captures(demo, ct_sources, UIDS, CONTEXT)
    assert "DEMO" in captures[0].SeriesDescription


def test_multiframe_true_colour_option(ct_sources: list[Dataset], tmp_path: Path) -> None:
    prediction = fake_prediction(ct_sources, n_slices=9)  # fewer slices than 25 keep the file small
    captures = capture_set(prediction, ct_sources)
    singles = build_secondary_captures(prediction, ct_sources, UIDS, CONTEXT, captures=captures)
    (capture,) = build_secondary_captures(prediction, ct_sources, UIDS, CONTEXT, multiframe=True, captures=captures)
    back = _save_valid(capture, tmp_path / "mf.dcm")
    assert back.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC_STORAGE
    assert int(back.NumberOfFrames) == 9
    assert back.BurnedInAnnotation == "YES"
    assert len(back.SourceImageSequence) == 9
    assert back.FrameLabelVector[4] == "slice 5 of 9"
    frames = back.pixel_array
    assert frames.shape[0] == 9 and frames.shape[-1] == 3
    np.testing.assert_array_equal(frames[4], singles[4].pixel_array)  # every frame the same size


def test_mr_window_is_the_sources_own_else_percentiles(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path / "mr", rows=64, n_slices=8, with_adc=False, with_flair=False)
    datasets = [pydicom.dcmread(p) for p in study.role("dwi").paths]
    b1000 = [ds for ds in datasets if float(ds.get("DiffusionBValue", 1000)) > 0] or datasets
    prediction = fake_prediction(b1000, pipeline="MR", primary_role="dwi", n_slices=8)
    headers = {ds.SOPInstanceUID: ds for ds in b1000}
    peak_header = headers[prediction.peak.source.sop_instance_uid]  # type: ignore[union-attr]
    window = display_window(prediction, headers)
    assert (window.centre, window.width) == (float(peak_header.WindowCenter), float(peak_header.WindowWidth))
    assert source_window(peak_header) == window
    fallback = display_window(prediction)  # no headers: percentiles of the planes shown
    values = np.concatenate([s.image.ravel() for s in prediction.attention])
    assert values.min() <= fallback.centre - fallback.width / 2 + 1e-3 * fallback.width
    assert fallback.centre + fallback.width / 2 <= values.max() + 1e-6
    for bad in ("0", "-5", ""):
        unusable = pydicom.Dataset()
        unusable.WindowCenter, unusable.WindowWidth = "10", bad
        assert source_window(unusable) is None
    captures = build_secondary_captures(prediction, b1000, UIDS, CONTEXT)
    assert len(captures) == 8
    back = _save_valid(captures[4], tmp_path / "mr_sc.dcm")
    assert back.StudyInstanceUID == b1000[0].StudyInstanceUID


def test_refuses_a_prediction_without_attention(ct_sources: list[Dataset]) -> None:
    prediction = dataclasses.replace(fake_prediction(ct_sources), attention=())
    with pytest.raises(ValueError, match="attention"):
        build_secondary_captures(prediction, ct_sources, UIDS, CONTEXT)
    with pytest.raises(ValueError, match="headers"):
        build_secondary_captures(fake_prediction(ct_sources), [], UIDS, CONTEXT)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_real_philips_ct_and_siemens_enhanced_mr_sources(tmp_path: Path) -> None:
    """Scanner-made headers: 512x512 Philips CT, and frames of a Siemens XA30 enhanced DWI."""
    from reports.sr import build_sr

    ct_dir = SHARED_DATA / "ct_philips_headphantom_1mm"
    assert ct_dir.is_dir(), f"shared test data missing: {ct_dir}"
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in ct_dir.iterdir() if p.is_file()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    chosen = [pydicom.dcmread(ds.filename) for ds in headers[:: max(1, len(headers) // 12)]]
    prediction = fake_prediction(chosen)
    assert prediction.attention[0].image.shape == (512, 512)
    captures = build_secondary_captures(prediction, chosen, UIDS, CONTEXT)
    back = _save_valid(captures[12], tmp_path / "ct_sc.dcm")
    assert back.Rows > back.Columns >= 512 and back.PatientID == chosen[0].PatientID
    sr_path = tmp_path / "ct_sr.dcm"
    build_sr(prediction, chosen, UIDS, CONTEXT).save_as(sr_path, enforce_file_format=True)
    assert not dciodvfy_errors(sr_path), dciodvfy_output(sr_path)
    assert read_strict(sr_path).StudyInstanceUID == chosen[0].StudyInstanceUID

    mr_dir = SHARED_DATA / "mr_siemens_xa30_dwi_enh" / "10_DWI_dir80_PA"
    assert mr_dir.is_dir(), f"shared test data missing: {mr_dir}"
    enhanced = pydicom.dcmread(sorted(p for p in mr_dir.iterdir() if p.is_file())[0])
    mr_prediction = fake_prediction([enhanced], pipeline="MR", primary_role="dwi")
    assert mr_prediction.peak is not None and mr_prediction.peak.source.frame is not None
    mr_sr = build_sr(mr_prediction, [enhanced], UIDS, CONTEXT)
    mr_sr_path = tmp_path / "mr_sr.dcm"
    mr_sr.save_as(mr_sr_path, enforce_file_format=True)
    assert not dciodvfy_errors(mr_sr_path), dciodvfy_output(mr_sr_path)
    frames = [e.value for e in read_strict(mr_sr_path).iterall() if e.keyword == "ReferencedFrameNumber"]
    assert frames == [mr_prediction.peak.source.frame]
    mr_captures = build_secondary_captures(mr_prediction, [enhanced], UIDS, CONTEXT)
    mr_back = _save_valid(mr_captures[12], tmp_path / "mr_sc.dcm")
    assert mr_back.StudyInstanceUID == enhanced.StudyInstanceUID
    assert mr_back.SourceImageSequence[0].ReferencedFrameNumber == mr_prediction.attention[12].source.frame
    # The enhanced image's window is in its Frame VOI LUT functional group (PS3.3 C.7.6.16.2.10).
    frame_window = source_window(enhanced, mr_prediction.peak.source.frame)
    assert frame_window is not None and frame_window == display_window(mr_prediction, {enhanced.SOPInstanceUID: enhanced})
