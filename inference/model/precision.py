"""Which precision a served model runs in, and the bf16 check on its card that allows bf16 on CPU.

The setting ``inference.precision`` is ``auto`` (default), ``fp32`` or ``bf16``:

* ``fp32`` always runs fp32;
* ``bf16`` runs bf16 autocast; it is a configuration error (start-up stops with a message
  naming ``inference.precision``) on a CPU without native bf16 instructions (AVX512-BF16 or
  AMX) or a CUDA device without bf16 support;
* ``auto`` on CUDA runs the precision the card was validated in (bf16 only where
  ``torch.cuda.is_bf16_supported()``, else fp32); on CPU it runs bf16 only when the CPU has
  native bf16 (:func:`cpu_has_native_bf16`) *and* the card's :class:`Bf16Check` says that bf16
  changed no decision on at least one validation case, for these weights at this threshold;
  otherwise fp32.

A :class:`Bf16Check` is written into a checkpoint's card by ``fpe-node evaluate ...
--record-bf16`` (:func:`inference.training.evaluate.evaluate_inputs`, then
:func:`inference.model.checkpoint.record_bf16_check`): every evaluated case scored in fp32 and
under CPU bf16 autocast, and the decisions at the card's threshold (after its calibration)
compared. Checkpoints without the record (older ones, original checkpoints, demonstration
weights) never run bf16 on CPU under ``auto``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # checkpoint imports this module
    from inference.model.checkpoint import ModelCard

logger = logging.getLogger(__name__)

PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISION_SETTINGS: tuple[str, ...] = ("auto", "fp32", "bf16")
SETTING_NAME = "inference.precision"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names (Linux)
CPUINFO = Path("/proc/cpuinfo")


class PrecisionSettingError(ValueError):
    """``inference.precision`` asks for what this machine cannot run; the message names the field."""


@dataclass(frozen=True)
class Bf16Check:
    """How bf16 autocast on CPU compared with fp32 on a checkpoint's validation cases.

    Attributes
    ----------
    cases
        Validation cases scored both ways.
    decisions_changed
        Cases whose decision (``score >= threshold``) differs between fp32 and bf16.
    max_abs_score_difference
        Largest ``|score_bf16 - score_fp32|`` over the cases (calibrated score scale).
    threshold
        The decision threshold compared at (the card's at the time of the check).
    weights_sha256
        SHA-256 of the weights checked (the card's ``weights_sha256``; for an ensemble the
        served card's hash over all members).
    torch_version, cpu_capability
        ``torch.__version__`` and ``torch.backends.cpu.get_cpu_capability()`` of the check.
    checked_at
        When, ISO 8601 UTC.
    """

    cases: int
    decisions_changed: int
    max_abs_score_difference: float
    threshold: float
    weights_sha256: str
    torch_version: str
    cpu_capability: str
    checked_at: str

    def __post_init__(self) -> None:
        if int(self.cases) < 0:
            raise ValueError(f"bf16_check cases must be >= 0, got {self.cases!r}")
        if not 0 <= int(self.decisions_changed) <= int(self.cases):
            raise ValueError(f"bf16_check decisions_changed must be in [0, cases], got {self.decisions_changed!r}")
        difference = float(self.max_abs_score_difference)
        if not math.isfinite(difference) or difference < 0.0:
            raise ValueError(f"bf16_check max_abs_score_difference must be finite and >= 0, got {difference!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"bf16_check threshold must be in [0, 1], got {self.threshold!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256):
            raise ValueError(f"bf16_check weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}")
        object.__setattr__(self, "cases", int(self.cases))
        object.__setattr__(self, "decisions_changed", int(self.decisions_changed))
        object.__setattr__(self, "max_abs_score_difference", difference)
        object.__setattr__(self, "threshold", float(self.threshold))
        for name in ("torch_version", "cpu_capability", "checked_at"):  # plain str: torch.__version__ is a subclass
            object.__setattr__(self, name, str(getattr(self, name)))

    def allows_bf16(self, weights_sha256: str, threshold: float) -> bool:
        """True when bf16 changed no decision on >= 1 case, for these weights at this threshold."""
        return (self.cases >= 1 and self.decisions_changed == 0 and self.weights_sha256 == weights_sha256
                and self.threshold == float(threshold))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (stored in the card)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Bf16Check":
        """Inverse of :meth:`to_dict`; unknown or missing fields raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(values) - names), sorted(names - set(values))
        if unknown or missing:
            raise ValueError(f"bf16_check: unknown fields {unknown}, missing fields {missing}")
        return cls(**values)

    @classmethod
    def from_scores(cls, fp32_scores: Sequence[float], bf16_scores: Sequence[float], threshold: float,
                    weights_sha256: str) -> "Bf16Check":
        """The record of one comparison: the same cases' scores in fp32 and in bf16."""
        if len(fp32_scores) != len(bf16_scores):
            raise ValueError(f"{len(fp32_scores)} fp32 scores but {len(bf16_scores)} bf16 scores")
        changed = sum((a >= threshold) != (b >= threshold) for a, b in zip(fp32_scores, bf16_scores))
        difference = max((abs(float(a) - float(b)) for a, b in zip(fp32_scores, bf16_scores)), default=0.0)
        return cls(
            cases=len(fp32_scores),
            decisions_changed=changed,
            max_abs_score_difference=difference,
            threshold=threshold,
            weights_sha256=weights_sha256,
            torch_version=torch.__version__,
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            checked_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo``; empty where there is none (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 natively: torch's AVX512 kernels and AVX512-BF16 or AMX-BF16.

    ``torch.backends.cpu.get_cpu_capability()`` gives the vector level torch's kernels use; the
    bf16 instructions themselves are read from the ``/proc/cpuinfo`` flags (Linux; elsewhere
    False). Without them bf16 autocast on CPU is emulated and slower than fp32. Cached.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    native = NATIVE_BF16_FLAGS & cpu_flags()
    return capability.startswith("AVX512") and bool(native)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a model is served in and why (logged once at model load)."""

    precision: Literal["fp32", "bf16", "fp16"]
    reason: str


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_precision_setting(setting: str, device: torch.device) -> None:
    """Refuse a value of ``inference.precision`` that ``device`` cannot run (for start-up checks).

    Raises
    ------
    PrecisionSettingError
        ``setting`` is not auto, fp32 or bf16; or it is bf16 on a CPU without native bf16 or a
        CUDA device without bf16 support. The message names ``inference.precision``.
    """
    if setting not in PRECISION_SETTINGS:
        raise PrecisionSettingError(f"{SETTING_NAME}: must be one of {', '.join(PRECISION_SETTINGS)}, got {setting!r}")
    if setting != "bf16":
        return
    if device.type == "cuda" and not _cuda_bf16():
        raise PrecisionSettingError(f"{SETTING_NAME}: bf16 was configured but this CUDA device has no bf16 support "
                                    "(torch.cuda.is_bf16_supported() is False); use auto or fp32")
    if device.type != "cuda" and not cpu_has_native_bf16():
        raise PrecisionSettingError(f"{SETTING_NAME}: bf16 was configured but this CPU has no native bf16 "
                                    "(AVX512-BF16 or AMX); use auto or fp32")


def serving_precision(setting: str, card: "ModelCard", device: torch.device) -> PrecisionChoice:
    """The precision to serve ``card``'s model in on ``device`` (rules in the module docstring).

    Raises
    ------
    PrecisionSettingError
        See :func:`check_precision_setting`.
    """
    check_precision_setting(setting, device)
    if setting == "fp32":
        return PrecisionChoice("fp32", f"{SETTING_NAME} is fp32")
    if setting == "bf16":
        check = card.bf16_check
        if check is None or not check.allows_bf16(card.weights_sha256, card.threshold):
            logger.warning("%s is bf16 but the card of %s %s records no bf16 check without decision changes",
                           SETTING_NAME, card.name, card.version)
        return PrecisionChoice("bf16", f"{SETTING_NAME} is bf16")
    if device.type == "cuda":
        if card.precision == "bf16" and not _cuda_bf16():
            return PrecisionChoice("fp32", "the card was validated in bf16 but this CUDA device has no bf16 support")
        return PrecisionChoice(card.precision, "CUDA: the precision the card was validated in")  # type: ignore[arg-type]
    return _cpu_auto(card)


def _cpu_auto(card: "ModelCard") -> PrecisionChoice:
    """``auto`` on CPU: bf16 only on native bf16 with a card whose check changed no decision."""
    if not cpu_has_native_bf16():
        return PrecisionChoice("fp32", "CPU without native bf16")
    check = card.bf16_check
    if check is None:
        return PrecisionChoice("fp32", "the card records no bf16 check")
    if check.weights_sha256 != card.weights_sha256 or check.threshold != card.threshold:
        return PrecisionChoice("fp32", "the card's bf16 check was made for other weights or another threshold")
    if not check.allows_bf16(card.weights_sha256, card.threshold):
        return PrecisionChoice("fp32", f"bf16 changed {check.decisions_changed} of {check.cases} validation decisions")
    return PrecisionChoice("bf16", f"native bf16 CPU and bf16 changed no decision on {check.cases} validation cases")
