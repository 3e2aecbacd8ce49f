"""Turning the model's logit into the score the node reports.

A checkpoint card names one calibration (stored as ``{"method": ..., "params": {...}}``, the
same plain form ``inference.training.calibrate`` writes):

* ``none``: ``p = sigmoid(z)`` -- an uncalibrated score in [0, 1], reported as such;
* ``temperature``: ``p = sigmoid(z / T)``, params ``{"temperature": T}`` with ``T > 0``;
* ``platt``: ``p = sigmoid(a z + b)``, params ``{"a": a, "b": b}``.

The card's decision threshold applies to this score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

CalibrationMethod = Literal["none", "temperature", "platt"]
_PARAMS: dict[str, tuple[str, ...]] = {"none": (), "temperature": ("temperature",), "platt": ("a", "b")}


def sigmoid(z: float) -> float:
    """Numerically stable logistic function of one value."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """A calibration method and its parameters; invalid ones raise ``ValueError`` naming them."""

    method: CalibrationMethod = "none"
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in _PARAMS:
            raise ValueError(f"calibration method must be one of {tuple(_PARAMS)}, got {self.method!r}")
        expected = set(_PARAMS[self.method])
        if set(self.params) != expected:
            raise ValueError(
                f"calibration {self.method!r} needs params {sorted(expected)}, got {sorted(self.params)}"
            )
        clean = {key: float(value) for key, value in self.params.items()}
        for key, value in clean.items():
            if not math.isfinite(value):
                raise ValueError(f"calibration parameter {key} must be finite, got {value!r}")
        if self.method == "temperature" and clean["temperature"] <= 0:
            raise ValueError(f"temperature must be > 0, got {clean['temperature']!r}")
        object.__setattr__(self, "params", clean)

    @property
    def calibrated(self) -> bool:
        """True when the score is a calibrated probability."""
        return self.method != "none"

    def apply(self, logit: float) -> float:
        """The score for one logit."""
        if self.method == "temperature":
            return sigmoid(logit / self.params["temperature"])
        if self.method == "platt":
            return sigmoid(self.params["a"] * logit + self.params["b"])
        return sigmoid(logit)

    def to_dict(self) -> dict[str, Any]:
        """Plain form stored in a checkpoint card."""
        return {"method": self.method, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "Calibration":
        """Inverse of :meth:`to_dict` (``None`` means no calibration)."""
        if values is None:
            return cls()
        unknown = sorted(set(values) - {"method", "params"})
        if unknown:
            raise ValueError(f"unknown calibration fields: {', '.join(unknown)}")
        return cls(method=values.get("method", "none"), params=dict(values.get("params") or {}))
