"""A bounded fuzzer over real associations: mutated real CT slices, the transfer-syntax set and a
tiny synthetic CT are sent to the node in-process; what a user relies on is checked afterwards.

Fixed seeds, so the corpus is the same on every run: it is the regression corpus of issue 10
(before validation, 0x0000 was answered to Pixel Data cut short, CT Image Storage without Pixel
Data, CT pixels labelled Basic Text SR, a Pixel Data length of 0xFFFFFFF0 with 1 KiB sent,
unknown character sets, and a 1000-deep sequence that stopped analysis).

After the run: the node answers C-ECHO, no store was answered 0xC211 (an exception in the
handler), every acknowledged instance reads back in full with its Pixel Data as long as its
Image Pixel module implies (or decodes, when compressed) unless it was quarantined, and index
and disk agree.
"""

from __future__ import annotations

import collections
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from dicom_node.bootstrap import Node
from dicom_node.index.models import Instance
from dicom_node.status import Status
from tests.conftest import require_shared_data
from tests.peers import dataset_bytes, encode_dataset, store_raw, tiny_ct

SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
    RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
)
SOP_CLASSES = (CTImageStorage, MRImageStorage, BasicTextSRStorage)


@dataclass(frozen=True)
class Base:
    """One valid instance to mutate: its data set bytes as sent and how they are sent."""

    name: str
    data: bytes
    sop_class: str
    sop_uid: str
    syntax: str


@dataclass(frozen=True)
class Mutant:
    """One mutation to send: the command's UIDs and syntax, the data set bytes, what was done."""

    kind: str
    data: bytes
    sop_class: str
    sop_uid: str
    syntax: str


def _tiny(rng: random.Random) -> Dataset:
    """The tiny CT with UIDs drawn from ``rng`` (so the corpus is the same on every run)."""
    study, series, sop = (f"2.25.{rng.getrandbits(120) | 1 << 119}" for _ in range(3))
    return tiny_ct(study_uid=study, series_uid=series, sop_uid=sop)


def _with_uid(base: Base, rng: random.Random) -> Base:
    """The base with a fresh SOP Instance UID of the same length (so byte offsets stay valid)."""
    new_uid = ("2.25." + "".join(rng.choice("0123456789") for _ in range(len(base.sop_uid))))[: len(base.sop_uid)]
    new_uid = new_uid[:-1] + "1" if new_uid.endswith(".") else new_uid
    data = base.data.replace(base.sop_uid.encode(), new_uid.encode())
    return Base(base.name, data, base.sop_class, new_uid, base.syntax)


def _element_header_offsets(data: bytes, syntax: str) -> list[int]:
    """Offsets where a group 0008-0028 element header plausibly starts (to aim length mutations)."""
    little = syntax != ExplicitVRBigEndian
    offsets = []
    for group in (0x0008, 0x0010, 0x0018, 0x0020, 0x0028, 0x7FE0):
        needle = struct.pack("<H" if little else ">H", group)
        start = 0
        while len(offsets) < 400:
            found = data.find(needle, start, min(len(data), 8192))
            if found < 0:
                break
            offsets.append(found)
            start = found + 1
    return offsets


def _byte_mutation(base: Base, rng: random.Random) -> Mutant:
    data = bytearray(base.data)
    kind = rng.choice(("truncate", "flip", "length", "insert", "delete", "pixel-length"))
    if kind == "truncate":
        del data[rng.randrange(1, len(data)) :]
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(len(data), 4096))] = rng.randrange(256)
    elif kind == "length":
        offsets = _element_header_offsets(base.data, base.syntax) or [0]
        at = rng.choice(offsets) + rng.choice((4, 6, 8))
        value = rng.choice((0xFFFFFFF0, 0xFFFFFFFF, rng.randrange(1 << 32), rng.randrange(1 << 16)))
        data[at : at + 4] = struct.pack("<I", value)
    elif kind == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 64)]
    else:  # Pixel Data's own length field
        little = base.syntax != ExplicitVRBigEndian
        at = base.data.rfind(struct.pack("<HH" if little else ">HH", 0x7FE0, 0x0010))
        if at >= 0:
            data[at + 8 : at + 12] = struct.pack("<I" if little else ">I", rng.choice((0xFFFFFFF0, 1024, len(data) - at)))
    return Mutant(kind, bytes(data), base.sop_class, base.sop_uid, base.syntax)


_REMOVABLE = ("PixelData", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation",
              "StudyInstanceUID", "BitsStored", "PixelRepresentation")


def _deep_sequence(depth: int) -> bytes:
    item_open = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_open = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
    seq_close = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (seq_open + item_open) * depth + (item_close + seq_close) * depth


def _structural_mutation(rng: random.Random) -> Mutant:
    """Attribute-level changes to a tiny CT (Explicit VR Little Endian)."""
    ds: Dataset = _tiny(rng)
    sop_class = CTImageStorage
    kind = rng.choice(("remove", "pixel-module", "sop-class", "charset", "deep", "short-pixels"))
    if kind == "remove":
        keyword = rng.choice(_REMOVABLE)
        if keyword != "PixelData":
            ds["PixelData"].VR = "OW"
        delattr(ds, keyword)
        kind = f"remove {keyword}"
    elif kind == "pixel-module":
        keyword = rng.choice(("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"))
        value = rng.choice((0, 1, 7, 9, 16, 17, 64, 1000, 65535))
        setattr(ds, keyword, str(value) if keyword == "NumberOfFrames" else value)
        ds["PixelData"].VR = "OW"
        kind = f"{keyword}={value}"
    elif kind == "sop-class":
        sop_class = BasicTextSRStorage
        ds.SOPClassUID = sop_class
    elif kind == "charset":
        ds.SpecificCharacterSet = rng.choice(("KLINGON", "ISO_IR 999", "ISO 2022 IR 9999", "utf-8", "\x01\x02"))
    elif kind == "deep":
        depth = rng.choice((40, 200, 1000, 3000))
        data = encode_dataset(ds)
        cut = data.index(struct.pack("<HH", 0x0010, 0x0010))
        return Mutant(f"deep {depth}", data[:cut] + _deep_sequence(depth) + data[cut:], sop_class, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    else:
        ds.PixelData = ds.PixelData[: rng.randrange(0, len(ds.PixelData), 2)]
    return Mutant(kind, encode_dataset(ds), sop_class, ds.SOPInstanceUID, ExplicitVRLittleEndian)


def _bases(rng: random.Random) -> list[Base]:
    bases = []
    ct = sorted(require_shared_data("ct_philips_headphantom_1mm").iterdir())[:2]
    syntaxes = sorted(require_shared_data("ts_siemens_mr_transfer_syntaxes").glob("*.dcm"))
    for path in [*ct, *syntaxes]:
        header = dcmread(path, stop_before_pixels=True)
        bases.append(Base(path.name, dataset_bytes(path), str(header.SOPClassUID), str(header.SOPInstanceUID),
                          str(header.file_meta.TransferSyntaxUID)))
    tiny = _tiny(rng)
    bases.append(Base("tiny", encode_dataset(tiny), CTImageStorage, tiny.SOPInstanceUID, ExplicitVRLittleEndian))
    return bases


def regressions() -> Iterator[Mutant]:
    """The instances issue 10 saw acknowledged, each built on purpose (all must be refused)."""
    rng = random.Random(0)
    ds = _tiny(rng)
    ds["PixelData"].VR = "OW"
    del ds.PixelData
    yield Mutant("CT without Pixel Data", encode_dataset(ds), CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds = _tiny(rng)
    ds.PixelData = ds.PixelData[:64]
    yield Mutant("Pixel Data cut short", encode_dataset(ds), CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds = _tiny(rng)
    ds.SOPClassUID = BasicTextSRStorage
    yield Mutant("CT pixels as Basic Text SR", encode_dataset(ds), BasicTextSRStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds = _tiny(rng)
    data = encode_dataset(ds)
    at = data.rfind(struct.pack("<HH", 0x7FE0, 0x0010))
    huge = data[:at] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", 0xFFFFFFF0) + b"\x00" * 1024
    yield Mutant("Pixel Data 0xFFFFFFF0 with 1 KiB", huge, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds = _tiny(rng)
    ds.SpecificCharacterSet = "ISO_IR 999"
    yield Mutant("unknown character set", encode_dataset(ds), CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    ds = _tiny(rng)
    data = encode_dataset(ds)
    cut = data.index(struct.pack("<HH", 0x0010, 0x0010))
    deep = data[:cut] + _deep_sequence(1000) + data[cut:]
    yield Mutant("1000-deep sequence", deep, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)


def corpus(seed: int = 10, byte_mutations_per_base: int = 18, structural: int = 90) -> Iterator[Mutant]:
    """The fixed mutation corpus: byte mutations of every base, attribute mutations of a tiny CT."""
    yield from regressions()
    rng = random.Random(seed)
    for base in _bases(rng):
        for _ in range(byte_mutations_per_base):
            yield _byte_mutation(_with_uid(base, rng), rng)
    for _ in range(structural):
        yield _structural_mutation(rng)


def _associate(port: int) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context("1.2.840.10008.1.1")
    for sop_class in SOP_CLASSES:
        for syntax in SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="FPENODE")
    assert assoc.is_established
    return assoc


def _native_pixel_bytes(ds: Dataset) -> int:
    values = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1) * int(ds.SamplesPerPixel)
    return (values + 7) // 8 if ds.BitsAllocated == 1 else values * (int(ds.BitsAllocated) // 8)


def _reads_back_in_full(path: Path) -> None:
    ds = dcmread(path)
    for element in ds.iterall():
        _ = element.value
    assert "PixelData" in ds
    if ds.file_meta.TransferSyntaxUID.is_compressed and ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        pixel_array(ds, index=0)
    else:
        assert len(ds.PixelData) >= _native_pixel_bytes(ds)


def _send_all(port: int, mutants: list[Mutant], folder: Path, on_result: Callable[[Mutant, int], None]) -> None:
    assoc = _associate(port)
    try:
        for mutant in mutants:
            if not assoc.is_established:
                assoc = _associate(port)
            status = store_raw(assoc, mutant.sop_class, mutant.sop_uid, mutant.data, folder, mutant.syntax)
            on_result(mutant, status)
        assert assoc.send_c_echo().Status == Status.SUCCESS, "the node stopped answering"
    finally:
        if assoc.is_established:
            assoc.release()


def test_fuzzed_stores_are_refused_or_stored_whole(node: Node, tmp_path: Path) -> None:
    mutants = list(corpus())
    assert len(mutants) > 250
    results: list[tuple[Mutant, int]] = []
    _send_all(node.scp.address[1], mutants, tmp_path, lambda mutant, status: results.append((mutant, status)))
    node.dispatcher.drain()
    statuses = collections.Counter(status for _, status in results)
    acknowledged = [mutant for mutant, status in results if status == Status.SUCCESS]
    data_dir = node.settings.storage.data_dir
    with node.session_factory() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        quarantined = {uid for uid, row in rows.items() if row.quarantine_reason is not None}
        paths = {row.path for row in rows.values()}
    on_disk = {path.relative_to(data_dir).as_posix() for path in (data_dir / "dicom").rglob("*.dcm")}
    on_disk |= {path.relative_to(data_dir).as_posix() for path in (data_dir / "quarantine").rglob("*.dcm")}
    print(
        f"fuzz: {len(results)} sent, {len(acknowledged)} acknowledged, {len(quarantined)} quarantined, refused "
        + ", ".join(f"0x{status:04X}: {count}" for status, count in sorted(statuses.items()) if status != Status.SUCCESS)
    )
    assert Status.UNEXPECTED_ERROR not in statuses, [m.kind for m, s in results if s == Status.UNEXPECTED_ERROR]
    assert -1 not in statuses, "a store got no response"
    assert paths == on_disk, "index and disk disagree"
    assert {mutant.sop_uid for mutant in acknowledged} == set(rows)
    for mutant in acknowledged:
        if mutant.sop_uid in quarantined:
            continue
        try:
            _reads_back_in_full(data_dir / rows[mutant.sop_uid].path)
        except Exception as exc:  # noqa: BLE001 - name the mutation that got through
            pytest.fail(f"acknowledged {mutant.kind} mutation of a {mutant.syntax} instance does not read back: {exc!r}")
    # The regression cases of issue 10 are in the corpus and all refused.
    refused_kinds = {mutant.kind for mutant, status in results if status != Status.SUCCESS}
    assert {mutant.kind for mutant in regressions()} <= refused_kinds
