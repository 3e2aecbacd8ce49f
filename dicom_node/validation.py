"""Checks a received data set must pass before its C-STORE is acknowledged, and the later check.

Everything here is a pure function over bytes or a file; :class:`dicom_node.scp.Ingest` calls
:func:`check_dataset` on every C-STORE (before anything else reads the data set)
and :class:`dicom_node.quarantine.QuarantineCheck` runs :func:`deep_check` on each stored file
off the network path.

:func:`check_dataset` walks the whole data set once, iteratively (no recursion, so no nesting
can exhaust the interpreter's stack), without converting values:

* every element, item and delimiter lies inside the data set and inside its enclosing item or
  sequence (PS3.5 section 7.1, 7.5); nothing is left over at the end;
* sequences nest at most :data:`MAX_NESTING` deep (pydicom reads nested sequences recursively,
  a few interpreter frames per level: a 1000-deep sequence is a ``RecursionError`` later);
* Pixel Data has the length Rows x Columns x Number of Frames x Samples per Pixel x Bits
  Allocated implies (PS3.5 section 8.1.1, PS3.3 C.7.6.3), or, in an encapsulated transfer
  syntax, a Basic Offset Table and fragments that are well formed (PS3.5 A.4);
* the SOP class matches the content: image storage classes carry Pixel Data and the Image
  Pixel module's type 1 attributes (PS3.3 C.7.6.3), classes without pixels (structured reports,
  presentation states, encapsulated documents) carry none (PS3.3 A.35, A.33, A.45);
* every Specific Character Set term is one pydicom can decode (PS3.3 C.12.1.1.2).

A failure raises :class:`InvalidInstance` with the status to answer
(:class:`dicom_node.status.Status`) and a reason free of patient identifiers.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.status import Status
from dicom_node.storage import HeaderError

log = logging.getLogger(__name__)

MAX_NESTING = 32
"""Deepest sequence nesting accepted (real objects rarely pass 6; pydicom's recursion would
exhaust Python's default limit of 1000 frames at about 200 levels)."""

MAX_INFLATED_BYTES = 2**31
"""Largest inflated size of a Deflated Explicit VR Little Endian data set (PS3.5 A.5)."""

_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_PIXEL_DATA = 0x7FE00009
_PIXEL_TAGS = (_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA)
_EXTENDED_OFFSET_TABLE = 0x7FE00001

# Top-level attributes whose raw values the checks read (PS3.3 C.7.6.3, C.7.6.6, C.12.1).
_SPECIFIC_CHARACTER_SET = 0x00080005
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_HIGH_BIT = 0x00280102
_PIXEL_REPRESENTATION = 0x00280103
_KEPT = frozenset(
    {
        _SPECIFIC_CHARACTER_SET, _SAMPLES_PER_PIXEL, _PHOTOMETRIC, _NUMBER_OF_FRAMES, _ROWS, _COLUMNS,
        _BITS_ALLOCATED, _BITS_STORED, _HIGH_BIT, _PIXEL_REPRESENTATION, _EXTENDED_OFFSET_TABLE,
    }
)

# Explicit VR: VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

# SOP classes by what their IODs say about pixels (PS3.3 Annex A): names as pydicom registers them.
_PIXEL_FREE_NAME_PARTS = (
    "SR Storage", "Key Object Selection", "Presentation State", "Encapsulated", "Waveform", "Raw Data",
    "Structure Set", "Plan Storage", "Spectroscopy",
)


class InvalidInstance(HeaderError):
    """A received data set that must not be acknowledged; ``status`` is the answer."""


@dataclass
class _Frame:
    """One open level of the walk: a data set (top level or an item) or a sequence."""

    is_sequence: bool
    end: int | None  # None: undefined length, ends at its delimiter
    bound: int  # nearest defined end of this level or any enclosing one
    implicit: bool  # items of a UN sequence are Implicit VR Little Endian (PS3.5 6.2.2)
    depth: int


@dataclass
class DatasetFacts:
    """What the walk found that the checks need (raw values, not converted)."""

    top: dict[int, bytes] = field(default_factory=dict)
    pixel_tag: int | None = None
    pixel_length: int | None = None  # None when encapsulated
    fragments: list[int] | None = None  # encapsulated: lengths of the items after the offset table
    offset_table: bytes = b""
    first_fragment: bytes = b""  # its first 64 bytes at most
    max_depth: int = 0
    little_endian: bool = True


def check_dataset(dataset_bytes: bytes, transfer_syntax_uid: str, sop_class_uid: str) -> DatasetFacts:
    """Every acknowledge-time check of one data set as received (see the module docstring).

    Parameters
    ----------
    dataset_bytes:
        The data set without File Meta Information, in ``transfer_syntax_uid``.
    transfer_syntax_uid:
        The presentation context's transfer syntax (PS3.5 section 10).
    sop_class_uid:
        The data set's SOP Class UID (already checked against the command's).

    Raises
    ------
    InvalidInstance
        ``0xC000`` cannot be parsed to its end, ``0xC003`` nested too deep, ``0xC004`` Pixel
        Data inconsistent with the Image Pixel module, ``0xC002`` unknown character set,
        ``0xA900`` the content contradicts the SOP class.
    """
    syntax = UID(transfer_syntax_uid)
    data = _inflated(dataset_bytes) if syntax == DeflatedExplicitVRLittleEndian else dataset_bytes
    facts = scan(data, implicit=syntax == ImplicitVRLittleEndian, little_endian=syntax != ExplicitVRBigEndian)
    _check_character_set(facts)
    _check_sop_class(facts, sop_class_uid)
    if facts.pixel_tag is not None:
        encapsulated = syntax.is_compressed and syntax != DeflatedExplicitVRLittleEndian
        _check_pixel_data(facts, encapsulated=encapsulated)
        if encapsulated:
            _check_codec_marker(facts.first_fragment, syntax)
    return facts


def _inflated(data: bytes) -> bytes:
    """The data set of a Deflated transfer syntax, inflated (raw deflate, PS3.5 A.5), bounded."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error:
        raise InvalidInstance(Status.CANNOT_UNDERSTAND, "deflated data set cannot be inflated") from None
    if inflater.unconsumed_tail:
        raise InvalidInstance(Status.CANNOT_UNDERSTAND, "deflated data set inflates beyond the limit")
    return inflated


@functools.lru_cache(maxsize=4096)
def _is_sequence_tag(tag: int) -> bool:
    """Implicit VR: whether the data dictionary says ``tag`` is a sequence (PS3.6)."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def scan(data: bytes, *, implicit: bool, little_endian: bool) -> DatasetFacts:
    """Walk a data set to its end without recursion; raises :class:`InvalidInstance`.

    Values are skipped, not read, except the top-level attributes the checks need.
    """
    order = "<" if little_endian else ">"
    tag_format = struct.Struct(order + "HH")
    u32 = struct.Struct(order + "I")
    u16 = struct.Struct(order + "H")
    le_tag = struct.Struct("<HH")
    le_u32 = struct.Struct("<I")
    facts = DatasetFacts(little_endian=little_endian)
    size = len(data)
    stack = [_Frame(is_sequence=False, end=size, bound=size, implicit=implicit, depth=0)]
    position = 0

    def fail(reason: str) -> InvalidInstance:
        return InvalidInstance(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {reason} at byte {position}")

    while stack:
        frame = stack[-1]
        if frame.end is not None and position >= frame.end:
            if position > frame.end:
                raise fail("an element runs past the end of its item or sequence")
            stack.pop()
            continue
        if position + 8 > frame.bound:
            raise fail("truncated element header")
        # Items of a UN (implicit) sequence are little endian whatever the transfer syntax.
        item_tags, item_u32 = (le_tag, le_u32) if frame.implicit and not little_endian else (tag_format, u32)
        group, element = item_tags.unpack_from(data, position)
        tag = group << 16 | element
        if frame.is_sequence:
            (length,) = item_u32.unpack_from(data, position + 4)
            position += 8
            if tag == _SEQUENCE_DELIMITER and frame.end is None:
                stack.pop()
                continue
            if tag != _ITEM:
                raise fail(f"({group:04X},{element:04X}) where a sequence item was expected")
            if length == _UNDEFINED:
                stack.append(_Frame(False, None, frame.bound, frame.implicit, frame.depth))
            elif position + length > frame.bound:
                raise fail("an item runs past the end of its sequence")
            else:
                stack.append(_Frame(False, position + length, position + length, frame.implicit, frame.depth))
            continue
        if group == 0xFFFE:
            if tag == _ITEM_DELIMITER and frame.end is None and len(stack) > 1:
                position += 8
                stack.pop()
                continue
            raise fail(f"unexpected delimiter ({group:04X},{element:04X})")
        if frame.implicit:
            (length,) = (le_u32 if not little_endian else u32).unpack_from(data, position + 4)
            vr = b"SQ" if length == _UNDEFINED and tag not in _PIXEL_TAGS or _is_sequence_tag(tag) else b"--"
            position += 8
        else:
            vr = data[position + 4 : position + 6]
            if vr in _LONG_VRS:
                if position + 12 > frame.bound:
                    raise fail("truncated element header")
                (length,) = u32.unpack_from(data, position + 8)
                position += 12
            elif vr in _SHORT_VRS:
                (length,) = u16.unpack_from(data, position + 6)
                position += 8
            else:
                raise fail(f"unknown VR in ({group:04X},{element:04X})")
        if vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED):
            depth = frame.depth + 1
            if depth > MAX_NESTING:
                raise InvalidInstance(
                    Status.NESTED_TOO_DEEP, f"sequences nested deeper than {MAX_NESTING} levels"
                )
            facts.max_depth = max(facts.max_depth, depth)
            unknown = vr == b"UN"
            if length == _UNDEFINED:
                stack.append(_Frame(True, None, frame.bound, frame.implicit or unknown, depth))
            elif position + length > frame.bound:
                raise fail(f"sequence ({group:04X},{element:04X}) runs past its end")
            else:
                stack.append(_Frame(True, position + length, position + length, frame.implicit or unknown, depth))
            continue
        if length == _UNDEFINED:
            if tag not in _PIXEL_TAGS or len(stack) > 1:
                raise fail(f"undefined length in a non-sequence element ({group:04X},{element:04X})")
            position = _scan_fragments(data, position, frame.bound, facts, item_tags, item_u32)
            facts.pixel_tag = tag
            continue
        if position + length > frame.bound:
            raise fail(f"({group:04X},{element:04X}) value of {length} bytes runs past the end")
        if len(stack) == 1:
            if tag in _PIXEL_TAGS:
                facts.pixel_tag, facts.pixel_length = tag, length
            elif tag in _KEPT:
                facts.top[tag] = data[position : position + length]
        position += length
    if position != size:
        raise fail("bytes left after the data set")
    return facts


def _scan_fragments(
    data: bytes, position: int, bound: int, facts: DatasetFacts, item_tags: struct.Struct, item_u32: struct.Struct
) -> int:
    """Encapsulated Pixel Data (PS3.5 A.4): offset table item, fragment items, delimiter."""
    fragments: list[int] = []
    first = True
    while True:
        if position + 8 > bound:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data ends without its delimiter")
        group, element = item_tags.unpack_from(data, position)
        (length,) = item_u32.unpack_from(data, position + 4)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED or position + length > bound:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data has a malformed item")
        if first:
            facts.offset_table = data[position : position + length]
            first = False
        else:
            if not fragments:
                facts.first_fragment = data[position : position + min(length, 64)]
            fragments.append(length)
        position += length
    if first:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data without a Basic Offset Table item")
    facts.fragments = fragments
    return position


def _check_character_set(facts: DatasetFacts) -> None:
    """Specific Character Set terms pydicom can decode (PS3.3 C.12.1.1.2; first may be empty)."""
    raw = facts.top.get(_SPECIFIC_CHARACTER_SET)
    if raw is None:
        return
    for term in raw.decode("ascii", errors="replace").split("\\"):
        if _known_charset(term.strip(" \x00")) is None:
            raise InvalidInstance(Status.UNKNOWN_CHARACTER_SET, "Specific Character Set (0008,0005) term not known")


_CORRECTABLE_CHARSET = re.compile(r"^ISO[-_ ]?(2022)?[-_ ]?IR[-_ ]?(\d+)$", re.IGNORECASE)


def _known_charset(term: str) -> str | None:
    """The Defined Term a value names (a common mis-spelling such as ``ISO-IR 100`` tolerated)."""
    if term in python_encoding:
        return term
    match = _CORRECTABLE_CHARSET.match(term)
    if match is None:
        return None
    corrected = f"ISO 2022 IR {match.group(2)}" if match.group(1) else f"ISO_IR {match.group(2)}"
    return corrected if corrected in python_encoding else None


def is_image_storage(sop_class_uid: str) -> bool:
    """An image storage SOP class (its IOD has the Image Pixel module, PS3.3 Annex A)."""
    return "Image Storage" in UID(sop_class_uid).name


def is_pixel_free_storage(sop_class_uid: str) -> bool:
    """A storage SOP class whose IOD has no pixel data (SR, KOS, presentation states, documents)."""
    name = UID(sop_class_uid).name
    return any(part in name for part in _PIXEL_FREE_NAME_PARTS)


def _check_sop_class(facts: DatasetFacts, sop_class_uid: str) -> None:
    """Image classes need pixels and their description; pixel-free classes must have none (0xA900)."""
    if is_pixel_free_storage(sop_class_uid):
        if facts.pixel_tag is not None:
            raise InvalidInstance(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Pixel Data in a SOP class without pixels")
        return
    if not is_image_storage(sop_class_uid):
        return  # unknown or private classes: only the generic checks
    if facts.pixel_tag is None:
        raise InvalidInstance(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "image SOP class without Pixel Data (7FE0,0010)")
    required = [_ROWS, _COLUMNS, _BITS_ALLOCATED, _SAMPLES_PER_PIXEL, _PHOTOMETRIC]
    if facts.pixel_tag == _PIXEL_DATA:
        required += [_BITS_STORED, _HIGH_BIT, _PIXEL_REPRESENTATION]
    missing = [tag for tag in required if not _present(facts, tag)]
    if missing:
        names = ", ".join(f"({tag >> 16:04X},{tag & 0xFFFF:04X})" for tag in missing)
        raise InvalidInstance(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Image Pixel module attributes missing: {names}")
    _check_image_pixel_values(facts)


# Photometric Interpretation defined terms, retired ones included (PS3.3 C.7.6.3.1.2).
_PHOTOMETRIC_TERMS = frozenset(
    {b"MONOCHROME1", b"MONOCHROME2", b"PALETTE COLOR", b"RGB", b"HSV", b"ARGB", b"CMYK", b"YBR_FULL",
     b"YBR_FULL_422", b"YBR_PARTIAL_422", b"YBR_PARTIAL_420", b"YBR_ICT", b"YBR_RCT", b"XYB"}
)


def _check_image_pixel_values(facts: DatasetFacts) -> None:
    """Values a reader needs to interpret the pixels (PS3.3 C.7.6.3.1): consistent, known terms."""
    photometric = facts.top.get(_PHOTOMETRIC, b"").strip(b" \x00")
    if photometric not in _PHOTOMETRIC_TERMS:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Photometric Interpretation (0028,0004) is not a defined term")
    samples = _us(facts, _SAMPLES_PER_PIXEL)
    if samples not in (1, 3, 4):
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, f"Samples per Pixel {samples} is not 1, 3 or 4")
    if facts.pixel_tag != _PIXEL_DATA:
        return
    allocated, stored = _us(facts, _BITS_ALLOCATED), _us(facts, _BITS_STORED)
    high_bit, representation = _us(facts, _HIGH_BIT), _us(facts, _PIXEL_REPRESENTATION)
    if not allocated or not stored or stored > allocated:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Bits Stored is zero or exceeds Bits Allocated")
    if high_bit is None or high_bit >= allocated:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "High Bit is not inside Bits Allocated")
    if representation not in (0, 1):
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Pixel Representation is not 0 or 1")


def _present(facts: DatasetFacts, tag: int) -> bool:
    """A top-level attribute with a value (a CS value of only padding counts as empty)."""
    raw = facts.top.get(tag, b"")
    return bool(raw.strip(b" \x00")) if tag == _PHOTOMETRIC else len(raw) > 0


def _us(facts: DatasetFacts, tag: int) -> int | None:
    """First value of a top-level US attribute (None when absent or mis-sized)."""
    raw = facts.top.get(tag)
    if raw is None or len(raw) < 2:
        return None
    return int(struct.unpack_from("<H" if facts.little_endian else ">H", raw)[0])


def _frames(facts: DatasetFacts) -> int:
    """Number of Frames (0028,0008, IS), 1 when absent (PS3.3 C.7.6.6)."""
    raw = facts.top.get(_NUMBER_OF_FRAMES)
    if raw is None or not raw.strip(b" \x00"):
        return 1
    try:
        frames = int(raw.decode("ascii").strip(" \x00").split("\\")[0])
    except ValueError:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Number of Frames (0028,0008) is not a number") from None
    if frames < 1:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Number of Frames (0028,0008) below 1")
    return frames


def expected_pixel_bytes(facts: DatasetFacts) -> int:
    """Native Pixel Data length the Image Pixel module implies (PS3.5 8.1.1, 8.2), before the
    even-length padding (a sender that leaves it out is tolerated: readers need no more)."""
    rows, columns = _us(facts, _ROWS), _us(facts, _COLUMNS)
    bits, samples = _us(facts, _BITS_ALLOCATED), _us(facts, _SAMPLES_PER_PIXEL)
    if not rows or not columns or not bits or not samples:
        raise InvalidInstance(
            Status.PIXEL_DATA_INCONSISTENT, "Rows, Columns, Bits Allocated or Samples per Pixel missing or zero"
        )
    if bits != 1 and bits % 8:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, f"Bits Allocated {bits} is not 1 or a multiple of 8")
    photometric = facts.top.get(_PHOTOMETRIC, b"").strip(b" \x00")
    values = rows * columns * _frames(facts) * samples
    if photometric == b"YBR_FULL_422":  # two samples' worth per pixel (PS3.3 C.7.6.3.1.2)
        values = values * 2 // samples
    return (values + 7) // 8 if bits == 1 else values * (bits // 8)


def _check_pixel_data(facts: DatasetFacts, *, encapsulated: bool) -> None:
    """Native length or encapsulated structure of Pixel Data (PS3.5 8.1.1, A.4)."""
    if facts.fragments is None:
        if encapsulated and facts.pixel_tag == _PIXEL_DATA:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "native Pixel Data in an encapsulated transfer syntax")
        expected = expected_pixel_bytes(facts)
        if facts.pixel_length is None or facts.pixel_length < expected:
            raise InvalidInstance(
                Status.PIXEL_DATA_INCONSISTENT,
                f"Pixel Data has {facts.pixel_length} bytes, the Image Pixel module implies {expected}",
            )
        return
    if not encapsulated:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data in a native transfer syntax")
    frames = _frames(facts)
    fragments = facts.fragments
    if not fragments:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data without fragments")
    if any(length % 2 for length in fragments):
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "encapsulated Pixel Data fragment of odd length")
    table = facts.offset_table
    extended = facts.top.get(_EXTENDED_OFFSET_TABLE)
    if extended is not None:
        if len(extended) != 8 * frames:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Extended Offset Table does not have one entry per frame")
        return
    if table:
        if len(table) % 4 or len(table) // 4 != frames:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Basic Offset Table does not have one entry per frame")
        offsets = struct.unpack(("<" if facts.little_endian else ">") + f"{frames}I", table)
        total = sum(8 + length for length in fragments)
        if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= total:
            raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, "Basic Offset Table offsets out of order or range")
        return
    if len(fragments) < frames:
        raise InvalidInstance(
            Status.PIXEL_DATA_INCONSISTENT, f"{len(fragments)} fragments for {frames} frames and no offset table"
        )


# Start of the first fragment for each codec family (PS3.5 A.4.1-A.4.6; ISO/IEC 10918-1, 15444-1).
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def _check_codec_marker(fragment: bytes, syntax: UID) -> None:
    """The first fragment starts as its codec requires (JPEG SOI, J2K SOC or JP2, RLE header)."""
    keyword = syntax.keyword or ""
    if "JPEG2000" in keyword or "HTJ2K" in keyword:
        ok = fragment.startswith(_J2K_SOC) or fragment.startswith(_JP2_SIGNATURE)
    elif keyword.startswith("JPEG"):
        ok = fragment.startswith(_JPEG_SOI)
    elif keyword == "RLELossless":  # 64-byte header, 1 to 15 segments (PS3.5 G.5)
        ok = len(fragment) >= 64 and 1 <= struct.unpack_from("<I", fragment)[0] <= 15
    else:
        ok = True
    if not ok:
        raise InvalidInstance(Status.PIXEL_DATA_INCONSISTENT, f"first fragment is not {keyword or 'encapsulated'} data")


# -- the later check ------------------------------------------------------------------------
def deep_check(path: Path) -> str | None:
    """The later check of a stored file: a compressed instance's first frame must decode.

    Returns the reason it fails, ``None`` when it passes. A native or deflated instance passed
    everything at the C-STORE (its structure was walked to the end and its pixels measured),
    so only its File Meta Information is read here; an encapsulated one is read in full, every
    value converted and its first frame decoded, as analysis will, off the network path, so a
    file that would stop analysis is quarantined instead.
    """
    try:
        syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
        if not syntax.is_compressed or syntax == DeflatedExplicitVRLittleEndian:
            return None
        dataset = dcmread(path)
        for element in dataset.iterall():
            _ = element.value
        if "PixelData" in dataset:
            pixel_array(dataset, index=0)
    except RecursionError:
        return "nested too deep to read"
    except Exception as exc:  # noqa: BLE001 - any failure to read is a reason to quarantine
        return f"cannot be read in full ({type(exc).__name__})"
    return None
