"""Validate before acknowledging (dicom_node.validation): the checks as pure functions on real
and synthetic data sets, then the refusals over a real association (status, no file, no row)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, CTImageStorage, JPEG2000Lossless, RLELossless
from sqlalchemy import func, select

from dicom_node.bootstrap import Node
from dicom_node.index.models import Instance
from dicom_node.status import Status
from dicom_node.validation import MAX_NESTING, InvalidInstance, check_dataset, deep_check
from tests.conftest import CT_PHILIPS, require_shared_data
from tests.peers import CT_IMAGE_STORAGE, associate, dataset_bytes, encode_dataset, store_raw, tiny_ct

EXPLICIT = "1.2.840.10008.1.2.1"


def _status_of(data: bytes, sop_class: str = CTImageStorage, syntax: str = EXPLICIT) -> int:
    try:
        check_dataset(data, syntax, sop_class)
    except InvalidInstance as exc:
        return int(exc.status)
    return int(Status.SUCCESS)


def nested(depth: int) -> Dataset:
    """A tiny CT whose ReferencedImageSequence nests ``depth`` levels (undefined lengths when written)."""
    ds = tiny_ct()
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "2.25.1"
    for _ in range(depth - 1):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = Sequence([inner])
    return ds


def undefined_length_nesting(depth: int) -> bytes:
    """A valid tiny CT with a ``depth``-deep undefined-length sequence, encoded by hand."""
    item_open = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_open = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
    seq_close = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    blob = (seq_open + item_open) * depth + (item_close + seq_close) * depth
    data = encode_dataset(tiny_ct())
    # (0008,1140) sorts before (0010,xxxx): insert it before the first group 0010 element.
    cut = data.index(struct.pack("<HH", 0x0010, 0x0010))
    return data[:cut] + blob + data[cut:]


def test_real_ct_and_transfer_syntax_set_pass(shared_data: Path) -> None:
    ct = sorted(require_shared_data("ct_philips_headphantom_1mm").iterdir())[:3]
    syntaxes = sorted(require_shared_data("ts_siemens_mr_transfer_syntaxes").glob("*.dcm"))
    from pydicom import dcmread

    for path in [*ct, *syntaxes]:
        header = dcmread(path, stop_before_pixels=True)
        facts = check_dataset(dataset_bytes(path), header.file_meta.TransferSyntaxUID, header.SOPClassUID)
        assert facts.pixel_tag is not None


def test_parse_to_end_limits() -> None:
    good = encode_dataset(tiny_ct())
    assert _status_of(good) == Status.SUCCESS
    assert _status_of(good[:-10]) == Status.CANNOT_UNDERSTAND  # pixel data cut short
    assert _status_of(good + b"\x00\x00\x00") == Status.CANNOT_UNDERSTAND  # bytes after the end
    # Pixel Data claiming 0xFFFFFFF0 bytes with 1 KiB sent.
    cut = good.index(struct.pack("<HH", 0x7FE0, 0x0010))
    huge = good[:cut] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", 0xFFFFFFF0) + b"\x00" * 1024
    assert _status_of(huge) == Status.CANNOT_UNDERSTAND
    assert _status_of(encode_dataset(nested(MAX_NESTING))) == Status.SUCCESS
    assert _status_of(encode_dataset(nested(MAX_NESTING + 1))) == Status.NESTED_TOO_DEEP
    assert _status_of(undefined_length_nesting(1000)) == Status.NESTED_TOO_DEEP
    assert _status_of(undefined_length_nesting(3)) == Status.SUCCESS


def test_pixel_data_length_and_sop_class() -> None:
    ds = tiny_ct()
    ds.Rows = 16  # 8x8 pixels sent, 16x8 claimed
    assert _status_of(encode_dataset(ds)) == Status.PIXEL_DATA_INCONSISTENT
    ds = tiny_ct()
    ds.NumberOfFrames = "0"
    assert _status_of(encode_dataset(ds)) == Status.PIXEL_DATA_INCONSISTENT
    ds = tiny_ct()
    del ds.PixelData
    assert _status_of(encode_dataset(ds)) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    ds = tiny_ct()
    ds["PixelData"].VR = "OW"
    del ds.BitsAllocated
    assert _status_of(encode_dataset(ds)) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    # CT pixels labelled Basic Text SR.
    assert _status_of(encode_dataset(tiny_ct()), BasicTextSRStorage) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    # A private or unknown class: only the generic checks.
    assert _status_of(encode_dataset(tiny_ct()), "1.2.826.0.1.3680043.9.9999.1") == Status.SUCCESS


@pytest.mark.parametrize(
    ("charset", "status"),
    [("ISO_IR 100", Status.SUCCESS), ("\\ISO 2022 IR 87", Status.SUCCESS), ("ISO-IR 192", Status.SUCCESS),
     ("KLINGON", Status.UNKNOWN_CHARACTER_SET), ("ISO_IR 100\\ISO_IR 999", Status.UNKNOWN_CHARACTER_SET)],
)
def test_character_set_must_be_known(charset: str, status: Status) -> None:
    ds = tiny_ct()
    ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    assert _status_of(encode_dataset(ds)) == status


def _encapsulated(frames: list[bytes], *, offset_table: bool, number_of_frames: int | None = None) -> bytes:
    ds = tiny_ct()
    ds.NumberOfFrames = str(number_of_frames or len(frames))
    ds.PixelData = encapsulate(frames, has_bot=offset_table)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return encode_dataset(ds)


def test_encapsulated_fragments() -> None:
    j2k = b"\xff\x4f\xff\x51" + b"\x00" * 60
    assert _status_of(_encapsulated([j2k, j2k], offset_table=True), syntax=JPEG2000Lossless) == Status.SUCCESS
    assert _status_of(_encapsulated([j2k, j2k], offset_table=False), syntax=JPEG2000Lossless) == Status.SUCCESS
    # Three frames claimed, two fragments and no offset table.
    three = _encapsulated([j2k, j2k], offset_table=False, number_of_frames=3)
    assert _status_of(three, syntax=JPEG2000Lossless) == Status.PIXEL_DATA_INCONSISTENT
    # An offset table with two entries for three frames.
    bad_table = _encapsulated([j2k, j2k], offset_table=True, number_of_frames=3)
    assert _status_of(bad_table, syntax=JPEG2000Lossless) == Status.PIXEL_DATA_INCONSISTENT
    # JPEG 2000 announced, something else sent.
    assert _status_of(_encapsulated([b"\x00" * 64], offset_table=False), syntax=JPEG2000Lossless) == Status.PIXEL_DATA_INCONSISTENT
    assert _status_of(_encapsulated([b"\x00" * 64], offset_table=False), syntax=RLELossless) == Status.PIXEL_DATA_INCONSISTENT
    # Native Pixel Data in an encapsulated syntax, encapsulated in a native one.
    assert _status_of(encode_dataset(tiny_ct()), syntax=JPEG2000Lossless) == Status.PIXEL_DATA_INCONSISTENT
    assert _status_of(_encapsulated([j2k], offset_table=False)) == Status.PIXEL_DATA_INCONSISTENT


def test_deep_check_reads_a_stored_file(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    tiny_ct().save_as(good, enforce_file_format=True)
    assert deep_check(good) is None
    compressed = sorted(require_shared_data("ts_siemens_mr_transfer_syntaxes").glob("*.dcm"))[3:]
    assert [deep_check(path) for path in compressed] == [None] * len(compressed)
    # Passes the C-STORE checks (JPEG 2000 start of codestream) but does not decode.
    broken = tmp_path / "broken.dcm"
    ds = tiny_ct()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x17" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(broken, enforce_file_format=True)
    assert deep_check(broken) is not None


def test_refused_over_an_association_leaves_no_file_or_row(node: Node, tmp_path: Path) -> None:
    port = node.scp.address[1]
    ds = tiny_ct()
    good = encode_dataset(ds)
    cases = {
        "deep": (undefined_length_nesting(1000), Status.NESTED_TOO_DEEP),
        "cut": (good[:-10], Status.CANNOT_UNDERSTAND),
        "sr": (good, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    }
    assoc = associate(port, contexts=(CT_IMAGE_STORAGE, BasicTextSRStorage))
    try:
        for name, (data, status) in cases.items():
            sop_class = BasicTextSRStorage if name == "sr" else CT_IMAGE_STORAGE
            if name == "sr":
                relabelled = tiny_ct(sop_uid=ds.SOPInstanceUID)
                relabelled.SOPClassUID = BasicTextSRStorage
                data = encode_dataset(relabelled)
            assert store_raw(assoc, sop_class, ds.SOPInstanceUID, data, tmp_path) == status, name
        assert assoc.send_c_echo().Status == Status.SUCCESS
    finally:
        assoc.release()
    assert not list((node.settings.storage.data_dir / "dicom").rglob("*.dcm"))
    with node.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
