"""Stratified k-fold cross-validation of the res25 network on a site's cohort.

For each outer fold the cases outside it are split again (stratified, seeded) into an inner
training part and an inner validation part. The network is trained on the inner training part
only; the inner validation part chooses the early-stopping epoch, fits the calibration
(temperature or Platt, :mod:`inference.training.calibrate`) and sets the decision threshold
(Youden's J on the calibrated scores). The reported fold is touched once, at the end, with
everything frozen -- so the cross-validated figures are not optimistic.

Training: res25 with the auxiliary group heads as deep supervision
(``loss = BCE(main) + aux_weight * mean_g BCE(aux_g)``), class-balanced binary cross-entropy
(``pos_weight = n_negative / n_positive`` of the inner training part), AdamW with a cosine
learning-rate schedule, augmentation of training batches only (left-right flip, small in-plane
affine, intensity scale/offset and noise), bf16 autocast on CUDA, and on CPU deterministic
algorithms seeded by the run's seed.

Each fold's network is written in the node's checkpoint format with its model card
(:mod:`inference.model.checkpoint`). The fold ensemble (mean of the members' logits) gets its
own calibration and threshold from the out-of-fold predictions of all cases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from inference.model.calibration import Calibration
from inference.model.checkpoint import ModelCard, save_checkpoint
from inference.model.res25 import Res25, Res25Config
from inference.model.runtime import autocast, run
from inference.training import metrics
from inference.training.calibrate import CalibrationMethod, apply_calibration, fit_calibration
from inference.training.ensemble import EnsembleCard, calibrated_logit_affine, save_ensemble
from inference.training.splits import inner_validation_split, stratified_folds

log = logging.getLogger(__name__)

ModelSize = Literal["small", "full"]
SMALL_GRID: tuple[int, int, int] = (10, 32, 32)
FULL_GRID: tuple[int, int, int] = (25, 224, 224)


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation of training batches (never of validation or test data)."""

    flip_probability: float = 0.5  # left-right flip (label-invariant for FPE)
    rotate_deg: float = 8.0  # in-plane rotation, uniform in +-
    shift_fraction: float = 0.05  # in-plane shift, fraction of the field of view, uniform in +-
    scale_fraction: float = 0.05  # in-plane zoom, uniform in 1 +-
    intensity_scale: float = 0.1  # per case and channel, uniform in 1 +-
    intensity_offset: float = 0.1  # per case and channel, added, uniform in +-
    noise_std: float = 0.05  # Gaussian noise, in normalised units


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in every card it writes."""

    folds: int = 5
    seed: int = 0
    epochs: int = 40
    min_epochs: int = 5
    patience: int = 10  # epochs without inner-validation improvement before stopping
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    aux_weight: float = 0.3  # weight of the auxiliary group heads (deep supervision)
    validation_fraction: float = 0.2  # inner validation part of each training fold
    calibration: CalibrationMethod = "platt"
    model_size: ModelSize = "small"
    variant: Literal["nonlocal", "plain"] = "nonlocal"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    model_name: str = "res25-fpe"

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError("folds must be at least 2")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.aux_weight < 0:
            raise ValueError("aux_weight must not be negative")
        if self.model_size not in ("small", "full"):
            raise ValueError(f"model_size must be small or full, got {self.model_size!r}")

    def architecture(self, grid: tuple[int, int, int], in_channels: int = 3) -> Res25Config:
        """The network for ``grid``: reduced widths for ``small``, ResNet-34 for ``full``."""
        group_size = 5 if grid[0] % 5 == 0 else grid[0]
        if self.model_size == "small":
            return Res25Config.reduced(self.variant, in_channels=in_channels, n_slices=grid[0], group_size=group_size)
        return Res25Config(variant=self.variant, in_channels=in_channels, n_slices=grid[0], group_size=group_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return asdict(self)


def default_grid(model_size: ModelSize) -> tuple[int, int, int]:
    """Model grid used when none is given: reduced for ``small``, the paper's for ``full``."""
    return SMALL_GRID if model_size == "small" else FULL_GRID


# --------------------------------------------------------------------------------------------
# Devices and determinism


def pick_device(preference: str) -> torch.device:
    """CUDA when asked or (``auto``) present, else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and, on CPU, use deterministic algorithms inside the block (same seed, same weights).

    The process's previous determinism setting is restored afterwards.
    """
    torch.manual_seed(seed)
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def training_precision(device: torch.device) -> str:
    """Mixed precision (bf16 autocast) on CUDA, fp32 on CPU."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


# --------------------------------------------------------------------------------------------
# Batches and augmentation


CaseArrays = Sequence[NDArray[np.float32]]
"""Preprocessed model inputs, one ``(channels, slices, rows, columns)`` array per case."""


def stack(inputs: CaseArrays, indices: Sequence[int]) -> Tensor:
    """A float32 batch ``(B, C, S, H, W)`` of the given cases."""
    return torch.from_numpy(np.stack([np.asarray(inputs[i], dtype=np.float32) for i in indices]))


def augment(
    batch: Tensor, generator: torch.Generator, spec: AugmentSpec, noise_generator: torch.Generator | None = None
) -> Tensor:
    """Randomly flip, rotate/shift/zoom in plane (same for every slice of a case) and jitter intensity.

    The few random parameters come from ``generator`` (CPU); the noise from ``noise_generator``,
    which must live on the batch's device (default: ``generator``, for CPU batches).
    """
    b, c, s, h, w = batch.shape
    device = batch.device

    def uniform(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=generator) * 2.0 - 1.0).to(device)

    flip = (torch.rand(b, generator=generator) < spec.flip_probability).to(device)
    batch = torch.where(flip[:, None, None, None, None], batch.flip(-1), batch)
    angle = uniform(b) * math.radians(spec.rotate_deg)
    zoom = 1.0 + uniform(b) * spec.scale_fraction
    shift = uniform(b, 2) * spec.shift_fraction * 2.0  # normalised coordinates span 2
    theta = torch.stack(
        [
            torch.stack([torch.cos(angle) / zoom, -torch.sin(angle) / zoom, shift[:, 0]], dim=1),
            torch.stack([torch.sin(angle) / zoom, torch.cos(angle) / zoom, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    planes = batch.reshape(b, c * s, h, w)
    grid = F.affine_grid(theta.to(batch.dtype), [b, c * s, h, w], align_corners=False)
    planes = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=False)
    batch = planes.reshape(b, c, s, h, w)
    gain = 1.0 + uniform(b, c) * spec.intensity_scale
    offset = uniform(b, c) * spec.intensity_offset
    batch = batch * gain[:, :, None, None, None] + offset[:, :, None, None, None]
    noise = torch.randn(batch.shape, generator=noise_generator or generator, device=device)
    return batch + noise * spec.noise_std


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device`` (for augmentation noise drawn where the batch lives)."""
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# One network


@dataclass(frozen=True)
class FitResult:
    """A trained network (best inner-validation epoch) and its history."""

    model: Res25
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]]
    seconds: float


def deep_supervision_loss(
    logits: Tensor, aux_logits: Tensor, labels: Tensor, pos_weight: Tensor, aux_weight: float
) -> Tensor:
    """Class-balanced BCE of the main logit plus ``aux_weight`` times the mean BCE of the group heads."""
    main = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels, pos_weight=pos_weight)
    if aux_weight == 0:
        return main
    targets = labels[:, None].expand_as(aux_logits)
    aux = F.binary_cross_entropy_with_logits(aux_logits, targets, pos_weight=pos_weight)
    return main + aux_weight * aux


@dataclass
class TrainStep:
    """One optimisation step: forward (autocast), deep-supervision loss, backward, AdamW, schedule."""

    model: Res25
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pos_weight: Tensor
    config: TrainConfig
    device: torch.device
    precision: str

    def __call__(self, batch: Tensor, targets: Tensor) -> float:
        """Train on one (already augmented) batch; return the loss."""
        self.model.train()
        with autocast(self.device, self.precision):
            out = self.model(batch)
        loss = deep_supervision_loss(
            out.logits.float(), out.aux_logits.float(), targets, self.pos_weight, self.config.aux_weight
        )
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        self.scheduler.step()
        return float(loss.detach())


def make_optimiser(
    model: Res25, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a cosine learning-rate schedule over ``total_steps``."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(total_steps, 1))
    return optimiser, scheduler


def predict_logits(
    model: Res25, inputs: CaseArrays, indices: Sequence[int], device: torch.device, precision: str = "fp32"
) -> NDArray[np.float64]:
    """Logits of the given cases, one case per forward exactly as the node serves them."""
    model.eval()
    values = [float(run(model, stack(inputs, [i]), device, precision).logits[0, 0]) for i in indices]
    return np.asarray(values, dtype=np.float64)


def fit_network(
    inputs: CaseArrays,
    labels: Sequence[int],
    train_indices: Sequence[int],
    validation_indices: Sequence[int],
    config: TrainConfig,
    architecture: Res25Config,
    seed: int,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> FitResult:
    """Train one network on ``train_indices``; keep the epoch with the lowest inner-validation loss."""
    with seeded(seed, device):
        return _fit(inputs, labels, train_indices, validation_indices, config, architecture, seed, device, progress)


def _fit(
    inputs: CaseArrays,
    labels: Sequence[int],
    train_indices: Sequence[int],
    validation_indices: Sequence[int],
    config: TrainConfig,
    architecture: Res25Config,
    seed: int,
    device: torch.device,
    progress: Callable[[str], None] | None,
) -> FitResult:
    started = time.perf_counter()
    model = Res25(config=architecture).to(device)
    generator = torch.Generator().manual_seed(seed)
    noise_generator = generator if device.type == "cpu" else device_generator(seed, device)
    label_array = np.asarray(labels, dtype=np.float32)
    train = np.asarray(train_indices, dtype=np.int64)
    n_pos = float(label_array[train].sum())
    pos_weight = torch.tensor((train.size - n_pos) / max(n_pos, 1.0), device=device)
    steps_per_epoch = math.ceil(train.size / config.batch_size)
    optimiser, scheduler = make_optimiser(model, config, config.epochs * steps_per_epoch)
    precision = training_precision(device)
    validation_labels = label_array[np.asarray(validation_indices, dtype=np.int64)]
    best_loss, best_epoch, best_state = math.inf, 0, _state_copy(model)
    history: list[dict[str, float]] = []
    epoch = 0
    step = TrainStep(model, optimiser, scheduler, pos_weight, config, device, precision)
    for epoch in range(1, config.epochs + 1):
        order = train[torch.randperm(train.size, generator=generator).numpy()]
        train_loss = 0.0
        for start in range(0, order.size, config.batch_size):
            chosen = order[start : start + config.batch_size]
            if chosen.size < 2 and order.size >= 2:
                continue  # batch norm needs more than one case
            batch = stack(inputs, chosen).to(device)
            targets = torch.from_numpy(label_array[chosen]).to(device)
            loss = step(augment(batch, generator, config.augment, noise_generator), targets)
            train_loss += loss * chosen.size
        validation_logits = predict_logits(model, inputs, validation_indices, device)
        validation_loss = _bce(validation_logits, validation_labels)
        history.append({"epoch": epoch, "train_loss": train_loss / train.size, "validation_loss": validation_loss})
        if validation_loss < best_loss - 1e-6:
            best_loss, best_epoch, best_state = validation_loss, epoch, _state_copy(model)
        if progress is not None:
            progress(f"epoch {epoch}: train {train_loss / train.size:.4f} validation {validation_loss:.4f}")
        if epoch >= config.min_epochs and epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    return FitResult(model, best_epoch, epoch, history, time.perf_counter() - started)


def _state_copy(model: Res25) -> dict[str, Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def _bce(logits: NDArray[np.float64], labels: NDArray[np.float32]) -> float:
    z = torch.from_numpy(logits)
    return float(F.binary_cross_entropy_with_logits(z, torch.from_numpy(labels.astype(np.float64))))


# --------------------------------------------------------------------------------------------
# Threshold and calibration


def choose_operating_point(
    logits: NDArray[np.float64], labels: Sequence[int], method: CalibrationMethod
) -> tuple[Calibration, float]:
    """Fit the calibration on ``logits`` and set the Youden threshold on the calibrated scores.

    The threshold lies halfway between the Youden-optimal score and the next lower score, so a
    new case scoring exactly like a validation case is not decided by a hair. With a single
    class present the threshold stays 0.5.
    """
    calibration = fit_calibration(method, logits, labels)
    scores = apply_calibration(calibration, logits)
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.min() == label_array.max():
        return calibration, 0.5
    best = metrics.youden_threshold(label_array, scores)
    lower = scores[scores < best]
    threshold = (best + float(lower.max())) / 2.0 if lower.size else best
    return calibration, float(min(max(threshold, 0.0), 1.0))


# --------------------------------------------------------------------------------------------
# Cross-validation


@dataclass(frozen=True)
class FoldResult:
    """One outer fold: what was trained, chosen and measured."""

    fold: int
    test_indices: list[int]
    inner_train_indices: list[int]
    validation_indices: list[int]
    test_logits: list[float]
    test_scores: list[float]
    calibration: Calibration
    threshold: float
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    seconds: float
    checkpoint: Path | None


@dataclass(frozen=True)
class CrossValidation:
    """The whole run: folds, out-of-fold predictions, summary, written files."""

    case_ids: list[str]
    labels: list[int]
    folds: list[FoldResult]
    oof_logits: list[float]  # each case's calibrated logit from the fold model that did not see it
    ensemble_calibration: Calibration
    ensemble_threshold: float
    summary: dict[str, Any]
    out_dir: Path | None = None

    @property
    def fold_of_case(self) -> list[int]:
        """Outer fold of each case."""
        assignment = [-1] * len(self.case_ids)
        for fold in self.folds:
            for index in fold.test_indices:
                assignment[index] = fold.fold
        return assignment


def fold_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, float]:
    """ROC-AUC (NaN with one class), sensitivity, specificity at ``threshold``, Brier score."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    both = 0 < y.sum() < y.size
    at = metrics.sensitivity_specificity(y, s, threshold)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "roc_auc": metrics.roc_auc(y, s) if both else math.nan,
        "sensitivity": at.sensitivity,
        "specificity": at.specificity,
        "brier": metrics.brier_score(y, s),
    }


def cross_validate(
    inputs: CaseArrays,
    labels: Sequence[int],
    case_ids: Sequence[str],
    config: TrainConfig,
    *,
    grid: tuple[int, int, int],
    recipe: dict[str, Any] | None,
    out_dir: Path | None = None,
    fixed_folds: Sequence[int | None] | None = None,
    data_summary: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CrossValidation:
    """Run k-fold cross-validation; write fold checkpoints and the ensemble under ``out_dir``."""
    if len(inputs) != len(labels) or len(labels) != len(case_ids):
        raise ValueError("inputs, labels and case ids must have the same length")
    device = pick_device(config.device)
    in_channels = int(np.asarray(inputs[0]).shape[0])
    architecture = config.architecture(grid, in_channels)
    assignment = stratified_folds(labels, config.folds, config.seed, fixed_folds)
    results: list[FoldResult] = []
    oof = np.full(len(labels), math.nan)
    for fold in range(config.folds):
        result = _run_fold(
            fold, inputs, labels, assignment, config, architecture, device, grid, recipe, out_dir, data_summary, progress
        )
        scale, offset = calibrated_logit_affine(result.calibration)
        oof[result.test_indices] = [scale * z + offset for z in result.test_logits]
        results.append(result)
    calibration, threshold = choose_operating_point(oof, labels, config.calibration)
    summary = summarise(labels, oof, calibration, threshold, results)
    cv = CrossValidation(list(case_ids), [int(v) for v in labels], results, oof.tolist(), calibration, threshold, summary, out_dir)
    if out_dir is not None:
        write_outputs(cv, config, architecture, grid, recipe, data_summary or {})
    return cv


def _run_fold(
    fold: int,
    inputs: CaseArrays,
    labels: Sequence[int],
    assignment: Sequence[int],
    config: TrainConfig,
    architecture: Res25Config,
    device: torch.device,
    grid: tuple[int, int, int],
    recipe: dict[str, Any] | None,
    out_dir: Path | None,
    data_summary: dict[str, Any] | None,
    progress: Callable[[str], None] | None,
) -> FoldResult:
    test = [i for i, f in enumerate(assignment) if f == fold]
    rest = [i for i, f in enumerate(assignment) if f != fold]
    inner_train_pos, validation_pos = inner_validation_split(
        [labels[i] for i in rest], config.validation_fraction, config.seed * 1000 + fold
    )
    inner_train = [rest[i] for i in inner_train_pos]
    validation = [rest[i] for i in validation_pos]
    log.info("fold %d: %d train, %d inner validation, %d test", fold, len(inner_train), len(validation), len(test))

    def fold_progress(message: str) -> None:
        if progress is not None:
            progress(f"fold {fold}: {message}")

    fit = fit_network(
        inputs, labels, inner_train, validation, config, architecture, config.seed * 1000 + fold, device, fold_progress
    )
    cpu = torch.device("cpu")
    validation_logits = predict_logits(fit.model, inputs, validation, cpu)
    calibration, threshold = choose_operating_point(validation_logits, [labels[i] for i in validation], config.calibration)
    test_logits = predict_logits(fit.model, inputs, test, cpu)
    test_scores = [calibration.apply(float(z)) for z in test_logits]
    measured = fold_metrics([labels[i] for i in test], test_scores, threshold) if test else {}
    checkpoint = None
    if out_dir is not None:
        card = _fold_card(
            fold, config, architecture, grid, recipe, calibration, threshold, fit, measured,
            {"train": len(inner_train), "inner_validation": len(validation), "test": len(test)}, data_summary or {},
        )
        checkpoint = out_dir / f"fold{fold}.pt"
        save_checkpoint(checkpoint, fit.model, card)
    log.info("fold %d: best epoch %d of %d, test ROC-AUC %s", fold, fit.best_epoch, fit.epochs_run, measured.get("roc_auc"))
    return FoldResult(
        fold,
        test,
        inner_train,
        validation,
        [float(z) for z in test_logits],
        test_scores,
        calibration,
        threshold,
        measured,
        fit.best_epoch,
        fit.epochs_run,
        fit.seconds,
        checkpoint,
    )


def _fold_card(
    fold: int,
    config: TrainConfig,
    architecture: Res25Config,
    grid: tuple[int, int, int],
    recipe: dict[str, Any] | None,
    calibration: Calibration,
    threshold: float,
    fit: FitResult,
    measured: dict[str, float],
    case_counts: dict[str, int],
    data_summary: dict[str, Any],
) -> ModelCard:
    """The model card of one fold's network: how it was made and how it did on its fold."""
    training = {
        "role": "cross-validation fold",
        "fold": fold,
        "folds": config.folds,
        "cases": case_counts,
        "data": data_summary,
        "config": config.to_dict(),
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "test_metrics": measured,
        "threshold_rule": "Youden's J on the inner validation split",
        "calibration_fitted_on": "inner validation split",
        "software_version": software_version(),
    }
    return ModelCard(
        name=config.model_name,
        version=f"seed{config.seed}-fold{fold}",
        architecture=architecture,
        grid=grid,
        recipe=recipe,
        precision="fp32",
        threshold=threshold,
        calibration=calibration,
        training=json_safe(training),
    )


def summarise(
    labels: Sequence[int],
    oof_logits: NDArray[np.float64],
    ensemble_calibration: Calibration,
    ensemble_threshold: float,
    folds: Sequence[FoldResult],
) -> dict[str, Any]:
    """Per-fold mean (SD) as the paper reports it, plus pooled out-of-fold figures."""
    per_fold = {
        key: metrics.mean_sd([fold.metrics.get(key, math.nan) for fold in folds])
        for key in ("roc_auc", "sensitivity", "specificity", "brier")
    }
    oof_scores = [ensemble_calibration.apply(float(z)) for z in oof_logits]
    pooled = fold_metrics(labels, oof_scores, ensemble_threshold)
    return json_safe(
        {
            "cv_mean_sd": {key: {"mean": v.mean, "sd": v.sd, "n_folds": v.n, "text": v.format()} for key, v in per_fold.items()},
            "pooled_out_of_fold": pooled,
            "ensemble": {"calibration": ensemble_calibration.to_dict(), "threshold": ensemble_threshold},
            "folds": [
                {"fold": f.fold, "best_epoch": f.best_epoch, "epochs_run": f.epochs_run, "threshold": f.threshold,
                 "calibration": f.calibration.to_dict(), "seconds": round(f.seconds, 2), **f.metrics}
                for f in folds
            ],
        }
    )


def json_safe(value: Any) -> Any:
    """NaN and infinities become None so cards and reports are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def software_version() -> str:
    """Installed fpe-node version (``unknown`` when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fpe-node")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Outputs


def write_outputs(
    cv: CrossValidation,
    config: TrainConfig,
    architecture: Res25Config,
    grid: tuple[int, int, int],
    recipe: dict[str, Any] | None,
    data_summary: dict[str, Any],
) -> None:
    """``cv_summary.json``, ``oof_predictions.csv`` and the ensemble under ``cv.out_dir``."""
    assert cv.out_dir is not None
    members = [fold.checkpoint for fold in cv.folds if fold.checkpoint is not None]
    ensemble_card = EnsembleCard(
        name=config.model_name,
        version=f"seed{config.seed}-ensemble{len(members)}",
        grid=grid,
        recipe=recipe,
        precision="fp32",
        threshold=cv.ensemble_threshold,
        calibration=cv.ensemble_calibration,
        training=json_safe(
            {
                "role": "fold ensemble (mean of the members' calibrated logits)",
                "data": data_summary,
                "config": config.to_dict(),
                "cross_validation": cv.summary,
                "threshold_rule": "Youden's J on the out-of-fold predictions",
                "calibration_fitted_on": "out-of-fold predictions",
                "software_version": software_version(),
            }
        ),
    )
    save_ensemble(cv.out_dir / "ensemble.pt", members, ensemble_card)
    (cv.out_dir / "cv_summary.json").write_text(json.dumps(cv.summary, indent=2, allow_nan=False))
    fold_of = cv.fold_of_case
    lines = ["id,label,fold,calibrated_logit,fold_score,fold_threshold,fold_positive,ensemble_score"]
    by_fold = {fold.fold: fold for fold in cv.folds}
    for i, case_id in enumerate(cv.case_ids):
        fold = by_fold[fold_of[i]]
        position = fold.test_indices.index(i)
        score = fold.test_scores[position]
        lines.append(
            f"{case_id},{cv.labels[i]},{fold.fold},{cv.oof_logits[i]:.6f},{score:.6f},{fold.threshold:.6f},"
            f"{int(score >= fold.threshold)},{cv.ensemble_calibration.apply(cv.oof_logits[i]):.6f}"
        )
    (cv.out_dir / "oof_predictions.csv").write_text("\n".join(lines) + "\n")



# --------------------------------------------------------------------------------------------
# From a manifest


def train_manifest(
    manifest_path: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    grid: tuple[int, int, int] | None = None,
    modality: Literal["CT", "MR"] | None = None,
    cache_dir: Path | None = None,
    case_window_h: float = 24.0,
    progress: Callable[[str], None] | None = None,
) -> CrossValidation:
    """Validate the manifest, preprocess (cached) and cross-validate its ``train`` rows.

    Validation names every bad row before anything runs, DICOM study folders included (series
    selection with the recipe's required roles, ``case_window_h`` as the node uses it). A
    manifest with CT and MR rows trains one pipeline per run: name it with ``modality``.
    """
    from inference.recipe import DEFAULT_RECIPE
    from inference.training.cache import file_digest, preprocess_cohort
    from inference.training.manifest import load_manifest, recipe_required_roles, selection_checker

    recipe = DEFAULT_RECIPE.with_grid(grid or default_grid(config.model_size))
    required = recipe_required_roles(recipe)
    checker = selection_checker(case_window_h, required)
    cases = [
        case
        for case in load_manifest(manifest_path, check_case=checker, required_roles=required)
        if case.split == "train"
    ]
    modalities = sorted({case.modality for case in cases})
    if modality is None:
        if len(modalities) != 1:
            raise ValueError(f"the manifest's train rows hold {' and '.join(modalities) or 'no'} cases: choose one modality")
        modality = cases[0].modality
    cases = [case for case in cases if case.modality == modality]
    labels = [case.label for case in cases]
    if len(cases) < config.folds * 2 or min(labels.count(0), labels.count(1)) < config.folds:
        raise ValueError(
            f"{len(cases)} {modality} train cases ({labels.count(1)} FPE) are too few for {config.folds}-fold "
            "cross-validation: each fold needs both classes"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = preprocess_cohort(cases, recipe, cache_dir or out_dir / "cache")
    data_summary = {
        "pipeline": modality,
        "cases": len(cases),
        "fpe_positive": sum(labels),
        "input_formats": sorted({case.input_format for case in cases}),
        "manifest": Path(manifest_path).name,
        "manifest_sha256": file_digest(Path(manifest_path)),
        "preprocessing_warnings": sum(1 for entry in cached if entry.warnings),
    }
    return cross_validate(
        [entry.load() for entry in cached],
        labels,
        [case.case_id for case in cases],
        config,
        grid=recipe.grid,
        recipe=recipe.to_dict(),
        out_dir=out_dir,
        fixed_folds=[case.fold for case in cases],
        data_summary=data_summary,
        progress=progress,
    )
