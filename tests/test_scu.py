"""C-STORE SCU: per-object contexts, SR class fallback, failures never counted as sent.

Archives are real: DCMTK ``storescp`` restricted to some SOP classes, and pynetdicom SCPs
that record what they stored or answer a failure status.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.scu import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    Destination,
    OutgoingObject,
    ScuTimeouts,
    StoreScu,
    allowed_sr_classes,
)
from tests.archives import SC_STORAGE, StorescpArchive, free_port, make_sc, make_sr

STUDY = "2.25.1000001"
FAST = ScuTimeouts(acse_s=5, dimse_s=10, network_s=10, connect_s=3)


def _objects(tmp_path: Path, n_sc: int = 2, **sr_options: bool) -> list[OutgoingObject]:
    sr = make_sr(tmp_path / "sr.dcm", STUDY, **sr_options)
    objects = [OutgoingObject(tmp_path / "sr.dcm", sr.SOPInstanceUID, sr.SOPClassUID)]
    series = "2.25.1000002"
    for i in range(n_sc):
        sc = make_sc(tmp_path / f"sc{i}.dcm", STUDY, series, number=i + 1)
        objects.append(OutgoingObject(tmp_path / f"sc{i}.dcm", sc.SOPInstanceUID, sc.SOPClassUID))
    return objects


class RecordingScp:
    """A pynetdicom Storage SCP accepting only some SOP classes, answering a fixed status."""

    def __init__(self, sop_classes: list[str] | None, status: int = 0x0000) -> None:
        self.received: list[tuple[str, str]] = []  # (SOP class, SOP instance) per C-STORE request
        self.status = status
        self.port = free_port()
        self.ae = AE(ae_title="RECORDER")
        for cx in AllStoragePresentationContexts:
            if sop_classes is None or cx.abstract_syntax in sop_classes:
                self.ae.add_supported_context(cx.abstract_syntax)
        self._lock = threading.Lock()

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        with self._lock:
            self.received.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return self.status

    def __enter__(self) -> "RecordingScp":
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @property
    def destination(self) -> Destination:
        return Destination("recorder", "RECORDER", "127.0.0.1", self.port)


def class_changing_recoder(dataset: Dataset, sop_class_uid: str) -> Dataset:
    """A stand-in for reports.sr.reencode_sr: other class, UID derived from the original's."""
    recoded = copy.deepcopy(dataset)
    recoded.SOPClassUID = recoded.file_meta.MediaStorageSOPClassUID = sop_class_uid
    recoded.SOPInstanceUID = recoded.file_meta.MediaStorageSOPInstanceUID = derived_uid(dataset, sop_class_uid)
    return recoded


def derived_uid(dataset: Dataset, sop_class_uid: str) -> str:
    return f"{dataset.SOPInstanceUID}.{sop_class_uid.rsplit('.', 1)[-1]}"


@pytest.fixture
def scu() -> Iterator[StoreScu]:
    yield StoreScu("FPENODE", FAST, recoder=class_changing_recoder)


def test_fallback_chain_depends_on_content(tmp_path: Path) -> None:
    plain = make_sr(tmp_path / "a.dcm", STUDY)
    assert allowed_sr_classes(plain) == (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR)
    with_3d = make_sr(tmp_path / "b.dcm", STUDY, with_3d=True)
    assert allowed_sr_classes(with_3d) == (COMPREHENSIVE_3D_SR,)
    by_reference = make_sr(tmp_path / "c.dcm", STUDY, by_reference=True)
    assert allowed_sr_classes(by_reference) == (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR)


def test_all_classes_accepted_sends_3d_sr(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path)
    with RecordingScp(None) as scp:
        outcomes = scu.send(scp.destination, objects)
    assert [o.ok for o in outcomes] == [True, True, True]
    assert outcomes[0].sent_sop_class_uid == COMPREHENSIVE_3D_SR
    assert scp.received[0] == (COMPREHENSIVE_3D_SR, objects[0].sop_instance_uid)
    assert len(scp.received) == 3


def test_archive_refusing_3d_sr_receives_comprehensive_sr(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path)
    with RecordingScp([COMPREHENSIVE_SR, ENHANCED_SR, SC_STORAGE]) as scp:
        outcomes = scu.send(scp.destination, objects)
    assert all(o.ok for o in outcomes)
    assert outcomes[0].sent_sop_class_uid == COMPREHENSIVE_SR
    sr_uid = derived_uid(dcmread(objects[0].path), COMPREHENSIVE_SR)
    assert outcomes[0].sent_sop_instance_uid == sr_uid
    # Re-encoded by the recoder; one request each, no 3D attempt reached the archive.
    assert scp.received[0] == (COMPREHENSIVE_SR, sr_uid)
    assert [c for c, _ in scp.received].count(COMPREHENSIVE_3D_SR) == 0
    assert len(scp.received) == 3


def test_storescp_with_enhanced_sr_only_gets_enhanced_sr(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path, n_sc=1)
    with StorescpArchive(tmp_path / "arch", sop_classes=[ENHANCED_SR, SC_STORAGE]) as archive:
        outcomes = scu.send(Destination("arch", archive.ae_title, archive.host, archive.port), objects)
        files = archive.received_files()
    assert [o.ok for o in outcomes] == [True, True]
    assert outcomes[0].sent_sop_class_uid == ENHANCED_SR
    stored = {dcmread(f).SOPInstanceUID: dcmread(f).SOPClassUID for f in files}
    assert stored[derived_uid(dcmread(objects[0].path), ENHANCED_SR)] == ENHANCED_SR
    assert stored[objects[1].sop_instance_uid] == SC_STORAGE


def test_archive_refusing_all_sr_still_gets_captures_and_failure_is_visible(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path, n_sc=2)
    with StorescpArchive(tmp_path / "arch", sop_classes=[SC_STORAGE]) as archive:
        outcomes = scu.send(Destination("arch", archive.ae_title, archive.host, archive.port), objects)
        requests = archive.store_requests()
    sr, *scs = outcomes
    assert not sr.ok and sr.sent_sop_class_uid is None and sr.status is None
    assert "no presentation context accepted" in (sr.error or "")
    assert all(o.ok and o.sent_sop_class_uid == SC_STORAGE for o in scs)
    assert objects[0].sop_instance_uid not in requests
    assert sorted(requests) == sorted(o.sop_instance_uid for o in objects[1:])


def test_without_recoder_there_is_no_fallback(tmp_path: Path) -> None:
    objects = _objects(tmp_path, n_sc=0)
    with RecordingScp([COMPREHENSIVE_SR, SC_STORAGE]) as scp:
        (outcome,) = StoreScu("FPENODE", FAST).send(scp.destination, objects)
    assert not outcome.ok and "no SR re-encoding" in (outcome.error or "")
    assert scp.received == []


def test_3d_content_does_not_fall_back(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path, n_sc=0, with_3d=True)
    with RecordingScp([COMPREHENSIVE_SR, ENHANCED_SR, SC_STORAGE]) as scp:
        outcomes = scu.send(scp.destination, objects)
    assert not outcomes[0].ok
    assert scp.received == []


def test_failure_status_is_not_sent(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path, n_sc=1)
    with RecordingScp(None, status=0xA700) as scp:
        outcomes = scu.send(scp.destination, objects)
    assert [o.ok for o in outcomes] == [False, False]
    assert [o.status for o in outcomes] == [0xA700, 0xA700]
    assert "0xA700" in (outcomes[0].error or "")


def test_unreachable_archive_fails_every_object(tmp_path: Path, scu: StoreScu) -> None:
    objects = _objects(tmp_path, n_sc=1)
    outcomes = scu.send(Destination("gone", "GONE", "127.0.0.1", free_port()), objects)
    assert [o.ok for o in outcomes] == [False, False]
    assert all("association" in (o.error or "") for o in outcomes)


def test_busy_process_gets_every_response(tmp_path: Path) -> None:
    """CPU-bound threads beside the SCU (the node's own work) must not make responses go astray.

    Without :func:`dicom_node.scu.wait_for_reactor`, pynetdicom's reactor thread could take a
    C-STORE response meant for the SCU; the store then timed out and the association aborted.
    """
    objects = []
    for i in range(40):
        ds = make_sc(tmp_path / f"{i}.dcm", STUDY, "2.25.1000003", number=i + 1)
        objects.append(OutgoingObject(tmp_path / f"{i}.dcm", ds.SOPInstanceUID, ds.SOPClassUID))
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(2000))

    hogs = [threading.Thread(target=burn, daemon=True) for _ in range(2)]
    for hog in hogs:
        hog.start()
    try:
        with StorescpArchive(tmp_path / "arch") as archive:
            scu = StoreScu("FPENODE", ScuTimeouts(acse_s=5, dimse_s=5, network_s=5, connect_s=3))
            outcomes = scu.send(Destination("arch", archive.ae_title, archive.host, archive.port), objects)
    finally:
        stop.set()
    assert [o.ok for o in outcomes] == [True] * len(objects)
