"""The fold ensemble that ``fpe-node train`` writes: re-exported from :mod:`inference.model.ensemble`.

The model, the file format, the writer (:func:`save_ensemble`) and the readers live with the
node's other checkpoints, so the node serves exactly what training wrote; this module keeps the
training code's import path.
"""

from inference.model.ensemble import (
    ENSEMBLE_FORMAT,
    ENSEMBLE_FORMAT_VERSION,
    EnsembleCard,
    LoadedEnsemble,
    Res25Ensemble,
    calibrated_logit_affine,
    is_ensemble,
    load_ensemble,
    save_ensemble,
)

__all__ = [
    "ENSEMBLE_FORMAT",
    "ENSEMBLE_FORMAT_VERSION",
    "EnsembleCard",
    "LoadedEnsemble",
    "Res25Ensemble",
    "calibrated_logit_affine",
    "is_ensemble",
    "load_ensemble",
    "save_ensemble",
]
