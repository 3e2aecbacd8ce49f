"""Where and in which precision the model runs.

A checkpoint card names the precision the model was validated in (``fp32``, ``bf16`` or
``fp16``); which precision a served model runs in (the setting ``inference.precision``, the
CPU's native bf16, the card's bf16 check) is decided by
:func:`inference.model.precision.serving_precision`. This module runs it: autocast for
bf16/fp16, fp32 outputs. CPU bf16 is only fast on processors with native bf16 instructions
(AVX512-BF16 / AMX) and can change decisions near the threshold; ``benchmarks/model.py``
measures both.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import TYPE_CHECKING, ContextManager, Literal, TypeVar, cast

import torch
from torch import Tensor, nn

from inference.model.res25 import BasicBlock, NonLocalBlock2d, Res25, Res25Output

if TYPE_CHECKING:  # ensemble imports checkpoint, which imports this module
    from inference.model.ensemble import Res25Ensemble

ServedModel = TypeVar("ServedModel", bound=nn.Module)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DevicePreference = Literal["auto", "cpu", "cuda"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(preference: DevicePreference = "auto") -> torch.device:
    """The device to run on: ``auto`` takes CUDA when present, else CPU.

    Raises
    ------
    RuntimeError
        ``cuda`` was asked for and no CUDA device is available.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("device 'cuda' was configured but no CUDA device is available")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> ContextManager[object]:
    """Autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def prepare(model: ServedModel, device: torch.device, channels_last: bool = True) -> ServedModel:
    """Move ``model`` to ``device`` in ``eval()`` mode, channels-last for faster convolutions."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def run(model: Res25 | Res25Ensemble, volumes: Tensor, device: torch.device, precision: str = "fp32",
        return_features: bool = False) -> Res25Output:
    """One inference forward: ``eval()``, ``torch.inference_mode()``, autocast, fp32 outputs on CPU.

    Parameters
    ----------
    model
        The network (already on ``device``; see :func:`prepare`).
    volumes
        ``(B, in_channels, n_slices, H, W)``.
    """
    if model.training:
        raise RuntimeError("run() needs a model in eval() mode")
    with torch.inference_mode(), autocast(device, precision):
        out = model(volumes.to(device, non_blocking=True), return_features=return_features)
    return Res25Output(
        logits=out.logits.float().cpu(),
        aux_logits=out.aux_logits.float().cpu(),
        slice_scores=out.slice_scores.float().cpu(),
        slice_weights=out.slice_weights.float().cpu(),
        features=None if out.features is None else out.features.float().cpu(),
    )


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))`` of an eval-mode batch norm in one step."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"expected BatchNorm2d after {conv}, got {type(bn).__name__}")
    running_mean = cast(Tensor, bn.running_mean)
    running_var = cast(Tensor, bn.running_var)
    fused = copy.deepcopy(conv)  # same device, memory format and hyper-parameters
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(running_var + bn.eps)
        fused.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(running_mean)
        fused.bias = nn.Parameter((bias - running_mean) * scale + bn.bias, requires_grad=False)
    return fused


def fold_batch_norm(model: Res25) -> Res25:
    """An inference-only copy of ``model`` with every batch norm folded into its convolution.

    Same function (up to rounding), fewer passes over memory. The copy's ``state_dict`` has other
    keys than a checkpoint's: use it to run, never to save.
    """
    fused = copy.deepcopy(model).eval()
    fused.conv1, fused.bn1 = _fold(fused.conv1, fused.bn1), nn.Identity()  # type: ignore[assignment]
    for module in fused.modules():
        if isinstance(module, BasicBlock):
            module.conv1, module.bn1 = _fold(module.conv1, module.bn1), nn.Identity()  # type: ignore[assignment]
            module.conv2, module.bn2 = _fold(module.conv2, module.bn2), nn.Identity()  # type: ignore[assignment]
            if isinstance(module.downsample, nn.Sequential):
                module.downsample = _fold(cast(nn.Conv2d, module.downsample[0]), module.downsample[1])
        elif isinstance(module, NonLocalBlock2d):
            module.W_z = _fold(cast(nn.Conv2d, module.W_z[0]), module.W_z[1])  # type: ignore[assignment]
    return fused
