"""Keep freed memory in the process, so that every case does not pay again for fresh pages.

One CT case moves a few gigabytes through short-lived buffers: the decoded planes, the float32
volumes (NCCT and CTA together about 840 MB at 512 x 512), their SimpleITK copies, the
block-averaged copies and the network's activations. glibc's ``malloc`` serves every block
above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it back with
``munmap`` when freed, so each case faults in, and the kernel zeroes, every page of every
large buffer again: on the project's 2-core machine about 4 of the 11 CPU seconds of an
uncompressed 300 + 500 slice case (``benchmarks/pipeline.py``), spent in the kernel and
counted in the ``volume`` stage (whose copies themselves cost a few hundredths of a second on
pages already mapped).

:func:`keep_freed_memory` tells ``malloc`` (``mallopt(3)``) to serve large blocks from the heap
(``M_MMAP_MAX`` 0) and never to give the heap's free top back (``M_TRIM_THRESHOLD`` -1): a
worker process then holds the memory of its largest case between cases (somewhat more when
cases of different sizes leave the heap fragmented) and reuses it. The
values computed do not change, only where their buffers live. Worker threads other than the
main one still get large blocks from ``mmap`` (their arenas cannot grow that far), which glibc
does by itself when the heap cannot serve a request.

Other C libraries (musl, macOS) have no ``mallopt``: nothing is changed there.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
import threading

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4

_lock = threading.Lock()
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process (see the module docstring).

    Returns True when the setting is in force (glibc), False where the C library has no
    ``mallopt``. Calling it again does nothing more.
    """
    global _kept
    with _lock:
        if _kept:
            return True
        if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        # mallopt returns 1 on success; -1 for M_TRIM_THRESHOLD means "never trim" (mallopt(3)).
        _kept = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
        log.debug("freed memory kept for reuse: %s", _kept)
        return _kept
