"""Quarantine and start-up reconciliation: a poisoned study is still analysed, the bad instances
are refused or quarantined (shown with their reason by ``fpe-node studies``), and files without
index rows are adopted or set aside when the node starts."""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.bootstrap import Node, build_node
from dicom_node.cli import main
from dicom_node.index.models import Instance
from dicom_node.lifecycle import StudyState
from dicom_node.status import Status
from dicom_node.worker import Analyst
from tests.conftest import SettingsFactory, wait_study_state
from tests.factory import Study, write_ct_stroke_study
from tests.peers import encode_dataset, send_datasets, store_raw, tiny_ct
from tests.training_support import reduced_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return reduced_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", name="res25-quarantine-test")


@pytest.fixture
def analysing_node(make_settings: SettingsFactory, checkpoint: Path) -> Iterator[Node]:
    settings = make_settings(
        inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1},
        completion={"series_quiet_s": 0.5, "study_timeout_s": 30.0},
    )
    node = build_node(settings)
    node.start("127.0.0.1", 0)
    try:
        yield node
    finally:
        node.stop(grace_s=1.0)


def _deep_sequence(depth: int) -> bytes:
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    sequence = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sequence + item) * depth + closing * depth


def _poisoned_copies(source: pydicom.Dataset) -> tuple[str, bytes, pydicom.Dataset]:
    """Two bad instances of the patient's study: one 1000 levels deep, one whose pixels do not decode."""
    deep = copy.deepcopy(source)
    deep.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    data = encode_dataset(deep)
    cut = data.index(struct.pack("<HH", 0x0010, 0x0010))
    deep_bytes = data[:cut] + _deep_sequence(1000) + data[cut:]
    undecodable = copy.deepcopy(source)
    undecodable.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    undecodable.SeriesInstanceUID = f"2.25.{uuid.uuid4().int}"
    undecodable.SeriesNumber = 99
    undecodable.file_meta.TransferSyntaxUID = JPEG2000Lossless
    undecodable.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x17" * 60])  # a J2K start, then noise
    undecodable["PixelData"].VR = "OB"
    undecodable["PixelData"].is_undefined_length = True
    return str(deep.SOPInstanceUID), deep_bytes, undecodable


def _store(port: int, sop_uid: str, data: bytes, syntax: str, folder: Path) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="FPENODE")
    assert assoc.is_established
    try:
        return store_raw(assoc, CTImageStorage, sop_uid, data, folder, syntax)
    finally:
        assoc.release()


def test_poisoned_patient_study_is_analysed_without_the_bad_instances(
    analysing_node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = analysing_node
    port = node.scp.address[1]
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    study: Study = write_ct_stroke_study(
        tmp_path / "study", rows=48, study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
        with_dose_report=False, with_reformats=False,
    )
    datasets = [pydicom.dcmread(path) for path in study.paths()]
    deep_uid, deep_bytes, undecodable = _poisoned_copies(pydicom.dcmread(study.role("ncct").paths[0]))
    assert _store(port, deep_uid, deep_bytes, ExplicitVRLittleEndian, tmp_path) == Status.NESTED_TOO_DEEP
    assert _store(port, undecodable.SOPInstanceUID, encode_dataset(undecodable), JPEG2000Lossless, tmp_path) == Status.SUCCESS
    assert set(send_datasets(port, datasets)) == {Status.SUCCESS}

    wait_study_state(node.lifecycle, study.study_uid, {StudyState.QUEUED}, timeout_s=60.0, poll_s=0.2)
    outcome = Analyst(node.settings, session_factory=node.session_factory).run_next()
    assert outcome is not None and outcome.study_uid == study.study_uid
    assert outcome.state is StudyState.ANALYSED
    # ... and reported: an SR whose evidence lists the instances analysed, never the quarantined one
    report = node.delivery.on_result(study.study_uid, outcome.result)  # type: ignore[arg-type]
    assert report.failed_reason is None
    (sr_file,) = [f for f in report.files if f.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88.")]
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for item in pydicom.dcmread(sr_file.path).CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert {str(ds.SOPInstanceUID) for ds in datasets if ds.Modality == "CT"} & evidence
    assert undecodable.SOPInstanceUID not in evidence and deep_uid not in evidence

    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(node.settings.storage.data_dir)}}))
    capsys.readouterr()
    assert main(["--config", str(config), "studies", "--json", "--study", study.study_uid]) == 0
    detail = json.loads(capsys.readouterr().out)
    quarantined = detail["sections"]["quarantined instances"]
    assert [row["sop_instance_uid"] for row in quarantined] == [undecodable.SOPInstanceUID]
    assert "cannot be read in full" in quarantined[0]["reason"]


def _orphan(data_dir: Path, ds: pydicom.Dataset, cut: int | None = None) -> Path:
    """Write ``ds`` where the node would have, as the node writes it, without an index row."""
    from dicom_node.storage import FileStore, file_meta_bytes

    relative = FileStore.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    data = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "TESTSCU") + encode_dataset(ds)
    path = data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if cut is None else data[:cut])
    return path


def test_orphans_are_adopted_or_quarantined_at_start_up(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    build_node(settings).stop(grace_s=0.1)  # creates the index
    data_dir = settings.storage.data_dir
    valid, truncated = tiny_ct(), tiny_ct()
    valid_path = _orphan(data_dir, valid)
    truncated_path = _orphan(data_dir, truncated, cut=-20)
    node = build_node(settings)
    try:
        with node.session_factory() as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    finally:
        node.stop(grace_s=0.1)
    assert set(rows) == {valid.SOPInstanceUID}
    assert data_dir / rows[valid.SOPInstanceUID].path == valid_path and valid_path.is_file()
    assert rows[valid.SOPInstanceUID].calling_ae == "TESTSCU"
    assert not truncated_path.exists()
    assert list((data_dir / "quarantine" / "orphans").rglob("*.dcm")) == [
        data_dir / "quarantine" / "orphans" / truncated_path.relative_to(data_dir / "dicom")
    ]
