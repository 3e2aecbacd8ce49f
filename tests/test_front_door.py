"""The front door (issue 10, issue 9 private classes): admission, protocol limits, refusals logged.

Real sockets on loopback only. Floods come from other loopback source addresses
(127.0.0.2-127.0.0.5: all of 127/8 is loopback on Linux), as they would from other hosts;
every flood is bounded in count and time.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, Association
from sqlalchemy import select

from dicom_node.bootstrap import Node, build_node
from dicom_node.completion import SeriesInfo, is_non_image
from dicom_node.index.models import Instance
from dicom_node.sop_classes import is_known_storage_class
from dicom_node.status import Status
from dicom_node.transport import Refusal, RefusalLog
from tests.conftest import CT_PHILIPS, TEST_PEER, SettingsFactory, require_shared_data
from tests.factory import PHILIPS_PRIVATE_SOP_CLASS, _study_info, default_patient, private_object_dataset, write_datasets
from tests.peers import CT_IMAGE_STORAGE, DCMTK, send_file, tiny_ct

IDLER = {"name": "IDLER", "ae_titles": ["IDLER"], "host": "127.0.0.3", "roles": ["source"]}


# -- helpers ------------------------------------------------------------------------------
@contextmanager
def running(make_settings: SettingsFactory, **sections: Any) -> Iterator[Node]:
    built = build_node(make_settings(**sections))
    built.start("127.0.0.1", 0)
    try:
        yield built
    finally:
        built.stop(grace_s=1.0)


def _connect(port: int, source: str = "127.0.0.1", timeout_s: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _associate(
    port: int, *, calling: str = "TESTSCU", called: str = "FPENODE", source: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, transfer_syntax)
    bind = None if source is None else (source, 0)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=bind)


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _raw_socket(assoc: Association) -> socket.socket:
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock is not None
    return sock


def _context_id(assoc: Association) -> int:
    return int(assoc.accepted_contexts[0].context_id)  # type: ignore[arg-type]


def _c_store_command_pdu(context_id: int, sop_uid: str) -> bytes:
    """A P-DATA-TF carrying only a C-STORE-RQ command that announces a data set (PS3.7 9.3.1.1)."""
    command = Dataset()
    command.AffectedSOPClassUID = CT_IMAGE_STORAGE
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_uid
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, command)
    encoded = struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body.getvalue())) + body.getvalue()
    pdv = struct.pack(">LBB", len(encoded) + 2, context_id, 0x03) + encoded
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _part10(meta_ts: str, sop_uid: str, dataset_bytes: bytes, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = meta_ts
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path.write_bytes(buffer.getvalue() + dataset_bytes)
    return path


def deflate_bomb(path: Path, expanded_bytes: int = 1_500_000_000) -> tuple[Path, str]:
    """A Deflated Explicit VR LE CT instance whose Pixel Data inflates to ``expanded_bytes`` zeros.

    Built without holding the expansion: after a full flush the compressor has no history, so
    one compressed MiB of zeros is repeated (checked); the file is about 1.5 MB.
    """
    ds = tiny_ct()
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    chunk = 1024 * 1024
    blocks = expanded_bytes // chunk + 1
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, blocks * chunk)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(chunk)
    start = compressor.compress(header.getvalue() + pixel_header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH) == block
    end = compressor.compress(zeros) + compressor.flush()
    stream = start + block * (blocks - 2) + end
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream, 4096).startswith(header.getvalue()[:64])
    return _part10(DeflatedExplicitVRLittleEndian, str(ds.SOPInstanceUID), stream, path), str(ds.SOPInstanceUID)


def refusal_lines(caplog: pytest.LogCaptureFixture, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"refused ({reason})")]


# -- in-process node ----------------------------------------------------------------------
def test_refusals_are_counted_each_and_logged_once_per_reason_and_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.transport")
    refusals = RefusalLog(interval_s=3600)
    for _ in range(3):
        refusals.record(Refusal.RATE, "192.0.2.1", "too many")
    refusals.record(Refusal.RATE, "192.0.2.2", "too many")
    refusals.record(Refusal.CALLED_AE, "192.0.2.1", "wrong title")
    assert refusals.counts == {"connection_rate": 4, "called_ae": 1}
    assert len(refusal_lines(caplog, "connection_rate")) == 2 and len(refusal_lines(caplog, "called_ae")) == 1


def test_called_ae_and_limit_refusals_are_logged_once_each(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    with running(make_settings, network={"max_associations": 1}) as node:
        port = node.scp.address[1]
        first = _associate(port)
        assert first.is_established
        over = _associate(port)
        assert over.is_rejected
        wrong = _associate(port, called="NOTTHISNODE")
        assert wrong.is_rejected
        first.release()
        assert node.scp.refusals["association_limit"] == 1
        assert node.scp.refusals["called_ae"] == 1
    limit = refusal_lines(caplog, "association_limit")
    called = refusal_lines(caplog, "called_ae")
    assert len(limit) == 1 and "max_associations" in limit[0]
    assert len(called) == 1 and "NOTTHISNODE" in called[0]


def test_c_store_command_without_its_data_set_is_aborted_at_the_dimse_timeout(make_settings: SettingsFactory) -> None:
    with running(make_settings, network={"dimse_timeout_s": 1.0, "network_timeout_s": 60.0}) as node:
        assoc = _associate(node.scp.address[1])
        assert assoc.is_established
        started = time.monotonic()
        _raw_socket(assoc).sendall(_c_store_command_pdu(_context_id(assoc), f"2.25.{uuid.uuid4().int}"))
        assert _wait(lambda: assoc.is_aborted, 20.0), "the node did not abort"
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 10.0, elapsed
        assert node.scp.refusals["dimse_timeout"] == 1
        assert _wait(lambda: node.scp.door.associations == 0, 10.0)


def test_p_data_over_the_advertised_maximum_is_aborted_unread(make_settings: SettingsFactory) -> None:
    with running(make_settings, network={"max_pdu": 65_536}) as node:
        assoc = _associate(node.scp.address[1])
        assert assoc.is_established
        sock = _raw_socket(assoc)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 65_536 + 1024) + bytes(4096))
        assert _wait(lambda: assoc.is_aborted, 10.0)
        assert node.scp.refusals["pdu_too_large"] == 1


def _send_private(port: int, ds: Dataset) -> int | None:
    """C-STORE ``ds`` proposing only its (private) class; None when no context was accepted.

    DCMTK's storescu refuses to propose a class it does not know ("unknown storage SOP class
    in file"), so the sender here is pynetdicom, proposing the class as a PACS does.
    """
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="FPENODE")
    if not assoc.is_established:  # pynetdicom aborts when no context was accepted
        return None
    try:
        response = assoc.send_c_store(ds)
        return int(response.Status) if "Status" in response else -1
    finally:
        assoc.release()


def test_private_sop_class_is_stored_and_indexed_or_refused_by_setting(make_settings: SettingsFactory) -> None:
    study = _study_info(f"2.25.{uuid.uuid4().int}", "MR HEAD", "20240102", "101500", "ACC9")
    ds = private_object_dataset(patient=default_patient(3), study=study, series_uid=f"2.25.{uuid.uuid4().int}", series_number=99)
    assert not is_known_storage_class(PHILIPS_PRIVATE_SOP_CLASS) and is_known_storage_class(CT_IMAGE_STORAGE)
    with running(make_settings) as node:
        assert _send_private(node.scp.address[1], ds) == Status.SUCCESS
        with node.session_factory() as session:
            row = session.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
            assert row is not None and row.sop_class_uid == PHILIPS_PRIVATE_SOP_CLASS
            assert row.series.modality == "MR" and row.series.study.study_uid == ds.StudyInstanceUID
            assert (node.settings.storage.data_dir / row.path).is_file()
    other = private_object_dataset(patient=default_patient(3), study=study, series_uid=f"2.25.{uuid.uuid4().int}", series_number=98)
    with running(make_settings, network={"accept_unknown_storage": False}) as node:
        assert _send_private(node.scp.address[1], other) is None
        assert node.scp.refusals["unknown_sop_class"] == 1
        with node.session_factory() as session:
            assert session.scalar(select(Instance).where(Instance.sop_instance_uid == other.SOPInstanceUID)) is None


def test_orthanc_transfer_of_a_study_with_a_private_object_succeeds(make_settings: SettingsFactory, tmp_path: Path) -> None:
    """Issue 9: Orthanc's store job for a study holding a vendor's private object ended in HTTP 500."""
    from pydicom import dcmread

    from tests.archives import OrthancArchive
    from tests.factory import Patient

    ct_files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())[:3]
    ct = dcmread(ct_files[0], stop_before_pixels=True)
    patient = Patient(name=str(ct.PatientName), patient_id=str(ct.PatientID))
    study = _study_info(str(ct.StudyInstanceUID), str(ct.get("StudyDescription", "")), str(ct.StudyDate), str(ct.StudyTime), "")
    private = private_object_dataset(patient=patient, study=study, series_uid=f"2.25.{uuid.uuid4().int}", series_number=1001)
    (private_path,) = write_datasets([private], tmp_path / "private")
    orthanc_peer = {"name": "orthanc", "ae_titles": ["ORTHANC"], "host": "127.0.0.1", "roles": ["source"]}
    with running(make_settings, peers=[TEST_PEER, orthanc_peer]) as node:
        orthanc = OrthancArchive(tmp_path / "orthanc", modalities={"fpenode": ("FPENODE", "127.0.0.1", node.scp.address[1])})
        orthanc.start()
        try:
            orthanc.upload([*ct_files, private_path])
            orthanc.send_study(str(ct.StudyInstanceUID), "fpenode")  # raises on HTTP 500
        finally:
            orthanc.stop()
        with node.session_factory() as session:
            rows = session.scalars(select(Instance)).all()
            classes = sorted(str(row.sop_class_uid) for row in rows)
    assert classes == sorted([str(ct.SOPClassUID)] * len(ct_files) + [PHILIPS_PRIVATE_SOP_CLASS])


def test_unknown_contexts_are_accepted_for_storage_classes_only(make_settings: SettingsFactory) -> None:
    """A private or unlisted storage class gets a context; an unknown query/retrieve class does not."""
    proposed = [PHILIPS_PRIVATE_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.9999", "1.2.840.10008.5.1.4.1.2.9999"]
    with running(make_settings) as node:
        ae = AE(ae_title="TESTSCU")
        for uid in proposed:
            ae.add_requested_context(uid, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.scp.address[1], ae_title="FPENODE")
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
    assert accepted == set(proposed[:2])


# -- fpe-node serve under a flood ---------------------------------------------------------
def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class _Peak:
    """Samples a process's resident memory every 50 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, _rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def _idle_flood(port: int, source: str, count: int, stop: threading.Event, held: list[socket.socket]) -> None:
    """Keep up to ``count`` silent sockets open from ``source`` (reopen closed ones each second)."""
    while not stop.is_set():
        for sock in list(held):
            try:
                sock.setblocking(False)
                closed = sock.recv(16) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                held.remove(sock)
                sock.close()
        for _ in range(count - len(held)):
            try:
                held.append(_connect(port, source, timeout_s=1.0))
            except OSError:
                pass
        stop.wait(1.0)


def _rapid_flood(port: int, source: str, count: int, stop: threading.Event, done: list[int]) -> None:
    """Rounds of ``count`` connect/close from ``source``, one round a second, until ``stop``."""
    while not stop.is_set():
        for _ in range(count):
            try:
                # Short: a port the node still holds in TIME_WAIT drops the SYN (retried after 1 s).
                _connect(port, source, timeout_s=0.3).close()
            except OSError:
                pass
            done[0] += 1
        stop.wait(1.0)


def _associate_rq_bomb(port: int, source: str) -> tuple[int, bool]:
    """Declare a 0xFFFFFFFF-byte A-ASSOCIATE-RQ and stream zeros (at most 10 s, 512 MiB)."""
    sock = _connect(port, source, timeout_s=2.0)
    sent, closed = 0, False
    deadline = time.monotonic() + 10.0
    try:
        sock.sendall(b"\x01\x00\xff\xff\xff\xff")
        chunk = bytes(1024 * 1024)
        while sent < 512 * 1024 * 1024 and time.monotonic() < deadline:
            sent += sock.send(chunk)
    except OSError:
        closed = True
    finally:
        sock.close()
    return sent, closed


def test_flood_leaves_legitimate_stores_served_and_memory_bounded(
    serve_process: Callable[..., Any], dcmtk: DCMTK, tmp_path: Path, data_dir: Path
) -> None:
    files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())[:60]
    server = serve_process(
        # A low inflation bound keeps the bomb cheap (inflating is CPU-bound); the default is 1 GiB.
        network={
            "max_associations": 6,
            "max_associations_per_peer": 4,
            "associate_rq_timeout_s": 2.0,
            "max_inflated_bytes": 256 * 1024 * 1024,
        },
        peers=[TEST_PEER, IDLER],
    )
    port = server.port
    nodelay = {"TCP_NODELAY": "1"}  # as a PACS runs DCMTK on loopback (tests/peers.py)

    def store(batch: list[Path]) -> float:
        started = time.monotonic()
        sent = dcmtk.storescu(port, batch, timeout_s=60, env=nodelay)
        assert sent.returncode == 0, sent.stderr
        return time.monotonic() - started

    quiet_delay = store(files[30:])
    baseline = _rss_mb(server.process.pid)
    peak = _Peak(server.process.pid)
    stop = threading.Event()
    held: list[socket.socket] = []
    idle = threading.Thread(target=_idle_flood, args=(port, "127.0.0.2", 200, stop, held), daemon=True)
    idlers: list[Association] = []
    rapid = threading.Thread()
    try:
        # 200 idle associations asked by one known peer: its cap (4 here) is held, the rest refused.
        idlers = [_associate(port, calling="IDLER", source="127.0.0.3") for _ in range(200)]
        assert sum(a.is_established for a in idlers) == 4
        idle.start()
        rapid_done = [0]
        rapid = threading.Thread(target=_rapid_flood, args=(port, "127.0.0.4", 200, stop, rapid_done), daemon=True)
        rapid.start()
        assert _wait(lambda: rapid_done[0] >= 50 and len(held) > 0, 10.0)
        before = rapid_done[0]
        flood_delay = store(files[:30])
        assert rapid.is_alive() and idle.is_alive(), "the floods ended before the store"
        during = rapid_done[0] - before
        # Protocol bombs while the idle flood goes on.
        rq_sent, rq_closed = _associate_rq_bomb(port, "127.0.0.5")
        assert rq_closed, f"an unbounded A-ASSOCIATE-RQ was still read after {rq_sent} bytes"
        oversized = _associate(port)
        assert oversized.is_established
        _raw_socket(oversized).sendall(struct.pack(">BBL", 0x04, 0, 64 * 1024 * 1024) + bytes(1024 * 1024))
        assert _wait(lambda: oversized.is_aborted, 10.0)
        bomb, _ = deflate_bomb(tmp_path / "bomb.dcm")
        deflated = _associate(port, transfer_syntax=DeflatedExplicitVRLittleEndian)
        assert deflated.is_established
        assert send_file(deflated, bomb) != Status.SUCCESS
        assert _wait(lambda: not deflated.is_established, 10.0)
        store(files[:1])
    finally:
        stop.set()
        idle.join(10)
        if rapid.is_alive():
            rapid.join(10)
        for sock in held:
            sock.close()
        for assoc in idlers:
            if assoc.is_established:
                assoc.release()
        top = peak.stop()
    print(f"30 CT files stored in {quiet_delay:.2f} s quiet, {flood_delay:.2f} s under the flood; "
          f"{during} rapid connections during it; RSS {baseline:.0f} MB -> peak {top:.0f} MB; refusals {server.log_text().count('refused (')} log lines")
    assert flood_delay < 30.0, flood_delay
    assert top - baseline < 300, (baseline, top)
    log = server.log_text()
    print("\n".join(line[:200] for line in log.splitlines() if "refused (" in line))
    for reason in ("peer_limit", "pending_per_address", "connection_rate", "associate_rq_too_large",
                   "pdu_too_large", "inflated_too_large"):
        assert f"refused ({reason})" in log, reason
    assert len(list(data_dir.glob("dicom/*/*/*.dcm"))) == len(files), "every legitimate instance is stored"


@pytest.mark.parametrize("sop_class_uid", [PHILIPS_PRIVATE_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.999"])
def test_storage_classes_the_node_does_not_know_never_hold_a_study_back(sop_class_uid: str) -> None:
    # A vendor's private object (Philips examcard) or a newer standard class is stored and
    # indexed (dicom_node.scp) but read by no pipeline: like an SR, it is a non-image object.
    series = SeriesInfo("1.4.1", "1.4.1.9", sop_class_uid, "1.4.1.9.1", modality="MR")  # examcards say MR
    assert is_non_image(series)
    ct = SeriesInfo("1.4.1", "1.4.1.2", "1.2.840.10008.5.1.4.1.1.2", "1.4.1.2.1", modality="CT")
    assert not is_non_image(ct)
