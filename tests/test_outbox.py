"""The persistent outbox: routing, backoff, deadline, dead letters, restart, re-sends.

Archives are DCMTK ``storescp`` subprocesses; the index is SQLite upgraded by the real
migrations. Most tests drive the outbox with a fake clock (``run_once``), one runs the
background runner against an archive that is stopped mid-way and restarted.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.index.outbox import OutboxState
from dicom_node.outbox import (
    Outbox,
    OutboxRunner,
    ResultFile,
    RouteRule,
    RoutingContext,
    RoutingError,
    RoutingRules,
    StudyDelivery,
    backoff_s,
    delivery_rows,
    load_routing_rules,
    route,
)
from dicom_node.scu import COMPREHENSIVE_3D_SR, Destination, ScuTimeouts, StoreOutcome, StoreScu
from dicom_node.settings import Settings, load_settings
from tests.archives import SC_STORAGE, StorescpArchive, free_port, make_sc, make_sr
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url

STUDY = "2.25.2000001"
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
FAST = ScuTimeouts(acse_s=5, dimse_s=10, network_s=10, connect_s=3)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _settings(tmp_path: Path, index_url: str | None = None, **delivery: object) -> Settings:
    values = {"retry_initial_s": 10, "retry_max_s": 40, "deadline_s": 300}
    values.update(delivery)
    return load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "data")}, "index": {"url": index_url}, "delivery": values,
    })


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The index on SQLite (default file) or on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield None
        return
    base = postgres_base_url()
    url, schema = fresh_postgres_schema(base)
    try:
        yield url
    finally:
        drop_postgres_schema(base, schema)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    engine = build_engine(settings)
    upgrade_to_head(engine)
    return build_session_factory(engine)


def _results(settings: Settings, n_sc: int = 3, study_uid: str = STUDY) -> list[ResultFile]:
    folder = settings.storage.results_dir / study_uid
    folder.mkdir(parents=True, exist_ok=True)
    sr = make_sr(folder / "sr.dcm", study_uid)
    files = [ResultFile(folder / "sr.dcm", study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.SOPClassUID, "sr")]
    series = f"{study_uid}.9"
    for i in range(n_sc):
        sc = make_sc(folder / f"sc{i}.dcm", study_uid, series, number=i + 1)
        files.append(ResultFile(folder / f"sc{i}.dcm", study_uid, series, sc.SOPInstanceUID, SC_STORAGE, "sc"))
    return files


def _destination(archive: StorescpArchive, name: str = "pacs") -> Destination:
    return Destination(name, archive.ae_title, archive.host, archive.port)


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[StorescpArchive]:
    with StorescpArchive(tmp_path / "archive") as running:
        yield running


# --- pure functions ------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    delivery = _settings(tmp_path).delivery
    assert [backoff_s(n, delivery) for n in range(1, 7)] == [10, 20, 40, 40, 40, 40]
    assert backoff_s(500, delivery) == 40


def test_routing_rules_as_data(tmp_path: Path) -> None:
    rules_file = tmp_path / "routes.yaml"
    rules_file.write_text(
        "rules:\n"
        "  - {destinations: [PACS], kinds: [sr, sc]}\n"
        "  - {destinations: [RESEARCH], kinds: [sr], pipelines: [MR]}\n"
        "  - {destinations: ['*'], calling_ae_titles: [SCANNER1], kinds: [pdf]}\n",
        encoding="utf-8",
    )
    rules = load_routing_rules(rules_file)
    names = ["PACS", "RESEARCH", "OTHER"]
    assert route(rules, "sr", RoutingContext("MR"), names) == ["PACS", "RESEARCH"]
    assert route(rules, "sr", RoutingContext("CT"), names) == ["PACS"]
    assert route(rules, "sc", RoutingContext("MR"), names) == ["PACS"]
    assert route(rules, "pdf", RoutingContext("CT", "SCANNER1"), names) == names
    assert route(rules, "pdf", RoutingContext("CT", "OTHERAE"), names) == []
    assert route(None, "sc", RoutingContext(), names) == names  # default: everywhere
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {destinations: [PACS], kinds: [xray]}\n", encoding="utf-8")
    with pytest.raises(RoutingError, match="kinds"):
        load_routing_rules(bad)


def test_enqueue_routes_per_kind(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    rules = RoutingRules(rules=(RouteRule(destinations=("a", "b"), kinds=("sc",)), RouteRule(destinations=("a",))))
    dests = [Destination("a", "A", "127.0.0.1", 1), Destination("b", "B", "127.0.0.1", 2)]
    outbox = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: dests, clock=FakeClock(), rules=rules)
    files = _results(settings, n_sc=1)
    rows = outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
    assert sorted((r.kind, r.destination) for r in rows) == [("sc", "a"), ("sc", "b"), ("sr", "a")]
    assert all(r.state == "pending" for r in rows)
    # Queuing the same objects again adds nothing.
    outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
    assert len(outbox.rows(STUDY)) == 3


# --- against a real archive ----------------------------------------------------------------


def test_delivers_and_records_the_class_sent(tmp_path: Path, archive: StorescpArchive, index_url: str | None) -> None:
    settings = _settings(tmp_path, index_url)
    settled: list[tuple[str, StudyDelivery]] = []
    outbox = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: [_destination(archive)], clock=FakeClock(), on_settled=lambda s, o: settled.append((s, o)))
    files = _results(settings)
    outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
    report = outbox.run_once()
    assert (report.attempted, report.sent) == (4, 4)
    rows = outbox.rows(STUDY)
    assert {r.state for r in rows} == {"sent"}
    assert rows[0].sent_sop_class_uid == COMPREHENSIVE_3D_SR
    assert settled == [(STUDY, StudyDelivery.DELIVERED)]
    assert sorted(archive.store_requests()) == sorted(f.sop_instance_uid for f in files)
    assert outbox.run_once().attempted == 0  # nothing left, nothing sent twice


def test_backoff_deadline_and_dead_letter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, index_url: str | None
) -> None:
    settings = _settings(tmp_path, index_url, deadline_s=60)
    clock = FakeClock()
    settled: list[tuple[str, StudyDelivery]] = []
    gone = Destination("pacs", "GONE", "127.0.0.1", free_port())  # nothing listens there
    sessions = _sessions(settings)
    outbox = Outbox(sessions, settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: [gone], clock=clock, on_settled=lambda s, o: settled.append((s, o)))
    outbox.enqueue(_results(settings, n_sc=0), RoutingContext("CT"), demonstration=False)

    attempts_at = []
    for _ in range(20):
        report = outbox.run_once()
        if report.attempted:
            attempts_at.append((clock.now - T0).total_seconds())
        if settled:
            break
        clock.advance(5)
    # Attempts at 0, +10, +20 (doubling from 10 s), then the 40 s cap is clipped to the 60 s deadline.
    assert attempts_at == [0, 10, 30, 60]
    (row,) = outbox.rows(STUDY)
    assert row.state == "dead" and row.attempts == 4
    assert "association" in (row.last_error or "")
    assert settled == [(STUDY, StudyDelivery.DEAD_LETTERED)]
    with sessions() as session:
        assert [r.sop_instance_uid for r in delivery_rows(session, states=["dead"])] == [row.sop_instance_uid]
    dead_logs = [r for r in caplog.records if r.levelno == logging.ERROR and "dead letter" in r.getMessage()]
    assert len(dead_logs) == 1 and row.sop_instance_uid in dead_logs[0].getMessage()


def test_refused_sr_class_is_partly_delivered(tmp_path: Path) -> None:
    settings = _settings(tmp_path, deadline_s=30, retry_initial_s=30)
    clock = FakeClock()
    settled: list[tuple[str, StudyDelivery]] = []
    with StorescpArchive(tmp_path / "sc-only", sop_classes=[SC_STORAGE]) as archive:
        outbox = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                        lambda: [_destination(archive)], clock=clock,
                        on_settled=lambda s, o: settled.append((s, o)))
        outbox.enqueue(_results(settings, n_sc=2), RoutingContext("CT"), demonstration=False)
        outbox.run_once()
        sr_row = outbox.rows(STUDY)[0]
        assert sr_row.state == "failed" and "no presentation context accepted" in (sr_row.last_error or "")
        clock.advance(30)
        outbox.run_once()
    states = {r.kind: r.state for r in outbox.rows(STUDY)}
    assert states == {"sr": "dead", "sc": "sent"}
    assert settled == [(STUDY, StudyDelivery.PARTLY_DELIVERED)]


def test_demonstration_results_are_held_unless_allowed(tmp_path: Path, archive: StorescpArchive) -> None:
    settings = _settings(tmp_path)
    sessions = _sessions(settings)
    outbox = Outbox(sessions, settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: [_destination(archive)], clock=FakeClock())
    outbox.enqueue(_results(settings, n_sc=1), RoutingContext("CT"), demonstration=True)
    assert outbox.run_once().attempted == 0
    assert {r.state for r in outbox.rows(STUDY)} == {"held"}
    assert outbox.resend(STUDY) == 0  # resend does not bypass the setting
    assert archive.store_requests() == []

    allowed = _settings(tmp_path, allow_demonstration_results=True)
    outbox = Outbox(sessions, allowed.delivery, allowed.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: [_destination(archive)], clock=FakeClock())
    assert outbox.resend(STUDY) == 2
    assert outbox.run_once().sent == 2


def test_restart_resumes_with_the_same_uids(tmp_path: Path, index_url: str | None) -> None:
    settings = _settings(tmp_path, index_url)
    clock = FakeClock()
    archive = StorescpArchive(tmp_path / "archive")  # not started: the first attempt fails
    files = _results(settings, n_sc=2)
    first = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                   lambda: [_destination(archive)], clock=clock)
    first.enqueue(files, RoutingContext("CT"), demonstration=False)
    assert first.run_once().failed == 3
    del first  # the node stops; only the index remains

    with archive:
        clock.advance(10)
        second = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir,
                        StoreScu("FPENODE", FAST), lambda: [_destination(archive)], clock=clock)
        assert second.run_once().sent == 3
        stored = {dcmread(p).SOPInstanceUID for p in archive.received_files()}
    assert stored == {f.sop_instance_uid for f in files}
    assert [r.attempts for r in second.rows(STUDY)] == [2, 2, 2]


def test_resend_requeues_a_delivered_study(tmp_path: Path, archive: StorescpArchive) -> None:
    settings = _settings(tmp_path)
    outbox = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir, StoreScu("FPENODE", FAST),
                    lambda: [_destination(archive)], clock=FakeClock())
    files = _results(settings, n_sc=1)
    outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
    outbox.run_once()
    assert outbox.resend(STUDY) == 2
    assert {r.state for r in outbox.rows(STUDY)} == {"pending"}
    assert outbox.run_once().sent == 2
    counts = Counter(archive.store_requests())
    assert counts == Counter({f.sop_instance_uid: 2 for f in files})  # same UIDs: a re-send


def test_archive_stopped_midway_and_restarted_loses_nothing(tmp_path: Path, archive: StorescpArchive) -> None:
    """The runner keeps going through an outage; re-sends happen only after failures."""
    settings = _settings(tmp_path, retry_initial_s=0.3, retry_max_s=1.0, deadline_s=120, scan_interval_s=0.5)
    files = _results(settings, n_sc=12)
    outcomes: list[StoreOutcome] = []

    def stop_after_four(outcome: StoreOutcome) -> None:
        outcomes.append(outcome)
        if len(outcomes) == 4:
            archive.stop()  # the archive goes down in the middle of the association

    settled: list[tuple[str, StudyDelivery]] = []
    outbox = Outbox(_sessions(settings), settings.delivery, settings.storage.data_dir,
                    StoreScu("FPENODE", FAST, after_each=stop_after_four), lambda: [_destination(archive)],
                    on_settled=lambda s, o: settled.append((s, o)))
    runner = OutboxRunner(outbox, settings.delivery.scan_interval_s)
    outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while not any(not o.ok for o in outcomes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(not o.ok for o in outcomes), "the outage caused no failure"
        time.sleep(1.0)  # a few retries fail while the archive is down
        archive.start()
        while not settled and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()
    assert settled == [(STUDY, StudyDelivery.DELIVERED)]
    rows = {r.sop_instance_uid: r for r in outbox.rows(STUDY)}
    assert all(r.state == OutboxState.SENT.value for r in rows.values())
    stored = {dcmread(p).SOPInstanceUID for p in archive.received_files()}
    assert stored == set(rows)  # every result arrived
    requests = Counter(archive.store_requests())
    for uid, row in rows.items():
        assert 1 <= requests[uid] <= row.attempts  # never more requests than attempts
        if row.attempts == 1:
            assert requests[uid] == 1  # no failure, no re-send
    assert sum(r.attempts > 1 for r in rows.values()) >= 1
    assert sum(requests.values()) <= sum(r.attempts for r in rows.values())
