"""Every process of the node dies with the process that owns it (issue 13).

``kill -9`` of ``fpe-node serve`` leaves it no chance to stop its inference workers, and a
killed worker none to stop its decode pool; without :mod:`inference.lifetime` they lived on
as orphans, still connected to the index and able to claim studies. The processes are found
through ``/proc`` (parent PIDs) before the kill and must all be gone (or be zombies awaiting
their new parent's reaping) within a few seconds after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT
from tests.training_support import reduced_checkpoint

GONE_WITHIN_S = 10.0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent PID, start time) of a process from /proc/<pid>/stat (proc(5)); None once gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every living descendant of ``root``: PID -> start time (to tell a reused PID apart)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                parents[int(entry.name)] = (stat[1], stat[2])
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def _still_running(processes: dict[int, int]) -> list[int]:
    """The processes among ``processes`` that still run (zombies and reused PIDs do not count)."""
    running = []
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == started:
            running.append(pid)
    return running


def _wait_gone(processes: dict[int, int]) -> list[int]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := _still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_9_of_serve_leaves_no_worker_process(serve_process: Callable[..., Any], tmp_path: Path) -> None:
    checkpoint = reduced_checkpoint(tmp_path / "res25-test.pt")
    server = serve_process(inference={"workers": 1, "torch_threads": 1, "device": "cpu", "checkpoint": str(checkpoint)})
    deadline = time.monotonic() + 120
    while "inference worker ready" not in server.log_text():
        assert time.monotonic() < deadline, f"the worker never became ready:\n{server.log_text()}"
        assert server.process.poll() is None, server.log_text()
        time.sleep(0.2)
    children = _descendants(server.process.pid)
    assert children, "fpe-node serve with one worker has no child process"
    server.kill()
    left = _wait_gone(children)
    _kill_leftovers(left)
    assert not left, f"{len(left)} of {len(children)} child process(es) outlived the killed node"


_POOL_OWNER = """
import os, sys, time
from inference import decode
pool = decode._get_pool(2)
pids = {pool.submit(os.getpid).result() for _ in range(8)}
print(" ".join(str(pid) for pid in sorted(pids)), flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_decode_pools_owner_leaves_no_pool_process() -> None:
    owner = subprocess.Popen([sys.executable, "-c", _POOL_OWNER], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pool_pids = [int(pid) for pid in owner.stdout.readline().split()]
        assert pool_pids, "the decode pool reported no process"
        processes = _descendants(owner.pid)
        assert set(pool_pids) <= set(processes), (pool_pids, processes)
        owner.kill()
        owner.wait(30)
        left = _wait_gone(processes)
        _kill_leftovers(left)
        assert not left, f"{len(left)} of {len(processes)} pool process(es) outlived their owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(30)
