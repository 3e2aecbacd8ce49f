"""Rigid co-registration (recipe step 2): a known rotation and shift is recovered."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inference.recipe import DEFAULT_RECIPE
from inference.registration import align, block_average, same_grid


def phantom_hu(points: np.ndarray) -> np.ndarray:
    """A head in HU at patient points (..., 3): skull, brain, two ventricles, lesion, orbit."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2] - 20.0
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    hu[(x / 72) ** 2 + (y / 92) ** 2 + (z / 80) ** 2 <= 1] = 1000.0
    hu[(x / 65) ** 2 + (y / 85) ** 2 + (z / 73) ** 2 <= 1] = 35.0
    hu[((x - 12) / 8) ** 2 + ((y + 10) / 25) ** 2 + ((z - 10) / 15) ** 2 <= 1] = 8.0
    hu[((x + 10) / 6) ** 2 + ((y + 5) / 20) ** 2 + ((z - 5) / 12) ** 2 <= 1] = 8.0
    hu[((x - 40) / 12) ** 2 + ((y - 20) / 15) ** 2 + ((z + 20) / 10) ** 2 <= 1] = 20.0
    hu[(x + 30) ** 2 + (y + 85) ** 2 + (z + 40) ** 2 <= 15**2] = 10.0
    return hu


def rigid(rotation_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]) -> np.ndarray:
    """4x4 world-from-patient matrix (Euler angles about x, y, z as ITK composes them)."""
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*np.radians(rotation_deg))
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(euler.GetMatrix()).reshape(3, 3)
    matrix[:3, 3] = shift_mm
    return matrix


def phantom_image(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    world_from_patient: np.ndarray | None = None,
) -> sitk.Image:
    """The phantom seen on an axis-aligned grid, optionally through a moved frame of reference."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    world = grid * np.asarray(spacing) + np.asarray(origin)
    inverse = np.linalg.inv(world_from_patient if world_from_patient is not None else np.eye(4))
    patient = world @ inverse[:3, :3].T + inverse[:3, 3]
    image = sitk.GetImageFromArray(phantom_hu(patient).transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture(scope="module")
def fixed() -> sitk.Image:
    return phantom_image((96, 96, 70), (2.0, 2.3, 3.0), (-96.0, -110.0, -80.0))


def test_known_rotation_and_shift_recovered(fixed: sitk.Image) -> None:
    truth = rigid((6.0, -4.0, 10.0), (12.0, -8.0, 15.0))
    moving = phantom_image((80, 100, 110), (2.5, 2.2, 2.4), (-100.0, -110.0, -110.0), truth)
    result = align(fixed, moving, DEFAULT_RECIPE.registration, fixed_frame_uid="1.2.3", moving_frame_uid="1.2.4")
    assert result.method == "registered"
    assert result.metric_after is not None and result.metric_before is not None
    assert result.metric_after < result.metric_before
    points = np.random.default_rng(0).uniform(-55.0, 55.0, (200, 3)) + [0.0, 0.0, 20.0]
    found = np.array([result.transform.TransformPoint(tuple(p)) for p in points])
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    errors = np.linalg.norm(found - expected, axis=1)
    assert errors.max() < 1.5, f"max error {errors.max():.2f} mm"
    true_angle = np.degrees(np.arccos((np.trace(truth[:3, :3]) - 1) / 2))
    assert result.rotation_deg == pytest.approx(true_angle, abs=1.0)


def test_same_frame_and_grid_skips_registration(fixed: sitk.Image) -> None:
    result = align(fixed, fixed, DEFAULT_RECIPE.registration, fixed_frame_uid="1.2.3", moving_frame_uid="1.2.3")
    assert result.method == "same-grid"
    assert result.transform.GetParameters() == (0.0,) * 6


def test_same_frame_other_grid_uses_identity(fixed: sitk.Image) -> None:
    other = phantom_image((48, 48, 35), (4.0, 4.6, 6.0), (-96.0, -110.0, -80.0))
    result = align(fixed, other, DEFAULT_RECIPE.registration, fixed_frame_uid="1.2.3", moving_frame_uid="1.2.3")
    assert result.method == "same-frame"
    assert not same_grid(fixed, other)


def test_nifti_without_frame_same_grid_is_assumed_aligned(fixed: sitk.Image) -> None:
    assert align(fixed, fixed, DEFAULT_RECIPE.registration).method == "same-grid"


def test_block_average_is_exact_box_filter() -> None:
    image = sitk.GetImageFromArray(np.arange(4 * 4 * 8, dtype=np.float32).reshape(8, 4, 4))
    image.SetSpacing((1.0, 1.0, 0.5))
    shrunk = block_average(image, (1.0, 1.0, 2.0))
    assert shrunk.GetSize() == (4, 4, 2)
    assert shrunk.GetSpacing() == (1.0, 1.0, 2.0)
    array = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(sitk.GetArrayFromImage(shrunk)[0], array[:4].mean(axis=0))
    # Physical centre of the first output voxel is the centre of the block it averages.
    assert shrunk.GetOrigin()[2] == pytest.approx(0.75)
