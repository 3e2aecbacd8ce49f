"""Trained weights for the test suite: the phantom cohort, cross-validated once per session.

Other end-to-end tests that want trained weights instead of the demonstration model import
:func:`trained_checkpoint` and call it from a session fixture of their own::

    from tests.training_support import TrainedModel, trained_checkpoint

    @pytest.fixture(scope="session")
    def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
        return trained_checkpoint(tmp_path_factory)

``trained_model.checkpoint`` is a node-format checkpoint (fold 0) with its card, recipe,
threshold and calibration; ``trained_model.manifest`` lists the NIfTI phantom cases.
Everything is seeded: the same code and seed give bit-identical checkpoints on CPU. Under
xdist the first worker that asks trains, the others wait on a lock file and reuse its output.

The model: reduced res25 (widths 8-16-32-64), MR pipeline (ADC, DWI, FLAIR) on a 10 x 32 x 32
grid, trained on 40 phantom cases (:mod:`inference.training.phantoms`) with 5-fold CV.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from inference.training.phantoms import write_cohort
from inference.training.train import TrainConfig, train_manifest

COHORT_CASES = 40
COHORT_SEED = 0
TRAIN_CONFIG = TrainConfig(epochs=12, patience=5, min_epochs=5, learning_rate=3e-3, device="cpu", seed=0)
SHUFFLED_CONFIG = TrainConfig(epochs=6, patience=3, min_epochs=3, learning_rate=3e-3, device="cpu", seed=0)


@dataclass(frozen=True)
class TrainedModel:
    """Outputs of the session's training run."""

    root: Path
    manifest: Path  # the phantom cohort (NIfTI MR cases)
    out_dir: Path  # fpe-node train output
    cache_dir: Path  # preprocessing cache (shared with evaluation)
    checkpoint: Path  # fold 0, node checkpoint format (what the predictor serves)
    ensemble: Path  # the fold ensemble
    summary: dict  # cv_summary.json


def _done_marker(out_dir: Path) -> Path:
    return out_dir / "DONE"


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """Train (or reuse, across xdist workers) the phantom cohort model of this test session."""
    basetemp = tmp_path_factory.getbasetemp()
    # Under xdist each worker's basetemp sits in the session's common folder; alone, use our own.
    shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    root = shared / "fpe-trained-phantom"
    root.mkdir(exist_ok=True)
    out_dir = root / "run"
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _done_marker(out_dir).exists():
                _train(root, out_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return TrainedModel(
        root=root,
        manifest=root / "cohort" / "manifest.csv",
        out_dir=out_dir,
        cache_dir=root / "cache",
        checkpoint=out_dir / "fold0.pt",
        ensemble=out_dir / "ensemble.pt",
        summary=json.loads((out_dir / "cv_summary.json").read_text()),
    )


def _train(root: Path, out_dir: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = write_cohort(root / "cohort", COHORT_CASES, seed=COHORT_SEED)
        train_manifest(manifest, out_dir, TRAIN_CONFIG, cache_dir=root / "cache")
    finally:
        torch.set_num_threads(threads)
    _done_marker(out_dir).write_text("ok\n")



REDUCED_GRID = (10, 32, 32)


def reduced_checkpoint(path: Path, *, name: str = "res25-test", seed: int = 5) -> Path:
    """A cheap, non-demonstration node checkpoint: seeded reduced res25 on a 10 x 32 x 32 grid with
    the default recipe (CT needs NCCT + CTA, MR needs DWI + ADC + FLAIR). Its results leave the node
    like a site's; the values mean nothing, but they are deterministic (same seed, same weights)."""
    from inference.model.checkpoint import ModelCard, save_checkpoint
    from inference.model.res25 import Res25, Res25Config, seeded_init_
    from inference.recipe import DEFAULT_RECIPE

    config = Res25Config.reduced(n_slices=REDUCED_GRID[0])
    model = seeded_init_(Res25(config=config), seed=seed).eval()
    card = ModelCard(name=name, version="1", architecture=config, grid=REDUCED_GRID,
                     recipe=DEFAULT_RECIPE.with_grid(REDUCED_GRID).to_dict())
    save_checkpoint(path, model, card)
    return path
