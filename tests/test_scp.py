"""The SCP in-process, driven by pynetdicom SCUs on loopback: access control, C-STORE
statuses, files on disk and rows in the index, duplicates, concurrency, listeners, and the
``fpe-node serve`` subprocess driven by DCMTK."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_node.bootstrap import Node, build_node
from dicom_node.index.models import Instance, Series, Study, StudyEvent
from dicom_node.peers import PeerInfo
from dicom_node.scp import StoredInstance
from dicom_node.status import Status
from dicom_node.storage import DiskFullError, FileStore
from tests.conftest import CT_PHILIPS, SettingsFactory, require_shared_data
from tests.peers import CT_IMAGE_STORAGE, DCMTK, associate, encode_dataset, send_datasets, store_raw, tiny_ct


def _port(node: Node) -> int:
    return node.scp.address[1]


def _files(node: Node) -> list[Path]:
    return sorted((node.settings.storage.data_dir / "dicom").rglob("*.dcm"))


def _tmp_files(node: Node) -> list[Path]:
    return sorted((node.settings.storage.data_dir / "tmp").iterdir())


def _count(node: Node, model: Any) -> int:
    with node.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


# -- association acceptance -----------------------------------------------------------------
def test_echo_from_registered_peer(node: Node) -> None:
    assoc = associate(_port(node), calling="TESTSCU")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == Status.SUCCESS
    assoc.release()


@pytest.mark.parametrize(
    ("calling", "called", "diagnostic"),
    [("STRANGER", "FPENODE", 0x03), ("TESTSCU", "NOTTHENODE", 0x07)],
)
def test_unknown_calling_or_wrong_called_ae_is_rejected(node: Node, calling: str, called: str, diagnostic: int) -> None:
    assoc = associate(_port(node), calling=calling, called=called)
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.result == 0x01  # rejected-permanent
    assert assoc.acceptor.primitive.diagnostic == diagnostic


def test_known_title_from_wrong_host_is_rejected(node: Node) -> None:
    node.peers.add(PeerInfo(name="FAR", ae_titles=("FARAWAY",), host="192.0.2.7"), actor="test")
    assoc = associate(_port(node), calling="FARAWAY")
    assert assoc.is_rejected


def test_peer_added_while_running_is_accepted_and_removed_is_refused(node: Node) -> None:
    assert associate(_port(node), calling="NEWPACS").is_rejected
    node.peers.add(PeerInfo(name="PACS", ae_titles=("PACS_QR", "NEWPACS")), actor="test")
    assoc = associate(_port(node), calling="NEWPACS")
    assert assoc.is_established
    assoc.release()
    node.peers.remove("PACS", actor="test")
    assert associate(_port(node), calling="NEWPACS").is_rejected


def test_destination_only_peer_may_echo_but_not_store(node: Node) -> None:
    node.peers.add(PeerInfo(name="ARCH", ae_titles=("ARCHIVE",), host="127.0.0.1", port=104, roles=("destination",)), actor="test")
    assert send_datasets(_port(node), [tiny_ct()], calling="ARCHIVE") == [Status.NOT_AUTHORIZED]
    assert _files(node) == []


# -- C-STORE ----------------------------------------------------------------------------------
def test_store_lands_on_disk_and_in_index(node: Node) -> None:
    ds = tiny_ct(instance_number=3)
    assert send_datasets(_port(node), [ds]) == [Status.SUCCESS]
    path = node.settings.storage.data_dir / f"dicom/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    stored = dcmread(path)
    assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert path.read_bytes().endswith(encode_dataset(ds)), "data set not stored as received"
    with node.session_factory() as session:
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert instance is not None
        assert instance.path == path.relative_to(node.settings.storage.data_dir).as_posix()
        assert instance.size_bytes == path.stat().st_size
        assert instance.instance_number == 3
        assert instance.calling_ae == "TESTSCU"
        series = instance.series
        assert (series.modality, series.number, series.instance_count) == ("CT", 2, 1)
        assert series.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
        study = series.study
        assert study.study_uid == ds.StudyInstanceUID
        assert study.state == "received"
        assert study.modalities == "CT"
        assert study.patient is not None and study.patient.patient_id == "TINY0001"
        assert [event.state for event in study.events] == ["received"]
    assert _tmp_files(node) == []


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_indexed_text_is_decoded_with_the_character_set(node: Node, charset: str) -> None:
    ds = tiny_ct()
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = "Schädel nativ"
    ds.StudyDescription = "Kopf µ-CT"
    assert send_datasets(_port(node), [ds]) == [Status.SUCCESS]
    with node.session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series.description == "Schädel nativ"
        assert series.study.description == "Kopf µ-CT"


def test_missing_study_uid_is_refused_and_leaves_no_file(node: Node) -> None:
    ds = tiny_ct()
    del ds.StudyInstanceUID
    assert send_datasets(_port(node), [ds]) == [Status.MISSING_OR_INVALID_UID]
    ds = tiny_ct()
    ds.SeriesInstanceUID = "1.2.3/../../etc"
    assert send_datasets(_port(node), [ds]) == [Status.MISSING_OR_INVALID_UID]
    assert _files(node) == [] and _tmp_files(node) == []
    assert _count(node, Instance) == 0


def test_data_set_not_matching_command_is_refused(node: Node, tmp_path: Path) -> None:
    ds = tiny_ct()
    assoc = associate(_port(node))
    try:
        # The data set says it is an MR image; the command says CT.
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        assert store_raw(assoc, CT_IMAGE_STORAGE, ds.SOPInstanceUID, encode_dataset(ds), tmp_path) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        # Garbage instead of a data set.
        assert store_raw(assoc, CT_IMAGE_STORAGE, "2.25.42", b"\x01\x02garbage" * 3, tmp_path) in (
            Status.CANNOT_UNDERSTAND,
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
        assert assoc.send_c_echo().Status == Status.SUCCESS
    finally:
        assoc.release()
    assert _files(node) == [] and _tmp_files(node) == []


def test_handler_exception_answers_c211_and_node_keeps_serving(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.index import repository

    original = repository.record_instance
    calls = {"n": 0}

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated index failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(repository, "record_instance", failing_once)
    first, second = tiny_ct(), tiny_ct()
    assert send_datasets(_port(node), [first, second]) == [Status.UNEXPECTED_ERROR, Status.SUCCESS]
    assert [p.stem for p in _files(node)] == [second.SOPInstanceUID]
    assert _tmp_files(node) == []


class _NoRoom:
    def has_room(self, size_bytes: int) -> bool:
        return False


def test_disk_above_watermark_answers_a700_without_file(make_settings: SettingsFactory) -> None:
    built = build_node(make_settings(), disk_guard=_NoRoom())
    built.start("127.0.0.1", 0)
    try:
        assert send_datasets(_port(built), [tiny_ct()]) == [Status.OUT_OF_RESOURCES]
        assert _files(built) == [] and _tmp_files(built) == []
    finally:
        built.stop(grace_s=1)


def test_disk_full_while_writing_answers_a700(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: FileStore, chunks: Any) -> Path:
        raise DiskFullError(28, "no space")

    monkeypatch.setattr(FileStore, "write_temp", full)
    assert send_datasets(_port(node), [tiny_ct()]) == [Status.OUT_OF_RESOURCES]
    assert _count(node, Instance) == 0


# -- duplicate SOP Instance UIDs --------------------------------------------------------------
def test_identical_duplicate_is_success_without_second_copy(node: Node) -> None:
    ds = tiny_ct()
    assert send_datasets(_port(node), [ds, ds]) == [Status.SUCCESS, Status.SUCCESS]
    assert send_datasets(_port(node), [ds]) == [Status.SUCCESS]
    assert len(_files(node)) == 1
    assert _count(node, Instance) == 1
    with node.session_factory() as session:
        assert session.scalar(select(Series.instance_count)) == 1


def test_different_duplicate_keeps_the_newest(node: Node) -> None:
    old = tiny_ct(value=1)
    new = tiny_ct(study_uid=old.StudyInstanceUID, series_uid=old.SeriesInstanceUID, sop_uid=old.SOPInstanceUID, value=2)
    assert send_datasets(_port(node), [old]) == [Status.SUCCESS]
    assert send_datasets(_port(node), [new]) == [Status.SUCCESS]
    (path,) = _files(node)
    assert path.read_bytes().endswith(encode_dataset(new))
    assert _count(node, Instance) == 1
    with node.session_factory() as session:
        assert session.scalar(select(Series.instance_count)) == 1


def test_concurrent_duplicates_leave_one_row_and_a_consistent_file(node: Node) -> None:
    template = tiny_ct()
    versions = [
        tiny_ct(study_uid=template.StudyInstanceUID, series_uid=template.SeriesInstanceUID, sop_uid=template.SOPInstanceUID, value=v)
        for v in range(6)
    ]
    results: list[list[int]] = []

    def send(ds: Any) -> None:
        results.append(send_datasets(_port(node), [ds]))

    threads = [threading.Thread(target=send, args=(ds,)) for ds in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [[Status.SUCCESS]] * len(versions)
    (path,) = _files(node)
    with node.session_factory() as session:
        instance = session.scalars(select(Instance)).one()
        from dicom_node.storage import dataset_digest

        assert dataset_digest(path.read_bytes()[-len(encode_dataset(versions[0])) :]) == instance.sha256


# -- concurrency and listeners -----------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.stored: list[StoredInstance] = []
        self.released: list[set[str]] = []
        self.lock = threading.Lock()

    def instance_stored(self, info: StoredInstance) -> None:
        with self.lock:
            self.stored.append(info)

    def association_released(self, series_uids: set[str]) -> None:
        with self.lock:
            self.released.append(series_uids)


def test_concurrent_associations_and_listeners(make_settings: SettingsFactory) -> None:
    recorder = _Recorder()
    built = build_node(make_settings())
    built.add_listener(recorder)
    built.start("127.0.0.1", 0)
    study_uid = "2.25.777"
    senders, per_sender = 8, 5
    batches = [
        [tiny_ct(study_uid=study_uid, series_uid=f"2.25.{1000 + s}", instance_number=i) for i in range(per_sender)]
        for s in range(senders)
    ]
    statuses: list[int] = []
    try:
        threads = [threading.Thread(target=lambda b=b: statuses.extend(send_datasets(_port(built), b))) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        built.dispatcher.drain()
        assert statuses == [Status.SUCCESS] * senders * per_sender
        assert _count(built, Study) == 1 and _count(built, Series) == senders
        assert _count(built, Instance) == senders * per_sender
        with built.session_factory() as session:
            assert set(session.scalars(select(Series.instance_count))) == {per_sender}
            assert session.scalar(select(func.count()).select_from(StudyEvent)) == 1
        assert len(recorder.stored) == senders * per_sender
        assert {info.study_uid for info in recorder.stored} == {study_uid}
        assert all(info.path.is_file() and info.modality == "CT" for info in recorder.stored)
        assert sorted(recorder.released, key=sorted) == sorted(({f"2.25.{1000 + s}"} for s in range(senders)), key=sorted)
    finally:
        built.stop(grace_s=1)


# -- fpe-node serve with DCMTK -----------------------------------------------------------------
def test_serve_receives_a_real_ct_from_dcmtk_and_stops_on_sigterm(
    serve_process: Callable[..., Any], dcmtk: DCMTK, data_dir: Path
) -> None:
    ct = require_shared_data(CT_PHILIPS.name)
    files = sorted(ct.iterdir())[:12]
    server = serve_process()
    echo = dcmtk.echoscu(server.port)
    assert echo.returncode == 0, echo.stderr
    refused = dcmtk.echoscu(server.port, calling="INTRUDER")
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
    sent = dcmtk.storescu(server.port, files)
    assert sent.returncode == 0, sent.stderr
    assert server.terminate() == 0
    stored = sorted(data_dir.glob("dicom/*/*/*.dcm"))
    assert len(stored) == len(files)
    from dicom_node.index.db import build_engine, build_session_factory
    from dicom_node.settings import load_settings

    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(data_dir)}})
    engine = build_engine(settings)
    with build_session_factory(engine)() as session:
        study = session.scalars(select(Study)).one()
        assert study.modalities == "CT" and study.description == "1A TRAUMA/PLAIN HEAD DM"
        series = session.scalars(select(Series)).one()
        assert series.instance_count == len(files) and series.manufacturer == "Philips"
        assert [e.state for e in study.events] == ["received"]
    engine.dispose()
    assert "finishing stores in progress" in server.log_text()
