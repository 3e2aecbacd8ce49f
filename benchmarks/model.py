"""Benchmark the res25 forward: batched (the node's) against slice by slice (the original's order).

Both paths run the SAME modules with the SAME weights in the same process:

* ``original_loop_fp32`` -- :func:`inference.model.res25.slice_by_slice_forward`: one trunk call
  per single slice, a group at a time, the shared attention per group, plain NCHW tensors; what
  the published ``_forward_impl`` does (minus its inference-time dropout);
* ``ours_fp32`` -- :meth:`Res25.forward`: all ``batch x 25`` slices through the trunk in one call,
  channels-last weights, ``torch.inference_mode()``;
* ``ours_fp32_folded`` -- the same with batch norms folded into the convolutions
  (:func:`inference.model.runtime.fold_batch_norm`);
* ``ours_bf16`` -- ``ours_fp32`` under CPU bf16 autocast (only fast with native bf16
  instructions: AVX512-BF16 or AMX).

Repetitions are interleaved (every configuration once per round) so that load from other
processes hits all of them alike; the report gives medians and ratios to the original loop,
the largest output differences to the original loop, and the decisions that bf16 changes
compared with fp32 at the card's threshold (after its calibration). For a meaningful flip count
pass a trained checkpoint (``--checkpoint``) and its preprocessed inputs (``--inputs``, an
``.npy`` array ``(N, C, S, H, W)``); otherwise seeded demonstration weights and random inputs are
used.

Usage::

    .venv/bin/python benchmarks/model.py [--variant nonlocal] [--reps 5] [--threads 2]
        [--checkpoint PATH --inputs cases.npy] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.model import LoadedModel, Res25Config, Res25Output, demonstration_model, load_checkpoint  # noqa: E402
from inference.model.precision import Bf16Check, cpu_has_native_bf16  # noqa: E402
from inference.model.res25 import Res25, slice_by_slice_forward  # noqa: E402
from inference.model.runtime import autocast, fold_batch_norm, prepare  # noqa: E402

BASELINE = "original_loop_fp32"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("nonlocal", "plain"), default="nonlocal",
                        help="variant of the demonstration weights (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="node-format or original checkpoint to benchmark")
    parser.add_argument("--inputs", type=Path, help=".npy (N, C, S, H, W) preprocessed cases for the flip count")
    parser.add_argument("--trained-phantom", type=Path, metavar="WORKDIR",
                        help="train (or reuse) the training issue's phantom-cohort checkpoint in WORKDIR and use it "
                             "with its preprocessed cases (sets --checkpoint and --inputs)")
    parser.add_argument("--batch", type=int, default=1, help="cases per forward (default 1: one study)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds of the fp32 configurations")
    parser.add_argument("--bf16-reps", type=int, default=3, help="rounds that include bf16 (slow without native bf16)")
    parser.add_argument("--flip-cases", type=int, default=8, help="random cases for the flip count without --inputs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-bf16", action="store_true", help="skip bf16")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def trained_phantom(workdir: Path) -> tuple[Path, Path]:
    """The test suite's trained phantom checkpoint (same cohort and config) and its preprocessed cases."""
    from inference.training.phantoms import write_cohort
    from inference.training.train import train_manifest
    from tests.training_support import COHORT_CASES, COHORT_SEED, TRAIN_CONFIG

    out_dir, cache_dir = workdir / "run", workdir / "cache"
    if not (out_dir / "fold0.pt").exists():
        manifest = write_cohort(workdir / "cohort", COHORT_CASES, seed=COHORT_SEED)
        train_manifest(manifest, out_dir, TRAIN_CONFIG, cache_dir=cache_dir)
    arrays = [np.load(path) for path in sorted(cache_dir.rglob("*.npy"))]
    cases = workdir / "cases.npy"
    np.save(cases, np.stack(arrays).astype(np.float32))
    return out_dir / "fold0.pt", cases


def load(args: argparse.Namespace) -> LoadedModel:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)
    return demonstration_model(Res25Config(variant=args.variant))


def random_cases(n: int, loaded: LoadedModel, seed: int) -> Tensor:
    grid = loaded.card.grid
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, loaded.card.architecture.in_channels, *grid, generator=generator)


def interleaved(configs: dict[str, Callable[[], Res25Output]], reps: int, bf16_reps: int) -> dict[str, list[float]]:
    """Seconds per call, every configuration once per round (bf16 only in the first ``bf16_reps``)."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for name, call in configs.items():  # warm-up: oneDNN primitive creation, allocator
        call()
    for round_index in range(reps):
        for name, call in configs.items():
            if "bf16" in name and round_index >= bf16_reps:
                continue
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def differences(reference: Res25Output, other: Res25Output) -> dict[str, float]:
    rel_aux = (other.aux_logits - reference.aux_logits).abs() / reference.aux_logits.abs().clamp_min(1e-6)
    return {
        "logits_max_abs": float((other.logits.float() - reference.logits).abs().max()),
        "slice_weights_max_abs": float((other.slice_weights.float() - reference.slice_weights).abs().max()),
        "aux_logits_max_rel": float(rel_aux.max()),
    }


def decisions(loaded: LoadedModel, logits: Tensor) -> list[bool]:
    card = loaded.card
    return [card.calibration.apply(float(z)) >= card.threshold for z in logits.reshape(-1)]


def flip_count(loaded: LoadedModel, model: Res25, cases: Tensor, batch: int) -> dict[str, Any]:
    """fp32 vs bf16 decisions of the node's path on ``cases``."""
    fp32, bf16 = [], []
    device = torch.device("cpu")
    with torch.inference_mode():
        for start in range(0, cases.shape[0], batch):
            chunk = cases[start:start + batch]
            fp32.append(model(chunk).logits.float())
            with autocast(device, "bf16"):
                bf16.append(model(chunk).logits.float())
    z32, z16 = torch.cat(fp32), torch.cat(bf16)
    card = loaded.card
    check = Bf16Check.from_scores([card.calibration.apply(float(z)) for z in z32.reshape(-1)],
                                  [card.calibration.apply(float(z)) for z in z16.reshape(-1)],
                                  card.threshold, card.weights_sha256)
    return {
        "cases": check.cases,
        "flips": check.decisions_changed,
        "positives_fp32": sum(decisions(loaded, z32)),
        "logit_max_abs_diff": float((z32 - z16).abs().max()),
        "score_max_abs_diff": check.max_abs_score_difference,
        "native_bf16": cpu_has_native_bf16(),
        "threshold": loaded.card.threshold,
        "calibration": loaded.card.calibration.method,
        "trained": not loaded.card.demonstration,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trained_phantom:
        args.checkpoint, args.inputs = trained_phantom(args.trained_phantom)
    loaded = load(args)
    plain = copy.deepcopy(loaded.model).eval()  # NCHW weights, as the original runs
    ours = prepare(loaded.model, torch.device("cpu"), channels_last=True)
    folded = fold_batch_norm(ours)
    volumes = random_cases(args.batch, loaded, seed=2024)
    cpu = torch.device("cpu")

    def bf16_call() -> Res25Output:
        with autocast(cpu, "bf16"):
            return ours(volumes)

    configs: dict[str, Callable[[], Res25Output]] = {
        BASELINE: lambda: slice_by_slice_forward(plain, volumes),
        "ours_fp32": lambda: ours(volumes),
        "ours_fp32_folded": lambda: folded(volumes),
    }
    if not args.no_bf16:
        configs["ours_bf16"] = bf16_call
    with torch.inference_mode():
        outputs = {name: call() for name, call in configs.items()}
        times = interleaved(configs, args.reps, args.bf16_reps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": args.threads, "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__},
        "model": {"name": loaded.card.name, "variant": loaded.card.variant, "grid": list(loaded.card.grid),
                  "demonstration": loaded.card.demonstration, "batch": args.batch},
        "seconds": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "median_s": {name: round(v, 4) for name, v in medians.items()},
        "speedup_vs_original_loop": {name: round(medians[BASELINE] / v, 3) for name, v in medians.items()},
        "diff_vs_original_loop": {name: differences(outputs[BASELINE], out) for name, out in outputs.items() if name != BASELINE},
    }
    if not args.no_bf16:
        if args.inputs:
            cases = torch.from_numpy(np.load(args.inputs)).float()
        else:
            cases = random_cases(args.flip_cases, loaded, seed=7)
        result["bf16_decision_flips"] = flip_count(loaded, ours, cases, args.batch)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
