"""Inference throughput of the full-size res25 on a GPU: studies per second in fp32 and bf16.

One "study" is one model input (3 x 25 x 224 x 224), the forward the node runs per case
(``inference.model.runtime.run``: eval, inference mode, channels-last, autocast for bf16).
Batch 1 is what the node does per study as it arrives; larger batches show what a backlog can
reach. Also counts how many decisions (logit >= 0) differ between fp32 and bf16 on the same
inputs. Prints one JSON object, also written to ``$OUT/gpu_throughput.json`` when ``$OUT`` is set.

    python benchmarks/gpu_throughput.py                   # on a GPU machine
    python benchmarks/gpu_throughput.py --device cpu --repeats 1 --batches 1   # smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from inference.model import demonstration_model  # noqa: E402
from inference.model.runtime import prepare, run  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(model: torch.nn.Module, volumes: torch.Tensor, device: torch.device, precision: str,
                  repeats: int) -> tuple[float, torch.Tensor]:
    logits = run(model, volumes, device, precision).logits  # warm-up (cuDNN autotune, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        logits = run(model, volumes, device, precision).logits
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), logits.float().cpu()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variant", choices=("nonlocal", "plain"), default="nonlocal")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    loaded = demonstration_model()
    model = prepare(loaded.model, device)
    generator = torch.Generator().manual_seed(2024)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "variant": loaded.model.config.variant if hasattr(loaded.model, "config") else args.variant,
        "input": [3, 25, 224, 224],
        "runs": [],
    }
    runs: list[dict[str, object]] = []
    for batch in args.batches:
        volumes = torch.randn(batch, 3, 25, 224, 224, generator=generator)
        entry: dict[str, object] = {"batch": batch}
        logits = {}
        for precision in ("fp32", "bf16"):
            seconds, logits[precision] = _time_forward(model, volumes, device, precision, args.repeats)
            entry[f"{precision}_s_per_batch"] = round(seconds, 5)
            entry[f"{precision}_studies_per_s"] = round(batch / seconds, 2)
        entry["bf16_speedup"] = round(float(entry["fp32_s_per_batch"]) / float(entry["bf16_s_per_batch"]), 2)  # type: ignore[arg-type]
        entry["max_abs_logit_diff"] = float((logits["fp32"] - logits["bf16"]).abs().max())
        entry["decision_flips"] = int(((logits["fp32"] >= 0) != (logits["bf16"] >= 0)).sum())
        runs.append(entry)
        print(json.dumps(entry), flush=True)
    result["runs"] = runs
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_throughput.json").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
