"""``fpe-node train MANIFEST --out DIR``: cross-validate the FPE model on a site's cohort.

Validates the whole manifest first (every bad row named, nothing trained), preprocesses each
case with the serving recipe (cached under ``--cache``, default ``DIR/cache``), runs stratified
k-fold cross-validation and writes ``fold<k>.pt`` (node checkpoints with model cards),
``ensemble.pt`` (the fold ensemble), ``cv_summary.json`` and ``oof_predictions.csv`` to DIR.
See :mod:`inference.training.train`. Research use only, not for diagnosis.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser("train", help="cross-validate the model on a cohort manifest")
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="cohort CSV (see inference.training.manifest)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, summary)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation, augmentation")
    parser.add_argument("--epochs", type=int, default=40, help="maximum epochs per fold")
    parser.add_argument("--patience", type=int, default=10, help="early stopping: epochs without improvement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine schedule)")
    parser.add_argument("--aux-weight", type=float, default=0.3, help="weight of the auxiliary group heads")
    parser.add_argument("--calibration", choices=("platt", "temperature", "none"), default="platt")
    parser.add_argument("--model-size", choices=("small", "full"), default="small",
                        help="small: reduced widths and grid (CPU); full: the paper's ResNet-34 on 25x224x224")
    parser.add_argument("--variant", choices=("nonlocal", "plain"), default="nonlocal")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("SLICES", "ROWS", "COLUMNS"),
                        help="model grid (default 10 32 32 small, 25 224 224 full)")
    parser.add_argument("--modality", choices=("CT", "MR"), help="pipeline to train when the manifest holds both")
    parser.add_argument("--cache", type=Path, help="preprocessing cache folder (default OUT/cache)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: settings inference.device")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Train; exit 0 on success, 2 for a bad manifest or arguments."""
    import torch

    from inference.training.train import TrainConfig, train_manifest

    if settings.inference.torch_threads:
        torch.set_num_threads(settings.inference.torch_threads)
    try:
        config = TrainConfig(
            folds=args.folds, seed=args.seed, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
            learning_rate=args.lr, aux_weight=args.aux_weight, calibration=args.calibration,
            model_size=args.model_size, variant=args.variant, device=args.device or settings.inference.device,
        )
        result = train_manifest(
            args.manifest, args.out, config,
            grid=tuple(args.grid) if args.grid else None,
            modality=args.modality,
            cache_dir=args.cache,
            case_window_h=settings.inference.case_window_h,
            progress=log.info,
        )
    except ValueError as exc:  # ManifestError (every bad row named) is a ValueError too
        print(f"fpe-node train: {exc}")
        return 2
    summary = result.summary
    for key, value in summary["cv_mean_sd"].items():
        print(f"CV {key}: {value['text']} (mean (SD) across {value['n_folds']} folds)")
    print("pooled out-of-fold: " + json.dumps(summary["pooled_out_of_fold"]))
    print(f"wrote {args.out / 'ensemble.pt'} and {config.folds} fold checkpoints; research use only, not for diagnosis")
    return 0
