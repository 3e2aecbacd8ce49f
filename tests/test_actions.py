"""Operator actions (dicom_node.actions) from the command line on a real index: force complete,
re-run, dead letters retried and dropped, analysis and delivery suspended node-wide and obeyed
by the queue and the outbox the running node uses."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.index.db import write_session
from dicom_node.index.models import AuditEntry, Series, Study
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.outbox import Outbox
from dicom_node.scu import StoreScu
from tests.studyindex import Index, add_instances, index  # noqa: F401 - fixture

S = StudyState
pytestmark = pytest.mark.parametrize("index", ["sqlite"], indirect=True)


def _cli(index: Index, tmp_path: Path, *argv: str) -> int:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(index.data_dir)}}))
    return main(["--config", str(config), *argv])


def _audit(index: Index) -> list[tuple[str, str | None]]:
    with index.sessions() as session:
        return [(e.action, e.source) for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]


def _dead_letter(index: Index, study_uid: str) -> int:
    """An analysed, dead-lettered study with one dead SR whose file exists."""
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    add_instances(index, study_uid, study_uid + ".1", 2)
    lifecycle.enqueue(study_uid, "ready")
    lifecycle.claim_next("worker-a")
    lifecycle.finish(study_uid, S.ANALYSED)
    lifecycle.transition(study_uid, S.REPORTING)
    lifecycle.transition(study_uid, S.DEAD_LETTERED, "PACS unreachable")
    result = index.data_dir / "results" / study_uid / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"not sent")
    with write_session(index.sessions) as session:
        item = OutboxItem(
            study_uid=study_uid, series_uid="2.25.7", sop_instance_uid=study_uid + ".99", kind="sr",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", path=f"results/{study_uid}/sr.dcm", destination="PACS",
            state="dead", attempts=9, last_error="association refused", deadline_at=dt.datetime.now(dt.timezone.utc),
        )
        session.add(item)
        session.flush()
        return item.id


def test_force_complete_queues_a_receiving_study_once(index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_instances(index, "1.9.1", "1.9.1.1", 3)
    assert _cli(index, tmp_path, "complete", "1.9.1") == 0
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    assert lifecycle.state_of("1.9.1") is S.QUEUED
    with index.sessions() as session:
        assert session.scalar(select(Series.complete_at).where(Series.series_uid == "1.9.1.1")) is not None
    assert _cli(index, tmp_path, "complete", "1.9.1") == 1
    assert "is queued, not waiting" in capsys.readouterr().err
    assert _cli(index, tmp_path, "complete", "9.9.9") == 1
    assert _cli(index, tmp_path, "rerun", "1.9.1") == 1  # already waiting
    job = lifecycle.claim_next("worker-a")
    assert job is not None and job.study_uid == "1.9.1"
    lifecycle.finish("1.9.1", S.NOT_ANALYSED, "no usable series")
    assert _cli(index, tmp_path, "rerun", "1.9.1") == 0
    assert lifecycle.state_of("1.9.1") is S.QUEUED
    assert _audit(index) == [("study.complete", "local"), ("study.rerun", "local")]


def test_suspended_analysis_claims_nothing_until_resumed(index: Index, tmp_path: Path) -> None:
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    add_instances(index, "1.9.2", "1.9.2.1", 1)
    lifecycle.enqueue("1.9.2", "ready")
    assert _cli(index, tmp_path, "suspend", "analysis") == 0
    assert _cli(index, tmp_path, "suspend", "analysis") == 0  # idempotent, not audited twice
    assert lifecycle.claim_next("worker-a") is None
    assert lifecycle.state_of("1.9.2") is S.QUEUED
    assert _cli(index, tmp_path, "resume", "analysis") == 0
    job = lifecycle.claim_next("worker-a")
    assert job is not None and job.study_uid == "1.9.2"
    assert _audit(index) == [("node.suspend", "local"), ("node.resume", "local")]


def test_dead_letter_retry_waits_while_delivery_is_suspended_and_drop_removes_it(
    index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _dead_letter(index, "1.9.3")
    second = _dead_letter(index, "1.9.4")
    assert _cli(index, tmp_path, "dead-letters", "list", "--json") == 0
    assert [letter["id"] for letter in json.loads(capsys.readouterr().out)] == [first, second]

    assert _cli(index, tmp_path, "suspend", "delivery") == 0
    assert _cli(index, tmp_path, "dead-letters", "retry", str(first)) == 0
    assert _cli(index, tmp_path, "dead-letters", "retry", str(first)) == 1  # no longer dead
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    assert lifecycle.state_of("1.9.3") is S.REPORTING
    outbox = Outbox(index.sessions, index.settings.delivery, index.data_dir, StoreScu("FPENODE"), lambda: [])
    report = outbox.run_once()
    assert report.suspended and report.attempted == 0
    with index.sessions() as session:
        row = session.get(OutboxItem, first)
        assert row is not None and (row.state, row.attempts) == ("pending", 0)

    assert _cli(index, tmp_path, "resume", "delivery") == 0
    report = outbox.run_once()  # PACS is no configured destination: tried and failed, not skipped
    assert not report.suspended and report.attempted == 1

    assert _cli(index, tmp_path, "dead-letters", "drop", str(second)) == 0
    with index.sessions() as session:
        assert session.get(OutboxItem, second) is None
        study = session.scalars(select(Study).where(Study.study_uid == "1.9.4")).one()
        assert f"dead letter {second} (sr for PACS) dropped" in (study.events[-1].detail or "")
    assert [action for action, _ in _audit(index)] == [
        "node.suspend", "dead_letter.retry", "node.resume", "dead_letter.drop"
    ]
