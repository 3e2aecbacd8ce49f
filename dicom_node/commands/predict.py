"""``fpe-node predict PATH...``: the node's prediction, offline, for folders of DICOM or NIfTI.

DICOM: every file under the given paths is read; selection picks the pipeline and series
exactly as the node does (same rules, case window and pipeline preference from the settings;
roles required by the served recipe), then the predictor runs. NIfTI: one volume per role,
``--nifti dwi=dwi.nii.gz adc=adc.nii.gz flair=flair.nii.gz`` (or ``ncct=... cta=...``).

The JSON written (``--out`` or stdout) holds the score (``probability`` only for a calibrated
model), threshold, decision, model identity, series used, per-stage timings and warnings; see
:func:`inference.predictor.result_summary`. Exit status: 0 analysed, 1 not analysed, 2 bad
arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, get_args

from dicom_node.selector import build_selector
from dicom_node.settings import Settings
from inference.case import dicom_case, nifti_case
from inference.model.checkpoint import CheckpointError
from inference.predictor import CaseInput, Predictor, result_summary
from inference.result import NotAnalysed, Role

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = get_args(Role)


def register(subparsers: Any) -> None:
    """Add the ``predict`` sub-command."""
    parser = subparsers.add_parser(
        "predict", help="predict offline for folders of DICOM or NIfTI volumes and write JSON (research use only)"
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="DICOM files or folders (walked)")
    parser.add_argument(
        "--nifti", nargs="+", metavar="ROLE=FILE", default=[],
        help=f"NIfTI volumes by role ({', '.join(ROLES)}) instead of DICOM",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: settings' inference.checkpoint)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: settings' inference.device")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: settings' inference.precision")
    parser.set_defaults(func=run)


def parse_nifti(items: list[str]) -> dict[Role, Path]:
    """``ROLE=FILE`` arguments to a mapping; raises ``ValueError`` naming a bad item."""
    roles: dict[Role, Path] = {}
    for item in items:
        role, sep, path = item.partition("=")
        if not sep or role not in ROLES or not path:
            raise ValueError(f"--nifti expects ROLE=FILE with ROLE one of {', '.join(ROLES)}, got {item!r}")
        if not Path(path).is_file():
            raise ValueError(f"--nifti {role}: no such file {path}")
        roles[role] = Path(path)  # type: ignore[index]
    return roles


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Predict and write the JSON summary."""
    if bool(args.paths) == bool(args.nifti):
        print("fpe-node predict: give DICOM paths or --nifti ROLE=FILE..., not both or neither", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"fpe-node predict: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    inference = settings.inference
    try:
        nifti = parse_nifti(args.nifti)
        predictor = Predictor.load(
            args.checkpoint or inference.checkpoint,
            device=args.device or inference.device,
            precision=args.precision or inference.precision,
            torch_threads=inference.torch_threads,
        )
        case: CaseInput | NotAnalysed
        if nifti:
            case = nifti_case(nifti)
        else:
            case = dicom_case(args.paths, build_selector(settings, predictor.recipe))
    except (ValueError, CheckpointError, FileNotFoundError) as exc:
        print(f"fpe-node predict: {exc}", file=sys.stderr)
        return 2
    result = case if isinstance(case, NotAnalysed) else predictor.predict(case)
    text = json.dumps(result_summary(result), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    if isinstance(result, NotAnalysed):
        log.warning("not analysed: %s", result.reason)
        return 1
    return 0
