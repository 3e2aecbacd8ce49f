"""Fitting score calibration (temperature or Platt scaling) on held-in validation logits.

Both methods map the model's logit ``z`` to a probability:

* temperature: ``p = sigmoid(z / T)`` (one parameter, keeps the ranking and the 0.5 point);
* Platt: ``p = sigmoid(a * z + b)`` (two parameters; also corrects the prior shift that
  class-balanced training introduces).

Fits minimise the negative log-likelihood with Newton's method. By default the targets are
Platt's smoothed labels ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` (Platt 1999), so a small,
perfectly separated validation split does not drive the parameters to infinity.

The fits return :class:`inference.model.calibration.Calibration`, the form checkpoint cards
store and the node applies.
"""

from __future__ import annotations

import math
import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference.model.calibration import Calibration, CalibrationMethod
_MIN_TEMPERATURE = 0.05
_MAX_TEMPERATURE = 100.0


def sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """Numerically stable logistic function of an array (used while fitting)."""
    out = np.empty_like(z, dtype=np.float64)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    exp_z = np.exp(z[~positive])
    out[~positive] = exp_z / (1.0 + exp_z)
    return out


def _targets(labels: NDArray[np.int64], smooth: bool) -> NDArray[np.float64]:
    if not smooth:
        return labels.astype(np.float64)
    n_pos = float(labels.sum())
    n_neg = float(labels.size - labels.sum())
    return np.where(labels == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def _check(logits: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if z.shape != y.shape or z.size == 0:
        raise ValueError("logits and labels must be non-empty vectors of the same length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return z, y


def fit_platt(logits: ArrayLike, labels: ArrayLike, *, smooth: bool = True, max_iter: int = 100) -> Calibration:
    """Fit ``p = sigmoid(a z + b)`` by Newton's method on the (smoothed) log-likelihood."""
    z, y = _check(logits, labels)
    t = _targets(y, smooth)
    prior = (t.sum() + 1e-12) / (t.size + 2e-12)
    a, b = 1.0, math.log(prior / (1.0 - prior)) if 0 < prior < 1 else 0.0
    design = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(max_iter):
        p = sigmoid(a * z + b)
        gradient = design.T @ (p - t)
        weight = np.maximum(p * (1.0 - p), 1e-12)
        hessian = design.T @ (design * weight[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        a, b = a - float(step[0]), b - float(step[1])
        if float(np.abs(step).max()) < 1e-10:
            break
    return Calibration(method="platt", params={"a": a, "b": b})


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *, smooth: bool = True, max_iter: int = 100) -> Calibration:
    """Fit ``p = sigmoid(z / T)``, T kept within [0.05, 100], by Newton's method on ``1/T``."""
    z, y = _check(logits, labels)
    t = _targets(y, smooth)
    inverse = 1.0
    for _ in range(max_iter):
        p = sigmoid(inverse * z)
        gradient = float(np.sum((p - t) * z))
        hessian = float(np.sum(p * (1.0 - p) * z * z)) + 1e-12
        step = gradient / hessian
        inverse = float(np.clip(inverse - step, 1.0 / _MAX_TEMPERATURE, 1.0 / _MIN_TEMPERATURE))
        if abs(step) < 1e-10:
            break
    return Calibration(method="temperature", params={"temperature": 1.0 / inverse})


def fit_calibration(method: CalibrationMethod, logits: ArrayLike, labels: ArrayLike) -> Calibration:
    """Fit the named method (``none`` returns the plain sigmoid)."""
    if method == "platt":
        return fit_platt(logits, labels)
    if method == "temperature":
        return fit_temperature(logits, labels)
    if method == "none":
        return Calibration()
    raise ValueError(f"unknown calibration method {method!r} (none, temperature, platt)")


def apply_calibration(calibration: Calibration, logits: ArrayLike) -> NDArray[np.float64]:
    """Scores of many logits, each exactly as the node computes it (:meth:`Calibration.apply`)."""
    return np.asarray([calibration.apply(float(z)) for z in np.asarray(logits, dtype=np.float64).ravel()])
