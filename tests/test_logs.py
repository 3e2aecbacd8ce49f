"""No patient identifier reaches a log line, at any level, library warnings included.

A study whose patient has a known fake name, ID and birth date is sent by DCMTK to
``fpe-node serve`` at DEBUG level, through the normal path and the noisy ones (duplicates,
refused data sets, a refused association); the whole stderr is searched afterwards. The same
is checked in-process with every logger (pynetdicom and pydicom included) at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.bootstrap import Node
from dicom_node.index.db import build_engine, upgrade_to_head
from dicom_node.logs import QUIET_LOGGERS, configure
from tests.peers import DCMTK, send_datasets, tiny_ct

FAKE_NAME = "Zzyzxquent^Ottoline"
FAKE_ID = "PHI-7731-XQ"
FAKE_BIRTH = "19010203"
FORBIDDEN = ("Zzyzxquent", "Ottoline", FAKE_ID, FAKE_BIRTH)


def _phi_study(folder: Path) -> list[Path]:
    """Files of one study with the fake patient: 3 images, a changed duplicate, a broken one."""
    folder.mkdir()
    study_uid, series_uid = "2.25.5550001", "2.25.5550002"
    datasets = [
        tiny_ct(study_uid=study_uid, series_uid=series_uid, patient_name=FAKE_NAME, patient_id=FAKE_ID, instance_number=i)
        for i in range(1, 4)
    ]
    for ds in datasets:
        ds.PatientBirthDate = FAKE_BIRTH
        ds.OtherPatientIDs = FAKE_ID + "-OTHER"
    changed = tiny_ct(study_uid=study_uid, series_uid=series_uid, sop_uid=datasets[0].SOPInstanceUID,
                      patient_name=FAKE_NAME, patient_id=FAKE_ID, value=7)
    broken = tiny_ct(patient_name=FAKE_NAME, patient_id=FAKE_ID)
    del broken.SeriesInstanceUID
    paths = []
    for number, ds in enumerate([*datasets, datasets[1], changed, broken]):
        path = folder / f"{number:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _assert_clean(text: str) -> None:
    leaked = [value for value in FORBIDDEN if value.lower() in text.lower()]
    assert leaked == [], f"patient identifiers in the log: {leaked}"


def test_serve_logs_no_patient_identifier(serve_process: Callable[..., Any], dcmtk: DCMTK, tmp_path: Path) -> None:
    files = _phi_study(tmp_path / "study")
    server = serve_process(logging={"level": "DEBUG"}, env={"PYTHONWARNINGS": "always"})
    sent = dcmtk.storescu(server.port, files, extra=["-v"])  # the broken file fails; the rest succeed
    assert sent.stderr.count("Received Store Response (Success)") == len(files) - 1, sent.stderr
    assert dcmtk.echoscu(server.port, calling="STRANGER").returncode != 0
    assert server.terminate() == 0
    text = server.log_text()
    assert "received again with different content" in text  # the noisy paths did log
    assert "refused" in text
    _assert_clean(text)


def test_in_process_logs_no_patient_identifier(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("pynetdicom", "pydicom", "dicom_node"):
        caplog.set_level(logging.DEBUG, logger=name)
    # SQL statements are logged with their parameters hidden (row dumps at DEBUG are a
    # deliberate debugging switch and stay off).
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    datasets = [tiny_ct(patient_name=FAKE_NAME, patient_id=FAKE_ID) for _ in range(2)]
    broken = tiny_ct(patient_name=FAKE_NAME, patient_id=FAKE_ID)
    broken.StudyInstanceUID = "not-a-uid"
    statuses = send_datasets(node.scp.address[1], [*datasets, datasets[0], broken])
    assert statuses[:3] == [0, 0, 0] and statuses[3] != 0
    node.dispatcher.drain()
    assert any(record.name.startswith("sqlalchemy.engine") for record in caplog.records)
    assert any(record.name.startswith("pynetdicom") for record in caplog.records)
    _assert_clean("\n".join(record.getMessage() for record in caplog.records))


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root handlers and the library loggers' levels back after :func:`configure`."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


def test_configure_caps_alembic_and_sqlalchemy(restored_logging: None, make_settings: Callable[..., Any],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    configure("DEBUG")
    for name in ("alembic", "alembic.runtime.migration", "sqlalchemy", "sqlalchemy.engine.Engine",
                 "sqlalchemy.pool", "sqlalchemy.orm"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    assert logging.getLogger("dicom_node").getEffectiveLevel() == logging.DEBUG
    engine = build_engine(make_settings())
    try:
        upgrade_to_head(engine)  # Alembic logs every migration step at INFO
    finally:
        engine.dispose()
    text = capsys.readouterr().err
    assert "index schema at head" in text  # the node's own DEBUG line is kept
    assert "alembic" not in text and "Running upgrade" not in text
    assert "sqlalchemy" not in text


def test_a_library_warning_quoting_a_person_name_is_dropped() -> None:
    """highdicom warns about a one-component name with the name in the text (via logging.captureWarnings)."""
    from dicom_node.logs import PatientIdentifierFilter

    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, (
        'UserWarning: The string "DOE" is unlikely to represent the intended person name since it contains only a '
        "single component."), None, None)
    assert PatientIdentifierFilter().filter(record) is False
