"""Instances that passed the C-STORE checks but fail later, and files the index does not know.

* :class:`QuarantineCheck` (an :class:`dicom_node.scp.IngestListener`) runs the later check on
  every stored file off the network path (:func:`dicom_node.validation.deep_check`: a compressed
  instance read in full and its first frame decoded); one that fails is
  quarantined: its row keeps the file and gets ``quarantine_reason``, ``fpe-node studies`` shows
  it, and case building never sees it (the queries that list a study's files skip it).
* :func:`reconcile_orphans` runs at start-up, before the SCP listens: a file under ``dicom/``
  without an index row (the node was killed between the rename and the commit, so its sender
  was never acknowledged) is adopted when it passes every check, else moved to
  ``quarantine/orphans/`` with the reason logged.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index import repository
from dicom_node.index.db import run_write
from dicom_node.index.models import Instance
from dicom_node.index.repository import FileFacts
from dicom_node.storage import FileStore, HeaderError, dataset_digest, parse_header
from dicom_node.validation import check_dataset, deep_check

log = logging.getLogger(__name__)

QUARANTINE_FOLDER = "quarantine"
"""Under ``storage.data_dir``: files set aside (``orphans/`` for files no row described)."""


def quarantine_instance(sessions: sessionmaker[Session], sop_instance_uid: str, path: str, reason: str) -> bool:
    """Mark the row of ``sop_instance_uid`` quarantined if it still describes the file at ``path``."""

    def mark(session: Session) -> bool:
        result = session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == sop_instance_uid, Instance.path == path)
            .values(quarantine_reason=reason[:500])
        )
        return bool(getattr(result, "rowcount", 0))

    return run_write(sessions, mark)


class QuarantineCheck:
    """Reads each stored instance in full after it was acknowledged; quarantines what fails.

    Runs on the listener thread before completion (so the check is done before a series can be
    judged) and never raises into it.
    """

    def __init__(self, sessions: sessionmaker[Session], data_dir: Path) -> None:
        self._sessions = sessions
        self._data_dir = data_dir
        self.checked = 0
        self.quarantined = 0

    def instance_stored(self, info: object) -> None:
        """Check the file of a newly stored instance (:class:`dicom_node.scp.StoredInstance`)."""
        path: Path = getattr(info, "path")
        sop_instance_uid: str = getattr(info, "sop_instance_uid")
        reason = deep_check(path)
        self.checked += 1
        if reason is None:
            return
        relative = path.relative_to(self._data_dir).as_posix()
        if quarantine_instance(self._sessions, sop_instance_uid, relative, reason):
            self.quarantined += 1
            log.warning("instance %s quarantined: %s", sop_instance_uid, reason)

    def association_released(self, series_uids: set[str]) -> None:
        """Nothing to do when a sender releases."""


@dataclass(frozen=True)
class Reconciled:
    """What start-up did with files under ``dicom/`` that had no index row."""

    adopted: int
    quarantined: int


def reconcile_orphans(files: FileStore, sessions: sessionmaker[Session], *, min_age_s: float = 0.0) -> Reconciled:
    """Adopt or quarantine every file under ``dicom/`` that no index row names (start-up).

    ``min_age_s``: leave files younger than this alone. Receivers sharing the storage folder
    (``fpe-node serve --role receiver``) pass a few minutes, so a file another receiver has just
    put in place and is indexing is never taken for an orphan.
    """
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    adopted = quarantined = 0
    now = time.time()
    for path in sorted((files.data_dir / "dicom").rglob("*.dcm")):
        relative = path.relative_to(files.data_dir).as_posix()
        if relative in known:
            continue
        try:
            if min_age_s and now - path.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:
            continue
        reason = _adopt(files, sessions, path, relative)
        if reason is None:
            adopted += 1
            log.info("file %s had no index row: it passed every check and was indexed", relative)
            continue
        target = files.data_dir / QUARANTINE_FOLDER / "orphans" / path.relative_to(files.data_dir / "dicom")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        quarantined += 1
        log.warning("file %s had no index row and was moved to %s: %s", relative, target, reason)
    return Reconciled(adopted, quarantined)


def _adopt(files: FileStore, sessions: sessionmaker[Session], path: Path, relative: str) -> str | None:
    """Index an orphan file that passes every check; the reason it cannot be adopted otherwise."""
    try:
        meta = read_file_meta_info(path)
        data = path.read_bytes()
        (group_length,) = struct.unpack_from("<I", data, 140)
        dataset = data[144 + group_length :]
        syntax = str(meta.TransferSyntaxUID)
        check_dataset(dataset, syntax, str(meta.MediaStorageSOPClassUID))
        header = parse_header(dataset, syntax)
    except HeaderError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read is quarantined
        return f"cannot be read ({type(exc).__name__})"
    if files.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid) != relative:
        return "its UIDs do not match its place under dicom/"
    reason = deep_check(path)
    if reason is not None:
        return reason
    facts = FileFacts(
        path=relative,
        size_bytes=len(data),
        sha256=dataset_digest(dataset),
        transfer_syntax_uid=syntax,
        calling_ae=str(getattr(meta, "SourceApplicationEntityTitle", "") or "").strip() or None,
        received_at=repository.record_received_at(),
    )

    def record(session: Session) -> str | None:
        if repository.stored_copy(session, header.sop_instance_uid) is not None:
            return "another copy of this SOP Instance UID is indexed"
        repository.record_instance(session, header, facts)
        return None

    return run_write(sessions, record)
