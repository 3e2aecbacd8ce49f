"""The fold ensemble: k cross-validation networks served as one model.

File format (``torch.save`` of plain types, read with ``weights_only=True`` like the node's
single-network checkpoints of :mod:`inference.model.checkpoint`)::

    {"format": "fpe-node/res25-ensemble", "format_version": 1,
     "card": {...EnsembleCard...},
     "members": [{"card": {...ModelCard...}, "state_dict": {...}}, ...]}

Written by ``fpe-node train`` (:func:`save_ensemble`); read by
:func:`inference.model.checkpoint.load_checkpoint`, which dispatches on ``format`` and returns a
:class:`~inference.model.checkpoint.LoadedModel` like for one network, so the predictor serves an
ensemble file unchanged (``settings.inference.checkpoint: ensemble.pt``).

Score
    Each member's logit is first put on the probability-logit scale by the member's own
    calibration (``a z + b`` for Platt, ``z / T`` for temperature, ``z`` for none), so members
    trained in different folds speak the same units; the ensemble's logit is the mean of these.
    Its own calibration and threshold -- fitted by training on the out-of-fold values of the same
    quantity -- turn that logit into the score and the decision. Auxiliary logits, slice scores
    and slice weights are plain means over the members.

Served card
    The :class:`~inference.model.checkpoint.ModelCard` a loaded ensemble carries is the
    ensemble's: its name, version, threshold, calibration, precision and training summary (with
    the members' names, versions and hashes added under ``ensemble_members``); the architecture,
    grid and recipe the members share (members with different architectures, grids or recipes
    are refused, naming them, and so is an ensemble card that disagrees with them); and
    ``weights_sha256`` over all members: :func:`~inference.model.checkpoint.weights_sha256` of
    the ensemble module's state dict (keys ``members.<i>.<name>``, members in file order).

Attention
    :class:`Res25Ensemble` has the interface of :class:`~inference.model.res25.Res25` that
    :mod:`inference.attention` uses (``slice_images``, ``trunk``, ``head``, ``config``,
    ``forward(..., return_features=True)``), so Grad-CAM runs on it unchanged. Its ``trunk`` is
    the members' ``layer4`` maps concatenated along the channels, and its ``head`` splits them
    back and gives the ensemble's logit. Grad-CAM of the ensemble's logit on that concatenated
    map is therefore exactly ``ReLU(mean_i(s_i * cam_i))``, where ``cam_i`` is member ``i``'s
    Grad-CAM *before* its ReLU and ``s_i`` its calibration slope: the evidence of every member,
    in the units the ensemble averages. The slice weights that multiply it are the members'
    mean slice weights.

Each member keeps its full node card, weights hash included, so every member can also be
served alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from inference.model.calibration import Calibration
from inference.model.checkpoint import (
    CheckpointError,
    LoadedModel,
    ModelCard,
    build_exact,
    load_checkpoint,
    read_payload,
    weights_sha256,
    write_payload,
)
from inference.model.precision import Bf16Check
from inference.model.res25 import Res25, Res25Config, Res25Output

logger = logging.getLogger(__name__)

ENSEMBLE_FORMAT = "fpe-node/res25-ensemble"
ENSEMBLE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EnsembleCard:
    """What an ensemble file says about itself (the members carry their own cards).

    ``bf16_check`` is the ensemble's own CPU bf16 check (:class:`~inference.model.precision.Bf16Check`,
    over the served weights of all members), ``None`` when never checked.
    """

    name: str
    version: str
    grid: tuple[int, int, int]
    recipe: dict[str, Any] | None
    precision: str
    threshold: float
    calibration: Calibration
    training: dict[str, Any] = field(default_factory=dict)
    members_sha256: tuple[str, ...] = ()
    bf16_check: Bf16Check | None = None

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
            "bf16_check": None if self.bf16_check is None else self.bf16_check.to_dict(),
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
            bf16_check=Bf16Check.from_dict(values["bf16_check"]) if values.get("bf16_check") is not None else None,
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

    Same interface as :class:`~inference.model.res25.Res25` for serving and Grad-CAM (see the
    module docstring): ``trunk`` concatenates the members' ``layer4`` maps along the channels,
    ``head`` splits them back. All members must share one architecture.
    """

    scales: Tensor
    offsets: Tensor

    def __init__(self, members: Sequence[Res25], affines: Sequence[tuple[float, float]] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        differing = [str(number) for number, m in enumerate(members) if m.config != members[0].config]
        if differing:
            raise ValueError(f"ensemble members {', '.join(differing)} differ in architecture from member 0")
        affines = list(affines) if affines is not None else [(1.0, 0.0)] * len(members)
        if len(affines) != len(members):
            raise ValueError("one (scale, offset) per member")
        self.members = nn.ModuleList(members)
        self.config: Res25Config = members[0].config
        self.register_buffer("scales", torch.tensor([a for a, _ in affines], dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", torch.tensor([b for _, b in affines], dtype=torch.float32), persistent=False)

    @property
    def variant(self) -> str:
        """The members' ``"nonlocal"`` or ``"plain"``."""
        return self.config.variant

    def networks(self) -> list[Res25]:
        """The members, typed."""
        return [cast(Res25, member) for member in self.members]

    def slice_images(self, volumes: Tensor) -> Tensor:
        """``(B, C, S, H, W)`` as ``(B * S, C, H, W)``, as every member slices them."""
        return self.networks()[0].slice_images(volumes)

    def trunk(self, images: Tensor) -> Tensor:
        """The members' ``layer4`` maps concatenated along the channels: ``(N, members * C, h, w)``."""
        return torch.cat([member.trunk(images) for member in self.networks()], dim=1)

    def head(self, feature_maps: Tensor, batch_size: int, return_features: bool = False) -> Res25Output:
        """Each member's head on its share of the channels; the outputs combined (module docstring)."""
        dim = self.config.feature_dim
        if feature_maps.shape[1] != dim * len(self.members):
            raise ValueError(f"expected {len(self.members)} x {dim} feature channels, got {feature_maps.shape[1]}")
        outputs = [member.head(maps, batch_size) for member, maps in zip(self.networks(), feature_maps.split(dim, dim=1))]
        raw = torch.stack([o.logits.float() for o in outputs])  # (members, B, 1)
        calibrated = raw * self.scales[:, None, None] + self.offsets[:, None, None]
        features = None
        if return_features:
            features = feature_maps.reshape(batch_size, self.config.n_slices, *feature_maps.shape[1:])
        return Res25Output(
            logits=calibrated.mean(0),
            aux_logits=torch.stack([o.aux_logits.float() for o in outputs]).mean(0),
            slice_scores=torch.stack([o.slice_scores.float() for o in outputs]).mean(0),
            slice_weights=torch.stack([o.slice_weights.float() for o in outputs]).mean(0),
            features=features,
        )

    def forward(self, volumes: Tensor, return_features: bool = False) -> Res25Output:
        """Outputs for ``volumes`` ``(B, in_channels, n_slices, H, W)``; features are the concatenated maps."""
        return self.head(self.trunk(self.slice_images(volumes)), volumes.shape[0], return_features)


@dataclass(frozen=True)
class LoadedEnsemble:
    """An ensemble in ``eval()`` mode on CPU with its card and its members' cards."""

    model: Res25Ensemble
    card: EnsembleCard
    member_cards: tuple[ModelCard, ...]


# --------------------------------------------------------------------------------------------
# Writing


def save_ensemble(path: Path, member_checkpoints: Sequence[Path], card: EnsembleCard) -> EnsembleCard:
    """Bundle node-format member checkpoints into one ensemble file, atomically."""
    members = []
    hashes = []
    for member_path in member_checkpoints:
        loaded = load_checkpoint(member_path)
        if not isinstance(loaded.model, Res25):
            raise CheckpointError(f"{Path(member_path).name}: an ensemble member must be one network, not a {loaded.source}")
        state = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
        members.append({"card": loaded.card.to_dict(), "state_dict": state})
        hashes.append(loaded.card.weights_sha256)
    card = replace(card, members_sha256=tuple(hashes))
    payload = {"format": ENSEMBLE_FORMAT, "format_version": ENSEMBLE_FORMAT_VERSION, "card": card.to_dict(), "members": members}
    write_payload(payload, path)
    logger.info("saved ensemble %s (%d members, model %s %s)", path.name, len(members), card.name, card.version)
    return card


# --------------------------------------------------------------------------------------------
# Reading


def is_ensemble_payload(payload: Any) -> bool:
    """True when a loaded file's content is an ensemble."""
    return isinstance(payload, Mapping) and payload.get("format") == ENSEMBLE_FORMAT


def is_ensemble(path: Path) -> bool:
    """True when ``path`` holds an ensemble file."""
    return is_ensemble_payload(read_payload(path))


def _member(number: int, member: Any, label: str) -> tuple[Res25, ModelCard]:
    what = f"{label}: member {number}"
    if not isinstance(member, Mapping):
        raise CheckpointError(f"{what} is not a mapping with 'card' and 'state_dict'")
    missing = [key for key in ("card", "state_dict") if key not in member]
    if missing:
        raise CheckpointError(f"{what}: missing key {', '.join(repr(k) for k in missing)}")
    try:
        card = ModelCard.from_dict(member["card"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{what}: invalid model card: {exc}") from exc
    state = member["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what}: state_dict is not a mapping")
    digest = weights_sha256(state)
    if digest != card.weights_sha256:
        raise CheckpointError(f"{what} ({card.name} {card.version}): weights SHA-256 {digest} differs from its card's "
                              f"{card.weights_sha256 or '(none)'}")
    return build_exact(card.architecture, state, what), card


def _differences(cards: Sequence[ModelCard], label: str) -> None:
    """Refuse members that disagree with member 0 on architecture, grid or recipe, naming them."""
    first = cards[0]
    for attribute in ("architecture", "grid", "recipe"):
        differing = [f"{n} ({c.name} {c.version})" for n, c in enumerate(cards) if getattr(c, attribute) != getattr(first, attribute)]
        if differing:
            raise CheckpointError(f"{label}: members {', '.join(differing)} have another {attribute} than member 0 "
                                  f"({first.name} {first.version}); an ensemble's members must share one {attribute}")


def _read_card(payload: Mapping[str, Any], label: str) -> EnsembleCard:
    version = payload.get("format_version")
    if version != ENSEMBLE_FORMAT_VERSION:
        raise CheckpointError(f"{label}: unsupported ensemble format_version {version!r} (this node reads {ENSEMBLE_FORMAT_VERSION})")
    if "card" not in payload:
        raise CheckpointError(f"{label}: missing key 'card'")
    try:
        return EnsembleCard.from_dict(payload["card"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{label}: invalid ensemble card: {exc}") from exc


def build_ensemble(payload: Mapping[str, Any], label: str) -> LoadedEnsemble:
    """An ensemble from the content of an ensemble file; every check names what is wrong.

    Raises
    ------
    CheckpointError
        Wrong format or version; a member without ``card`` or ``state_dict``; a member whose
        weights differ from its card's SHA-256; members with different architectures, grids or
        recipes; an ensemble card whose grid, recipe or members' hashes disagree with its members.
    """
    if not is_ensemble_payload(payload):
        raise CheckpointError(f"{label}: not a {ENSEMBLE_FORMAT} file")
    card = _read_card(payload, label)
    members = payload.get("members")
    if not isinstance(members, Sequence) or not members:
        raise CheckpointError(f"{label}: missing key 'members' (a non-empty list of networks)")
    built = [_member(number, member, label) for number, member in enumerate(members)]
    cards = tuple(member_card for _, member_card in built)
    _differences(cards, label)
    if tuple(card.grid) != cards[0].grid:
        raise CheckpointError(f"{label}: ensemble card grid {tuple(card.grid)} differs from its members' {cards[0].grid}")
    if card.recipe != cards[0].recipe:
        raise CheckpointError(f"{label}: ensemble card recipe differs from its members' recipe")
    hashes = tuple(member_card.weights_sha256 for member_card in cards)
    if card.members_sha256 and card.members_sha256 != hashes:
        raise CheckpointError(f"{label}: ensemble card members_sha256 does not list its members' weights in order")
    affines = [calibrated_logit_affine(member_card.calibration) for member_card in cards]
    model = Res25Ensemble([model for model, _ in built], affines).eval()
    return LoadedEnsemble(model, card, cards)


def served_card(loaded: LoadedEnsemble) -> ModelCard:
    """The node card under which an ensemble is served (see "Served card" in the module docstring)."""
    card, members = loaded.card, loaded.member_cards
    training = dict(card.training)
    training["ensemble_members"] = [
        {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256} for m in members
    ]
    try:
        return ModelCard(
            name=card.name,
            version=card.version,
            architecture=members[0].architecture,
            grid=tuple(card.grid),  # type: ignore[arg-type]
            recipe=card.recipe,
            precision=card.precision,
            threshold=card.threshold,
            calibration=card.calibration,
            training=training,
            weights_sha256=weights_sha256(loaded.model.state_dict()),
            demonstration=any(m.demonstration for m in members),
            recipe_from_checkpoint=all(m.recipe_from_checkpoint for m in members),
            bf16_check=card.bf16_check,
        )
    except ValueError as exc:
        raise CheckpointError(f"ensemble {card.name} {card.version}: invalid card: {exc}") from exc


def load_ensemble_payload(payload: Mapping[str, Any], label: str) -> LoadedModel:
    """What :func:`inference.model.checkpoint.load_checkpoint` returns for an ensemble file."""
    loaded = build_ensemble(payload, label)
    logger.info("%s: fold ensemble of %d networks (%s)", label, len(loaded.member_cards),
                ", ".join(f"{m.name} {m.version}" for m in loaded.member_cards))
    return LoadedModel(loaded.model, served_card(loaded), "ensemble", (), loaded.member_cards)


def load_ensemble(path: Path) -> LoadedEnsemble:
    """Read an ensemble file with its own card (training and evaluation; serving uses ``load_checkpoint``)."""
    path = Path(path)
    return build_ensemble(read_payload(path), path.name)
