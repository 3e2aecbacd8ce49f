"""Every encoding a stroke study may come in, sent by DCMTK ``storescu``, is stored exactly as
received: the nine encodings of one Siemens MR image, the real Philips CT, the enhanced
multi-frame MR, and a deflated data set."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.bootstrap import Node
from dicom_node.index.models import Instance
from tests.conftest import CT_PHILIPS, MR_ENHANCED, TS_SIEMENS, free_port, require_shared_data
from tests.peers import DCMTK, dataset_bytes, tiny_ct

# storescu options proposing each file's own transfer syntax (PS3.5 Annex A).
ENCODINGS = [
    ("1.dcm", "1.2.840.10008.1.2.1", ["-xe"]),  # Explicit VR Little Endian
    ("2.dcm", "1.2.840.10008.1.2", ["-xi"]),  # Implicit VR Little Endian
    ("3.dcm", "1.2.840.10008.1.2.2", ["-xb"]),  # Explicit VR Big Endian (retired)
    ("4.dcm", "1.2.840.10008.1.2.5", ["-xr"]),  # RLE Lossless
    ("5.dcm", "1.2.840.10008.1.2.4.70", ["-xs"]),  # JPEG Lossless SV1
    ("6.dcm", "1.2.840.10008.1.2.4.70", ["-xs"]),
    ("7.dcm", "1.2.840.10008.1.2.4.80", ["-xt"]),  # JPEG-LS Lossless
    ("8.dcm", "1.2.840.10008.1.2.4.80", ["-xt"]),
    ("9.dcm", "1.2.840.10008.1.2.4.90", ["-xv"]),  # JPEG 2000 Lossless
]


def _stored(node: Node, sop_uid: str) -> tuple[Path, Instance]:
    with node.session_factory() as session:
        instance = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()
    return node.settings.storage.data_dir / instance.path, instance


@pytest.mark.parametrize(("name", "transfer_syntax", "options"), ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_encoding_stored_byte_identical(node: Node, dcmtk: DCMTK, name: str, transfer_syntax: str, options: list[str]) -> None:
    source = require_shared_data(TS_SIEMENS.name, name)
    sent = dcmtk.storescu(node.scp.address[1], [source], extra=options)
    assert sent.returncode == 0, sent.stderr
    sop_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    path, instance = _stored(node, sop_uid)
    assert instance.transfer_syntax_uid == transfer_syntax
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    assert dataset_bytes(path) == dataset_bytes(source)


def test_real_ct_stored_byte_identical(node: Node, dcmtk: DCMTK) -> None:
    ct_files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())[:3]
    sent = dcmtk.storescu(node.scp.address[1], ct_files)
    assert sent.returncode == 0, sent.stderr
    for source in ct_files:
        path, _ = _stored(node, pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(path) == dataset_bytes(source), source.name


def _bit_preserved_by_dcmtk(dcmtk: DCMTK, source: Path, folder: Path) -> Path:
    """What DCMTK storescp stores with ``+B`` (bit-preserving) when storescu sends ``source``."""
    folder.mkdir()
    port = free_port()
    archive = subprocess.Popen(
        [dcmtk.tool("storescp"), "+B", "-od", str(folder), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while dcmtk.echoscu(port, called="ANY").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        sent = dcmtk.storescu(port, [source], called="ANY")
        assert sent.returncode == 0, sent.stderr
    finally:
        archive.terminate()
        archive.wait(30)
    (stored,) = folder.iterdir()
    return stored


def test_enhanced_mr_stored_as_received(node: Node, dcmtk: DCMTK, tmp_path: Path) -> None:
    # storescu re-encodes this file (sequence lengths), so "as received" is checked against
    # what DCMTK's own storescp keeps in bit-preserving mode from the same sender.
    source = sorted(require_shared_data(MR_ENHANCED.name, "12_DWI_dir80_PA").iterdir())[0]
    sent = dcmtk.storescu(node.scp.address[1], [source])
    assert sent.returncode == 0, sent.stderr
    path, instance = _stored(node, pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    assert instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    assert dataset_bytes(path) == dataset_bytes(_bit_preserved_by_dcmtk(dcmtk, source, tmp_path / "dcmtk"))
    assert pydicom.dcmread(path).NumberOfFrames == pydicom.dcmread(source).NumberOfFrames


def test_deflated_data_set_is_kept_deflated(node: Node, dcmtk: DCMTK, tmp_path: Path) -> None:
    ds = tiny_ct()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    source = tmp_path / "deflated.dcm"
    ds.save_as(source, enforce_file_format=True)
    sent = dcmtk.storescu(node.scp.address[1], [source], extra=["-xd"])
    assert sent.returncode == 0, sent.stderr
    path, instance = _stored(node, ds.SOPInstanceUID)
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    stored = pydicom.dcmread(path)
    assert stored.PixelData == ds.PixelData and stored.StudyInstanceUID == ds.StudyInstanceUID
