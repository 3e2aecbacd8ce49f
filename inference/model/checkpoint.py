"""Checkpoints: the node's own format (weights + model card) and the original code's.

Node format
    One ``torch.save`` file holding plain types only, read back with ``weights_only=True``::

        {"format": "fpe-node/res25", "format_version": 1,
         "card": {...ModelCard.to_dict()...}, "state_dict": {name: tensor}}

    The card names the model (name, version, variant, architecture), the input grid, the
    preprocessing recipe (an opaque JSON dict owned by ``inference.recipe``), the precision the
    model was validated in, the decision threshold, the calibration, a training summary and the
    SHA-256 of the weights, which is checked on load.

Original checkpoints
    ``state_dict()`` of the published code's ``resnet34(...)`` (Zhang et al., AJNR 2024), as a
    bare mapping, with a ``module.`` prefix (DataParallel), or wrapped as
    ``{"state_dict": ...}``. Alias keys (``shared_features.*``, ``ind_features.<i>.*``) are
    checked to hold the same values as their canonical keys and then dropped; parameters the
    original never uses in forward (``attn_2..attn_5``, ``fc``) are ignored with a note; the
    variant is detected from the keys (``layer3.<n>.g.weight`` => non-local). Any other missing
    or unexpected key is an error that names it: nothing is ever loaded partially. Such a
    checkpoint carries no preprocessing recipe: the card says so
    (``recipe_from_checkpoint=False``) and the default recipe applies.

Fold ensembles
    ``{"format": "fpe-node/res25-ensemble", ...}`` files that ``fpe-node train`` writes: several
    networks served as one model under the ensemble's own card, threshold and calibration; the
    format and the model live in :mod:`inference.model.ensemble`, and :func:`load_checkpoint`
    returns them as a :class:`LoadedModel` like any other checkpoint.

No checkpoint
    :func:`demonstration_model` builds deterministic, seeded, *untrained* weights whose card has
    ``demonstration=True``; every result made with them must say so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from inference.model.calibration import Calibration
from inference.model.precision import Bf16Check
from inference.model.res25 import Res25, Res25Config, seeded_init_
from inference.model.runtime import PRECISIONS
from inference.result import ModelInfo

if TYPE_CHECKING:
    from inference.model.ensemble import Res25Ensemble

logger = logging.getLogger(__name__)

FORMAT = "fpe-node/res25"
FORMAT_VERSION = 1
DEFAULT_GRID: tuple[int, int, int] = (25, 224, 224)
DEMONSTRATION_NOTE = "untrained demonstration weights"
DEFAULT_RECIPE_NOTE = "original checkpoint: no recipe inside, default recipe applied"

Source = Literal["node", "original", "demonstration", "ensemble"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a whole; the message names what is wrong."""


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model; invalid values raise ``ValueError`` naming them.

    Attributes
    ----------
    name, version
        Identity of the model, reported in every result (SR Algorithm Identification,
        TID 4019).
    architecture
        Enough to rebuild the network (:class:`~inference.model.res25.Res25Config`).
    grid
        Model input grid ``(slices, rows, columns)``; slices must equal the architecture's.
    recipe
        Preprocessing recipe as a plain dict (``inference.recipe``), ``None`` for the default.
    precision
        Precision the model was validated in (``fp32``, ``bf16``, ``fp16``).
    threshold
        Decision threshold on the (calibrated) score: positive (FPE likely) when ``score >= threshold``.
    calibration
        How the logit becomes the score (:class:`~inference.model.calibration.Calibration`).
    training
        Training summary (cohort size, folds, metrics...), plain JSON values.
    weights_sha256
        SHA-256 of the weights (:func:`weights_sha256`).
    demonstration
        True for untrained demonstration weights.
    recipe_from_checkpoint
        False when the checkpoint carried no recipe (original checkpoints).
    bf16_check
        How CPU bf16 compared with fp32 on validation cases (:class:`~inference.model.precision.Bf16Check`,
        written by ``fpe-node evaluate --record-bf16``); ``None``: never checked, so never bf16 on
        CPU unless ``inference.precision`` forces it.
    """

    name: str
    version: str
    architecture: Res25Config = field(default_factory=Res25Config)
    grid: tuple[int, int, int] = DEFAULT_GRID
    recipe: dict[str, Any] | None = None
    precision: str = "fp32"
    threshold: float = 0.5
    calibration: Calibration = field(default_factory=Calibration)
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    demonstration: bool = False
    recipe_from_checkpoint: bool = True
    bf16_check: Bf16Check | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("card name must not be empty")
        if not self.version or not self.version.strip():
            raise ValueError("card version must not be empty")
        grid = tuple(int(v) for v in self.grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid must be 3 positive integers (slices, rows, columns), got {self.grid!r}")
        if grid[0] != self.architecture.n_slices:
            raise ValueError(f"grid slices {grid[0]} differ from the architecture's n_slices {self.architecture.n_slices}")
        object.__setattr__(self, "grid", grid)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.weights_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256):
            raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}")
        for label, value in (("recipe", self.recipe), ("training", self.training)):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"card {label} must hold plain JSON values: {exc}") from exc

    @property
    def variant(self) -> str:
        """``"nonlocal"`` or ``"plain"``."""
        return self.architecture.variant

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible form (what the checkpoint file stores)."""
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "architecture": self.architecture.to_dict(),
            "grid": list(self.grid),
            "recipe": json.loads(json.dumps(self.recipe)),
            "precision": self.precision,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "training": json.loads(json.dumps(self.training)),
            "weights_sha256": self.weights_sha256,
            "demonstration": self.demonstration,
            "recipe_from_checkpoint": self.recipe_from_checkpoint,
            "bf16_check": None if self.bf16_check is None else self.bf16_check.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelCard":
        """Inverse of :meth:`to_dict`; unknown or inconsistent fields raise ``ValueError``."""
        known = set(cls.__dataclass_fields__) | {"variant"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model card fields: {', '.join(unknown)}")
        kwargs = {k: v for k, v in values.items() if k != "variant"}
        kwargs["architecture"] = Res25Config.from_dict(values.get("architecture") or {})
        kwargs["calibration"] = Calibration.from_dict(values.get("calibration"))
        if "grid" in kwargs:
            kwargs["grid"] = tuple(kwargs["grid"])
        if kwargs.get("bf16_check") is not None:
            kwargs["bf16_check"] = Bf16Check.from_dict(kwargs["bf16_check"])
        card = cls(**kwargs)
        if "variant" in values and values["variant"] != card.variant:
            raise ValueError(f"card variant {values['variant']!r} differs from its architecture's {card.variant!r}")
        return card

    def model_info(self, precision: str | None = None) -> ModelInfo:
        """The identity a :class:`~inference.result.Prediction` carries.

        ``precision`` is the precision the model actually runs in
        (:func:`inference.model.precision.serving_precision`); default the card's validated one.
        """
        return ModelInfo(
            name=self.name,
            version=self.version,
            variant=self.variant,
            weights_sha256=self.weights_sha256,
            calibrated=self.calibration.calibrated,
            threshold=self.threshold,
            demonstration=self.demonstration,
            precision=self.precision if precision is None else precision,
            recipe_from_checkpoint=self.recipe_from_checkpoint,
        )


@dataclass(frozen=True)
class LoadedModel:
    """A network in ``eval()`` mode on CPU, its card, and what the loader had to say.

    For a fold ensemble (``source == "ensemble"``) ``model`` is a
    :class:`~inference.model.ensemble.Res25Ensemble` with the interface of :class:`Res25`, ``card``
    the ensemble's served card and ``member_cards`` the cards of its networks.
    """

    model: "Res25 | Res25Ensemble"
    card: ModelCard
    source: Source
    notes: tuple[str, ...] = ()
    member_cards: tuple[ModelCard, ...] = ()


# --------------------------------------------------------------------------------------------
# Weights hash


def weights_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 over every tensor (sorted by name: name, dtype, shape, raw bytes).

    Independent of dict order and of the device the tensors sit on.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}".encode("ascii") + b"\0")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Node format


def write_payload(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, model: Res25, card: ModelCard) -> ModelCard:
    """Write ``model`` and ``card`` (with the weights' SHA-256 filled in) to ``path`` atomically.

    Returns the card as written. The architecture in the card must be the model's.
    """
    if card.architecture != model.config:
        raise ValueError(f"card architecture {card.architecture} differs from the model's {model.config}")
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    card = replace(card, weights_sha256=weights_sha256(state))
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "card": card.to_dict(), "state_dict": state}
    path = Path(path)
    write_payload(payload, path)
    logger.info("saved checkpoint %s (model %s %s, sha256 %s)", path.name, card.name, card.version, card.weights_sha256[:12])
    return card


def read_payload(path: Path) -> Any:
    """What ``torch.load(..., weights_only=True)`` reads from ``path``; unreadable files raise :class:`CheckpointError`."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"{Path(path).name}: not a readable weights-only checkpoint ({exc})") from exc


def _key_errors(missing: list[str], unexpected: list[str], mismatched: list[str], what: str) -> None:
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches: {', '.join(mismatched)}")
    if parts:
        raise CheckpointError(f"{what} does not fit the model ({'; '.join(parts)})")


def build_exact(config: Res25Config, state: Mapping[str, Tensor], what: str,
                original_name: Callable[[str], str] | None = None) -> Res25:
    """A :class:`Res25` holding exactly ``state``: every key and shape must match, else name the faults.

    The skeleton is built on the ``meta`` device and takes the tensors of ``state`` as its own
    (``assign=True``): no throw-away initialisation of 22 M parameters.
    """
    with torch.device("meta"):
        model = Res25(config=config)
    expected = model.state_dict()
    rename = original_name or (lambda key: key)
    missing = sorted(rename(key) for key in expected if key not in state)
    unexpected = sorted(rename(key) for key in state if key not in expected)
    mismatched = sorted(
        f"{rename(key)} {tuple(state[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and tuple(state[key].shape) != tuple(tensor.shape)
    )
    _key_errors(missing, unexpected, mismatched, what)
    floats = {key: tensor.float() if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    model.load_state_dict(floats, strict=True, assign=True)
    return model.eval()


def _load_node(payload: Mapping[str, Any], label: str) -> LoadedModel:
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{label}: unsupported checkpoint format_version {version!r} (this node reads {FORMAT_VERSION})")
    try:
        card = ModelCard.from_dict(payload["card"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{label}: invalid model card: {exc}") from exc
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label}: no state_dict")
    digest = weights_sha256(state)
    if card.weights_sha256 and digest != card.weights_sha256:
        raise CheckpointError(f"{label}: weights SHA-256 {digest} differs from the card's {card.weights_sha256}")
    model = build_exact(card.architecture, state, label)
    return LoadedModel(model, replace(card, weights_sha256=digest), "node",
                       (DEMONSTRATION_NOTE,) if card.demonstration else ())


# --------------------------------------------------------------------------------------------
# Original checkpoints

_ALIASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^shared_features\.0\."), "conv1."),
    (re.compile(r"^shared_features\.1\."), "bn1."),
    (re.compile(r"^shared_features\.4\."), "layer1."),
    (re.compile(r"^ind_features\.\d+\.0\."), "layer2."),
    (re.compile(r"^ind_features\.\d+\.1\."), "layer3."),
    (re.compile(r"^ind_features\.\d+\.2\."), "layer4."),
)
_DEAD = re.compile(r"^(attn_[2-5]|fc)\.")
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^attn_1\."), "attention."),
    (re.compile(r"^fc_(\d+)_1\."), r"group_heads.\1."),
    (re.compile(r"^fc_0_2\."), "slice_head."),
    (re.compile(r"^classifier\.1\."), "slice_mix."),
)
_RENAMES_BACK: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^attention\."), "attn_1."),
    (re.compile(r"^group_heads\.(\d+)\."), r"fc_\1_1."),
    (re.compile(r"^slice_head\."), "fc_0_2."),
    (re.compile(r"^slice_mix\."), "classifier.1."),
)
_NONLOCAL_KEY = re.compile(r"^layer3\.\d+\.g\.weight$")


def _sub_first(rules: tuple[tuple[re.Pattern[str], str], ...], key: str) -> str | None:
    for pattern, target in rules:
        if pattern.match(key):
            return pattern.sub(target, key, count=1)
    return None


def to_node_name(original_key: str) -> str:
    """Name in :class:`Res25` of a canonical key of the original."""
    return _sub_first(_RENAMES, original_key) or original_key


def to_original_name(node_key: str) -> str:
    """Name in the original of a :class:`Res25` key (inverse of :func:`to_node_name`)."""
    return _sub_first(_RENAMES_BACK, node_key) or node_key


def _unwrap(obj: Any, label: str, notes: list[str]) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        others = sorted(str(k) for k in obj if k != "state_dict")
        notes.append("unwrapped {'state_dict': ...}" + (f"; ignored top-level entries {', '.join(others)}" if others else ""))
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{label}: not a state_dict (a mapping of names to tensors)")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"{label}: entries that are not tensors: {', '.join(not_tensors)}")
    state: dict[str, Tensor] = {}
    prefixed = [k for k in obj if str(k).startswith("module.")]
    if prefixed:
        notes.append("stripped DataParallel prefix 'module.'")
    for key, tensor in obj.items():
        name = str(key)[len("module."):] if str(key).startswith("module.") else str(key)
        if name in state:
            raise CheckpointError(f"{label}: key {name} appears both with and without the 'module.' prefix")
        state[name] = tensor
    return state


def _same_values(first: Tensor, second: Tensor) -> bool:
    """Equal shapes and values (views of the same storage, as a saved ``state_dict()`` has, are equal)."""
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    if first.data_ptr() == second.data_ptr() and first.stride() == second.stride():
        return True
    return torch.equal(first, second)


def _resolve_aliases(state: dict[str, Tensor], label: str, notes: list[str]) -> dict[str, Tensor]:
    """Drop alias keys after checking each equals its canonical key; drop dead parameters."""
    canonical: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    dead: list[str] = []
    for key, tensor in state.items():
        target = _sub_first(_ALIASES, key)
        if target is not None:
            aliases[key] = target
        elif _DEAD.match(key):
            dead.append(key)
        else:
            canonical[key] = tensor
    differing, adopted = [], []
    for alias, target in sorted(aliases.items()):
        value = state[alias]
        if target not in canonical:
            canonical[target] = value
            adopted.append(alias)
        elif not _same_values(canonical[target], value):
            differing.append(f"{alias} != {target}")
    if differing:
        raise CheckpointError(f"{label}: alias keys hold other values than their canonical keys: {', '.join(differing)}")
    if aliases:
        notes.append(f"{len(aliases)} alias keys (shared_features.*, ind_features.*) checked equal to their canonical keys")
    if adopted:
        notes.append(f"{len(adopted)} canonical keys taken from their aliases")
    if dead:
        roots = sorted({key.split(".")[0] for key in dead})
        notes.append(f"ignored {len(dead)} parameters that the original's forward never uses ({', '.join(roots)})")
    return canonical


def detect_variant(keys: Any) -> str:
    """``"nonlocal"`` when the original's keys hold a non-local block in layer3 (``layer3.<n>.g.weight``)."""
    return "nonlocal" if any(_NONLOCAL_KEY.match(str(k)) for k in keys) else "plain"


def load_original_state_dict(obj: Any, label: str = "original checkpoint") -> LoadedModel:
    """Build a :class:`Res25` from an object ``torch.load`` returned for an original checkpoint.

    The model takes the tensors of ``obj`` as its own (no copy).

    Raises
    ------
    CheckpointError
        Keys missing or unexpected (named in the original's terms), shapes that differ, aliases
        that disagree with their canonical keys.
    """
    notes: list[str] = []
    state = _resolve_aliases(_unwrap(obj, label, notes), label, notes)
    variant = detect_variant(state)
    notes.append(f"variant {variant!r} detected from the keys")
    config = Res25Config(variant=variant)  # type: ignore[arg-type]  # the original is always ResNet-34, 3 channels, 25 slices
    renamed = {to_node_name(key): tensor for key, tensor in state.items()}
    model = build_exact(config, renamed, label, original_name=to_original_name)
    notes.append(DEFAULT_RECIPE_NOTE)
    digest = weights_sha256(model.state_dict())
    card = ModelCard(
        name="res25",
        version="original",
        architecture=config,
        precision="fp32",
        threshold=0.5,
        training={"source": "checkpoint of the original code (Zhang et al., AJNR 2024)"},
        weights_sha256=digest,
        demonstration=False,
        recipe_from_checkpoint=False,
    )
    for note in notes:
        logger.info("%s: %s", label, note)
    return LoadedModel(model, card, "original", tuple(notes))


# --------------------------------------------------------------------------------------------
# Entry points


def load_checkpoint(path: Path) -> LoadedModel:
    """Load a node-format, fold-ensemble or original checkpoint from ``path`` onto the CPU, in ``eval()`` mode."""
    path = Path(path)
    payload = read_payload(path)
    if isinstance(payload, Mapping) and "format" in payload:
        from inference.model.ensemble import ENSEMBLE_FORMAT, load_ensemble_payload  # it imports this module

        if payload["format"] == ENSEMBLE_FORMAT:
            loaded = load_ensemble_payload(payload, path.name)
        elif payload["format"] == FORMAT:
            loaded = _load_node(payload, path.name)
        else:
            raise CheckpointError(f"{path.name}: unknown checkpoint format {payload['format']!r} "
                                  f"(this node reads {FORMAT} and {ENSEMBLE_FORMAT})")
    else:
        loaded = load_original_state_dict(payload, path.name)
    logger.info("loaded %s checkpoint %s: %s %s (%s), sha256 %s", loaded.source, path.name, loaded.card.name,
                loaded.card.version, loaded.card.variant, loaded.card.weights_sha256[:12])
    return loaded


def record_bf16_check(path: Path, check: Bf16Check) -> None:
    """Write ``check`` into the card of the node or ensemble checkpoint at ``path``, atomically.

    The weights are written back as read (their SHA-256 is unchanged); the file is re-read
    through its loader first, so a record for other weights than the file's is refused.

    Raises
    ------
    CheckpointError
        An original checkpoint (it has no card: save it in the node format first), an unknown
        format, or a check made for other weights.
    """
    from inference.model.ensemble import ENSEMBLE_FORMAT, load_ensemble_payload  # it imports this module

    path = Path(path)
    payload = read_payload(path)
    if not isinstance(payload, Mapping) or payload.get("format") not in (FORMAT, ENSEMBLE_FORMAT):
        raise CheckpointError(f"{path.name}: only node and ensemble checkpoints carry a card for the bf16 check")
    if not isinstance(payload.get("card"), Mapping):
        raise CheckpointError(f"{path.name}: missing key 'card'")
    updated = {**payload, "card": {**payload["card"], "bf16_check": check.to_dict()}}
    load = load_ensemble_payload if payload["format"] == ENSEMBLE_FORMAT else _load_node
    served = load(updated, path.name).card
    if served.weights_sha256 != check.weights_sha256:
        raise CheckpointError(f"{path.name}: the bf16 check was made for weights {check.weights_sha256[:12]}, "
                              f"the file holds {served.weights_sha256[:12]}")
    write_payload(updated, path)
    logger.info("%s: recorded bf16 check (%d cases, %d decisions changed)", path.name, check.cases,
                check.decisions_changed)


def demonstration_model(config: Res25Config | None = None, seed: int = 0,
                        grid: tuple[int, int] = DEFAULT_GRID[1:]) -> LoadedModel:
    """Deterministic seeded untrained weights (same seed, same weights, on any machine)."""
    config = config or Res25Config()
    model = seeded_init_(Res25(config=config), seed).eval()
    card = ModelCard(
        name="res25-demonstration",
        version=f"seed-{seed}",
        architecture=config,
        grid=(config.n_slices, *grid),
        training={"note": "untrained: deterministic seeded initialisation, no clinical meaning"},
        weights_sha256=weights_sha256(model.state_dict()),
        demonstration=True,
    )
    return LoadedModel(model, card, "demonstration", (DEMONSTRATION_NOTE,))


def load_model(checkpoint: Path | None, demonstration_config: Res25Config | None = None) -> LoadedModel:
    """The configured checkpoint, or demonstration weights when none is configured."""
    if checkpoint is None:
        logger.warning("no checkpoint configured: serving %s", DEMONSTRATION_NOTE)
        return demonstration_model(demonstration_config)
    return load_checkpoint(checkpoint)
