"""DWI as vendors store it: b-values and trace marks from the tables of inference.vendor_quirks.

Real files (../shared/data) show each quirk as a scanner wrote it; factory variants
(tests/factory.py ``write_vendor_dwi``) show the same quirk for vendors and layouts the real
files lack (GE, Canon Image Comments, Siemens CSA, b-values only in a private element, a
private block reserved at 0x11 instead of 0x10, b0 images without any b-value).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference import vendor_quirks as Q
from inference import volumes as V
from inference.dicom_headers import instance_header, read_series_headers
from tests import factory
from tests.conftest import require_shared_data

EXPECTED_SOURCE = {
    "ge": "GE (0043,1039)",
    "siemens": "Siemens (0019,100C)",
    "siemens_csa": "Siemens (0029,1010)",
    "philips": "Philips (2001,1003)",
    "canon": Q.CANON_COMMENT_SOURCE,
}


def _iso_paths(study: factory.Study) -> list[Path]:
    """The files of the scanner's isotropic image: the last block of ``write_vendor_dwi``."""
    series = study.series["dwi"]
    n_positions = len(set(p[2] for p in series.positions))
    return list(series.paths[-n_positions:])


@pytest.mark.parametrize("vendor", sorted(factory.VENDOR_DWI))
def test_private_b_value_and_scanner_trace_used_not_averaged(tmp_path: Path, vendor: str) -> None:
    study = factory.write_vendor_dwi(tmp_path, vendor=vendor, other_creator_first=vendor != "canon")
    first = pydicom.dcmread(study.series["dwi"].paths[0])
    assert "DiffusionBValue" not in first  # only the vendor's place holds it
    (header,) = read_series_headers([tmp_path])
    assert header.b_values == (0.0, 1000.0)
    assert header.b_value_source == EXPECTED_SOURCE[vendor]
    diffusion = V.load_diffusion(study.series["dwi"].paths, min_coverage_mm=50)
    assert diffusion.b_values == (0.0, 1000.0)
    assert len(diffusion.by_b_value[1000.0]) == 3  # three directions; the isotropic image is not a fourth
    trace = diffusion.trace()
    scanner = V.load_volume(_iso_paths(study), min_coverage_mm=50)
    assert np.array_equal(trace.array, scanner.array)  # the scanner's trace as stored, never averaged
    assert "the scanner's trace image at b=1000 used" in trace.notes
    assert not any("geometric mean" in note for note in trace.notes)


@pytest.mark.parametrize("vendor", ["ge", "philips"])
def test_without_a_trace_image_the_trace_is_the_mean_of_the_directions(tmp_path: Path, vendor: str) -> None:
    study = factory.write_vendor_dwi(tmp_path, vendor=vendor, with_trace=False)
    trace = V.load_diffusion(study.series["dwi"].paths, min_coverage_mm=50).trace()
    assert "trace built as geometric mean of 3 directions at b=1000" in trace.notes


def test_b0_images_without_any_b_value_are_b0(tmp_path: Path) -> None:
    study = factory.write_vendor_dwi(tmp_path, vendor="canon", public_b=True, b0_tag=False)
    b0_file = pydicom.dcmread(study.series["dwi"].paths[0])
    assert "DiffusionBValue" not in b0_file and "ImageComments" not in b0_file
    (header,) = read_series_headers([tmp_path])
    assert header.b_values == (0.0, 1000.0)  # selection sees the b0 the ADC needs
    diffusion = V.load_diffusion(study.series["dwi"].paths, min_coverage_mm=50)
    b0 = diffusion.b0()
    assert b0 is not None and any("without a b-value taken as b0" in note for note in b0.notes)
    adc = V.adc_from_b0_and_trace(b0, diffusion.trace())
    assert float(np.median(adc.array[adc.array > 0])) > 0


def test_private_elements_are_found_by_creator_not_by_number() -> None:
    ds = Dataset()
    ds.Modality = "MR"
    ds.private_block(0x0043, "SOMEONE ELSE", create=True).add_new(0x39, "IS", [1_000_001_000, 8, 0, 0])
    assert Q.private_b_value(ds) is None  # (0043,1039) of another creator is not GE's b-value
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [1_000_001_000, 8, 0, 0])
    assert (0x0043, 0x1139) in ds  # GE's block landed at 0x11
    assert Q.private_b_value(ds) == (1000.0, "GE (0043,1039)")  # first value, modulo 10^9


def test_derived_maps_take_no_private_b_value() -> None:
    ds = Dataset()
    ds.Modality = "MR"
    ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    ds.SOPInstanceUID = "2.25.1"
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", 1000)
    assert instance_header(ds).frames[0].b_value is None


def test_every_table_row_names_vendor_tag_and_source() -> None:
    rows = [entry.element for entry in Q.B_VALUE_ELEMENTS] + [marker.element for marker in Q.TRACE_MARKERS]
    for element in rows:
        assert element.vendor and element.creator and element.source and element.tag.startswith("(")


# --------------------------------------------------------------------------- real files


def test_real_philips_isotropic_image_is_the_trace() -> None:
    folder = require_shared_data("mr_philips_achieva_dti_tilted")
    diffusion = V.load_diffusion([folder], min_coverage_mm=50)
    assert diffusion.b_values == (0.0, 2000.0)
    assert len(diffusion.by_b_value[2000.0]) == 15  # 15 directions; (2001,1004) = 'I' is not a 16th
    assert set(diffusion.traces) == {2000.0}
    trace = diffusion.trace()
    assert "the scanner's trace image at b=2000 used" in trace.notes
    assert not any("geometric mean" in note for note in trace.notes)


def test_real_philips_b_value_only_in_the_private_tag(tmp_path: Path) -> None:
    folder = require_shared_data("mr_philips_achieva_dti_tilted")
    for path in sorted(folder.iterdir())[:40]:  # strip the public b-value from a part of the series
        ds = pydicom.dcmread(path)
        del ds.DiffusionBValue
        ds.save_as(tmp_path / path.name)
    header = instance_header(pydicom.dcmread(tmp_path / sorted(p.name for p in tmp_path.iterdir())[0]))
    assert header.b_value_source == "Philips (2001,1003)"
    (series,) = read_series_headers([tmp_path])
    assert series.b_values and series.b_value_source == "Philips (2001,1003)"


def test_real_canon_classic_and_enhanced_copies_used_once() -> None:
    folder = require_shared_data("mr_canon_galan_dti")
    (header,) = read_series_headers([folder])
    assert header.n_frames == 520 and header.n_instances == 1  # the enhanced copy, not both
    assert header.b_values == (0.0, 1500.0)
    diffusion = V.load_diffusion([folder], min_coverage_mm=50)
    assert len(diffusion.by_b_value[1500.0]) == 12
    trace = diffusion.trace()
    assert trace.shape[0] == 40  # one plane per position, not two stacked copies
    assert any("enhanced copy used, 520 classic image(s) ignored" in note for note in trace.notes)


def test_real_siemens_classic_tracew_and_adc() -> None:
    folder = require_shared_data("mr_siemens_xa30i_classic")
    headers = {h.series_description or h.series_uid: h for h in read_series_headers([folder])}
    by_type = {("ADC" if "ADC" in h.image_types else "TRACEW"): h for h in headers.values()}
    assert by_type["TRACEW"].b_values == (2500.0,)
    assert by_type["TRACEW"].b_value_source == "Siemens (0019,100C)"
    assert by_type["ADC"].b_values == ()  # the ADC map's private b-value is the acquisition's
    diffusion = V.load_diffusion([folder / "13001_TRACEW"], min_coverage_mm=50)
    assert set(diffusion.traces) == {2500.0}
    trace = diffusion.trace()
    assert 0 < float(trace.array.max()) <= 11  # tiny stored values kept as they are


def test_real_siemens_enhanced_tracew_frames_marked() -> None:
    folder = require_shared_data("mr_siemens_xa30_dwi_enh", "12_DWI_dir80_PA")
    (path,) = sorted(folder.iterdir())
    frames = instance_header(pydicom.dcmread(path, stop_before_pixels=True)).frames
    assert all(f.is_trace and f.b_value == 2500.0 for f in frames)


def test_directions_written_with_a_zero_gradient_are_not_taken_for_a_trace(tmp_path: Path) -> None:
    study = factory.write_vendor_dwi(tmp_path, vendor="philips", public_b=True, with_trace=False, trace_mark=False)
    for path in study.series["dwi"].paths:  # every b > 0 image claims a (0,0,0) gradient
        ds = pydicom.dcmread(path)
        ds.DiffusionGradientOrientation = [0.0, 0.0, 0.0]
        ds.save_as(path)
    diffusion = V.load_diffusion(study.series["dwi"].paths, min_coverage_mm=50)
    assert not diffusion.traces and len(diffusion.by_b_value[1000.0]) == 3
    assert "trace built as geometric mean of 3 directions at b=1000" in diffusion.trace().notes
