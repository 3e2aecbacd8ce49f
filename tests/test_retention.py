"""Retention: age-based purge of processed studies, disk watermarks, the SCP's disk guard."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.index.models import Instance, Series, Study, StudyEvent
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.retention import DiskUsage, Retention
from dicom_node.settings import RetentionSettings
from tests.studyindex import Index, add_instances, index  # noqa: F401 - fixture

S = StudyState
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


class FakeDisk:
    """A 100 kB filesystem whose use is the size of the files under the data directory."""

    def __init__(self, data_dir: Path, total: int = 100_000, other: int = 0) -> None:
        self.data_dir, self.total, self.other = data_dir, total, other

    def __call__(self, path: Path) -> DiskUsage:
        used = self.other + sum(p.stat().st_size for p in self.data_dir.rglob("*.dcm"))
        return DiskUsage(self.total, used, self.total - used)


def _study(index: Index, study_uid: str, state: StudyState, age: dt.timedelta, files: int = 3, size: int = 1000) -> list[Path]:
    paths = add_instances(index, study_uid, f"{study_uid}.1", files, received_at=NOW - age, size_bytes=size)
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    path = {
        S.RECEIVED: [],
        S.QUEUED: [S.COMPLETE, S.QUEUED],
        S.ANALYSED: [S.COMPLETE, S.QUEUED, S.ANALYSING, S.ANALYSED],
        S.DELIVERED: [S.COMPLETE, S.QUEUED, S.ANALYSING, S.ANALYSED, S.REPORTING, S.DELIVERED],
        S.NOT_ELIGIBLE: [S.COMPLETE, S.NOT_ELIGIBLE],
    }[state]
    for step in path:
        lifecycle.transition(study_uid, step)
    return paths


def _retention(index: Index, disk: FakeDisk | None = None, **values: object) -> Retention:
    settings = RetentionSettings(**{"enabled": True, "days": 7, "disk_high_watermark_pct": 90,
                                    "disk_low_watermark_pct": 80, **values})  # type: ignore[arg-type]
    return Retention(settings, index.settings.storage, index.sessions, usage=disk or FakeDisk(index.data_dir))


def _count(index: Index, model: type) -> int:
    with index.sessions() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def _state(index: Index, study_uid: str) -> str:
    with index.sessions() as session:
        return session.execute(select(Study.state).where(Study.study_uid == study_uid)).scalar_one()


def test_processed_studies_older_than_the_retention_are_purged(index: Index) -> None:
    old_done = _study(index, "1.6.1", S.DELIVERED, 8 * DAY)
    old_pending = _study(index, "1.6.2", S.QUEUED, 8 * DAY)
    new_done = _study(index, "1.6.3", S.ANALYSED, 1 * DAY)
    results = index.settings.storage.results_dir / "1.6.1"
    results.mkdir(parents=True)
    (results / "sr.dcm").write_bytes(b"x" * 500)

    report = _retention(index).run()

    assert report.purged == ["1.6.1"]
    assert report.files == 3 and report.bytes == 3500
    assert not any(p.exists() for p in old_done) and not results.exists()
    assert not (index.data_dir / "dicom" / "1.6.1").exists()  # emptied folders removed
    assert all(p.exists() for p in old_pending + new_done)
    assert _state(index, "1.6.1") == "purged"
    assert _count(index, Series) == 2 and _count(index, Instance) == 6
    with index.sessions() as session:
        events = session.execute(
            select(StudyEvent.state, StudyEvent.detail).join(Study).where(Study.study_uid == "1.6.1").order_by(StudyEvent.id)
        ).all()
    assert [e.state for e in events] == ["complete", "queued", "analysing", "analysed", "reporting", "delivered", "purged"]
    assert events[-1].detail == "retention: no arrival for 7 days; 3 files, 0.0 MB freed"
    assert _retention(index).run().purged == []  # idempotent
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    assert lifecycle.reopen("1.6.1", "re-opened by new series 1.6.1.9 (CT)") is S.PURGED  # a new usable series
    assert _state(index, "1.6.1") == "received"


def test_retention_off_keeps_old_studies(index: Index) -> None:
    _study(index, "1.6.4", S.DELIVERED, 30 * DAY)
    assert _retention(index, enabled=False).run().purged == []
    assert _state(index, "1.6.4") == "delivered"


@pytest.mark.parametrize("index", ["sqlite"], indirect=True)
def test_above_the_high_watermark_oldest_processed_go_first_until_below_low(index: Index) -> None:
    # 100 kB disk, 60 kB used by something else; each study holds 10 kB.
    disk = FakeDisk(index.data_dir, other=60_000)
    _study(index, "1.7.1", S.DELIVERED, 3 * DAY, files=10)
    _study(index, "1.7.2", S.NOT_ELIGIBLE, 2 * DAY, files=10)
    _study(index, "1.7.3", S.ANALYSED, 1 * DAY, files=10)
    _study(index, "1.7.4", S.RECEIVED, 4 * DAY, files=10)  # oldest, but not processed
    assert disk(index.data_dir).used == 100_000

    report = _retention(index, disk).run()

    assert report.purged == ["1.7.1", "1.7.2", "1.7.3"]  # 100% -> 90 -> 80 -> 70 (< 80)
    assert report.used_pct_after == pytest.approx(70.0)
    assert _state(index, "1.7.4") == "received"


@pytest.mark.parametrize("index", ["sqlite"], indirect=True)
def test_disk_guard_purges_first_and_refuses_only_when_nothing_is_left(index: Index) -> None:
    disk = FakeDisk(index.data_dir, other=75_000)
    _study(index, "1.8.1", S.DELIVERED, 1 * DAY, files=10)  # 85 kB used
    _study(index, "1.8.2", S.QUEUED, 1 * DAY, files=5)  # 90 kB used
    retention = _retention(index, disk)

    assert retention.has_room(0)  # exactly at the watermark
    assert retention.has_room(5_000)  # 95 kB would pass 90%: purge 1.8.1 first
    assert _state(index, "1.8.1") == "purged"
    assert disk(index.data_dir).used == 80_000

    disk.other = 90_000  # the disk fills with something else; only unprocessed studies remain
    assert not retention.has_room(1_000)  # the SCP answers 0xA700
    assert _state(index, "1.8.2") == "queued"
    assert retention.has_room(0) is False
