"""Benchmark the whole prediction pipeline, stage by stage, on a large CT case, uncompressed and JPEG 2000.

The case: a synthetic code-stroke CT from ``tests/factory.py`` at 512 x 512, an NCCT of about
300 slices and a CTA of about 500 slices, the CTA in its own rotated and shifted frame of
reference so registration really runs. It is written once into ``--data`` (Explicit VR Little
Endian), together with a copy of every file re-encoded as JPEG 2000 Lossless (PS3.5 A.4.4, by
pydicom's pylibjpeg-openjpeg encoder), and reused by later runs; neither is part of the
repository.

Both cases run end to end, side by side: ``load`` (headers of every file), ``select``,
``decode`` (pixel data of the chosen series), ``volume`` (sorting, checks, stacking),
``register`` (CTA onto NCCT), ``preprocess`` (mask, crop, resampling, windows), ``infer``
(full-size res25 forward on 25 x 224 x 224, fp32, ``torch.inference_mode()``), ``attention``
(Grad-CAM, mapping back onto the 300 NCCT planes, peak outline). Target: each case's total
< 10 s on the project's 2-core machine.

Each contender (a case, and with ``--baseline-tree`` the same case run by the code of another
checkout) is one child process that loads the model once, runs once to warm up (oneDNN
primitives, file cache, the decoding pool) and then runs when told; rounds rotate the order of
the contenders, as ``benchmarks/ingest.py`` does, so machine load falls on all alike. Figures
are medians over ``--reps`` rounds (seconds): the stages, their ``total``, the run's
``wall_s`` and ``cpu_s`` (the child's CPU time, all threads, its decoding processes included:
a figure other processes' load does not inflate). Ratios: JPEG 2000 / uncompressed per tree,
and this tree / baseline per case (median of per-round ratios of ``total``; < 1 is faster).
``same_output_every_run`` says whether every run of a contender (warm-up included) gave the same
logit, outputs and attention maps bit for bit, ``same_output_as`` whether two contenders did.
The 1-minute load average before and after is reported: the machine is shared.

Usage::

    .venv/bin/python benchmarks/pipeline.py [--data /tmp/fpe-bench] [--reps 3] [--threads 2]
        [--baseline-tree DIR] [--json out.json]

``--baseline-tree`` is a checkout of another revision (``git archive main | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CASES = ("uncompressed", "jpeg2000")


# --------------------------------------------------------------------------- data (this tree's factory)


def make_case(data: Path, rows: int, ncct: int, cta: int) -> Path:
    """Write the CT case once (a marker file says it is complete)."""
    sys.path.insert(0, str(ROOT))
    from tests.factory import write_ct_stroke_study

    folder = data / f"ct_{rows}_{ncct}_{cta}_v2"
    marker = folder / "COMPLETE"
    if marker.exists():
        return folder
    started = time.perf_counter()
    write_ct_stroke_study(
        folder, rows=rows, thin_slices=ncct, thin_spacing=0.5, cta_slices=cta, cta_spacing=0.5,
        with_thick=False, with_localizer=False, with_dose_report=False, with_reformats=False, with_mips=False,
    )
    marker.write_text("ok\n")
    print(f"wrote the case in {time.perf_counter() - started:.0f} s: {folder}", file=sys.stderr)
    return folder


def make_j2k_copy(folder: Path) -> Path:
    """Every file of ``folder`` re-encoded as JPEG 2000 Lossless, once (same series, same UIDs)."""
    sys.path.insert(0, str(ROOT))
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from tests.factory import write_datasets

    target = folder.with_name(folder.name + "_j2k")
    marker = target / "COMPLETE"
    if marker.exists():
        return target
    started = time.perf_counter()
    for series in sorted(p for p in folder.iterdir() if p.is_dir()):
        datasets = [pydicom.dcmread(path) for path in sorted(series.iterdir())]
        write_datasets(datasets, target / series.name, JPEG2000Lossless)
    marker.write_text("ok\n")
    print(f"wrote the JPEG 2000 copy in {time.perf_counter() - started:.0f} s: {target}", file=sys.stderr)
    return target


# --------------------------------------------------------------------------- one contender (child process)


def serve_case(tree: Path, folder: Path, threads: int) -> int:
    """Child: load the model from ``tree``'s code, warm up, then run once per ``run`` line on stdin."""
    sys.path.insert(0, str(tree))
    import numpy as np
    import torch

    from inference.case import dicom_case
    from inference.predictor import STAGES, CaseInput, Predictor
    from inference.result import Prediction
    from inference.selection import Selector

    torch.set_num_threads(threads)
    predictor = Predictor.load(None, device="cpu")  # full-size res25, demonstration weights
    selector = Selector(required_roles={p: predictor.recipe.for_pipeline(p).required_roles for p in ("CT", "MR")})

    def digest(result: Prediction) -> str:
        """SHA-256 of the logit, outputs and attention maps (not of UIDs: the JPEG 2000 copy has its own)."""
        sha = hashlib.sha256()
        sha.update(repr((result.logit, result.score, result.aux_scores, result.slice_weights)).encode())
        for plane in result.attention:
            sha.update(np.ascontiguousarray(plane.heat).tobytes())
        peak = result.peak
        if peak is not None:
            sha.update(repr((peak.model_slice, peak.row, peak.column, peak.outline, peak.region)).encode())
        return sha.hexdigest()

    def run_once() -> dict[str, Any]:
        cpu_started = _cpu_s()
        wall_started = time.perf_counter()
        case = dicom_case([folder], selector)
        assert isinstance(case, CaseInput), case
        result = predictor.predict(case)
        assert isinstance(result, Prediction), result
        timings: dict[str, Any] = {stage: result.timings_s.get(stage, 0.0) for stage in STAGES}
        timings["total"] = sum(timings.values())
        timings["wall_s"] = time.perf_counter() - wall_started
        timings["cpu_s"] = _cpu_s() - cpu_started
        timings["digest"] = digest(result)
        return timings

    print(json.dumps({"warm_up": run_once()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(run_once()), flush=True)
    return 0


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its finished or waited-for children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system + _live_children_cpu_s()


def _live_children_cpu_s() -> float:
    """CPU seconds of this process's live child processes (the decoding pool), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    pending = children.read_text().split() if children.exists() else []
    while pending:
        pid = pending.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            pending += Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, IndexError, ValueError):
            continue
    return total


class Contender:
    """A child process serving one (tree, case) pair."""

    def __init__(self, name: str, tree: Path, folder: Path, threads: int) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
        env["PYTHONPATH"] = str(tree)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-case", str(folder), "--tree", str(tree),
             "--threads", str(threads)],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.warm_up = self._answer()["warm_up"]
        self.runs: list[dict[str, Any]] = []

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the child process ended (exit {self.process.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.runs.append(self._answer())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(60)

    def medians(self) -> dict[str, float]:
        keys = [k for k in self.runs[0] if k != "digest"]
        return {k: round(statistics.median(run[k] for run in self.runs), 3) for k in keys}

    def digests(self) -> set[str]:
        return {self.warm_up["digest"], *(run["digest"] for run in self.runs)}


def _paired_ratio(mine: Contender, other: Contender) -> float:
    return round(statistics.median(a["total"] / b["total"] for a, b in zip(mine.runs, other.runs)), 3)


def machine() -> dict[str, Any]:
    """The CPU model, whether it has AVX512-BF16, and the cores this process may use."""
    model = platform.processor()
    flags = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), model)
        flags = lscpu
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "cores": len(os.sched_getaffinity(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fpe-bench"))
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--ncct", type=int, default=300)
    parser.add_argument("--cta", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-tree", type=Path, help="also run both cases with the code of this checkout")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-case", type=Path, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--tree", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_case:
        return serve_case(args.tree.resolve(), args.serve_case, args.threads)
    folder = make_case(args.data, args.rows, args.ncct, args.cta)
    folders = {"uncompressed": folder, "jpeg2000": make_j2k_copy(folder)}
    trees = {"this": ROOT}
    if args.baseline_tree is not None:
        trees["baseline"] = args.baseline_tree.resolve()
    load_before = os.getloadavg()[0]
    contenders = [Contender(f"{tree}/{case}", path, folders[case], args.threads) for tree, path in trees.items() for case in CASES]
    try:
        for number in range(args.reps):
            shift = number % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender.run()
    finally:
        for contender in contenders:
            contender.close()
    by_name = {c.name: c for c in contenders}
    ratios: dict[str, float] = {}
    for tree in trees:
        ratios[f"{tree}: jpeg2000 / uncompressed"] = _paired_ratio(by_name[f"{tree}/jpeg2000"], by_name[f"{tree}/uncompressed"])
    if "baseline" in trees:
        for case in CASES:
            ratios[f"{case}: this / baseline"] = _paired_ratio(by_name[f"this/{case}"], by_name[f"baseline/{case}"])
    report: dict[str, Any] = {
        "case": {"rows": args.rows, "ncct_slices": args.ncct, "cta_slices": args.cta},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "threads": args.threads,
        "trees": {name: str(path) for name, path in trees.items()},
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "reps": args.reps,
        "median_s": {c.name: c.medians() for c in contenders},
        "ratios_total": ratios,
        "same_output_every_run": {c.name: len(c.digests()) == 1 for c in contenders},
        "same_output_as": {
            f"{a.name} == {b.name}": a.digests() == b.digests()
            for i, a in enumerate(contenders) for b in contenders[i + 1:]
        },
        "runs_s": {c.name: [{k: (round(v, 3) if k != "digest" else v[:12]) for k, v in run.items()} for run in c.runs]
                   for c in contenders},
        "target_total_s": 10.0,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
