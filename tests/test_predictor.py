"""The predictor end to end on synthetic studies: CT with a CTA in a rotated frame, MR, NIfTI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inference.case import dicom_case, nifti_case, predict_paths
from inference.model.checkpoint import DEMONSTRATION_NOTE, demonstration_model
from inference.model.res25 import Res25Config
from inference.predictor import STAGES, CaseInput, Predictor
from inference.recipe import DEFAULT_RECIPE
from inference.result import NotAnalysed, Prediction
from inference.selection import Selector
from tests.factory import Study, write_ct_stroke_study, write_mr_stroke_study
from tests.test_registration import phantom_image

GRID = (10, 32, 32)


# torch's CPU sums are bit-stable per thread count: one thread for every test here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_predictor() -> Predictor:
    """Reduced res25 (10 slices, widths 8-64) with deterministic demonstration weights."""
    return Predictor(demonstration_model(Res25Config.reduced(n_slices=GRID[0]), grid=GRID[1:]), device="cpu")


def recipe_selector() -> Selector:
    return Selector(required_roles={p: DEFAULT_RECIPE.for_pipeline(p).required_roles for p in ("CT", "MR")})


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return write_ct_stroke_study(tmp_path_factory.mktemp("ct"), rows=64)


@pytest.fixture(scope="module")
def ct_case(ct_study: Study) -> CaseInput:
    case = dicom_case([ct_study.directory], recipe_selector())
    assert isinstance(case, CaseInput), case
    return case


@pytest.fixture(scope="module")
def ct_prediction(ct_case: CaseInput) -> Prediction:
    result = small_predictor().predict(ct_case)
    assert isinstance(result, Prediction), result
    return result


def test_ct_case_registers_rotated_cta_and_predicts(ct_study: Study, ct_prediction: Prediction) -> None:
    result = ct_prediction
    assert result.pipeline == "CT" and result.primary_role == "ncct"
    assert result.series_used == {"ncct": ct_study.role("ncct").series_uid, "cta": ct_study.role("cta").series_uid}
    assert 0.0 <= result.score <= 1.0
    assert result.positive == (result.score >= result.model.threshold)
    assert result.model.demonstration and DEMONSTRATION_NOTE in result.warnings
    assert set(result.timings_s) == set(STAGES)
    assert len(result.slice_weights) == GRID[0] and sum(result.slice_weights) == pytest.approx(1.0, abs=1e-5)
    assert len(result.aux_scores) == GRID[0] // 5
    # Every source instance of both series is evidence.
    used = {s.sop_instance_uid for s in result.sources}
    assert set(ct_study.role("ncct").sop_instance_uids) <= used
    assert set(ct_study.role("cta").sop_instance_uids) <= used


def test_cta_registration_recovers_the_factory_frame(ct_study: Study, ct_case: CaseInput) -> None:
    prepared = small_predictor().preprocess(ct_case)
    registration = prepared.registrations["cta"]
    assert registration.method == "registered"
    # The factory samples the CTA pixel at scanner point q from the phantom at T q
    # (T = Series.world_from_patient), so a patient point p of the NCCT lies at T^-1 p in the CTA.
    truth = np.linalg.inv(ct_study.role("cta").world_from_patient)
    points = np.random.default_rng(1).uniform(-45.0, 45.0, (100, 3)) + [0.0, 0.0, 20.0]
    found = np.array([registration.transform.TransformPoint(tuple(p)) for p in points])
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    error = np.linalg.norm(found - expected, axis=1).max()
    unregistered = np.linalg.norm(points - expected, axis=1).max()
    # 64 x 64 images of 3.75 mm pixels: within about 1.5 pixels, a third of the misalignment.
    assert error < 6.0 and error < unregistered / 3, (error, unregistered)


def test_attention_mapped_onto_primary_series(ct_study: Study, ct_prediction: Prediction) -> None:
    result = ct_prediction
    ncct = ct_study.role("ncct")
    assert [a.model_slice for a in result.attention] == list(range(GRID[0]))
    for plane in result.attention:
        assert plane.source.series_uid == ncct.series_uid
        assert plane.image.shape == plane.heat.shape == (64, 64)  # native in-plane matrix
        assert 0.0 <= float(plane.heat.min()) and float(plane.heat.max()) <= 1.0
        # The plane is the source image's own plane: same position as that instance.
        index = ncct.sop_instance_uids.index(plane.source.sop_instance_uid)
        np.testing.assert_allclose(plane.position_patient, ncct.positions[index], atol=1e-3)
    # Model slices run inferior to superior.
    heights = [a.position_patient[2] for a in result.attention]
    assert heights == sorted(heights)
    # The peak: the maximum of the attention on the source planes (every slice of the series).
    assert result.peak is not None and result.source_attention is not None
    k = [p.source for p in result.source_planes].index(result.peak.source)
    assert result.source_attention[k, int(result.peak.row), int(result.peak.column)] == pytest.approx(1.0)
    assert result.peak.outline[0] == result.peak.outline[-1] and len(result.peak.outline) >= 5
    assert "hemisphere" in result.peak.region


def test_same_input_same_output_bit_for_bit(ct_case: CaseInput, ct_prediction: Prediction) -> None:
    first = ct_prediction
    second = small_predictor().predict(ct_case)
    assert isinstance(first, Prediction) and isinstance(second, Prediction)
    assert first.score == second.score and first.logit == second.logit
    assert first.slice_weights == second.slice_weights
    for a, b in zip(first.attention, second.attention):
        assert a.heat.tobytes() == b.heat.tobytes()
    assert first.peak == second.peak
    assert first.sources == second.sources


def test_ct_without_cta_is_not_analysed(tmp_path: Path) -> None:
    study = write_ct_stroke_study(tmp_path, rows=48, with_cta=False, with_dose_report=False, with_reformats=False,
                                  with_mips=False, with_localizer=False, with_thick=False)
    result = predict_paths([study.directory], small_predictor(), recipe_selector())
    assert isinstance(result, NotAnalysed)
    assert "cta" in result.reason.lower()


def test_mr_case(tmp_path: Path) -> None:
    study = write_mr_stroke_study(tmp_path, rows=48)
    result = predict_paths([study.directory], small_predictor(), recipe_selector())
    assert isinstance(result, Prediction), result
    assert result.pipeline == "MR" and result.primary_role == "dwi"
    assert result.series_used["dwi"] == study.role("dwi").series_uid
    assert result.series_used["flair"] == study.role("flair").series_uid
    assert result.attention[0].source.series_uid == study.role("dwi").series_uid


def test_nifti_case(tmp_path: Path) -> None:
    hu = phantom_image((48, 56, 36), (3.0, 3.5, 4.5), (-72.0, -98.0, -60.0))
    array = sitk.GetArrayFromImage(hu)
    paths = {}
    for role, values in {"dwi": (700.0, 150.0), "adc": (800.0, 3000.0), "flair": (500.0, 100.0)}.items():
        brain, csf = values
        signal = np.where(array == 35.0, brain, np.where(array == 8.0, csf, np.where(array == 20.0, brain * 1.4, 2.0)))
        image = sitk.GetImageFromArray(signal.astype(np.float32))
        image.CopyInformation(hu)
        paths[role] = tmp_path / f"{role}.nii.gz"
        sitk.WriteImage(image, str(paths[role]))
    result = small_predictor().predict(nifti_case(paths))
    assert isinstance(result, Prediction), result
    assert result.pipeline == "MR"
    assert result.series_used == {"dwi": "file:dwi.nii.gz", "adc": "file:adc.nii.gz", "flair": "file:flair.nii.gz"}
    assert result.attention == () and result.sources == ()
    assert any("NIfTI" in w for w in result.warnings)


def test_nifti_case_needs_one_primary(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="primary role"):
        nifti_case({"adc": tmp_path / "adc.nii.gz"})


def test_full_size_model_on_default_grid(ct_case: CaseInput) -> None:
    """The published architecture on 25 x 224 x 224, demonstration weights (a few seconds)."""
    predictor = Predictor(demonstration_model(), device="cpu")
    assert predictor.recipe.grid == (25, 224, 224)
    result = predictor.predict(ct_case)
    assert isinstance(result, Prediction)
    assert len(result.attention) == 25 and len(result.aux_scores) == 5
