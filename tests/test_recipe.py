"""The preprocessing recipe: serialisation, validation, and what preprocess_case makes of it."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import SimpleITK as sitk

from inference.preprocess import PreprocessingError, RoleVolume, preprocess_case
from inference.recipe import CT_RECIPE, DEFAULT_RECIPE, ChannelSpec, Recipe
from tests.test_registration import phantom_image, rigid

SMALL_GRID = (8, 32, 32)


def test_recipe_round_trips_through_json() -> None:
    data = json.loads(json.dumps(DEFAULT_RECIPE.to_dict()))
    again = Recipe.from_dict(data)
    assert again == DEFAULT_RECIPE
    assert again.digest() == DEFAULT_RECIPE.digest()
    assert DEFAULT_RECIPE.with_grid(SMALL_GRID).digest() != DEFAULT_RECIPE.digest()


def test_default_recipe_is_documented_choice() -> None:
    assert DEFAULT_RECIPE.grid == (25, 224, 224)
    assert DEFAULT_RECIPE.orientation == "LPS"
    assert [c.role for c in DEFAULT_RECIPE.mr.channels] == ["adc", "dwi", "flair"]
    assert [c.name for c in DEFAULT_RECIPE.ct.channels] == ["ncct_brain", "cta_vessel", "ncct_stroke"]
    assert DEFAULT_RECIPE.ct.roles == ("ncct", "cta")
    assert DEFAULT_RECIPE.mr.roles == ("dwi", "adc", "flair")


def test_recipe_is_frozen_and_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        DEFAULT_RECIPE.grid = (1, 1, 1)  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="needs a window"):
        ChannelSpec(name="x", role="ncct", normalisation="window")
    with pytest.raises(pydantic.ValidationError, match="extra"):
        Recipe.from_dict({**DEFAULT_RECIPE.to_dict(), "surprise": 1})
    with pytest.raises(pydantic.ValidationError, match="primary role"):
        CT_RECIPE.model_validate({**CT_RECIPE.model_dump(), "primary_role": "dwi"})


@pytest.fixture(scope="module")
def ct_case() -> dict[str, RoleVolume]:
    ncct = phantom_image((96, 96, 70), (2.0, 2.3, 3.0), (-96.0, -110.0, -80.0))
    cta = phantom_image((80, 100, 110), (2.5, 2.2, 2.4), (-100.0, -110.0, -110.0), rigid((0.0, 0.0, 8.0), (5.0, 0.0, 10.0)))
    return {
        "ncct": RoleVolume("ncct", ncct, frame_of_reference_uid="1.2.3"),
        "cta": RoleVolume("cta", cta, frame_of_reference_uid="1.2.4"),
    }


def test_ct_case_preprocessed_onto_model_grid(ct_case: dict[str, RoleVolume]) -> None:
    recipe = DEFAULT_RECIPE.with_grid(SMALL_GRID)
    case = preprocess_case(ct_case, recipe, "CT")
    assert case.tensor.shape == (3, *SMALL_GRID)
    assert case.tensor.dtype == np.float32
    assert case.channel_names == ("ncct_brain", "cta_vessel", "ncct_stroke")
    assert 0.0 <= case.tensor.min() and case.tensor.max() <= 1.0
    assert case.registrations["cta"].method == "registered"
    # Brain (35 HU) is most of the mask: brain window 35/80, stroke window (35-20)/40.
    assert float(np.median(case.tensor[0][case.mask])) == pytest.approx(35 / 80, abs=0.01)
    assert float(np.median(case.tensor[2][case.mask])) == pytest.approx(15 / 40, abs=0.02)
    # Crop: the brain's extent (130 x 170 mm in plane, 146 mm high) plus margins, squared in plane.
    columns, rows, slices = case.grid.size
    assert (slices, rows, columns) == SMALL_GRID
    assert case.grid.spacing[0] == case.grid.spacing[1]
    assert 170 <= case.grid.spacing[1] * rows <= 195
    assert 140 <= case.grid.spacing[2] * slices <= 170
    assert case.mask.mean() > 0.3
    assert set(case.timings_s) == {"register", "preprocess"}


def test_preprocessing_is_deterministic(ct_case: dict[str, RoleVolume]) -> None:
    recipe = DEFAULT_RECIPE.with_grid(SMALL_GRID)
    first = preprocess_case(ct_case, recipe, "CT")
    second = preprocess_case(ct_case, recipe, "CT")
    assert first.tensor.tobytes() == second.tensor.tobytes()


def test_missing_required_role_is_a_reason(ct_case: dict[str, RoleVolume]) -> None:
    with pytest.raises(PreprocessingError, match="CT pipeline lacks cta"):
        preprocess_case({"ncct": ct_case["ncct"]}, DEFAULT_RECIPE, "CT")


def test_optional_role_zero_filled_with_warning(ct_case: dict[str, RoleVolume]) -> None:
    ct = DEFAULT_RECIPE.ct.model_copy(update={"optional_roles": ("cta",)})
    recipe = DEFAULT_RECIPE.model_copy(update={"ct": ct}).with_grid(SMALL_GRID)
    case = preprocess_case({"ncct": ct_case["ncct"]}, recipe, "CT")
    assert not case.tensor[1].any()
    assert "cta missing: its channel is zero-filled" in case.warnings


def _mr_like_phantom() -> sitk.Image:
    """An MR-like image of the phantom: brain bright, skull and air dark."""
    hu = phantom_image((64, 64, 40), (3.0, 3.5, 4.0), (-96.0, -110.0, -60.0))
    array = sitk.GetArrayFromImage(hu)
    signal = np.where(array == 35.0, 600.0, np.where(array == 8.0, 200.0, np.where(array == 20.0, 900.0, 5.0)))
    dwi = sitk.GetImageFromArray(signal.astype(np.float32))
    dwi.CopyInformation(hu)
    return dwi


def test_mr_zscore_inside_brain_mask() -> None:
    dwi = _mr_like_phantom()
    volumes = {role: RoleVolume(role, dwi, frame_of_reference_uid="9.9") for role in ("dwi", "adc", "flair")}
    case = preprocess_case(volumes, DEFAULT_RECIPE.with_grid(SMALL_GRID), "MR")
    inside = case.tensor[1][case.mask]
    assert abs(float(inside.mean())) < 0.05
    assert float(inside.std()) == pytest.approx(1.0, abs=0.05)
    assert all(r.method == "same-grid" for r in case.registrations.values())


def test_oblique_mr_is_masked_and_preprocessed() -> None:
    # Most real DWI is acquired oblique (Philips ~10 deg, Siemens XA30i): the per-slice hole
    # filling of the mask raised "Inputs do not occupy the same physical space" on such grids.
    dwi = _mr_like_phantom()
    tilt = np.deg2rad(10.0)
    dwi.SetDirection((1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)), 0.0, float(np.sin(tilt)), float(np.cos(tilt))))
    volumes = {role: RoleVolume(role, dwi, frame_of_reference_uid="9.9") for role in ("dwi", "adc", "flair")}
    case = preprocess_case(volumes, DEFAULT_RECIPE.with_grid(SMALL_GRID), "MR")
    assert case.mask.any()
    inside = case.tensor[1][case.mask]
    assert abs(float(inside.mean())) < 0.05
