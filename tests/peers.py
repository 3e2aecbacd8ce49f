"""Real peers for tests: DCMTK command-line tools and the PostgreSQL server.

DCMTK is called by absolute path (``/usr/bin/storescu``): pynetdicom installs its own
``storescu``/``echoscu`` into the venv, which shadow DCMTK's when the venv is on PATH. The
version string is checked so a test never silently drives the wrong tool.

PostgreSQL comes from ``FPENODE_TEST_POSTGRES_URL`` (``make test`` starts a throw-away cluster,
``deploy/test-postgres.sh``, and sets it). Unset, the test FAILS with the reason; it never skips. Each test session gets a fresh schema.
"""

from __future__ import annotations

import os
import struct
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

POSTGRES_ENV = "FPENODE_TEST_POSTGRES_URL"
DCMTK_BIN = Path("/usr/bin")


class DCMTK:
    """DCMTK tools by absolute path, version-checked."""

    def __init__(self, bin_dir: Path = DCMTK_BIN) -> None:
        self.bin_dir = bin_dir
        self._checked: set[str] = set()

    def tool(self, name: str) -> str:
        """Absolute path of a DCMTK tool; fails the test if it is missing or not DCMTK."""
        path = self.bin_dir / name
        if name not in self._checked:
            if not path.is_file():
                pytest.fail(f"DCMTK {name} not found at {path} (install the 'dcmtk' package)")
            result = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" not in (result.stdout + result.stderr).lower():
                pytest.fail(f"{path} is not DCMTK's {name}: {result.stdout[:200]!r}")
            self._checked.add(name)
        return str(path)

    def run(self, name: str, args: Sequence[str], *, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a DCMTK tool, capturing output (never raises on a non-zero exit)."""
        environ = dict(os.environ, **(env or {}))
        return subprocess.run(
            [self.tool(name), *args], capture_output=True, text=True, timeout=timeout_s, env=environ
        )

    def echoscu(self, port: int, *, calling: str = "ECHOSCU", called: str = "FPENODE") -> subprocess.CompletedProcess[str]:
        """C-ECHO to 127.0.0.1:port."""
        return self.run("echoscu", ["-aet", calling, "-aec", called, "127.0.0.1", str(port)], timeout_s=60)

    def storescu(
        self,
        port: int,
        files: Sequence[Path | str],
        *,
        calling: str = "STORESCU",
        called: str = "FPENODE",
        extra: Sequence[str] = (),
        timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """C-STORE files or folders (``+sd`` added for folders) to 127.0.0.1:port."""
        args = ["-aet", calling, "-aec", called, *extra]
        if any(Path(f).is_dir() for f in files):
            args.append("+sd")
        return self.run("storescu", [*args, "127.0.0.1", str(port), *map(str, files)], timeout_s=timeout_s, env=env)


@pytest.fixture(scope="session")
def dcmtk() -> DCMTK:
    """DCMTK tools (``dcmtk.storescu(port, files)``, ``dcmtk.echoscu(port)``)."""
    return DCMTK()


def postgres_base_url() -> str:
    """The server URL from the environment; the test fails, naming the fix, when it is unset."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.fail(f"{POSTGRES_ENV} is not set: run `make test`, which starts a throw-away "
                    "PostgreSQL (deploy/test-postgres.sh) and sets it")
    return url


def with_search_path(url: str, schema: str) -> str:
    """The URL whose connections use ``schema`` (libpq ``options=-csearch_path=...``)."""
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL pointing at a fresh, empty schema for this test session (dropped after)."""
    base = postgres_base_url()
    url, schema = fresh_postgres_schema(base)
    try:
        yield url
    finally:
        drop_postgres_schema(base, schema)


def fresh_postgres_schema(base: str) -> tuple[str, str]:
    """(url, schema) for a new schema of its own, for tests needing a clean index each."""
    from sqlalchemy import create_engine, text

    schema = f"h1_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return with_search_path(base, schema), schema


def drop_postgres_schema(base: str, schema: str) -> None:
    """Drop a schema made by :func:`fresh_postgres_schema`."""
    from sqlalchemy import create_engine, text

    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


# -- minimal data sets and a pynetdicom SCU (fast, for protocol tests) --------------------
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def tiny_ct(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "TEST^TINY",
    patient_id: str = "TINY0001",
    instance_number: int = 1,
    value: int = 0,
) -> Dataset:
    """A small but valid CT Image Storage data set (8x8 pixels) with fresh ``2.25.`` UIDs."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    def uid() -> str:
        return f"2.25.{uuid.uuid4().int}"

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid or uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid()
    ds.SeriesInstanceUID = series_uid or uid()
    ds.FrameOfReferenceUID = "2.25.1"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19400101"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "CT HEAD"
    ds.Modality = "CT"
    ds.Manufacturer = "TESTVENDOR"
    ds.SeriesDescription = "HEAD 5MM"
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, instance_number * 5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (np.full((8, 8), value, dtype=np.int16)).tobytes()
    return ds


def encode_dataset(ds: Dataset) -> bytes:
    """The data set (no file meta) in Explicit VR Little Endian, as an SCU sends it."""
    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def associate(port: int, *, calling: str = "TESTSCU", called: str = "FPENODE", contexts: Sequence[str] = (CT_IMAGE_STORAGE,)) -> Association:
    """A pynetdicom association to the node on 127.0.0.1 (Verification + ``contexts``)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    from pydicom.uid import ExplicitVRLittleEndian

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop_class in contexts:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called)


def store_raw(
    assoc: Association, sop_class: str, sop_uid: str, dataset_bytes: bytes, folder: Path, transfer_syntax: str | None = None
) -> int:
    """C-STORE ``dataset_bytes`` as they are, with the command's SOP Class/Instance UIDs given
    separately (for bad input tests): sent from a Part 10 file with pynetdicom's chunked mode,
    in ``transfer_syntax`` (default Explicit VR Little Endian; the association must have it)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path = folder / f"raw-{uuid.uuid4().hex}.dcm"
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    try:
        return send_file(assoc, path)
    finally:
        path.unlink()


def send_file(assoc: Association, path: Path) -> int:
    """C-STORE a Part 10 file as it is (pynetdicom's chunked mode reads it in pieces); -1: no answer."""
    from pynetdicom import _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        response = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(response.Status) if "Status" in response else -1


def send_datasets(port: int, datasets: Sequence[Dataset], *, calling: str = "TESTSCU") -> list[int]:
    """C-STORE each data set on one association; returns the statuses (-1: no response)."""
    assoc = associate(port, calling=calling, contexts=sorted({str(ds.SOPClassUID) for ds in datasets}))
    assert assoc.is_established, "association was not accepted"
    statuses = []
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
    return statuses


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information of a Part 10 file (PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    # (0002,0000) UL group length, Explicit VR Little Endian: tag 4 + VR 2 + length 2 + value 4.
    assert data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]
