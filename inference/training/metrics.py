"""Classification metrics for the first-pass-effect model, in plain numpy.

Everything here works on a vector of binary labels ``y_true`` (1 = first-pass effect) and a
vector of scores ``y_score`` (higher = FPE more likely). A case is called positive when
``score >= threshold`` -- the same rule the node applies to a served checkpoint
(:class:`inference.result.Prediction.positive`).

The functions are checked against scikit-learn in ``tests/test_metrics.py``; scikit-learn is a
test dependency only, so the node does not need it at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def _as_labels(y_true: ArrayLike) -> IntArray:
    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D vector, got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return labels.astype(np.int64)


def _as_scores(y_score: ArrayLike, n: int) -> FloatArray:
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"scores must be a vector of {n} values, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


def _check_both_classes(labels: IntArray) -> None:
    if labels.sum() == 0 or labels.sum() == labels.size:
        raise ValueError("ROC analysis needs at least one positive and one negative case")


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties).

    Equals the probability that a random positive case scores above a random negative one,
    ties counting one half.
    """
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, labels.size)
    _check_both_classes(labels)
    ranks = _midranks(scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    u_statistic = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def _midranks(values: FloatArray) -> FloatArray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        stop = start + 1
        while stop < values.size and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2.0
        start = stop
    return ranks


@dataclass(frozen=True)
class RocCurve:
    """Operating points for every distinct score used as threshold, highest threshold first.

    ``thresholds[0]`` is ``+inf`` (nothing positive), as in scikit-learn.
    """

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> RocCurve:
    """False- and true-positive rates at each distinct score (``score >= threshold`` positive)."""
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, labels.size)
    _check_both_classes(labels)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # last index of each run of equal scores
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], labels.size - 1]
    true_pos = np.cumsum(sorted_labels)[distinct]
    false_pos = (distinct + 1) - true_pos
    tpr = np.r_[0.0, true_pos / labels.sum()]
    fpr = np.r_[0.0, false_pos / (labels.size - labels.sum())]
    thresholds = np.r_[np.inf, sorted_scores[distinct]]
    return RocCurve(fpr=fpr.astype(np.float64), tpr=tpr.astype(np.float64), thresholds=thresholds)


def youden_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    Of several thresholds with the same J the highest is taken (the most specific operating
    point), which is what ``thresholds[argmax(tpr - fpr)]`` of scikit-learn's ``roc_curve``
    gives.
    """
    curve = roc_curve(y_true, y_score)
    j_statistic = curve.tpr - curve.fpr
    best = int(np.argmax(j_statistic))
    threshold = float(curve.thresholds[best])
    if math.isinf(threshold):  # J = 0 everywhere: call everything at or above the top score
        threshold = float(curve.thresholds[1])
    return threshold


@dataclass(frozen=True)
class SensSpec:
    """Sensitivity and specificity at one threshold, with the confusion counts."""

    sensitivity: float
    specificity: float
    tp: int
    fn: int
    tn: int
    fp: int


def sensitivity_specificity(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> SensSpec:
    """Sensitivity and specificity calling ``score >= threshold`` positive (NaN if a class is absent)."""
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, labels.size)
    called = scores >= threshold
    tp = int(np.sum(called & (labels == 1)))
    fn = int(np.sum(~called & (labels == 1)))
    tn = int(np.sum(~called & (labels == 0)))
    fp = int(np.sum(called & (labels == 0)))
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    return SensSpec(sensitivity, specificity, tp, fn, tn, fp)


def brier_score(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean squared difference between predicted probability and outcome."""
    labels = _as_labels(y_true)
    probs = _as_scores(y_prob, labels.size)
    if ((probs < 0) | (probs > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return float(np.mean((probs - labels) ** 2))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Observed frequency against mean predicted probability, per non-empty bin."""

    prob_true: FloatArray
    prob_pred: FloatArray
    counts: IntArray
    bin_edges: FloatArray


def reliability_curve(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> ReliabilityCurve:
    """Reliability (calibration) curve over ``n_bins`` equal-width bins of [0, 1].

    Bins are right-closed (a probability on an inner edge falls into the lower bin); empty bins
    are dropped
    (scikit-learn's ``calibration_curve(strategy="uniform")``).
    """
    labels = _as_labels(y_true)
    probs = _as_scores(y_prob, labels.size)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], probs, side="left")
    counts = np.bincount(bin_ids, minlength=n_bins)
    sum_pred = np.bincount(bin_ids, weights=probs, minlength=n_bins)
    sum_true = np.bincount(bin_ids, weights=labels.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    return ReliabilityCurve(
        prob_true=sum_true[filled] / counts[filled],
        prob_pred=sum_pred[filled] / counts[filled],
        counts=counts[filled].astype(np.int64),
        bin_edges=edges,
    )


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def format(self, digits: int = 4) -> str:
        """``0.8506 (95% CI 0.7712-0.9120)``."""
        return f"{self.estimate:.{digits}f} ({self.level:.0%} CI {self.low:.{digits}f}-{self.high:.{digits}f})"


Statistic = Callable[[IntArray, FloatArray], float]


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    statistic: Statistic,
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(labels, scores)``.

    Cases are resampled with replacement *within each class* (stratified), so every resample
    holds both classes and ROC-AUC, sensitivity and specificity stay defined; the class sizes
    of the cohort are kept. Resamples where the statistic is NaN are left out.
    """
    labels = _as_labels(y_true)
    scores = _as_scores(y_score, labels.size)
    if not 0 < level < 1:
        raise ValueError("level must lie in (0, 1)")
    estimate = float(statistic(labels, scores))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    groups = [group for group in groups if group.size]
    values = np.empty(n_resamples, dtype=np.float64)
    for i in range(n_resamples):
        picked = np.concatenate([rng.choice(group, size=group.size, replace=True) for group in groups])
        values[i] = statistic(labels[picked], scores[picked])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan, level)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), level)


def auc_statistic(labels: IntArray, scores: FloatArray) -> float:
    """ROC-AUC as a bootstrap statistic."""
    return roc_auc(labels, scores)


def sensitivity_statistic(threshold: float) -> Statistic:
    """Sensitivity at a fixed threshold as a bootstrap statistic."""
    return lambda labels, scores: sensitivity_specificity(labels, scores, threshold).sensitivity


def specificity_statistic(threshold: float) -> Statistic:
    """Specificity at a fixed threshold as a bootstrap statistic."""
    return lambda labels, scores: sensitivity_specificity(labels, scores, threshold).specificity


@dataclass(frozen=True)
class MeanSD:
    """Mean and sample standard deviation across folds, reported as ``mean (SD)`` like the paper."""

    mean: float
    sd: float
    n: int

    def format(self, digits: int = 4) -> str:
        """``0.8506 (0.0712)``."""
        return f"{self.mean:.{digits}f} ({self.sd:.{digits}f})"


def mean_sd(values: Sequence[float]) -> MeanSD:
    """Mean and sample SD (ddof 1; 0 for a single value) of finite values."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return MeanSD(math.nan, math.nan, 0)
    sd = float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0
    return MeanSD(float(finite.mean()), sd, int(finite.size))
