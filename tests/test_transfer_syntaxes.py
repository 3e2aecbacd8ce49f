"""Every encoding a stroke study may come in, sent by DCMTK ``storescu``, is stored exactly as
received: the nine encodings of one Siemens MR image, the real Philips CT, the enhanced
multi-frame MR, and a deflated data set; and every one of them decodes to the same pixels
through :mod:`inference.decode`, in this process and in its decoding pool."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from sqlalchemy import select

from dicom_node.bootstrap import Node
from dicom_node.index.models import Instance
from inference import decode as decode_module
from inference.decode import PARALLEL_MIN_INSTANCES, PixelDecodeError, decode_all, plugins_for
from inference.volumes import DecodeError, read_planes
from tests import factory
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


# --------------------------------------------------------------------------- decoding what was stored
# inference.decode: the plugin chosen per transfer syntax and the pool that decodes compressed
# series on several cores must give the pixels the uncompressed file holds, and a corrupt frame
# must stop the series with an error naming its instance.

DECODED_SYNTAXES = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


def test_real_encodings_decode_to_identical_pixels_on_every_path() -> None:
    files = sorted(require_shared_data(TS_SIEMENS.name).glob("*.dcm"))
    assert len(files) == len(ENCODINGS)
    datasets = [pydicom.dcmread(path) for path in files]
    reference = pixel_array(datasets[0])  # 1.dcm: Explicit VR Little Endian
    for workers, items in ((1, datasets), (2, datasets * 2)):  # 2: twelve compressed files, through the pool
        for index, pixels in enumerate(decode_all(items, workers=workers)):
            assert np.array_equal(pixels, reference), (files[index % len(files)].name, workers)
    for path, ds in zip(files, datasets):  # every installed plugin agrees: the choice is speed only
        for plugin in plugins_for(ds.file_meta.TransferSyntaxUID):
            assert np.array_equal(pixel_array(ds, decoding_plugin=plugin), reference), (path.name, plugin)


@pytest.mark.parametrize("transfer_syntax", DECODED_SYNTAXES, ids=lambda uid: uid.name.split(" ")[0])
def test_compressed_series_decodes_like_the_uncompressed_one(tmp_path: Path, transfer_syntax: UID) -> None:
    reference = factory.write_ct_series(tmp_path / "ref", n_slices=PARALLEL_MIN_INSTANCES + 4, rows=64)
    encoded = factory.write_datasets([pydicom.dcmread(path) for path in reference.paths], tmp_path / "enc",
                                     transfer_syntax)  # the same images, compressed (pydicom gives new SOP UIDs)
    expected, _ = read_planes(reference.paths)
    assert pydicom.dcmread(encoded[0]).file_meta.TransferSyntaxUID == transfer_syntax
    planes, facts = read_planes(encoded)
    assert facts["series_uid"] == reference.series_uid
    assert [p.header.position for p in planes] == [p.header.position for p in expected]
    assert all(np.array_equal(a.stored, b.stored) for a, b in zip(planes, expected))
    parallel = decode_all([pydicom.dcmread(path) for path in encoded], workers=2)
    assert all(np.array_equal(a, b.stored) for a, b in zip(parallel, expected))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "pipe"])
def test_pool_hands_decoded_chunks_back_whole_and_leaves_no_shared_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    """A pool process's chunk comes back through shared memory, or through the pipe where /dev/shm is short."""
    reference = factory.write_ct_series(tmp_path / "ref", n_slices=6, rows=64)
    encoded = factory.write_datasets([pydicom.dcmread(path) for path in reference.paths], tmp_path / "enc",
                                     JPEG2000Lossless)
    chunk = [decode_module._portable(pydicom.dcmread(path)) for path in encoded]
    _corrupt(chunk[2], 40)  # a failure travels back in its place
    if not shared:
        monkeypatch.setattr(decode_module, "_shared_memory_free", lambda: 0)  # as a full /dev/shm
    before = set(os.listdir("/dev/shm"))
    name, layout = decode_module._decode_chunk_shared(chunk)
    assert bool(name) is shared
    arrays = decode_module._take_shared(name, layout)
    assert set(os.listdir("/dev/shm")) == before  # the receiver removed the block
    assert isinstance(arrays[2], PixelDecodeError) and arrays[2].sop_instance_uid == chunk[2].SOPInstanceUID
    expected = [pixel_array(pydicom.dcmread(path)) for path in reference.paths]
    for index, (array, stored) in enumerate(zip(arrays, expected)):
        if index != 2:
            assert isinstance(array, np.ndarray) and array.dtype == stored.dtype and np.array_equal(array, stored)


def _corrupt(ds: Dataset, keep: int) -> None:
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:keep]])


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_jpeg2000_frame_raises_naming_the_instance(tmp_path: Path, workers: int) -> None:
    series = factory.write_ct_series(tmp_path, n_slices=PARALLEL_MIN_INSTANCES + 4, rows=64,
                                     transfer_syntax=JPEG2000Lossless)
    datasets = [pydicom.dcmread(path) for path in series.paths]
    bad = datasets[5]
    _corrupt(bad, len(next(generate_frames(bad.PixelData, number_of_frames=1))) // 2)
    with pytest.raises(PixelDecodeError) as raised:
        decode_all(datasets, workers=workers)
    assert raised.value.sop_instance_uid == bad.SOPInstanceUID
    # Building planes drops that one instance, naming it, and keeps the rest of the series.
    dropped: list[str] = []
    planes, facts = read_planes(datasets, dropped)
    assert len(planes) == len(datasets) - 1 and facts["series_uid"] == series.series_uid
    assert bad.SOPInstanceUID not in {plane.source.sop_instance_uid for plane in planes}
    assert len(dropped) == 1 and bad.SOPInstanceUID in dropped[0] and "JPEG 2000" in dropped[0]
    with pytest.raises(DecodeError) as volume_error:  # alone, it leaves no image: a named error
        read_planes([bad])
    assert volume_error.value.sop_instance_uid == bad.SOPInstanceUID
    assert bad.SOPInstanceUID in volume_error.value.reason and "JPEG 2000" in volume_error.value.reason
    assert volume_error.value.series_uid == series.series_uid


def test_truncated_jpeg_ls_frame_is_refused_not_decoded_to_noise(tmp_path: Path) -> None:
    # pydicom's first JPEG-LS plugin (pylibjpeg-libjpeg) returns noise for this frame without
    # an error; CharLS, which inference.decode prefers, refuses it.
    series = factory.write_ct_series(tmp_path, n_slices=1, rows=64, transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(series.paths[0])
    _corrupt(ds, 200)
    with pytest.raises(DecodeError) as raised:
        read_planes([ds])
    assert raised.value.sop_instance_uid == ds.SOPInstanceUID
