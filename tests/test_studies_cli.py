"""``fpe-node studies``: arrivals, series, state, timeline, jobs, dead letters; ``--json``."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.index.db import write_session
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import Lifecycle, StudyState
from tests.studyindex import Index, add_instances, index  # noqa: F401 - fixture

S = StudyState
REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.parametrize("index", ["sqlite"], indirect=True)


def _config(index: Index, tmp_path: Path) -> Path:
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(index.data_dir)}, "index": {"url": index.settings.index.url}}))
    return config


def _populate(index: Index) -> None:
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    add_instances(index, "1.8.1", "1.8.1.1", 3, modality="CT")
    add_instances(index, "1.8.1", "1.8.1.2", 2, modality="CT")
    lifecycle.enqueue("1.8.1", "2 usable series complete")
    lifecycle.claim_next("worker-a")
    lifecycle.finish("1.8.1", S.ANALYSED)
    lifecycle.transition("1.8.1", S.REPORTING)
    lifecycle.transition("1.8.1", S.DEAD_LETTERED, "PACS unreachable for 24 h")
    now = dt.datetime.now(dt.timezone.utc)
    with write_session(index.sessions) as session:
        session.add(OutboxItem(
            study_uid="1.8.1", series_uid="2.25.7", sop_instance_uid="2.25.7.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            kind="sr", path="results/1.8.1/sr.dcm", destination="PACS", state="dead", attempts=9,
            last_error="association refused", deadline_at=now,
        ))
    add_instances(index, "1.8.2", "1.8.2.1", 4, modality="MR")


def test_list_shows_state_arrivals_and_dead_letters(index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _populate(index)
    assert main(["--config", str(_config(index, tmp_path)), "studies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "UID", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["1.8.2"][1:5] == ["received", "MR", "1", "4"]
    assert rows["1.8.1"][1] == "dead_lettered" and rows["1.8.1"][3:5] == ["2", "5"] and rows["1.8.1"][-1] == "1"
    assert lines[2].startswith("1.8.2")  # latest arrival first


def test_json_detail_has_series_timeline_jobs_and_deliveries(
    index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(index)
    assert main(["--config", str(_config(index, tmp_path)), "studies", "--json", "--study", "1.8.1"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["state"] == "dead_lettered" and detail["state_reason"] == "PACS unreachable for 24 h"
    assert [s["series_uid"] for s in detail["series_list"]] == ["1.8.1.1", "1.8.1.2"]
    assert all(s["complete_at"] is None for s in detail["series_list"])
    states = [event["state"] for event in detail["timeline"]]
    assert states == ["complete", "queued", "analysing", "analysed", "reporting", "dead_lettered"]
    assert all(event["at"].endswith("+00:00") for event in detail["timeline"])
    jobs = detail["sections"]["analysis jobs"]
    assert [(j["state"], j["attempts"], j["outcome"]) for j in jobs] == [("done", 1, "analysed")]
    deliveries = detail["sections"]["deliveries"]
    assert [(d["destination"], d["state"], d["last_error"]) for d in deliveries] == [("PACS", "dead", "association refused")]


def test_text_detail_and_unknown_study(index: Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _populate(index)
    config = str(_config(index, tmp_path))
    assert main(["--config", config, "studies", "--study", "1.8.1"]) == 0
    out = capsys.readouterr().out
    assert "Study 1.8.1" in out and "dead_lettered (PACS unreachable for 24 h)" in out
    assert "Timeline (UTC)" in out and "Deliveries" in out and "association refused" in out
    assert main(["--config", config, "studies", "--study", "9.9.9"]) == 1
    assert "not in the index" in capsys.readouterr().out
    assert main(["--config", config, "studies", "--json", "--state", "received"]) == 0
    assert [row["study_uid"] for row in json.loads(capsys.readouterr().out)] == ["1.8.2"]
    assert main(["--config", config, "studies", "--json", "--sender", "NOBODY"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["--config", config, "studies", "--json", "--since", "2999-01-01T00:00"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["--config", config, "studies", "--json", "--since", "2000-01-01T00:00+00:00"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_the_installed_command_runs(index: Index, tmp_path: Path) -> None:
    _populate(index)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(_config(index, tmp_path)), "studies", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert {row["study_uid"] for row in json.loads(done.stdout)} == {"1.8.1", "1.8.2"}
