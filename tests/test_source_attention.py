"""The attention on the primary series' own grid (``Prediction.source_attention``).

What a reader relies on when the map is drawn over the series: one plane per acquired image
(every slice, not only the model's), the images' own geometry (a gantry-tilted CT keeps its
tilted planes), nothing outside the head, no blocks, the peak inside the brain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from inference.attention import grid_image, iso_contour, smoothed_mask, source_attention
from inference.case import predict_paths
from inference.result import Prediction, SourcePlane
from inference.dicom_headers import slice_normal
from tests.conftest import require_shared_data
from tests.factory import write_ct_stroke_study, write_flair_for
from tests.test_predictor import recipe_selector, small_predictor

REAL_MR = "mr_siemens_xa30i_classic"
# Adjacent pixels both inside the brain differ by at most this (relative attention, 1 = peak):
# a map of nearest 7 x 7 Grad-CAM blocks jumps by up to 1 at a block edge. The steepest smooth
# change here: a 20 deg tilted CT plane (3.75 mm pixels) crossing the test model's 10 slices,
# whose weights differ a lot, every ~12 pixels (measured 0.072; the real MR: 0.010).
SMOOTH_STEP = 0.1


# torch's CPU sums are bit-stable per thread count: one thread for every test here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]


def _along_normal(headers: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    normal = slice_normal(tuple(float(v) for v in headers[0].ImageOrientationPatient))
    return sorted(headers, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))


def _pixels(folder: Path, planes: tuple[SourcePlane, ...]) -> np.ndarray:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in folder.iterdir() if p.is_file())}
    return np.stack([by_uid[plane.source.sop_instance_uid].pixel_array.astype(np.float32) for plane in planes])


def _check_planes_are_the_series(prediction: Prediction, folder: Path) -> None:
    headers = _along_normal(_headers(folder))
    assert prediction.source_attention is not None
    assert prediction.source_attention.shape == (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    assert prediction.source_attention.dtype == np.float32
    assert [p.source.sop_instance_uid for p in prediction.source_planes] == [str(ds.SOPInstanceUID) for ds in headers]
    for plane, ds in zip(prediction.source_planes, headers):
        np.testing.assert_allclose(plane.position_patient, [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(plane.orientation_patient, [float(v) for v in ds.ImageOrientationPatient], atol=1e-6)
        np.testing.assert_allclose(plane.pixel_spacing, [float(v) for v in ds.PixelSpacing], atol=1e-6)


def _check_smooth_masked_peak_in_head(attention: np.ndarray, pixels: np.ndarray, head_level: float) -> None:
    assert float(attention.max()) == pytest.approx(1.0)
    assert float(attention.min()) >= 0.0
    head = pixels >= head_level
    # nothing outside the head: the corners of every image (air) carry no attention at all
    corners = np.zeros(attention.shape[1:], dtype=bool)
    corners[:6, :6] = corners[:6, -6:] = corners[-6:, :6] = corners[-6:, -6:] = True
    assert not np.any(attention[:, corners]), "attention outside the head"
    assert np.count_nonzero(attention > 0) <= 1.05 * np.count_nonzero(head)
    # the peak lies inside the head
    peak = np.unravel_index(int(np.argmax(attention)), attention.shape)
    assert head[peak], f"peak {peak} outside the head"
    # smooth inside the brain: no block edges
    inside = attention > 0
    for axis in (1, 2):
        step = np.abs(np.diff(attention, axis=axis))
        both = np.logical_and(np.take(inside, range(1, inside.shape[axis]), axis=axis),
                              np.take(inside, range(inside.shape[axis] - 1), axis=axis))
        assert float(step[both].max()) <= SMOOTH_STEP


def test_real_mr_attention_on_every_source_slice(tmp_path: Path) -> None:
    real = require_shared_data(REAL_MR)
    shutil.copytree(real, tmp_path / "mr")
    trace_folder = tmp_path / "mr" / "13001_TRACEW"
    write_flair_for(tmp_path / "mr", sorted(trace_folder.iterdir()))
    prediction = predict_paths([tmp_path / "mr"], small_predictor(), recipe_selector())
    assert isinstance(prediction, Prediction), prediction
    _check_planes_are_the_series(prediction, trace_folder)
    assert prediction.source_attention is not None
    pixels = _pixels(trace_folder, prediction.source_planes)
    # the TRACEW values are tiny (at most 11): the head is what is above a tenth of its top
    _check_smooth_masked_peak_in_head(prediction.source_attention, pixels, 0.1 * float(np.percentile(pixels, 99)))
    covered = [k for k in range(len(prediction.source_planes)) if prediction.source_attention[k].any()]
    assert len(covered) > 25, "attention on more planes than the model has slices"
    _check_outline_is_smooth_inside_the_brain(prediction)


def _check_outline_is_smooth_inside_the_brain(prediction: Prediction) -> None:
    """The SR's region: a closed polygon on the peak's source plane, not a staircase, in the brain."""
    attention, peak = prediction.source_attention, prediction.peak
    assert attention is not None and peak is not None
    plane = next(k for k, p in enumerate(prediction.source_planes) if p.source == peak.source)
    assert attention[plane, int(peak.row), int(peak.column)] == pytest.approx(1.0)
    points = np.asarray(peak.outline)  # (column, row) image coordinates, pixel centre at +0.5
    assert len(points) >= 8 and np.array_equal(points[0], points[-1])
    steps = np.diff(points, axis=0)
    oblique = np.count_nonzero((np.abs(steps) > 1e-6).all(axis=1))
    assert oblique >= len(steps) // 2, "outline runs along pixel edges (a staircase)"
    # inside the brain: each point lies on a pixel that is brain (a point exactly on the edge of
    # the last brain pixel, where the iso-line meets the mask, counts as on it)
    for column, row in points - 0.5:  # index coordinates: pixel centres at integers
        near = [(r, c) for r in {int(np.floor(row)), int(np.ceil(row))} for c in {int(np.floor(column)), int(np.ceil(column))}
                if abs(r - row) <= 0.5 + 1e-6 and abs(c - column) <= 0.5 + 1e-6
                and 0 <= r < attention.shape[1] and 0 <= c < attention.shape[2]]
        assert any(attention[plane, r, c] > 0 for r, c in near), f"outline point {(column, row)} outside the brain"
    # it surrounds the peak: the winding number of the polygon about the peak's pixel centre is 1
    centre = np.array([peak.column + 0.5, peak.row + 0.5])
    angles = np.unwrap(np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0]))
    assert abs(abs(angles[-1] - angles[0]) - 2 * np.pi) < 1e-6


def test_gantry_tilted_ct_keeps_its_planes(tmp_path: Path) -> None:
    study = write_ct_stroke_study(tmp_path, rows=64, with_thick=False, with_reformats=False, with_mips=False,
                                  with_localizer=False, with_dose_report=False, tilt_deg=20.0)
    prediction = predict_paths([study.directory], small_predictor(), recipe_selector())
    assert isinstance(prediction, Prediction), prediction
    assert any("gantry tilt of 20.0 deg" in w for w in prediction.warnings)
    folder = study.directory / "ncct_thin"
    _check_planes_are_the_series(prediction, folder)
    assert prediction.source_planes[0].orientation_patient[5] == pytest.approx(-np.sin(np.radians(20.0)), abs=1e-5)
    assert prediction.source_attention is not None
    pixels = _pixels(folder, prediction.source_planes) - 1024.0  # stored values; rescale intercept -1024
    _check_smooth_masked_peak_in_head(prediction.source_attention, pixels, -300.0)
    _check_outline_is_smooth_inside_the_brain(prediction)


def test_plane_between_model_slices_is_interpolated_and_brain_edge_masked() -> None:
    # a model grid of 3 slices 10 mm apart, attention 0, 1, 0 by slice; brain: a 60 mm cube
    heat = np.zeros((3, 20, 20), dtype=np.float32)
    heat[1] = 1.0
    brain = np.zeros((3, 20, 20), dtype=np.float32)
    brain[:, 2:18, 2:18] = 1.0
    heat_image = grid_image(heat, (-47.5, -47.5, -10.0), (5.0, 5.0, 10.0))
    brain_image = smoothed_mask(grid_image(brain, (-47.5, -47.5, -10.0), (5.0, 5.0, 10.0)) > 0, 2.0)
    planes = tuple(
        SourcePlane(source=None, position_patient=(-49.0, -49.0, z), orientation_patient=(1, 0, 0, 0, 1, 0),  # type: ignore[arg-type]
                    pixel_spacing=(2.0, 2.0), rows=50, columns=50)
        for z in (0.0, -5.0, 2.5)
    )
    out = source_attention(heat_image, brain_image, planes)
    centre = (slice(20, 30), slice(20, 30))
    assert np.allclose(out[0][centre], 1.0)
    assert np.allclose(out[1][centre], 0.5, atol=1e-4)  # halfway between model slices 0 and 1
    assert np.allclose(out[2][centre], 0.75, atol=1e-4)
    assert not out[:, :5, :].any() and not out[:, -5:, :].any()  # outside the 60 mm brain


def test_iso_contour_follows_the_level_and_skips_other_regions() -> None:
    rows, cols = np.mgrid[:64, :64]
    blob = np.exp(-(((rows - 30) / 8.0) ** 2 + ((cols - 20) / 5.0) ** 2) / 2)
    other = np.exp(-(((rows - 30) / 4.0) ** 2 + ((cols - 50) / 4.0) ** 2) / 2)
    outline = np.asarray(iso_contour(blob + other, 30, 20, 0.5))
    radius = np.sqrt(2 * np.log(2))  # the Gaussian is half its peak at this many sigmas
    ellipse = ((outline[:, 0] - 30) / (8 * radius)) ** 2 + ((outline[:, 1] - 20) / (5 * radius)) ** 2
    assert np.allclose(ellipse, 1.0, atol=0.02)
    assert outline[:, 1].max() < 30  # the second blob is not outlined
    masked = blob.copy()
    masked[:, :18] = 0.0  # outside a mask
    assert np.asarray(iso_contour(masked, 30, 20, 0.5))[:, 1].min() >= 17.5
