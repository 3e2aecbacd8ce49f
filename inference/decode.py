"""Pixel data decoding policy: which codec decodes which transfer syntax, and on how many cores.

Which plugin
    pydicom 3 offers several decoding plugins for most compressed transfer syntaxes (PS3.5
    section 8.2 and Annex A.4) and, unless told, uses the first that is installed, in its own
    order. :data:`PREFERRED_PLUGINS` names ours, fastest first, as measured on a 512 x 512
    16-bit CT slice (best of 15 on the project's 2-core machine): JPEG-LS through ``pyjpegls``
    (CharLS, 2.0 ms) rather than ``pylibjpeg`` (7.4 ms, pydicom's first choice); RLE through
    ``pylibjpeg`` (``pylibjpeg-rle``, 1.1 ms) before pydicom's own Python decoder (4.0 ms);
    JPEG 2000 and HTJ2K through ``pylibjpeg`` (OpenJPEG, 13.7 ms) before ``pillow`` (also
    OpenJPEG, 14.0 ms). A plugin that is not installed falls back to the next; a frame the
    chosen plugin cannot decode raises :class:`PixelDecodeError` naming the SOP Instance UID
    (no second plugin is tried: see :func:`decode_one`).

How many cores
    The JPEG 2000 decoders hold the GIL while they decode (pylibjpeg-openjpeg calls OpenJPEG
    without releasing it and feeds it through Python stream callbacks; Pillow pulls its file
    through Python too), and a second thread gained nothing with pyjpegls either, so threads
    cannot decode side by side; compressed series are decoded by a pool of
    :func:`decode_workers` processes, each taking chunks of instances in turn (one multi-frame
    instance is one task), while this process only hands chunks out and takes the results
    back, through shared memory rather than the pipe. (This process decoding a share as well
    held the GIL that its feeding and reading threads need: the pool then stood idle and
    decoded a quarter of a 500-slice CTA, this process the rest.) The pool is started on first use
    (``forkserver``: no inherited threads of torch; as with any multiprocessing start method but
    fork, the main module must be importable without side effects) and kept for the life of
    the process. Native (uncompressed, deflated, big endian) pixel data costs little more than
    reading it and is decoded here, in order. The decoded values are those of the same plugin
    in this process: the pool changes where, not what.

:func:`decode_workers` follows the torch intra-op thread count of the process (the worker's
``inference.torch_threads`` setting, torch's default of one thread per core when 0), capped
at the cores this process may run on, so decoding and inference use the same share of the
machine and neither oversubscribes it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np
import pydicom.uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID

from inference.lifetime import die_with_owner

log = logging.getLogger(__name__)

PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    uids.JPEG2000Lossless: ("pylibjpeg", "pillow", "gdcm"),
    uids.JPEG2000: ("pylibjpeg", "pillow", "gdcm"),
    uids.HTJ2KLossless: ("pylibjpeg",),
    uids.HTJ2KLosslessRPCL: ("pylibjpeg",),
    uids.HTJ2K: ("pylibjpeg",),
    uids.JPEGLSLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    uids.JPEGLSNearLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    uids.JPEGLossless: ("pylibjpeg", "gdcm"),
    uids.JPEGLosslessSV1: ("pylibjpeg", "gdcm"),
    uids.JPEGBaseline8Bit: ("pylibjpeg", "pillow", "gdcm"),
    uids.JPEGExtended12Bit: ("pylibjpeg", "pillow", "gdcm"),
    uids.RLELossless: ("pylibjpeg", "pydicom"),
}
"""Decoding plugins per transfer syntax, fastest first (installed ones are used in this order)."""

PARALLEL_MIN_INSTANCES = 8
"""Fewer compressed instances than this are decoded here: the pool's hand-over costs more."""

_CHUNKS_PER_WORKER = 4  # chunks handed out per process: small enough to balance, large enough to amortise
_PIXEL_KEYWORDS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "PixelData",
)  # the Image Pixel module (PS3.3 C.7.6.3) and what pydicom's decoders read besides it


class PixelDecodeError(ValueError):
    """The pixel data of one instance cannot be decoded; the message names its SOP Instance UID."""

    def __init__(self, reason: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        super().__init__(f"SOP Instance {sop_instance_uid or '?'}: {reason}")
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # back from a pool process intact
        return type(self), (self.reason, self.sop_instance_uid, self.transfer_syntax)


def transfer_syntax(ds: Dataset) -> str:
    """The dataset's Transfer Syntax UID (PS3.10 7.1 File Meta Information), ``""`` when absent."""
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def plugins_for(syntax: str) -> tuple[str, ...]:
    """The installed plugins for ``syntax`` in our order of preference (``("",)``: pydicom's only one).

    Installed plugins missing from :data:`PREFERRED_PLUGINS` follow in pydicom's order.
    """
    try:
        available = get_decoder(UID(syntax)).available_plugins
    except NotImplementedError:
        return ("",)
    preferred = [name for name in PREFERRED_PLUGINS.get(syntax, ()) if name in available]
    rest = [name for name in available if name not in preferred]
    return tuple(preferred + rest) or ("",)


def _is_encapsulated(ds: Dataset) -> bool:
    syntax = transfer_syntax(ds)
    return bool(syntax) and UID(syntax).is_compressed and "PixelData" in ds


def decode_one(ds: Dataset) -> np.ndarray:
    """All frames of ``ds`` as stored values ((rows, columns) or (frames, rows, columns)).

    Decoded by the first installed plugin of :func:`plugins_for`, and by that one only: a
    second plugin is no second opinion on data the first found corrupt (pylibjpeg-libjpeg
    decodes a truncated JPEG-LS stream to noise without a word, where CharLS refuses it).

    Raises
    ------
    PixelDecodeError
        When the plugin cannot decode the pixel data; the message names the instance and
        the plugin's error.
    """
    syntax = transfer_syntax(ds)
    plugin = plugins_for(syntax)[0] if syntax else ""
    try:
        return pixel_array(ds, decoding_plugin=plugin)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError, KeyError, OSError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__  # pydicom puts the plugin's own error last
        name = UID(syntax).name if syntax else "unknown transfer syntax"
        raise PixelDecodeError(f"cannot decode pixel data in {name}: {detail}", str(ds.get("SOPInstanceUID", "")),
                               syntax) from exc


def _portable(ds: Dataset) -> Dataset:
    """The part of ``ds`` a decoder needs (pixel module, pixel data, transfer syntax), to send to a process."""
    part = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            setattr(part, keyword, ds[keyword].value)  # reads pixel data deferred on disk
    part.SOPInstanceUID = str(ds.get("SOPInstanceUID", ""))
    part.file_meta = FileMetaDataset()
    part.file_meta.TransferSyntaxUID = UID(transfer_syntax(ds))
    return part


def _decode_chunk(chunk: Sequence[Dataset]) -> list[np.ndarray | PixelDecodeError]:
    """Decode in a pool process; a failure is returned in its place so the others still come back."""
    out: list[np.ndarray | PixelDecodeError] = []
    for ds in chunk:
        try:
            out.append(decode_one(ds))
        except PixelDecodeError as exc:
            out.append(exc)
    return out


_Layout = tuple[int, tuple[int, ...], str]  # offset in the shared block, shape, dtype
_Decoded = list[np.ndarray | PixelDecodeError]
_SHM_FOLDER = "/dev/shm"  # where POSIX shared memory lives on Linux (a tmpfs, often small in containers)
_SHM_SPARE = 0.5  # a block may take at most this share of the free shared memory


def _shared_memory_free() -> int:
    """Bytes free for POSIX shared memory (0 when that cannot be told)."""
    try:
        stats = os.statvfs(_SHM_FOLDER)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _decode_chunk_shared(chunk: Sequence[Dataset]) -> tuple[str, list[_Layout | PixelDecodeError] | _Decoded]:
    """Decode in a pool process into one shared-memory block; its name and each array's place in it.

    The arrays come back through the block, not the pipe: one copy each side instead of
    pickling megabytes through a pipe that this process's threads must read. Where the block
    would take more than half of the free shared memory (a container's small ``/dev/shm``:
    writing past a full tmpfs kills the process), the arrays come back through the pipe, the
    name then being ``""``.
    """
    decoded = _decode_chunk(chunk)
    arrays = [np.ascontiguousarray(item) for item in decoded if not isinstance(item, PixelDecodeError)]
    size = sum(a.nbytes for a in arrays)
    if size == 0 or size > _SHM_SPARE * _shared_memory_free():
        return "", decoded
    block = shared_memory.SharedMemory(create=True, size=size)
    layout: list[_Layout | PixelDecodeError] = []
    offset = 0
    try:
        for item in decoded:
            if isinstance(item, PixelDecodeError):
                layout.append(item)
                continue
            array = np.ascontiguousarray(item)
            np.ndarray(array.shape, array.dtype, buffer=block.buf, offset=offset)[...] = array
            layout.append((offset, array.shape, array.dtype.str))
            offset += array.nbytes
    finally:
        block.close()  # the block lives on until the receiving process unlinks it
    return block.name, layout


def _take_shared(name: str, layout: Sequence[_Layout | PixelDecodeError | np.ndarray]) -> _Decoded:
    """The arrays of a block written by :func:`_decode_chunk_shared`, copied out; the block is removed.

    ``name`` ``""``: the arrays came through the pipe and are ``layout`` itself.
    """
    if not name:
        return [item for item in layout if isinstance(item, (np.ndarray, PixelDecodeError))]
    block = shared_memory.SharedMemory(name=name)
    try:
        out: _Decoded = []
        for item in layout:
            if isinstance(item, (np.ndarray, PixelDecodeError)):
                out.append(item)
                continue
            offset, shape, dtype = item
            out.append(np.ndarray(shape, np.dtype(dtype), buffer=block.buf, offset=offset).copy())
        return out
    finally:
        block.close()
        block.unlink()


def decode_workers() -> int:
    """Processes that decode side by side: torch's intra-op threads, at most the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch = sys.modules.get("torch")  # not imported here for this: only followed when loaded
    threads = int(torch.get_num_threads()) if torch is not None else cores
    return max(1, min(threads, cores))


_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0


def _get_pool(size: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            if method == "forkserver":
                context.set_forkserver_preload([__name__])
            # Pool processes end with this process (inference.lifetime); forkserver children
            # are forked by the fork server's main thread.
            from_main_thread = method == "forkserver" or threading.current_thread() is threading.main_thread()
            _pool = ProcessPoolExecutor(max_workers=size, mp_context=context, initializer=die_with_owner,
                                        initargs=(os.getpid(), from_main_thread))
            _pool_size = size
            log.debug("decode pool of %d %s process(es) started", size, method)
        return _pool


def _discard_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _chunks(count: int, workers: int) -> list[range]:
    size = max(1, -(-count // (workers * _CHUNKS_PER_WORKER)))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def decode_all(datasets: Sequence[Dataset], *, workers: int | None = None) -> list[np.ndarray]:
    """Decode every dataset (same order as given), compressed ones on ``workers`` cores.

    ``workers`` defaults to :func:`decode_workers`: the number of pool processes that decode
    side by side (this process feeds them and collects the results).

    Raises
    ------
    PixelDecodeError
        For the first instance (in the given order) that cannot be decoded.
    """
    workers = decode_workers() if workers is None else max(1, workers)
    results: list[np.ndarray | PixelDecodeError | None] = [None] * len(datasets)
    compressed = [i for i, ds in enumerate(datasets) if _is_encapsulated(ds)]
    if workers > 1 and len(compressed) >= PARALLEL_MIN_INSTANCES:
        _decode_parallel(datasets, compressed, results, workers)
    for index, ds in enumerate(datasets):
        if results[index] is None:
            results[index] = _decode_chunk([ds])[0]
    decoded = []
    for result in results:
        if isinstance(result, PixelDecodeError):
            raise result
        assert result is not None
        decoded.append(result)
    return decoded


def _decode_parallel(
    datasets: Sequence[Dataset], indices: list[int], results: list[np.ndarray | PixelDecodeError | None], workers: int
) -> None:
    """Chunks of ``indices`` to a pool of ``workers`` processes; results land in ``results``.

    This process only hands the chunks out and takes the results back: the JPEG 2000 decoders
    hold the GIL, and a chunk decoded here would hold up the threads that feed the pool its
    chunks and read its results (measured: the pool then decoded a quarter of a CTA's 500
    slices, this process the rest).
    """
    pool = _get_pool(workers)
    pending = deque(_chunks(len(indices), workers))
    running: dict[Future[tuple[str, list[_Layout | PixelDecodeError] | _Decoded]], range] = {}
    try:
        while pending or running:
            while pending and len(running) < 2 * workers:
                part = pending.popleft()
                running[pool.submit(_decode_chunk_shared, [_portable(datasets[indices[i]]) for i in part])] = part
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                part = running.pop(future)
                for i, result in zip(part, _take_shared(*future.result())):
                    results[indices[i]] = result
    except BrokenProcessPool:
        # A decoder crashed its process (a corrupt stream can do that): start again, one
        # instance per task, so the crash names the instance and costs no other result.
        _discard_pool()
        log.warning("a decoding process died; decoding the remaining instances one by one")
        for index in indices:
            if results[index] is None:
                results[index] = _decode_isolated(datasets[index])


def _decode_isolated(ds: Dataset) -> np.ndarray | PixelDecodeError:
    try:
        return _get_pool(1).submit(_decode_chunk, [_portable(ds)]).result()[0]
    except BrokenProcessPool:
        _discard_pool()
        syntax = transfer_syntax(ds)
        return PixelDecodeError(
            f"the {UID(syntax).name if syntax else '?'} decoder crashed on this instance's pixel data",
            str(ds.get("SOPInstanceUID", "")),
            syntax,
        )
