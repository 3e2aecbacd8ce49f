"""``fpe-node evaluate CHECKPOINT MANIFEST --out DIR``: validate a checkpoint on a cohort.

Scores the manifest's ``test`` rows (all rows when it has none) with the checkpoint -- a node
checkpoint or a fold ensemble from ``fpe-node train`` -- through the serving preprocessing, and
writes ``report.json``, ``report.txt``, ``per_case.csv``, ``roc.png`` and ``calibration.png``:
ROC-AUC, sensitivity and specificity at the stored threshold with 95% bootstrap intervals,
Brier score and reliability curve, the card's cross-validation summary, and how many decisions
change under bf16. ``--record-bf16`` writes that comparison into the checkpoint's card (weights
unchanged): a CPU with native bf16 then serves the model in bf16 when no decision changed
(``inference.precision: auto``, :mod:`inference.model.precision`). See
:mod:`inference.training.evaluate`. Research use only, not for diagnosis.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser("evaluate", help="evaluate a checkpoint on a cohort manifest")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="node checkpoint or ensemble.pt")
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="cohort CSV")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16-versus-fp32 comparison")
    parser.add_argument("--record-bf16", action="store_true",
                        help="write the bf16-versus-fp32 comparison into the checkpoint's card (lets CPUs with "
                             "native bf16 serve bf16 when no decision changed)")
    parser.add_argument("--cache", type=Path, help="preprocessing cache folder (default OUT/cache)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate; exit 0 on success, 2 for a bad manifest, checkpoint or arguments."""
    import torch

    from inference.model.checkpoint import CheckpointError
    from inference.training.evaluate import evaluate_manifest, format_report
    from inference.training.manifest import ManifestError

    if settings.inference.torch_threads:
        torch.set_num_threads(settings.inference.torch_threads)
    if args.record_bf16 and args.no_bf16:
        print("fpe-node evaluate: --record-bf16 needs the bf16 comparison (drop --no-bf16)")
        return 2
    if not args.checkpoint.is_file():
        print(f"fpe-node evaluate: checkpoint {args.checkpoint} does not exist")
        return 2
    try:
        evaluation = evaluate_manifest(
            args.checkpoint, args.manifest, args.out,
            cache_dir=args.cache,
            case_window_h=settings.inference.case_window_h,
            n_resamples=args.bootstrap, seed=args.seed, compare_bf16=not args.no_bf16,
            record_bf16=args.record_bf16,
        )
    except (ManifestError, CheckpointError, ValueError) as exc:
        print(f"fpe-node evaluate: {exc}")
        return 2
    print(format_report(evaluation.report), end="")
    print(f"report written to {args.out}")
    if args.record_bf16:
        print(f"bf16 check recorded in the card of {args.checkpoint}")
    return 0
