"""Files of received instances: header parsing, durable atomic writes, the disk guard.

Received instances are kept exactly as they came over the network: the File Meta Information
(PS3.10 section 7.1) the node builds, followed by the data set bytes as sent, unchanged, in
the negotiated transfer syntax. Layout under ``storage.data_dir``::

    dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/                       files being written (same filesystem, so rename is atomic)

A file is written under a temporary name, fsynced, renamed to its final name and its folder
fsynced, so a crash leaves either the complete file or none under the final name.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import logging
import os
import itertools
import shutil
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_valid_uid

log = logging.getLogger(__name__)

# Attributes the index and the listeners need (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.7.5.1, C.12.1).
HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "InstanceNumber",
    "SpecificCharacterSet",
)
_TAG_OF = {keyword: Tag(keyword) for keyword in HEADER_KEYWORDS}
_HEADER_TAGS: list[BaseTag | int] = list(_TAG_OF.values())
_LAST_HEADER_TAG = max(Tag(keyword) for keyword in HEADER_KEYWORDS)
# Values are decoded from their raw bytes (see _text), so no library warning can quote them.


class HeaderError(ValueError):
    """The data set cannot be understood or lacks what the node needs; ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes of one received instance (values stripped, ``None`` when absent)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer_of_patient_id: str
    acquired_at: dt.datetime | None
    accession: str | None
    study_description: str | None
    modality: str | None
    series_description: str | None
    series_number: int | None
    manufacturer: str | None
    manufacturer_model: str | None
    image_type: tuple[str, ...]
    body_part: str | None
    frame_of_reference_uid: str | None
    instance_number: int | None


def parse_header(dataset_bytes: bytes, transfer_syntax_uid: str) -> InstanceHeader:
    """Read only the header attributes of a data set as received (pixel data never touched).

    ``dataset_bytes`` is the data set without File Meta Information, encoded in
    ``transfer_syntax_uid`` (PS3.5 section 10); encapsulated syntaxes encode the data set in
    Explicit VR Little Endian, Deflated Explicit VR Little Endian is inflated first.

    Raises
    ------
    HeaderError
        ``0xC000`` when it cannot be parsed, ``0xC001`` when the Study, Series or SOP Instance
        UID is missing or not a UID (PS3.5 9.1), ``0xA900`` when the SOP Class UID is missing.
    """
    from dicom_node.status import Status

    try:
        dataset = _read_header(dataset_bytes, UID(transfer_syntax_uid))
        values = _values(dataset)
    except Exception as exc:  # noqa: BLE001 - any parser failure means "cannot understand"
        raise HeaderError(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(exc).__name__})") from None
    if not values["SOPClassUID"]:
        raise HeaderError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID (0008,0016) missing")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not is_valid_uid(values[keyword]):
            raise HeaderError(Status.MISSING_OR_INVALID_UID, f"{keyword} missing or not a valid UID")
    return InstanceHeader(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        patient_id=values["PatientID"],
        issuer_of_patient_id=values["IssuerOfPatientID"],
        acquired_at=_study_datetime(values["StudyDate"], values["StudyTime"]),
        accession=values["AccessionNumber"] or None,
        study_description=values["StudyDescription"] or None,
        modality=values["Modality"] or None,
        series_description=values["SeriesDescription"] or None,
        series_number=_integer(values["SeriesNumber"]),
        manufacturer=values["Manufacturer"] or None,
        manufacturer_model=values["ManufacturerModelName"] or None,
        image_type=tuple(v for v in values["ImageType"].split("\\") if v),
        body_part=values["BodyPartExamined"] or None,
        frame_of_reference_uid=values["FrameOfReferenceUID"] or None,
        instance_number=_integer(values["InstanceNumber"]),
    )


def _read_header(dataset_bytes: bytes, transfer_syntax: UID) -> Dataset:
    """The header attributes of ``dataset_bytes``, reading stops after the last one needed."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        dataset_bytes = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset_bytes)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little_endian = transfer_syntax != ExplicitVRBigEndian
    return read_dataset(
        io.BytesIO(dataset_bytes), implicit, little_endian, stop_when=_past_header, specific_tags=_HEADER_TAGS
    )


def _past_header(tag: Any, _vr: str | None, _length: int) -> bool:
    """Stop reading after the last attribute the node needs (never touches pixel data)."""
    return bool(tag > _LAST_HEADER_TAG)


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


def _integer(text: str) -> int | None:
    """An IS value as int, ``None`` when absent or not a number (tolerant reader)."""
    try:
        return int(float(text.split("\\")[0])) if text else None
    except ValueError:
        return None


def _study_datetime(date_text: str, time_text: str) -> dt.datetime | None:
    """StudyDate (DA) + StudyTime (TM, PS3.5 6.2) as a naive datetime; ``None`` if unusable.

    Parsed by hand (``strptime`` costs milliseconds per call on the C-STORE path).
    """
    digits_date = date_text[:8]
    if len(digits_date) != 8 or not digits_date.isdigit():
        return None
    try:
        date = dt.datetime(int(digits_date[:4]), int(digits_date[4:6]), int(digits_date[6:8]))
    except ValueError:
        return None
    digits = time_text.split(".")[0].replace(":", "")
    if len(digits) >= 2 and digits.isdigit():
        padded = (digits + "0000")[:6]
        try:
            clock = dt.time(int(padded[:2]), int(padded[2:4]), min(int(padded[4:6]), 59))
        except ValueError:
            return date
        return dt.datetime.combine(date.date(), clock)
    return date


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
        tmp_path = self.tmp_dir / f"{os.getpid()}-{threading.get_ident()}-{next(_TMP_COUNTER)}.part"
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
        """Delete temporary files left by a crash (start-up only); returns how many."""
        removed = 0
        for leftover in self.tmp_dir.glob("*.part"):
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
