"""Child processes that die with the process that owns them (worker processes, decode pools).

A process killed with ``SIGKILL`` cannot stop its children; without help they live on as
orphans (re-parented to init), still holding memory and database connections. Each child
calls :func:`die_with_owner` first thing, which uses two mechanisms:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (prctl(2)): the kernel kills the child the
  moment its parent goes. The signal follows the death of the parent *thread* that created
  the child, not of the parent process, so it is only armed when the owner says it started
  the child from its main thread (``from_main_thread``): a child started from a thread that
  later ends would otherwise be killed while its owner still runs;
* everywhere, a watchdog thread that checks every ``poll_s`` seconds that the owner still
  runs and ends the process (``os._exit``) once it does not. The owner is not always the
  parent: a ``forkserver`` pool's processes are children of the fork server, which in turn
  stays alive as long as any of them holds its "alive" pipe (CPython passes it to every
  child), so neither would ever see the other go; they watch the pool's owner instead.

This module imports nothing of the node: :mod:`inference.decode` and :mod:`dicom_node.worker`
both use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_POLL_S = 0.5
ORPHAN_EXIT_CODE = 70  # EX_SOFTWARE (sysexits.h): the child ended itself because its parent vanished


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where unavailable (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
    except OSError:
        return False
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the watchdog", ctypes.get_errno())
        return False
    return True


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot, proc(5)); None when gone, a zombie or unknown."""
    try:
        raw = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _owner_alive(owner_pid: int, started: int | None) -> bool:
    """True while the owner runs (a zombie or a new process under its PID counts as gone)."""
    if os.getppid() == owner_pid:
        return True
    if started is not None or os.path.isdir("/proc/self"):
        return _start_time(owner_pid) == started
    try:
        os.kill(owner_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(owner_pid: int, started: int | None, poll_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(poll_s):
        if not _owner_alive(owner_pid, started):
            log.error("owner process %d is gone: this process (%d) ends too", owner_pid, os.getpid())
            os._exit(ORPHAN_EXIT_CODE)


def die_with_owner(owner_pid: int | None = None, from_main_thread: bool = True,
                   poll_s: float = WATCHDOG_POLL_S) -> None:
    """Make this (child) process end when the process that owns it ends, however it ends.

    Parameters
    ----------
    owner_pid:
        The PID of the process that owns this one, as that process saw itself
        (``os.getpid()`` before starting it); ``None``: the parent (:func:`os.getppid`) now.
        When the owner is already gone, this process ends at once.
    from_main_thread:
        True when this process was started (forked) from its parent's main thread; only
        then is the kernel's parent-death signal armed (see the module docstring).
    poll_s:
        Watchdog interval.
    """
    owner = os.getppid() if owner_pid is None else owner_pid
    if from_main_thread:
        _set_pdeathsig(signal.SIGKILL)
    started = _start_time(owner)
    if not _owner_alive(owner, started) or (started is None and os.path.isdir("/proc/self")):
        os._exit(ORPHAN_EXIT_CODE)  # the owner died before this process was set up
    threading.Thread(target=_watch, args=(owner, started, poll_s), name="fpe-owner-watchdog", daemon=True).start()
