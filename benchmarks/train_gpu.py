"""Training throughput of the FULL-size res25 on one fold of synthetic data (GPU job).

Runs the training code of ``inference.training.train`` -- the same ``TrainStep`` (bf16 autocast
on CUDA, deep supervision, class-balanced BCE, AdamW + cosine) and ``augment`` that
``fpe-node train`` uses -- for ``--steps`` optimisation steps on random, label-shifted volumes of
the paper's grid (3 x 25 x 224 x 224), and prints one JSON object (steps/s, cases/s, peak CUDA
memory) to stdout and to ``$OUT/train_gpu.json`` when ``$OUT`` is set.

    python benchmarks/train_gpu.py --steps 300 --batch 4            # on a GPU machine
    python benchmarks/train_gpu.py --steps 2 --device cpu            # smoke check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from inference.model.res25 import Res25  # noqa: E402
from inference.training.train import (  # noqa: E402
    FULL_GRID,
    TrainConfig,
    TrainStep,
    augment,
    device_generator,
    make_optimiser,
    pick_device,
    training_precision,
)


def synthetic_batch(batch_size: int, grid: tuple[int, int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random volumes whose mean shifts with the label (so the loss can fall)."""
    labels = (torch.rand(batch_size, generator=generator) < 0.5).float()
    volumes = torch.randn(batch_size, 3, *grid, generator=generator) + 0.5 * labels[:, None, None, None, None]
    return volumes, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed optimisation steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: min(10, steps))")
    parser.add_argument("--batch", type=int, default=4, help="cases per step")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--variant", choices=("nonlocal", "plain"), default="nonlocal")
    parser.add_argument("--pool", type=int, default=8, help="distinct synthetic batches made up front (host RAM)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    config = TrainConfig(model_size="full", variant=args.variant, batch_size=args.batch, device=args.device)
    architecture = config.architecture(FULL_GRID)
    torch.manual_seed(0)
    model = Res25(config=architecture).to(device)
    optimiser, scheduler = make_optimiser(model, config, args.steps)
    precision = training_precision(device)
    step = TrainStep(model, optimiser, scheduler, torch.tensor(1.0, device=device), config, device, precision)
    generator = torch.Generator().manual_seed(0)
    noise_generator = generator if device.type == "cpu" else device_generator(0, device)
    pool = [synthetic_batch(args.batch, FULL_GRID, generator) for _ in range(max(1, min(args.pool, args.steps)))]
    if device.type == "cuda":
        pool = [(v.pin_memory(), y.pin_memory()) for v, y in pool]
        torch.cuda.reset_peak_memory_stats(device)
    warmup = min(10, args.steps) if args.warmup is None else args.warmup

    def one(index: int) -> float:
        volumes, labels = pool[index % len(pool)]
        batch = volumes.to(device, non_blocking=True)
        targets = labels.to(device, non_blocking=True)
        return step(augment(batch, generator, config.augment, noise_generator), targets)

    for index in range(warmup):
        one(index)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = [one(index) for index in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "benchmark": "train_gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": precision,
        "variant": args.variant,
        "grid": list(FULL_GRID),
        "batch": args.batch,
        "warmup_steps": warmup,
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(args.steps / seconds, 4),
        "cases_per_s": round(args.steps * args.batch / seconds, 3),
        "peak_cuda_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    text = json.dumps(result)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "train_gpu.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
