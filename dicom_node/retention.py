"""Retention: purge processed studies by age, and by disk use before refusing C-STOREs.

Rules (issue 2 item 8)
----------------------
* **Age.** With ``retention.enabled`` (the default) a *processed* study (analysed,
  not analysed, not eligible, delivered, partly delivered, dead-lettered) whose last instance
  arrived more than ``retention.days`` ago is purged. Studies still being received, waiting,
  analysed or reported are never purged.
* **Disk watermarks.** When the filesystem of ``storage.data_dir`` is used above
  ``disk_high_watermark_pct``, processed studies are purged oldest first (by last arrival),
  whatever their age, until use falls below ``disk_low_watermark_pct``. This runs even with
  age-based retention off: it is what keeps the node receiving.
* **Refusal last.** :meth:`Retention.has_room` is the SCP's disk guard
  (:class:`dicom_node.storage.DiskGuard`): a C-STORE that would pass the high watermark first
  triggers a purge; only if nothing purgeable is left does the SCP answer 0xA700 "Refused:
  Out of Resources" (PS3.4 B.2.3), before any byte is written.

What a purge keeps
------------------
The study's files (received instances, and its results folder ``results/<study UID>/``
when there is one) and its series and instance rows are deleted; the study row and its whole
timeline stay, with a last ``purged`` event saying why and how much was freed, so
``fpe-node studies`` can still tell what happened. A later *new* usable series re-opens a
purged study like any processed one (see :mod:`dicom_node.completion`).

Files are unlinked inside the same unit of work that deletes their rows (before commit): on
SQLite that transaction holds the write lock the SCP needs to publish a file, so a C-STORE
racing with the purge can never have its fresh file removed. A crash between unlink and
commit leaves the rows of a study whose files are gone; the next run purges it again.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.lifecycle import PROCESSED_STATES, StudyState, TransitionError, transition
from dicom_node.settings import RetentionSettings, StorageSettings

log = logging.getLogger(__name__)

NOTHING_TO_PURGE_BACKOFF_S = 5.0
"""After a purge found nothing to remove, C-STOREs above the watermark are refused without
asking the index again for this long (keeps a full node cheap to refuse)."""


class DiskUsage(NamedTuple):
    """Bytes of a filesystem, like :func:`shutil.disk_usage`."""

    total: int
    used: int
    free: int


DiskUsageProbe = Callable[[Path], DiskUsage]


def disk_usage(path: Path) -> DiskUsage:
    """Usage of the filesystem holding ``path``; used = total - free (reserved blocks count as used)."""
    usage = shutil.disk_usage(path)
    return DiskUsage(usage.total, usage.total - usage.free, usage.free)


@dataclass
class PurgeReport:
    """What one retention run did."""

    purged: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    used_pct_before: float = 0.0
    used_pct_after: float = 0.0


class Retention:
    """Purges processed studies; also the SCP's disk guard.

    Parameters
    ----------
    retention, storage:
        ``settings.retention`` and ``settings.storage``.
    sessions:
        Session factory of the index.
    usage:
        Disk-usage probe (tests pass a fake one).
    clock:
        Current UTC time.
    """

    def __init__(
        self,
        retention: RetentionSettings,
        storage: StorageSettings,
        sessions: sessionmaker[Session],
        *,
        usage: DiskUsageProbe = disk_usage,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._settings = retention
        self._storage = storage
        self._sessions = sessions
        self._usage = usage
        self._clock = clock
        self._lock = threading.Lock()
        self._nothing_until = 0.0

    # -- the disk guard of the SCP ---------------------------------------------------------

    def has_room(self, size_bytes: int) -> bool:
        """True if ``size_bytes`` more stay at or below the high watermark, purging first if needed."""
        if self._fits(size_bytes):
            return True
        if time.monotonic() < self._nothing_until:
            return False
        with self._lock:
            if not self._fits(size_bytes):
                report = self._purge_for_space()
                if not report.purged:
                    self._nothing_until = time.monotonic() + NOTHING_TO_PURGE_BACKOFF_S
        return self._fits(size_bytes)

    def _fits(self, size_bytes: int) -> bool:
        usage = self._usage(self._storage.data_dir)
        return (usage.used + size_bytes) * 100.0 <= usage.total * self._settings.disk_high_watermark_pct

    def used_pct(self) -> float:
        """Current use of the data directory's filesystem, percent."""
        usage = self._usage(self._storage.data_dir)
        return 100.0 * usage.used / usage.total if usage.total else 100.0

    # -- scheduled runs ------------------------------------------------------------------------

    def run(self) -> PurgeReport:
        """One retention pass: expired studies (when enabled), then the watermarks."""
        with self._lock:
            report = PurgeReport(used_pct_before=self.used_pct())
            if self._settings.enabled:
                self._merge(report, self._purge_expired())
            if self.used_pct() > self._settings.disk_high_watermark_pct:
                self._merge(report, self._purge_for_space())
            report.used_pct_after = self.used_pct()
        if report.purged:
            self._nothing_until = 0.0
            log.info(
                "retention purged %d studies, %d files, %.1f MB; disk use %.1f%% -> %.1f%%",
                len(report.purged), report.files, report.bytes / 1e6, report.used_pct_before, report.used_pct_after,
            )
        return report

    def purge_expired(self) -> PurgeReport:
        """Purge processed studies older than ``retention.days`` (regardless of ``enabled``)."""
        with self._lock:
            return self._purge_expired()

    def purge_study(self, study_uid: str, reason: str) -> PurgeReport:
        """Purge one processed study now (files and rows; study row and timeline kept)."""
        report = PurgeReport()
        with self._lock:
            self._purge_one(study_uid, reason, report)
        return report

    # -- internals -------------------------------------------------------------------------------

    def _purge_expired(self) -> PurgeReport:
        cutoff = self._clock() - dt.timedelta(days=self._settings.days)
        report = PurgeReport()
        for study_uid in self._processed_studies(older_than=cutoff):
            self._purge_one(study_uid, f"retention: no arrival for {self._settings.days:g} days", report)
        return report

    def _purge_for_space(self) -> PurgeReport:
        """Oldest processed studies first, until use is below the low watermark."""
        report = PurgeReport(used_pct_before=self.used_pct())
        low = self._settings.disk_low_watermark_pct
        for study_uid in self._processed_studies():
            if self.used_pct() < low:
                break
            self._purge_one(study_uid, f"disk use above {self._settings.disk_high_watermark_pct:g}%", report)
        report.used_pct_after = self.used_pct()
        if report.used_pct_after >= low:
            log.warning(
                "disk use %.1f%% still above the low watermark (%g%%): nothing processed left to purge",
                report.used_pct_after, low,
            )
        return report

    def _processed_studies(self, older_than: dt.datetime | None = None) -> list[str]:
        """Processed study UIDs, oldest last arrival first."""
        query = select(Study.study_uid).where(Study.state.in_([s.value for s in PROCESSED_STATES]))
        if older_than is not None:
            query = query.where(Study.last_received_at < older_than)
        with self._sessions() as session:
            return list(session.execute(query.order_by(Study.last_received_at, Study.id)).scalars())

    def _purge_one(self, study_uid: str, reason: str, report: PurgeReport) -> None:
        try:
            with write_session(self._sessions) as session:
                files, size = self._delete_study_content(session, study_uid)
                detail = f"{reason}; {files} files, {size / 1e6:.1f} MB freed"
                transition(session, study_uid, StudyState.PURGED, detail, expected=PROCESSED_STATES)
        except TransitionError as exc:  # re-opened or re-queued meanwhile: keep it
            log.info("study %s not purged: %s", study_uid, exc)
            return
        report.purged.append(study_uid)
        report.files += files
        report.bytes += size

    def _delete_study_content(self, session: Session, study_uid: str) -> tuple[int, int]:
        """Delete the study's instance and series rows and their files (in the caller's transaction)."""
        study_pk = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
        series_pks = select(Series.id).where(Series.study_pk == study_pk)
        rows = session.execute(select(Instance.path, Instance.size_bytes).where(Instance.series_pk.in_(series_pks))).all()
        session.execute(delete(Instance).where(Instance.series_pk.in_(series_pks)).execution_options(synchronize_session=False))
        session.execute(delete(Series).where(Series.study_pk == study_pk).execution_options(synchronize_session=False))
        size = 0
        folders: set[Path] = set()
        for relative, size_bytes in rows:
            path = self._storage.data_dir / relative
            path.unlink(missing_ok=True)
            size += size_bytes
            folders.add(path.parent)
        results = self._storage.results_dir / study_uid
        if results.is_dir():
            size += sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
            shutil.rmtree(results)
        self._remove_empty(folders)
        return len(rows), size

    def _remove_empty(self, folders: set[Path]) -> None:
        """Remove emptied series folders, then their study folder (only below ``dicom/``)."""
        root = self._storage.dicom_dir.resolve()
        for folder in folders:
            for candidate in (folder, folder.parent):
                if root not in candidate.resolve().parents:
                    continue
                try:
                    candidate.rmdir()
                except OSError:  # not empty (another series, or a new arrival) or already gone
                    continue

    @staticmethod
    def _merge(total: PurgeReport, part: PurgeReport) -> None:
        total.purged.extend(part.purged)
        total.files += part.files
        total.bytes += part.bytes
