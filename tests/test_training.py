"""Training and validation on a site's cohort, end to end on the synthetic phantom cohort.

The cohort (40 MR phantoms whose label follows the lesion size) is learnable: the reduced
model's cross-validated ROC-AUC must reach 0.9. The same images with shuffled labels must score
about chance -- if they do not, something leaks. The checkpoint the node serves must reproduce
``evaluate``'s per-case values.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model.checkpoint import load_checkpoint
from inference.recipe import Recipe
from inference.training.cache import cache_key, preprocess_cohort
from inference.training.ensemble import load_ensemble
from inference.training.evaluate import evaluate_manifest
from inference.training.manifest import load_manifest
from inference.training.phantoms import write_cohort
from inference.training.train import TrainConfig, fit_network, train_manifest
from tests.training_support import SHUFFLED_CONFIG, TrainedModel, trained_checkpoint

pytestmark = pytest.mark.xdist_group("training")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """The session's phantom model, trained once (shared with other tests' workers)."""
    return trained_checkpoint(tmp_path_factory)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cross_validation_learns_the_phantom_cohort(trained_model: TrainedModel) -> None:
    summary = trained_model.summary
    cv_auc = summary["cv_mean_sd"]["roc_auc"]
    assert cv_auc["n_folds"] == 5
    assert cv_auc["mean"] >= 0.9, summary
    assert summary["pooled_out_of_fold"]["roc_auc"] >= 0.85, summary
    out = trained_model.out_dir
    assert sorted(p.name for p in out.glob("fold*.pt")) == [f"fold{k}.pt" for k in range(5)]
    oof = _rows(out / "oof_predictions.csv")
    assert len(oof) == 40 and sorted(int(r["fold"]) for r in oof) == sorted([k for k in range(5) for _ in range(8)])


def test_fold_cards_say_how_the_model_was_made(trained_model: TrainedModel) -> None:
    loaded = load_checkpoint(trained_model.checkpoint)
    card = loaded.card
    assert loaded.source == "node" and not card.demonstration
    assert card.grid == (10, 32, 32) and card.precision == "fp32"
    assert Recipe.from_dict(card.recipe).grid == (10, 32, 32)
    assert card.calibration.method == "platt" and card.calibration.calibrated
    assert 0.0 < card.threshold < 1.0
    training = card.training
    assert training["data"]["pipeline"] == "MR" and training["data"]["cases"] == 40
    assert training["threshold_rule"] == "Youden's J on the inner validation split"
    assert training["calibration_fitted_on"] == "inner validation split"
    assert set(training["test_metrics"]) >= {"roc_auc", "sensitivity", "specificity", "brier"}
    assert training["cases"]["train"] + training["cases"]["inner_validation"] + training["cases"]["test"] == 40
    ensemble = load_ensemble(trained_model.ensemble)
    assert len(ensemble.member_cards) == 5
    assert ensemble.card.training["calibration_fitted_on"] == "out-of-fold predictions"
    assert [c.weights_sha256 for c in ensemble.member_cards] == list(ensemble.card.members_sha256)


def test_inner_validation_never_touches_the_reported_fold(trained_model: TrainedModel) -> None:
    # Re-derive the splits the run used and check that they are disjoint.
    from inference.training.splits import inner_validation_split, stratified_folds

    cases = load_manifest(trained_model.manifest)
    labels = [c.label for c in cases]
    folds = stratified_folds(labels, 5, seed=0)
    for fold in range(5):
        test = {i for i, f in enumerate(folds) if f == fold}
        rest = [i for i, f in enumerate(folds) if f != fold]
        train_pos, val_pos = inner_validation_split([labels[i] for i in rest], 0.2, 0 * 1000 + fold)
        train, val = {rest[i] for i in train_pos}, {rest[i] for i in val_pos}
        assert not (test & train) and not (test & val) and not (train & val)
        assert len(test | train | val) == 40


def test_shuffled_labels_score_about_chance(trained_model: TrainedModel, tmp_path: Path) -> None:
    # Same images (their preprocessing comes from the session's cache), labels permuted.
    manifest = write_cohort(tmp_path / "cohort", 40, seed=0, shuffle_labels_seed=7)
    torch.set_num_threads(1)
    result = train_manifest(manifest, tmp_path / "run", SHUFFLED_CONFIG, cache_dir=trained_model.cache_dir)
    auc = result.summary["cv_mean_sd"]["roc_auc"]["mean"]
    assert 0.25 <= auc <= 0.75, result.summary["cv_mean_sd"]


def test_served_checkpoint_reproduces_evaluate(trained_model: TrainedModel, tmp_path: Path) -> None:
    from inference.case import nifti_case
    from inference.predictor import Predictor

    evaluation = evaluate_manifest(
        trained_model.checkpoint, trained_model.manifest, tmp_path / "eval",
        cache_dir=trained_model.cache_dir, n_resamples=200, compare_bf16=False,
    )
    per_case = {row["id"]: row for row in _rows(tmp_path / "eval" / "per_case.csv")}
    assert len(per_case) == 40
    predictor = Predictor.load(trained_model.checkpoint, device="cpu")  # what the node serves
    assert predictor.model_info.calibrated and not predictor.model_info.demonstration
    for case in load_manifest(trained_model.manifest)[:6]:
        prediction = predictor.predict(nifti_case(case.series))
        row = per_case[case.case_id]
        assert prediction.logit == pytest.approx(float(row["logit"]), abs=1e-5)
        assert prediction.score == pytest.approx(float(row["score"]), abs=1e-5)
        assert prediction.positive == bool(int(row["positive"]))
        assert prediction.model.threshold == predictor.card.threshold
    index = evaluation.case_ids.index("phantom000")
    assert evaluation.scores[index] == pytest.approx(float(per_case["phantom000"]["score"]), abs=1e-6)


def test_evaluate_cli_writes_the_report(trained_model: TrainedModel, tmp_path: Path) -> None:
    from dicom_node.cli import main

    held_out = write_cohort(tmp_path / "held_out", 12, seed=11)  # new patients, same distribution
    out = tmp_path / "report"
    code = main(["evaluate", str(trained_model.ensemble), str(held_out), "--out", str(out), "--bootstrap", "300",
                 "--cache", str(trained_model.cache_dir)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["kind"] == "ensemble"
    assert report["cases"] == {"n": 12, "n_positive": 6}
    low, high = report["roc_auc"]["ci95"]
    assert low <= report["roc_auc"]["estimate"] <= high and report["roc_auc"]["estimate"] >= 0.8
    assert {"sensitivity", "specificity", "calibration", "bf16_vs_fp32"} <= set(report)
    assert report["cross_validation"]["mean_sd"]["roc_auc"]["n_folds"] == 5
    assert isinstance(report["bf16_vs_fp32"]["decisions_changed"], int)
    for name in ("roc.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out / "per_case.csv")
    assert len(rows) == 12 and {"logit", "score", "positive", "score_bf16", "positive_bf16"} <= set(rows[0])
    assert "research use only" in (out / "report.txt").read_text()


def test_train_cli_fails_fast_naming_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    manifest = tmp_path / "bad.csv"
    manifest.write_text("id,label,modality,dwi,adc,flair\na,yes,MR,x.nii,y.nii,z.nii\na,1,PET,,,\n")
    code = main(["train", str(manifest), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 2
    assert "line 2 (id 'a'): unknown label 'yes'" in printed
    assert "line 3 (id 'a'): unknown modality 'PET'" in printed and "duplicate id" in printed
    assert not (tmp_path / "out").exists()  # nothing started


def test_training_is_deterministic_on_cpu(trained_model: TrainedModel) -> None:
    recipe = Recipe.from_dict(load_checkpoint(trained_model.checkpoint).card.recipe)
    cases = load_manifest(trained_model.manifest)[:8]
    inputs = [entry.load() for entry in preprocess_cohort(cases, recipe, trained_model.cache_dir)]
    labels = [c.label for c in cases]
    config = TrainConfig(epochs=1, batch_size=4, device="cpu")
    architecture = config.architecture((10, 32, 32))
    runs = [fit_network(inputs, labels, range(6), [6, 7], config, architecture, 3, torch.device("cpu")) for _ in range(2)]
    first, second = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training


def test_cache_keys_follow_content_and_recipe(trained_model: TrainedModel, tmp_path: Path) -> None:
    recipe = Recipe.from_dict(load_checkpoint(trained_model.checkpoint).card.recipe)
    case = load_manifest(trained_model.manifest)[0]
    copy = tmp_path / "copy"
    shutil.copytree(case.series["dwi"].parent, copy)
    moved = type(case)(**{**case.__dict__, "series": {r: copy / p.name for r, p in case.series.items()}})
    assert cache_key(moved, recipe) == cache_key(case, recipe)  # same bytes elsewhere: same entry
    assert cache_key(case, recipe.with_grid((5, 32, 32))) != cache_key(case, recipe)
    hit = preprocess_cohort([moved], recipe, trained_model.cache_dir)[0]
    assert hit.hit
    volume = np.asarray(hit.load()).copy()
    (copy / "flair.nii.gz").write_bytes(case.series["adc"].read_bytes())  # content changes
    assert cache_key(moved, recipe) != cache_key(case, recipe)
    fresh = preprocess_cohort([moved], recipe, tmp_path / "cache")[0]
    assert not fresh.hit and not np.array_equal(np.asarray(fresh.load()), volume)


def test_dicom_study_rows_preprocess_exactly_like_the_node(tmp_path: Path) -> None:
    from tests import factory

    from inference.case import dicom_case
    from inference.model.checkpoint import demonstration_model
    from inference.model.res25 import Res25Config
    from inference.predictor import CaseInput, Predictor
    from inference.recipe import DEFAULT_RECIPE
    from inference.selection import Selector
    from inference.training.manifest import selection_checker

    factory.write_mr_stroke_study(tmp_path / "mr", rows=48, flair_other_frame=False)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("id,label,modality,study\nm1,1,MR,mr\n")
    cases = load_manifest(manifest, check_case=selection_checker())
    recipe = DEFAULT_RECIPE.with_grid((10, 32, 32))
    cached = preprocess_cohort(cases, recipe, tmp_path / "cache")[0]
    assert cached.shape == (3, 10, 32, 32) and not cached.hit
    demo = demonstration_model(Res25Config.reduced(n_slices=10, group_size=5), grid=(32, 32))
    served = Predictor(replace(demo, card=replace(demo.card, recipe=recipe.to_dict())), device="cpu")
    case_input = dicom_case([tmp_path / "mr"], Selector(prefer_pipeline="MR"))
    assert isinstance(case_input, CaseInput)
    np.testing.assert_array_equal(np.asarray(cached.load()), served.preprocess(case_input).tensor)


def test_ensemble_averages_the_members_calibrated_logits(trained_model: TrainedModel) -> None:
    from inference.training.ensemble import calibrated_logit_affine
    from inference.training.evaluate import case_logits

    ensemble = load_ensemble(trained_model.ensemble)
    recipe = Recipe.from_dict(ensemble.card.recipe)
    cases = load_manifest(trained_model.manifest)[:3]
    inputs = [entry.load() for entry in preprocess_cohort(cases, recipe, trained_model.cache_dir)]
    combined = case_logits(ensemble.model, inputs)
    members = []
    for number, member in enumerate(ensemble.model.members):
        scale, offset = calibrated_logit_affine(ensemble.member_cards[number].calibration)
        members.append(scale * case_logits(member, inputs) + offset)
    np.testing.assert_allclose(combined, np.mean(members, axis=0), rtol=1e-5, atol=1e-5)
