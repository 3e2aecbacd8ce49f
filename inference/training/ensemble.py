"""The fold ensemble: k cross-validation networks served as one model.

File format (``torch.save`` of plain types, read with ``weights_only=True`` like the node's
single-network checkpoints of :mod:`inference.model.checkpoint`)::

    {"format": "fpe-node/res25-ensemble", "format_version": 1,
     "card": {...EnsembleCard...},
     "members": [{"card": {...ModelCard...}, "state_dict": {...}}, ...]}

Each member's logit is first put on the probability-logit scale by the member's own calibration
(``a z + b`` for Platt, ``z / T`` for temperature, ``z`` for none), so members trained in
different folds speak the same units; the ensemble's logit is the mean of these. Its own
calibration and threshold -- fitted on the out-of-fold values of the same quantity -- turn that
logit into the score and the decision. Each
member keeps its full node card, weights hash included, so every member can also be served
alone.

The node's checkpoint loader (``inference.model.checkpoint.load_checkpoint``) reads single
networks only; serving an ensemble file through the predictor needs it to dispatch on this
format (proposed to the model owner).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inference.model.calibration import Calibration
from inference.model.checkpoint import CheckpointError, ModelCard, load_checkpoint, weights_sha256
from inference.model.res25 import Res25, Res25Output

ENSEMBLE_FORMAT = "fpe-node/res25-ensemble"
ENSEMBLE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EnsembleCard:
    """What an ensemble file says about itself (the members carry their own cards)."""

    name: str
    version: str
    grid: tuple[int, int, int]
    recipe: dict[str, Any] | None
    precision: str
    threshold: float
    calibration: Calibration
    training: dict[str, Any] = field(default_factory=dict)
    members_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        json.dumps(self.training, allow_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {
            "name": self.name,
            "version": self.version,
            "grid": list(self.grid),
            "recipe": self.recipe,
            "precision": self.precision,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "training": self.training,
            "members_sha256": list(self.members_sha256),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EnsembleCard":
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=values["name"],
            version=values["version"],
            grid=tuple(values["grid"]),  # type: ignore[arg-type]
            recipe=values.get("recipe"),
            precision=values["precision"],
            threshold=float(values["threshold"]),
            calibration=Calibration.from_dict(values.get("calibration")),
            training=dict(values.get("training") or {}),
            members_sha256=tuple(values.get("members_sha256") or ()),
        )


def calibrated_logit_affine(calibration: Calibration) -> tuple[float, float]:
    """``(scale, offset)`` so that ``sigmoid(scale * z + offset)`` is the calibrated score."""
    if calibration.method == "platt":
        return calibration.params["a"], calibration.params["b"]
    if calibration.method == "temperature":
        return 1.0 / calibration.params["temperature"], 0.0
    return 1.0, 0.0


class Res25Ensemble(nn.Module):
    """Members run on the same input; the logit is the mean of the members' calibrated logits.

    Auxiliary logits, slice scores and slice weights are plain means over the members.
    """

    scales: Tensor
    offsets: Tensor

    def __init__(self, members: Sequence[Res25], affines: Sequence[tuple[float, float]] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        configs = {(m.config.in_channels, m.config.n_slices) for m in members}
        if len(configs) != 1:
            raise ValueError("ensemble members must share channels and slices")
        affines = list(affines) if affines is not None else [(1.0, 0.0)] * len(members)
        if len(affines) != len(members):
            raise ValueError("one (scale, offset) per member")
        self.members = nn.ModuleList(members)
        self.register_buffer("scales", torch.tensor([a for a, _ in affines], dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", torch.tensor([b for _, b in affines], dtype=torch.float32), persistent=False)

    def forward(self, volumes: Tensor, return_features: bool = False) -> Res25Output:
        """Mean of the members' outputs (feature maps are not averaged: ``None``)."""
        outputs = [member(volumes) for member in self.members]
        raw = torch.stack([o.logits.float() for o in outputs])  # (members, B, 1)
        calibrated = raw * self.scales[:, None, None] + self.offsets[:, None, None]
        return Res25Output(
            logits=calibrated.mean(0),
            aux_logits=torch.stack([o.aux_logits for o in outputs]).mean(0),
            slice_scores=torch.stack([o.slice_scores for o in outputs]).mean(0),
            slice_weights=torch.stack([o.slice_weights for o in outputs]).mean(0),
            features=None,
        )


@dataclass(frozen=True)
class LoadedEnsemble:
    """An ensemble in ``eval()`` mode on CPU with its card and its members' cards."""

    model: Res25Ensemble
    card: EnsembleCard
    member_cards: tuple[ModelCard, ...]


def save_ensemble(path: Path, member_checkpoints: Sequence[Path], card: EnsembleCard) -> EnsembleCard:
    """Bundle node-format member checkpoints into one ensemble file, atomically."""
    members = []
    hashes = []
    for member_path in member_checkpoints:
        loaded = load_checkpoint(member_path)
        state = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
        members.append({"card": loaded.card.to_dict(), "state_dict": state})
        hashes.append(loaded.card.weights_sha256)
    card = EnsembleCard(**{**card.__dict__, "members_sha256": tuple(hashes)})
    payload = {"format": ENSEMBLE_FORMAT, "format_version": ENSEMBLE_FORMAT_VERSION, "card": card.to_dict(), "members": members}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return card


def is_ensemble(path: Path) -> bool:
    """True when ``path`` holds an ensemble file."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(payload, Mapping) and payload.get("format") == ENSEMBLE_FORMAT


def load_ensemble(path: Path) -> LoadedEnsemble:
    """Read an ensemble file; every member's weights are checked against its card's SHA-256."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, Mapping) or payload.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{path.name}: not a {ENSEMBLE_FORMAT} file")
    if payload.get("format_version") != ENSEMBLE_FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: unsupported ensemble format_version {payload.get('format_version')!r}")
    card = EnsembleCard.from_dict(payload["card"])
    models, cards = [], []
    for number, member in enumerate(payload["members"]):
        member_card = ModelCard.from_dict(member["card"])
        digest = weights_sha256(member["state_dict"])
        if digest != member_card.weights_sha256:
            raise CheckpointError(f"{path.name}: member {number} weights SHA-256 differs from its card")
        model = Res25(config=member_card.architecture)
        model.load_state_dict(member["state_dict"], strict=True)
        models.append(model.eval())
        cards.append(member_card)
    affines = [calibrated_logit_affine(member_card.calibration) for member_card in cards]
    return LoadedEnsemble(Res25Ensemble(models, affines).eval(), card, tuple(cards))
