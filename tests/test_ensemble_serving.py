"""Serving the fold ensemble ``fpe-node train`` writes: loader, card, predictor, Grad-CAM, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dicom_node.cli import main
from inference.attention import grad_cam
from inference.case import dicom_case
from inference.model.calibration import Calibration
from inference.model.checkpoint import CheckpointError, ModelCard, load_checkpoint, load_model, save_checkpoint, weights_sha256
from inference.model.ensemble import EnsembleCard, Res25Ensemble, load_ensemble, save_ensemble
from inference.model.res25 import Res25, Res25Config, seeded_init_
from inference.predictor import CaseInput, Predictor
from inference.recipe import DEFAULT_RECIPE
from inference.result import Prediction
from inference.selection import Selector
from tests.factory import Study, write_mr_stroke_study
from tests.training_support import TrainedModel, trained_checkpoint

GRID = (10, 32, 32)
MEMBER_PLATT = ({"a": 0.8, "b": 0.1}, {"a": 1.3, "b": -0.2})
ENSEMBLE_PLATT = {"a": 1.5, "b": 0.05}
THRESHOLD = 0.37


# torch's CPU sums are bit-stable per thread count: one thread for every test here (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Files:
    ensemble: Path
    members: tuple[Path, ...]


def _member_card(number: int, config: Res25Config, recipe: dict[str, Any] | None) -> ModelCard:
    return ModelCard(
        name="res25-test", version=f"fold{number}", architecture=config, grid=GRID, recipe=recipe,
        threshold=0.5, calibration=Calibration("platt", MEMBER_PLATT[number]),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Two reduced, differently seeded members with their own Platt calibrations, and their ensemble."""
    folder = tmp_path_factory.mktemp("ensemble")
    config = Res25Config.reduced(n_slices=GRID[0])
    recipe = DEFAULT_RECIPE.with_grid(GRID).to_dict()
    members = []
    for number in range(2):
        path = folder / f"fold{number}.pt"
        save_checkpoint(path, seeded_init_(Res25(config=config), seed=11 + number), _member_card(number, config, recipe))
        members.append(path)
    card = EnsembleCard(name="res25-test-ensemble", version="cv2", grid=GRID, recipe=recipe, precision="fp32",
                        threshold=THRESHOLD, calibration=Calibration("platt", ENSEMBLE_PLATT),
                        training={"calibration_fitted_on": "out-of-fold predictions"})
    save_ensemble(folder / "ensemble.pt", members, card)
    return Files(folder / "ensemble.pt", tuple(members))


@pytest.fixture(scope="module")
def mr_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return write_mr_stroke_study(tmp_path_factory.mktemp("mr"), rows=48)


def test_load_model_serves_the_ensemble_under_its_own_card(files: Files) -> None:
    loaded = load_model(files.ensemble)
    assert loaded.source == "ensemble" and isinstance(loaded.model, Res25Ensemble)
    assert not loaded.model.training and len(loaded.model.members) == 2
    card = loaded.card
    assert (card.name, card.version, card.threshold, card.precision) == ("res25-test-ensemble", "cv2", THRESHOLD, "fp32")
    assert card.calibration == Calibration("platt", ENSEMBLE_PLATT)
    assert card.grid == GRID and card.recipe == DEFAULT_RECIPE.with_grid(GRID).to_dict()
    members = [load_checkpoint(path).card for path in files.members]
    assert [m.weights_sha256 for m in loaded.member_cards] == [m.weights_sha256 for m in members]
    assert card.weights_sha256 == weights_sha256(loaded.model.state_dict())
    assert card.weights_sha256 not in {m.weights_sha256 for m in members}
    assert [m["version"] for m in card.training["ensemble_members"]] == ["fold0", "fold1"]
    assert card.training["calibration_fitted_on"] == "out-of-fold predictions"
    info = card.model_info()
    assert info.calibrated and info.threshold == THRESHOLD and not info.demonstration and info.recipe_from_checkpoint
    assert load_ensemble(files.ensemble).card.members_sha256 == tuple(m.weights_sha256 for m in members)


def _case(study: Study) -> CaseInput:
    case = dicom_case([study.directory], Selector(prefer_pipeline="MR"))
    assert isinstance(case, CaseInput), case
    return case


def test_predictor_gives_the_ensemble_score_threshold_and_identity(files: Files, mr_study: Study) -> None:
    predictor = Predictor(load_model(files.ensemble), device="cpu")
    case = _case(mr_study)
    result = predictor.predict(case)
    assert isinstance(result, Prediction), result
    volume = torch.from_numpy(predictor.preprocess(case).tensor)[None]
    calibrated = []
    for number, path in enumerate(files.members):
        with torch.inference_mode():
            z = float(load_checkpoint(path).model(volume).logits[0, 0])
        calibrated.append(MEMBER_PLATT[number]["a"] * z + MEMBER_PLATT[number]["b"])
    logit = sum(calibrated) / len(calibrated)
    expected = 1.0 / (1.0 + math.exp(-(ENSEMBLE_PLATT["a"] * logit + ENSEMBLE_PLATT["b"])))
    assert result.logit == pytest.approx(logit, abs=1e-6)
    assert result.score == pytest.approx(expected, abs=1e-6)
    assert result.positive == (result.score >= THRESHOLD)
    assert (result.model.name, result.model.version) == ("res25-test-ensemble", "cv2")
    assert result.model.threshold == THRESHOLD and result.model.calibrated
    assert result.model.weights_sha256 == predictor.card.weights_sha256
    assert len(result.attention) == GRID[0] and result.peak is not None
    assert all(0.0 <= float(s.heat.min()) and float(s.heat.max()) <= 1.0 for s in result.attention)
    assert sum(result.slice_weights) == pytest.approx(1.0, abs=1e-5)


def test_grad_cam_of_the_ensemble_is_the_mean_of_the_members_scaled_maps(files: Files) -> None:
    """ReLU(mean_i s_i * cam_i) with cam_i member i's Grad-CAM before its ReLU (module docstring)."""
    ensemble = load_model(files.ensemble).model
    assert isinstance(ensemble, Res25Ensemble)
    volume = torch.randn(1, 3, *GRID, generator=torch.Generator().manual_seed(5))
    # attention.py annotates Res25; the ensemble has the interface it uses
    out, cam = grad_cam(ensemble, volume)  # type: ignore[arg-type]
    sign = 1.0 if float(out.logits[0, 0]) >= 0 else -1.0
    scaled = []
    for number, member in enumerate(ensemble.networks()):
        maps = member.trunk(member.slice_images(volume)).detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(sign * member.head(maps, 1).logits.sum(), maps)
        scaled.append(MEMBER_PLATT[number]["a"] * (grads.mean(dim=(2, 3), keepdim=True) * maps.detach()).sum(dim=1))
    expected = F.relu(torch.stack(scaled).mean(0)).reshape(cam.shape)
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)


def _rewrite(source: Path, target: Path, change: Any) -> Path:
    payload = torch.load(source, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def _other_recipe(payload: dict[str, Any]) -> None:
    payload["members"][1]["card"]["recipe"] = DEFAULT_RECIPE.with_grid((10, 40, 40)).to_dict()


def _other_architecture(payload: dict[str, Any]) -> None:
    payload["members"][1]["card"]["architecture"]["dropout"] = 0.5


def _tampered(payload: dict[str, Any]) -> None:
    state = payload["members"][0]["state_dict"]
    first = sorted(key for key, value in state.items() if value.is_floating_point())[0]
    state[first] = state[first] + 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["members"][1].pop("state_dict"), r"member 1: missing key 'state_dict'"),
        (lambda p: p["members"][0].pop("card"), r"member 0: missing key 'card'"),
        (lambda p: p.pop("members"), r"missing key 'members'"),
        (_other_recipe, r"members 1 \(res25-test fold1\) have another recipe than member 0 \(res25-test fold0\)"),
        (_other_architecture, r"members 1 \(res25-test fold1\) have another architecture"),
        (_tampered, r"member 0 \(res25-test fold0\): weights SHA-256 .* differs"),
        (lambda p: p["card"].update(grid=[10, 48, 48]), r"ensemble card grid \(10, 48, 48\) differs"),
        (lambda p: p["card"]["members_sha256"].reverse(), r"members_sha256"),
        (lambda p: p.update(format_version=2), r"unsupported ensemble format_version 2"),
    ],
    ids=["no-state-dict", "no-card", "no-members", "recipes", "architectures", "weights", "grid", "hashes", "version"],
)
def test_bad_ensembles_are_refused_naming_the_fault(files: Files, tmp_path: Path, change: Any, message: str) -> None:
    bad = _rewrite(files.ensemble, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_fpe_node_predict_serves_an_ensemble(files: Files, mr_study: Study, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FPENODE_INFERENCE__DEVICE", "cpu")
    out = tmp_path / "result.json"
    assert main(["predict", str(mr_study.directory), "--checkpoint", str(files.ensemble), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["analysed"] is True and result["pipeline"] == "MR"
    assert result["calibrated"] is True and result["probability"] == result["score"]
    assert result["threshold"] == THRESHOLD and result["positive"] == (result["score"] >= THRESHOLD)
    assert result["model"]["name"] == "res25-test-ensemble" and result["model"]["version"] == "cv2"
    assert result["model"]["weights_sha256"] == load_model(files.ensemble).card.weights_sha256


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """The session's phantom model (trained once per session, shared with tests/test_training.py)."""
    return trained_checkpoint(tmp_path_factory)


def test_node_serves_the_trained_ensemble_as_evaluate_scores_it(trained_model: TrainedModel) -> None:
    """``fpe-node train``'s ensemble.pt through the predictor = evaluate's per-case values."""
    from inference.case import nifti_case
    from inference.training.evaluate import case_logits, load_served_model
    from inference.training.manifest import load_manifest
    from inference.training.cache import preprocess_cohort

    predictor = Predictor.load(trained_model.ensemble, device="cpu")
    evaluated = load_served_model(trained_model.ensemble)
    assert evaluated.kind == "ensemble"
    assert (predictor.card.name, predictor.card.version) == (evaluated.name, evaluated.version)
    assert predictor.card.threshold == evaluated.threshold and predictor.card.calibration == evaluated.calibration
    assert predictor.model_info.calibrated and not predictor.model_info.demonstration
    cases = load_manifest(trained_model.manifest)[:3]
    inputs = [entry.load() for entry in preprocess_cohort(cases, predictor.recipe, trained_model.cache_dir)]
    logits = case_logits(evaluated.model, inputs)
    for case, logit in zip(cases, logits):
        prediction = predictor.predict(nifti_case(case.series))
        assert isinstance(prediction, Prediction), prediction
        assert prediction.logit == pytest.approx(float(logit), abs=1e-5)
        assert prediction.score == pytest.approx(evaluated.calibration.apply(float(logit)), abs=1e-5)
        assert prediction.positive == (prediction.score >= evaluated.threshold)
