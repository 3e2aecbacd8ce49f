"""The index on SQLite and on a real PostgreSQL: migrations, recording instances, the
duplicate rule, concurrent creation of one study, the peer registry and its audit."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

import dicom_node.index.models  # noqa: F401 - tables on the metadata
from dicom_node.index.base import Base, utcnow
from dicom_node.index.db import build_engine, build_session_factory, run_write, upgrade_to_head
from dicom_node.index.models import AuditEntry, Instance, Patient, Peer, PeerAETitle, Series, Study, StudyEvent
from dicom_node.index.repository import (
    FileFacts,
    IndexKeys,
    KeyCache,
    RecordOutcome,
    record_instance,
    resolved_keys,
    stored_copy,
)
from dicom_node.peers import PeerError, PeerInfo, PeerRegistry
from dicom_node.settings import PeerSettings, load_settings
from inference.dicom_headers import InstanceHeader
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url


@dataclasses.dataclass
class Index:
    sessions: sessionmaker[Session]
    backend: str


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    """A freshly migrated index on each backend (PostgreSQL: a schema of its own)."""
    url, schema, base = None, None, None
    if request.param == "postgresql":
        base = postgres_base_url()
        url, schema = fresh_postgres_schema(base)
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path / "data")}, "index": {"url": url}})
    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        yield Index(build_session_factory(engine), request.param)
    finally:
        engine.dispose()
        if schema is not None and base is not None:
            drop_postgres_schema(base, schema)


def _header(study: str = "2.25.1", series: str = "2.25.11", sop: str = "2.25.111", **changes: object) -> InstanceHeader:
    header = InstanceHeader(
        path=None,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        patient_id="PID1",
        issuer_of_patient_id="",
        study_datetime=None,
        acquisition_datetime=None,
        accession="A1",
        study_description="HEAD",
        procedure_description="",
        modality="CT",
        series_description="AXIAL 5MM",
        protocol_name="",
        series_number=3,
        manufacturer="VENDOR",
        manufacturer_model="MODEL",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        body_part="HEAD",
        frame_of_reference_uid="2.25.9",
        instance_number=1,
        contrast_agent="",
        gantry_tilt=None,
        mr_acquisition_type="",
        rows=512,
        columns=512,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        has_pixels=True,
        frames=(),
    )
    return dataclasses.replace(header, **changes)  # type: ignore[arg-type]


def _facts(header: InstanceHeader, sha: str = "a" * 64) -> FileFacts:
    return FileFacts(
        path=f"dicom/{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm",
        size_bytes=100,
        sha256=sha,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="TESTSCU",
        received_at=utcnow(),
    )


def _record(index: Index, header: InstanceHeader, sha: str = "a" * 64) -> RecordOutcome:
    return run_write(index.sessions, lambda session: record_instance(session, header, _facts(header, sha)))


def _count(index: Index, model: object) -> int:
    with index.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)  # type: ignore[arg-type]


OWN_TABLES = {"patient", "study", "series", "instance", "peer", "peer_ae_title", "audit_entry", "study_event"}


def _tables_in(diff_item: object) -> set[str]:
    """Names of the tables a compare_metadata entry is about."""
    items = diff_item if isinstance(diff_item, list) else [diff_item]
    names = set()
    for item in items:
        for part in item:
            table = getattr(part, "table", None)
            name = getattr(part, "name", None) if table is None else table.name
            if isinstance(part, str) and part in OWN_TABLES:
                names.add(part)
            elif isinstance(name, str):
                names.add(name)
    return names


def test_migrations_match_the_models(index: Index) -> None:
    with index.sessions() as session:
        connection = session.connection()
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        names = set(inspect(connection).get_table_names())
    assert OWN_TABLES <= names
    # Only the tables of migration 0001 (other revisions' models may not be imported here).
    own_diff = [item for item in diff if _tables_in(item) & OWN_TABLES]
    assert own_diff == [], own_diff


def test_record_groups_patient_study_series_instance(index: Index) -> None:
    assert _record(index, _header()) is RecordOutcome.NEW
    assert _record(index, _header(sop="2.25.112", instance_number=2)) is RecordOutcome.NEW
    assert _record(index, _header(series="2.25.12", sop="2.25.121", modality="SR")) is RecordOutcome.NEW
    with index.sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.modalities == "CT\\SR"
        assert study.state == "received" and [e.state for e in study.events] == ["received"]
        assert study.patient is not None and (study.patient.patient_id, study.patient.issuer) == ("PID1", "")
        counts = {s.series_uid: s.instance_count for s in study.series}
        assert counts == {"2.25.11": 2, "2.25.12": 1}
        assert stored_copy(session, "2.25.112") is not None
        assert stored_copy(session, "2.25.999") is None


def test_duplicate_with_new_content_updates_the_row(index: Index) -> None:
    _record(index, _header(), sha="a" * 64)
    assert _record(index, _header(), sha="b" * 64) is RecordOutcome.REPLACED
    assert _count(index, Instance) == 1
    with index.sessions() as session:
        assert session.scalar(select(Instance.sha256)) == "b" * 64
        assert session.scalar(select(Series.instance_count)) == 1


def test_duplicate_moving_to_another_series_moves_the_count(index: Index) -> None:
    _record(index, _header())
    _record(index, _header(series="2.25.12"), sha="c" * 64)
    with index.sessions() as session:
        counts = {row.series_uid: row.instance_count for row in session.execute(select(Series.series_uid, Series.instance_count))}
    assert counts == {"2.25.11": 0, "2.25.12": 1}


def test_concurrent_writers_create_one_study(index: Index) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def writer(number: int) -> None:
        try:
            barrier.wait(10)
            for k in range(4):
                _record(index, _header(series=f"2.25.2{number}", sop=f"2.25.3{number}{k}"))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert (_count(index, Study), _count(index, Patient), _count(index, Series), _count(index, Instance)) == (1, 1, 6, 24)
    assert _count(index, StudyEvent) == 1


def test_deleting_a_study_cascades(index: Index) -> None:
    _record(index, _header())
    with index.sessions() as session:
        session.delete(session.scalars(select(Study)).one())
        session.commit()
    assert (_count(index, Series), _count(index, Instance), _count(index, StudyEvent)) == (0, 0, 0)


def test_peer_registry_and_audit(index: Index) -> None:
    registry = PeerRegistry(index.sessions)
    seeded = registry.seed([PeerSettings(name="PACS", ae_titles=("PACS_STORE", "PACS_QR"), host="10.0.0.9")])
    assert seeded == 1 and registry.seed([PeerSettings(name="PACS", ae_titles=("PACS_STORE", "PACS_QR"), host="10.0.0.9")]) == 0
    assert registry.authorize("PACS_QR", "10.0.0.9").accepted
    assert not registry.authorize("PACS_QR", "10.0.0.8").accepted
    assert registry.authorize("PACS_QR", "10.0.0.8", check_host=False).accepted
    assert not registry.authorize("NOBODY", "10.0.0.9").accepted
    with pytest.raises(PeerError):
        registry.add(PeerInfo("OTHER", ("PACS_QR",)), actor="test")
    registry.add(PeerInfo("PACS", ("PACS_STORE",), "*"), actor="test", replace=True)
    assert registry.authorize("PACS_STORE", "192.0.2.1").accepted
    assert not registry.authorize("PACS_QR", "10.0.0.9").accepted
    registry.remove("PACS", actor="test")
    assert (_count(index, Peer), _count(index, PeerAETitle)) == (0, 0)
    actions = [entry.action for entry in registry.audit_entries()]
    assert actions == ["peer.remove", "peer.update", "peer.add"]
    assert _count(index, AuditEntry) == 3


def test_timestamps_come_back_aware_utc(index: Index) -> None:
    """Both backends return the same aware UTC instant, whatever zone it was given in."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    given = dt.datetime(2026, 3, 1, 12, 30, 15, 250000, tzinfo=plus_two)
    _record(index, _header())
    with index.sessions() as session, session.begin():
        study = session.scalars(select(Study)).one()
        study.last_received_at = given
        study.first_received_at = dt.datetime(2026, 3, 1, 10, 0)  # naive: taken as UTC
    with index.sessions() as session:
        study = session.scalars(select(Study)).one()
        last, first = study.last_received_at, study.first_received_at
        received = session.scalars(select(Instance.received_at)).one()
        # Comparisons in SQL use the UTC instant (10:30 UTC is after 10:00 UTC, before 11:00).
        between = session.scalar(select(func.count()).select_from(Study).where(
            Study.last_received_at > dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.timezone.utc),
            Study.last_received_at < dt.datetime(2026, 3, 1, 11, 0, tzinfo=dt.timezone.utc)))
    assert last == given and last.utcoffset() == dt.timedelta(0) and last.hour == 10
    assert first == dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.timezone.utc)
    assert received.tzinfo is not None and received.utcoffset() == dt.timedelta(0)
    assert between == 1


def _record_keyed(index: Index, cache: KeyCache, header: InstanceHeader, sha: str = "a" * 64) -> RecordOutcome:
    """Record as the SCP does: cached keys offered, the keys used remembered after the commit."""
    used: list[IndexKeys | None] = []

    def work(session: Session) -> RecordOutcome:
        outcome = record_instance(session, header, _facts(header, sha), None, cache.get(header.series_uid))
        used.append(resolved_keys(session))
        return outcome

    outcome = run_write(index.sessions, work)
    assert used[-1] is not None
    cache.remember(used[-1])
    return outcome


def test_cached_keys_are_checked_and_refreshed(index: Index) -> None:
    """Stale cached keys (study deleted, series moved, modality added) fall back to look-ups."""
    cache = KeyCache()
    for number in range(1, 4):  # the second and third use the cached keys
        assert _record_keyed(index, cache, _header(sop=f"2.25.11{number}", instance_number=number)) is RecordOutcome.NEW
    assert _record_keyed(index, cache, _header(sop="2.25.113"), sha="b" * 64) is RecordOutcome.REPLACED
    with index.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 3 and series.study.modalities == "CT"
    # A new modality in the same series' study: the modalities are read afresh and merged.
    assert _record_keyed(index, cache, _header(series="2.25.12", sop="2.25.121", modality="SR")) is RecordOutcome.NEW
    assert _record_keyed(index, cache, _header(sop="2.25.114", instance_number=4)) is RecordOutcome.NEW
    # The study is deleted behind the cache's back; the next instance re-creates it.
    with index.sessions() as session:
        session.delete(session.scalars(select(Study)).one())
        session.commit()
    assert _record_keyed(index, cache, _header(sop="2.25.115", instance_number=5)) is RecordOutcome.NEW
    # The series moves to another study: its keys are looked up and the series moved.
    assert _record_keyed(index, cache, _header(study="2.25.2", sop="2.25.116")) is RecordOutcome.NEW
    with index.sessions() as session:
        studies = {s.study_uid: s for s in session.scalars(select(Study))}
        series = session.scalars(select(Series)).one()
        assert set(studies) == {"2.25.1", "2.25.2"} and studies["2.25.1"].modalities == "CT"
        assert series.study_pk == studies["2.25.2"].id and series.instance_count == 2
    assert _count(index, Instance) == 2
