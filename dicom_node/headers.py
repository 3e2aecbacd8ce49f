"""Instance headers as the index keeps them: parsed once by the C-STORE handler, read back here.

The C-STORE handler reduces every received header to an :class:`inference.dicom_headers.InstanceHeader`
(:func:`dicom_node.storage.parse_header`) and the index keeps it in ``instance.header``
(:func:`inference.dicom_headers.header_to_json`). Completion's readiness and the worker's planning
read headers from here, never from the files.

Rows indexed before the column existed (or by a node whose header layout was older,
:data:`inference.dicom_headers.HEADER_FORMAT`) hold no usable header: the first time one is
needed its file is read once and the header stored (lazy back-fill). A file that cannot be read
then is recorded as such (``{"format": ..., "unreadable": reason}``), so it is not read again;
the instance is left out, logged with its SOP Instance UID. Nothing here raises for a bad row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.db import write_session
from dicom_node.index.models import Instance
from inference.dicom_headers import HEADER_FORMAT, InstanceHeader, header_from_json, header_to_json, read_instance_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeaderRow:
    """What :func:`usable_headers` needs of one instance row."""

    instance_pk: int
    sop_instance_uid: str
    path: str  # relative to ``storage.data_dir``
    header: Any  # ``instance.header`` as stored (None before the back-fill)


def _unreadable(stored: Any) -> str | None:
    """The reason recorded for an instance whose file could not be read at back-fill, else None."""
    if isinstance(stored, dict) and stored.get("format") == HEADER_FORMAT and "unreadable" in stored:
        return str(stored["unreadable"])
    return None


def usable_headers(
    sessions: sessionmaker[Session], data_dir: Path, rows: Iterable[HeaderRow], problems: list[str] | None = None
) -> list[InstanceHeader]:
    """The stored headers of ``rows`` (their ``path`` made absolute), in row order.

    An instance whose header could not be reduced or whose file could not be read is left out
    with a warning naming its SOP Instance UID (also appended to ``problems`` when given, in the
    words of :func:`inference.dicom_headers.read_instance_header`). Rows without a stored header
    are back-filled from their files, in one write transaction.
    """
    headers: list[InstanceHeader] = []
    backfill: dict[int, dict[str, Any]] = {}
    for row in rows:
        path = data_dir / row.path
        header = header_from_json(row.header, path)
        reason = _unreadable(row.header)
        if header is None and reason is None:
            header, reason = _read_once(path, row.sop_instance_uid)
            backfill[row.instance_pk] = (header_to_json(header) if header is not None
                                         else {"format": HEADER_FORMAT, "unreadable": reason})
        if header is not None and header.problem is not None:
            reason, header = header.problem, None
        if header is None:
            _left_out(problems, row.sop_instance_uid, reason or "header unreadable")
            continue
        headers.append(header)
    if backfill:
        _store(sessions, backfill)
    return headers


def _read_once(path: Path, sop_instance_uid: str) -> tuple[InstanceHeader | None, str | None]:
    """Read a header from its file (the back-fill); (None, reason) when it cannot be."""
    if not path.is_file():
        return None, "file missing"
    try:
        header = read_instance_header(path)
    except Exception as exc:  # noqa: BLE001 - one bad file drops its instance, never the study
        return None, f"unreadable ({type(exc).__name__})"
    if header is None:
        return None, "unreadable (not a DICOM file with SOP Instance and Series UIDs)"
    if header.sop_instance_uid != sop_instance_uid:
        log.debug("instance %s: its file names SOP Instance UID %s", sop_instance_uid, header.sop_instance_uid)
    return header, None


def _left_out(problems: list[str] | None, sop_instance_uid: str, reason: str) -> None:
    message = f"instance {sop_instance_uid} dropped: {reason}"
    log.warning("%s; left out of the series' judgement", message)
    if problems is not None:
        problems.append(message)


def _store(sessions: sessionmaker[Session], backfill: dict[int, dict[str, Any]]) -> None:
    """Write back-filled headers; a failure is logged (they are read from the files again next time)."""
    try:
        with write_session(sessions) as session:
            for instance_pk, stored in backfill.items():
                # only rows still without one: a concurrent back-fill or a new copy may have written it
                session.execute(update(Instance).where(Instance.id == instance_pk, Instance.header.is_(None))
                                .values(header=stored))
        log.info("stored the headers of %d instance(s) indexed before headers were kept", len(backfill))
    except Exception:  # noqa: BLE001 - the headers were read; only keeping them failed
        log.exception("could not store %d back-filled header(s)", len(backfill))


def header_rows(results: Sequence[Any]) -> list[HeaderRow]:
    """:class:`HeaderRow` of result rows selecting ``Instance.id, sop_instance_uid, path, header``."""
    return [HeaderRow(int(r.id), str(r.sop_instance_uid), str(r.path), r.header) for r in results]
