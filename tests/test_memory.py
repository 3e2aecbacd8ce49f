"""inference.memory: a serving process keeps the memory it frees and reuses it for the next case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, resource, sys
from inference.memory import keep_freed_memory

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

kept = keep_freed_memory() if sys.argv[1] == "keep" else False
size = 256 * 2**20
block = bytearray(b"\\x01") * size  # malloc + every page written
before_free = resident_mb()
del block
after_free = resident_mb()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(b"\\x02") * size  # the next case's buffer of the same size
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"kept": kept, "released_mb": before_free - after_free, "faults": faults}))
"""


def _probe(mode: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_freed_memory_is_kept_and_reused_without_new_page_faults() -> None:
    default = _probe("default")
    kept = _probe("keep")
    # glibc's default: a 256 MB block is an mmap, returned when freed and faulted in again
    assert default["released_mb"] > 200, default
    assert default["faults"] > 256 * 2**20 // 4096 // 2, default
    # kept: the block stays in the process and the next one reuses its pages
    assert kept["kept"] is True, kept
    assert kept["released_mb"] < 10, kept
    assert kept["faults"] < 1000, kept
