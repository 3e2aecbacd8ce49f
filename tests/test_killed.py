"""``kill -9`` of ``fpe-node serve`` in the middle of a transfer loses no acknowledged instance.

A pynetdicom SCU sends the real CT slice by slice and records every Success it gets; the
server is SIGKILLed part-way. After a restart, every acknowledged instance is in the index and
its file on disk holds exactly the bytes that were sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from dicom_node.index.db import build_engine, build_session_factory
from dicom_node.index.models import Instance
from dicom_node.settings import load_settings
from dicom_node.storage import dataset_digest
from tests.conftest import CT_PHILIPS, require_shared_data
from tests.peers import CT_IMAGE_STORAGE, associate, dataset_bytes


def _send_until_failure(port: int, files: list[Path], acknowledged: list[str], done: threading.Event) -> None:
    """Send files one by one, appending each SOP Instance UID answered with Success."""
    try:
        assoc = associate(port, calling="STORESCU", contexts=[CT_IMAGE_STORAGE])
        if not assoc.is_established:
            return
        for path in files:
            if not assoc.is_established:
                return
            response = assoc.send_c_store(path)
            if "Status" not in response or int(response.Status) != 0:
                return
            acknowledged.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assoc.release()
    except Exception:  # noqa: BLE001 - the peer vanishing mid-transfer is the point of the test
        return
    finally:
        done.set()


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(
    serve_process: Callable[..., Any], data_dir: Path
) -> None:
    files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())[:80]
    server = serve_process()
    acknowledged: list[str] = []
    done = threading.Event()
    sender = threading.Thread(target=_send_until_failure, args=(server.port, files, acknowledged, done), daemon=True)
    sender.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 15 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL, no chance to clean up
    sender.join(60)
    assert 15 <= len(acknowledged) < len(files), "the kill did not land mid-transfer"

    restarted = serve_process()  # restart on the same data directory (cleans partial files)
    assert restarted.terminate() == 0
    assert list((data_dir / "tmp").iterdir()) == []

    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(data_dir)}})
    engine = build_engine(settings)
    try:
        with build_session_factory(engine)() as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    finally:
        engine.dispose()
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    for sop_uid in acknowledged:
        assert sop_uid in rows, f"acknowledged instance {sop_uid} missing from the index"
        stored = data_dir / rows[sop_uid].path
        assert stored.is_file(), f"acknowledged instance {sop_uid} has no file"
        assert dataset_bytes(stored) == dataset_bytes(sources[sop_uid])
        assert dataset_digest(dataset_bytes(stored)) == rows[sop_uid].sha256
    # Whatever was indexed but not acknowledged (killed between commit and response) is whole too.
    for sop_uid, row in rows.items():
        assert dataset_bytes(data_dir / row.path) == dataset_bytes(sources[sop_uid])
    # No orphan survives the restart: every file under dicom/ has its row (adopted at start-up).
    assert {p.relative_to(data_dir).as_posix() for p in (data_dir / "dicom").rglob("*.dcm")} == {
        row.path for row in rows.values()
    }
