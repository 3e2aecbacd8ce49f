"""The res25 network, its checkpoints, fold ensembles and how it runs (see ``res25``, ``checkpoint``, ``ensemble``, ``runtime``)."""

from inference.model.calibration import Calibration
from inference.model.checkpoint import (
    CheckpointError,
    LoadedModel,
    ModelCard,
    demonstration_model,
    load_checkpoint,
    load_model,
    load_original_state_dict,
    save_checkpoint,
    weights_sha256,
)
from inference.model.ensemble import EnsembleCard, Res25Ensemble, save_ensemble
from inference.model.res25 import Res25, Res25Config, Res25Output

__all__ = [
    "Calibration",
    "CheckpointError",
    "EnsembleCard",
    "LoadedModel",
    "ModelCard",
    "Res25",
    "Res25Config",
    "Res25Ensemble",
    "Res25Output",
    "demonstration_model",
    "load_checkpoint",
    "load_model",
    "load_original_state_dict",
    "save_checkpoint",
    "save_ensemble",
    "weights_sha256",
]
