"""Files of received instances: the one header parse, durable atomic writes, the disk guard.

Received instances are kept exactly as they came over the network: the File Meta Information
(PS3.10 section 7.1) the node builds, followed by the data set bytes as sent, unchanged, in
the negotiated transfer syntax. Layout under ``storage.data_dir``::

    dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                       files being written (same filesystem, so rename is atomic)

A file is written under a temporary name, fsynced, renamed to its final name and its folder
fsynced, so a crash leaves either the complete file or none under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import itertools
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.leases import holder_is_dead_here
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_valid_uid
from inference.dicom_headers import InstanceHeader, instance_header

log = logging.getLogger(__name__)

# Attributes whose raw values the C-STORE checks before the header is reduced (PS3.3 C.12.1,
# C.7.2.1, C.7.3.1): decoded from their bytes (see _text), so no library warning can quote them.
# Patient ID and its issuer are taken the same way (and kept from pydicom's value conversion).
CHECKED_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "IssuerOfPatientID",
    "SpecificCharacterSet",
)
_PATIENT_TAGS = (Tag("PatientID"), Tag("IssuerOfPatientID"))
_TAG_OF = {keyword: Tag(keyword) for keyword in CHECKED_KEYWORDS}
_FIRST_PIXEL_TAG = 0x7FE00008  # Float Pixel Data; Double Float Pixel Data and Pixel Data follow (PS3.6 section 6)
_INFLATE_STEP = 64 * 1024  # bytes of a deflated data set inflated at first; doubled until the header is whole


class HeaderError(ValueError):
    """The data set cannot be understood or lacks what the node needs; ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_header(dataset_bytes: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """The :class:`inference.dicom_headers.InstanceHeader` of a data set as received (pixel data never read).

    ``dataset_bytes`` is the data set without File Meta Information, encoded in
    ``transfer_syntax_uid`` (PS3.5 section 10); encapsulated syntaxes encode the data set in
    Explicit VR Little Endian. Reading stops at the pixel data; of a Deflated Explicit VR Little
    Endian data set only as much is inflated as the header needs. This is the node's one header
    parse: the index keeps the result (``instance.header``) for completion and the worker.

    A data set whose identifying attributes are sound but whose header cannot be reduced (an
    inconsistent functional group, say) is still accepted: its header carries the UIDs and
    ``problem`` saying why, and readiness and the worker leave the instance out, naming it.

    Raises
    ------
    HeaderError
        ``0xC000`` when it cannot be parsed, ``0xC001`` when the Study, Series or SOP Instance
        UID is missing or not a UID (PS3.5 9.1), ``0xA900`` when the SOP Class UID is missing.
    """
    from dicom_node.status import Status

    syntax = UID(transfer_syntax_uid)
    try:
        dataset, stopped_at_pixels = _read_header(dataset_bytes, syntax)
        values = _values(dataset)
    except Exception as exc:  # noqa: BLE001 - any parser failure means "cannot understand"
        raise HeaderError(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(exc).__name__})") from None
    if not values["SOPClassUID"]:
        raise HeaderError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID (0008,0016) missing")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_valid_uid(values[keyword]):
            raise HeaderError(Status.MISSING_OR_INVALID_UID, f"{keyword} missing or not a valid UID")
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    for tag in _PATIENT_TAGS:  # from their raw bytes (values), never through a converting reader
        if tag in dataset:
            del dataset[tag]
    try:
        header = replace(instance_header(dataset), patient_id=values["PatientID"],
                         issuer_of_patient_id=values["IssuerOfPatientID"])
    except Exception as exc:  # noqa: BLE001 - kept, with the reason; the instance is still stored
        problem = f"inconsistent header ({type(exc).__name__})"
        log.warning("instance %s: %s; stored, left out of analysis", values["SOPInstanceUID"], problem)
        return _unreduced_header(values, syntax, problem)
    if stopped_at_pixels and not header.has_pixels:
        header = replace(header, has_pixels=True)
    if (header.sop_class_uid, header.sop_instance_uid, header.study_uid, header.series_uid) != (
        values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"], values["SeriesInstanceUID"]
    ):
        header = replace(header, sop_class_uid=values["SOPClassUID"], sop_instance_uid=values["SOPInstanceUID"],
                         study_uid=values["StudyInstanceUID"], series_uid=values["SeriesInstanceUID"])
    return header


def _unreduced_header(values: dict[str, str], syntax: str, problem: str) -> InstanceHeader:
    """The header of an instance whose attributes could not be reduced: its UIDs and the reason."""
    return InstanceHeader(
        path=None, sop_class_uid=values["SOPClassUID"], sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"], series_uid=values["SeriesInstanceUID"], modality="", image_type=(),
        series_description="", protocol_name="", study_description="", procedure_description="",
        patient_id=values["PatientID"], issuer_of_patient_id=values["IssuerOfPatientID"], study_datetime=None, acquisition_datetime=None, frame_of_reference_uid="",
        manufacturer="", contrast_agent="", gantry_tilt=None, mr_acquisition_type="", body_part="", rows=0, columns=0,
        instance_number=None, series_number=None, transfer_syntax_uid=syntax, has_pixels=False, frames=(),
        problem=problem,
    )


def _read_header(dataset_bytes: bytes, transfer_syntax: UID) -> tuple[Dataset, bool]:
    """The data set up to its pixel data, and whether reading stopped there."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return _read_deflated_header(dataset_bytes)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little_endian = transfer_syntax != ExplicitVRBigEndian
    stopped: list[int] = []
    dataset = read_dataset(io.BytesIO(dataset_bytes), implicit, little_endian, stop_when=_pixel_stop(stopped))
    return dataset, bool(stopped)


def _read_deflated_header(deflated: bytes) -> tuple[Dataset, bool]:
    """Inflate (raw deflate, PS3.5 A.5) only until the header is whole: the pixel data is never inflated.

    The inflated prefix grows from :data:`_INFLATE_STEP`, doubling, until parsing it reaches the
    pixel data or the stream ends.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending = deflated
    step = _INFLATE_STEP
    while True:
        inflated += inflater.decompress(pending, step)
        pending = inflater.unconsumed_tail
        finished = inflater.eof or not pending
        stopped: list[int] = []
        try:
            dataset = read_dataset(io.BytesIO(bytes(inflated)), False, True, stop_when=_pixel_stop(stopped))
        except Exception:
            if finished:
                raise
            dataset = None  # cut inside an element: inflate more
        if dataset is not None and (stopped or finished):
            return dataset, bool(stopped)
        step = min(step * 2, 64 * 1024 * 1024)


def _pixel_stop(stopped: list[int]) -> Any:
    """A ``stop_when`` for :func:`read_dataset` ending at the first pixel data element (noted in ``stopped``)."""

    def stop(tag: Any, _vr: str | None, _length: int) -> bool:
        if int.__ge__(tag, _FIRST_PIXEL_TAG):  # int's comparison: BaseTag's own is a Python call per element
            stopped.append(int(tag))
            return True
        return False

    return stop


_CHARSET_VRS = {"LO", "SH", "LT", "ST", "UT", "PN", "UC"}


def _values(dataset: Dataset) -> dict[str, str]:
    """Every header keyword's value as text (``""`` when absent), see :func:`_text`."""
    encodings: list[str] | None = None
    values = {}
    for keyword, tag in _TAG_OF.items():
        if tag not in dataset:
            values[keyword] = ""
            continue
        element = dataset.get_item(tag)
        if encodings is None and element.VR in _CHARSET_VRS:
            encodings = convert_encodings(_charsets(dataset))
        values[keyword] = _text(element.value, element.VR, encodings)
    return values


def _text(raw: object, vr: str | None, encodings: list[str] | None) -> str:
    """A value as text from its raw bytes (no value conversion, so no validation warning).

    Multi-values stay backslash-separated; padding spaces and NULs are stripped. Strings of
    VRs affected by Specific Character Set (PS3.5 6.1.2.3) are decoded with ``encodings``
    (the data set's character set), others as ASCII.
    """
    if raw is None:
        return ""
    if not isinstance(raw, bytes):
        values = raw if isinstance(raw, (list, tuple)) else [raw]
        return "\\".join(str(v).strip(" \x00") for v in values)
    if vr in _CHARSET_VRS and encodings is not None:
        text = decode_bytes(raw, encodings, set())
    else:
        text = raw.decode("ascii", errors="replace")
    return "\\".join(part.strip(" \x00") for part in text.split("\\")).strip(" \x00")


def _charsets(dataset: Dataset) -> list[str]:
    """Specific Character Set (0008,0005) terms; the default repertoire when absent."""
    tag = Tag("SpecificCharacterSet")
    if tag not in dataset:
        return ["ISO_IR 6"]
    raw = dataset.get_item(tag).value
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else str(raw)
    return [term.strip(" \x00") or "ISO_IR 6" for term in text.split("\\")]


def file_meta_bytes(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae_title: str,
    *,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information (PS3.10 section 7.1), encoded directly.

    Explicit VR Little Endian elements: (0002,0000) group length, (0002,0001) version 00\\01,
    Media Storage SOP Class/Instance UID, Transfer Syntax UID, Implementation Class UID and
    Version Name, and Source Application Entity Title (the calling AE, PS3.10 7.1).
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(implementation_class_uid, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(implementation_version_name, b" ")),
            _meta_element(0x0016, b"AE", _padded(source_ae_title, b" ")),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _padded(text: str, pad: bytes) -> bytes:
    """ASCII value padded to even length (PS3.5 6.2: UIDs with NUL, strings with space)."""
    raw = text.encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element in Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def dataset_digest(dataset_bytes: bytes | memoryview) -> str:
    """SHA-256 of the data set as received (the duplicate rule compares these)."""
    return hashlib.sha256(dataset_bytes).hexdigest()


class DiskGuard(Protocol):
    """Decides, before a C-STORE is written, whether the node may take ``size_bytes`` more.

    Retention (dicom_node.retention) provides one that purges processed studies before
    saying no; :class:`WatermarkDiskGuard` is the plain default.
    """

    def has_room(self, size_bytes: int) -> bool:
        """True if ``size_bytes`` can be stored without passing the disk-use watermark."""
        ...


class WatermarkDiskGuard:
    """Refuses a store that would take the data directory's filesystem above ``high_watermark_pct``."""

    def __init__(self, data_dir: Path, high_watermark_pct: float) -> None:
        self._data_dir = data_dir
        self._high_watermark_pct = high_watermark_pct

    def has_room(self, size_bytes: int) -> bool:
        """True if used space plus ``size_bytes`` stays at or below the watermark."""
        usage = shutil.disk_usage(self._data_dir)
        used_after = usage.total - usage.free + size_bytes
        return used_after * 100.0 <= usage.total * self._high_watermark_pct


class DiskFullError(OSError):
    """The filesystem ran out of space or quota while writing; nothing was left behind."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_TMP_COUNTER = itertools.count()
_HOST = socket.gethostname()[:32]
STALE_TMP_S = 3600.0
"""Age after which another host's temporary file counts as left by a crash."""


class FileStore:
    """Durable, atomic writes of instance files under the data directory."""

    def __init__(self, data_dir: Path, *, fsync: bool = True) -> None:
        self.data_dir = data_dir
        self.tmp_dir = data_dir / "tmp"
        self._fsync = fsync
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        (self.data_dir / "dicom").mkdir(exist_ok=True)

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Path of an instance relative to the data directory (UIDs are digits and dots only)."""
        return f"dicom/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """Absolute path of a file given relative to the data directory."""
        return self.data_dir / relative

    def write_temp(self, chunks: Sequence[bytes | memoryview]) -> Path:
        """Write ``chunks`` to a new temporary file and fsync it.

        Raises
        ------
        DiskFullError
            When the filesystem is full; the partial file is removed.
        """
        tmp_path = self.tmp_dir / f"{_HOST}:{os.getpid()}:{threading.get_ident()}-{next(_TMP_COUNTER)}.part"
        try:
            with open(tmp_path, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                if self._fsync:
                    os.fsync(handle.fileno())
        except OSError as exc:
            self.discard(tmp_path)
            if exc.errno in _NO_SPACE:
                raise DiskFullError(exc.errno, "no space left for a received instance") from None
            raise
        except BaseException:
            self.discard(tmp_path)
            raise
        return tmp_path

    def publish(self, tmp_path: Path, relative: str, *, sync: bool = True) -> Path:
        """Rename a written temporary file to its final name (replacing any old one).

        With ``sync`` the folder is fsynced so the rename is durable; a caller that has more to
        make durable first (the index commit) passes ``sync=False`` and calls :meth:`sync_folder`
        afterwards: on ext4 the commit's fsync already carries the rename, so the folder fsync
        that follows costs almost nothing, and on every filesystem both are done before the
        C-STORE is answered.
        """
        final = self.absolute(relative)
        self._make_dirs(final.parent)
        os.replace(tmp_path, final)
        if sync:
            self._fsync_dir(final.parent)
        return final

    def sync_folder(self, relative: str) -> None:
        """fsync the folder holding ``relative`` (makes an earlier rename in it durable)."""
        self._fsync_dir(self.absolute(relative).parent)

    def discard(self, path: Path) -> None:
        """Remove a file if it exists (a temporary file or a file whose indexing failed)."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def remove(self, relative: str) -> None:
        """Remove a stored file and fsync its folder."""
        final = self.absolute(relative)
        self.discard(final)
        if final.parent.exists():
            self._fsync_dir(final.parent)

    def clean_tmp(self) -> int:
        """Delete temporary files left by a crash (start-up); returns how many.

        The folder may be shared by processes of several machines (``fpe-node serve --role``):
        a file is removed when the process that wrote it is gone (a process of this host, named
        in the file name) or, for another host's, when it has not been touched for
        :data:`STALE_TMP_S` (no store takes that long).
        """
        removed = 0
        now = time.time()
        for leftover in self.tmp_dir.glob("*.part"):
            writer = leftover.name.rsplit("-", 1)[0]  # host:pid:thread (older nodes: pid-thread)
            if ":" not in writer:
                writer = f"{_HOST}:{writer.split('-')[0]}:0"
            try:
                stale = now - leftover.stat().st_mtime > STALE_TMP_S
            except FileNotFoundError:
                continue
            if holder_is_dead_here(writer) or stale:
                self.discard(leftover)
                removed += 1
        return removed

    def _make_dirs(self, folder: Path) -> None:
        """Create missing folders, fsyncing each new folder's parent so the entry is durable."""
        if folder.is_dir():
            return
        self._make_dirs(folder.parent)
        try:
            folder.mkdir()
        except FileExistsError:
            return
        self._fsync_dir(folder.parent)

    def _fsync_dir(self, folder: Path) -> None:
        if not self._fsync:
            return
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
