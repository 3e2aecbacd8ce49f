"""Index fixtures shared by the life-cycle, completion, retention and ``studies`` tests.

``index`` gives a migrated index on SQLite and on PostgreSQL (a fresh schema per test from
``tests.peers``; failing without ``FPENODE_TEST_POSTGRES_URL``, which ``make test`` sets); narrow it with
``@pytest.mark.parametrize("index", ["sqlite"], indirect=True)``. Plus helpers that add studies, series and instances the way the
SCP's repository does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.base import utcnow
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head, write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.settings import Settings, load_settings
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url

BACKENDS = ("sqlite", "postgresql")


@dataclass
class Index:
    """A migrated index and the settings that point at it."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.data_dir


def index_settings(data_dir: Path, url: str | None = None, **sections: dict[str, object]) -> Settings:
    """Settings for a test index in ``data_dir`` (SQLite unless ``url`` is given)."""
    overrides: dict[str, object] = {"storage": {"data_dir": str(data_dir), "fsync": False}, "index": {"url": url}}
    overrides.update(sections)
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture(params=BACKENDS)
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    """A fresh, migrated index (SQLite file, or a private schema on PostgreSQL)."""
    if request.param == "sqlite":
        settings = index_settings(tmp_path / "data")
        engine = build_engine(settings)
        upgrade_to_head(engine)
        yield Index(settings, engine, build_session_factory(engine))
        engine.dispose()
        return
    base_url = postgres_base_url()
    url, schema = fresh_postgres_schema(base_url)
    settings = index_settings(tmp_path / "data", url)
    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        yield Index(settings, engine, build_session_factory(engine))
    finally:
        engine.dispose()
        drop_postgres_schema(base_url, schema)


def add_study(
    sessions: sessionmaker[Session],
    study_uid: str,
    *,
    acquired_at: dt.datetime | None = None,
    received_at: dt.datetime | None = None,
) -> int:
    """A study row in state ``received`` (as the SCP's first instance creates it)."""
    at = received_at or utcnow()
    with write_session(sessions) as session:
        study = Study(study_uid=study_uid, acquired_at=acquired_at, first_received_at=at, last_received_at=at)
        session.add(study)
        session.flush()
        return study.id


def add_instances(
    index: Index,
    study_uid: str,
    series_uid: str,
    count: int,
    *,
    modality: str = "CT",
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2",
    manufacturer: str | None = "ACME",
    received_at: dt.datetime | None = None,
    size_bytes: int = 1000,
) -> list[Path]:
    """Series and instance rows plus files of ``size_bytes`` under the data directory."""
    at = received_at or utcnow()
    paths = []
    with write_session(index.sessions) as session:
        study = session.query(Study).filter_by(study_uid=study_uid).one_or_none()
        if study is None:
            study = Study(study_uid=study_uid, first_received_at=at, last_received_at=at)
            session.add(study)
            session.flush()
        series = session.query(Series).filter_by(series_uid=series_uid).one_or_none()
        if series is None:
            series = Series(
                series_uid=series_uid, study_pk=study.id, modality=modality, manufacturer=manufacturer,
                last_received_at=at,
            )
            session.add(series)
            session.flush()
        for number in range(count):
            sop_uid = f"{series_uid}.{series.instance_count + number + 1}"
            relative = Path("dicom") / study_uid / series_uid / f"{sop_uid}.dcm"
            path = index.data_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * size_bytes)
            paths.append(path)
            session.add(
                Instance(
                    sop_instance_uid=sop_uid, series_pk=series.id, sop_class_uid=sop_class_uid,
                    transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(relative), size_bytes=size_bytes,
                    sha256="0" * 64, received_at=at,
                )
            )
        series.instance_count += count
        series.last_received_at = at
        study.last_received_at = at
        study.modalities = "\\".join(sorted(set(filter(None, study.modalities.split("\\"))) | {modality}))
    return paths


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass(frozen=True)
class Stored:
    """What the SCP hands its listeners after an instance is stored and indexed."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = CT_IMAGE
    modality: str | None = "CT"
    manufacturer: str | None = "ACME"
    series_description: str | None = None
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    calling_ae: str | None = "PACS"
    path: Path | None = None
    replaced: bool = False  # a differing copy of an instance already held (a PACS re-sending)


def receive(index: Index, listener: object, stored: Stored, count: int = 1) -> None:
    """Index ``count`` instances of a series and tell the listener, as the SCP does."""
    for _ in range(count):
        add_instances(
            index, stored.study_uid, stored.series_uid, 1, modality=stored.modality or "OT",
            sop_class_uid=stored.sop_class_uid, manufacturer=stored.manufacturer,
        )
        listener.instance_stored(stored)  # type: ignore[attr-defined]


def add_files(index: Index, study_uid: str, series_uid: str, files: list[Path], **kwargs: Any) -> list[Path]:
    """Index real DICOM files (copied into the data directory) as one series; returns their new paths."""
    paths = add_instances(index, study_uid, series_uid, len(files), **kwargs)
    for source, target in zip(files, paths):
        target.write_bytes(source.read_bytes())
    return paths
