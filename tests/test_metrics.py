"""Metric code of inference.training checked against scikit-learn on fixed vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from inference.training import metrics
from inference.training.calibrate import apply_calibration, fit_calibration, fit_platt, fit_temperature
from inference.training.splits import inner_validation_split, stratified_folds

# Fixed vectors: ties inside and across classes, scores on bin edges.
Y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1])
S = np.array(
    [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2, 0.7, 0.4, 0.3, 0.05, 0.6, 0.5, 0.65, 0.5, 0.2, 0.9, 0.95, 0.0, 1.0]
)


def _random_vectors(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(loc=y * 0.8, scale=1.0), 1)  # rounding makes ties
    return y, s


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_roc_auc_matches_sklearn(seed: int | None) -> None:
    y, s = (Y, S) if seed is None else _random_vectors(seed)
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", [None, 4, 5])
def test_roc_curve_matches_sklearn(seed: int | None) -> None:
    y, s = (Y, S) if seed is None else _random_vectors(seed)
    fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    curve = metrics.roc_curve(y, s)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds, thresholds)


@pytest.mark.parametrize("seed", [None, 6, 7, 8])
def test_youden_threshold_matches_sklearn(seed: int | None) -> None:
    y, s = (Y, S) if seed is None else _random_vectors(seed)
    fpr, tpr, thresholds = sk_roc_curve(y, s)
    expected = thresholds[int(np.argmax(tpr - fpr))]
    assert metrics.youden_threshold(y, s) == pytest.approx(expected)


@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.5, 0.65, 1.0, 2.0])
def test_sensitivity_specificity_match_confusion_matrix(threshold: float) -> None:
    tn, fp, fn, tp = confusion_matrix(Y, (S >= threshold).astype(int), labels=[0, 1]).ravel()
    result = metrics.sensitivity_specificity(Y, S, threshold)
    assert (result.tp, result.fn, result.tn, result.fp) == (tp, fn, tn, fp)
    assert result.sensitivity == pytest.approx(tp / (tp + fn))
    assert result.specificity == pytest.approx(tn / (tn + fp))


def test_brier_matches_sklearn() -> None:
    assert metrics.brier_score(Y, S) == pytest.approx(brier_score_loss(Y, S), abs=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.brier_score(Y, S + 0.5)


@pytest.mark.parametrize("n_bins", [3, 5, 10])
def test_reliability_curve_matches_sklearn(n_bins: int) -> None:
    prob_true, prob_pred = calibration_curve(Y, S, n_bins=n_bins, strategy="uniform")
    curve = metrics.reliability_curve(Y, S, n_bins=n_bins)
    np.testing.assert_allclose(curve.prob_true, prob_true)
    np.testing.assert_allclose(curve.prob_pred, prob_pred)
    assert curve.counts.sum() == Y.size


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    y, s = _random_vectors(9, n=120)
    first = metrics.bootstrap_ci(y, s, metrics.auc_statistic, n_resamples=400, seed=3)
    again = metrics.bootstrap_ci(y, s, metrics.auc_statistic, n_resamples=400, seed=3)
    assert first == again
    assert first.estimate == pytest.approx(roc_auc_score(y, s))
    assert first.low < first.estimate < first.high
    assert 0.05 < first.high - first.low < 0.3
    # A four times larger cohort gives a clearly narrower interval.
    y4, s4 = np.tile(y, 4), np.tile(s, 4)
    wide = metrics.bootstrap_ci(y4, s4, metrics.auc_statistic, n_resamples=400, seed=3)
    assert wide.high - wide.low < 0.7 * (first.high - first.low)
    sens = metrics.bootstrap_ci(y, s, metrics.sensitivity_statistic(0.5), n_resamples=200, seed=1)
    assert sens.low <= sens.estimate <= sens.high


def test_mean_sd_like_the_paper() -> None:
    summary = metrics.mean_sd([0.8, 0.9, 0.85, math.nan])
    assert summary.n == 3
    assert summary.mean == pytest.approx(0.85)
    assert summary.sd == pytest.approx(np.std([0.8, 0.9, 0.85], ddof=1))
    assert summary.format() == "0.8500 (0.0500)"


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="vector of 3"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])


def test_platt_matches_unpenalised_logistic_regression() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300)
    z = rng.normal(loc=2.0 * y - 1.0, scale=1.5)
    fitted = fit_platt(z, y, smooth=False)
    reference = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z[:, None], y)
    assert fitted.params["a"] == pytest.approx(reference.coef_[0, 0], rel=1e-5)
    assert fitted.params["b"] == pytest.approx(reference.intercept_[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(apply_calibration(fitted, z), reference.predict_proba(z[:, None])[:, 1], atol=1e-6)


def test_temperature_fit_minimises_log_loss_and_survives_separable_data() -> None:
    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, 300)
    z = 3.0 * rng.normal(loc=2.0 * y - 1.0, scale=1.5)  # over-confident logits
    fitted = fit_temperature(z, y, smooth=False)

    def log_loss(temperature: float) -> float:
        p = 1 / (1 + np.exp(-z / temperature))
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    temperature = fitted.params["temperature"]
    assert temperature > 1.5  # over-confidence is tempered
    assert log_loss(temperature) <= min(log_loss(temperature * 0.95), log_loss(temperature * 1.05))
    separable = fit_calibration("platt", [-3.0, -2.0, 2.0, 3.0], [0, 0, 1, 1])
    assert all(math.isfinite(v) for v in separable.params.values())
    probs = apply_calibration(separable, [-3.0, 3.0])
    assert 0.0 < probs[0] < 0.5 < probs[1] < 1.0


def test_stratified_folds_are_balanced_seeded_and_keep_fixed_folds() -> None:
    labels = [1] * 13 + [0] * 27
    folds = stratified_folds(labels, 5, seed=1)
    assert folds == stratified_folds(labels, 5, seed=1)
    assert folds != stratified_folds(labels, 5, seed=2)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    positives = np.bincount([f for f, y in zip(folds, labels) if y], minlength=5)
    assert positives.max() - positives.min() <= 1
    fixed = [None] * 40
    fixed[0] = 4
    assert stratified_folds(labels, 5, seed=1, fixed=fixed)[0] == 4
    train, validation = inner_validation_split(labels, 0.25, seed=0)
    assert sorted(train + validation) == list(range(40))
    assert sum(labels[i] for i in validation) in (3, 4)
