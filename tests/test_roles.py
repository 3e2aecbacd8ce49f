"""Roles as processes over one PostgreSQL index: two receivers, two workers, one sender (issue 13).

Five ``fpe-node serve --role ...`` processes share one PostgreSQL schema and one storage folder
and nothing else; a DCMTK ``storescp`` is the archive, and its log lists every C-STORE request,
so results are counted by SOP Instance UID. The module's tests run in order on one cluster:

* studies sent to both receivers (one of them split across the two) get one SR each;
* a worker paused with ``SIGSTOP`` in the middle of an analysis loses its lease; the other
  worker finishes the study, and after ``SIGCONT`` the paused worker's late commit is refused by
  the fence (nothing of it is recorded, nothing more reaches the archive);
* ``kill -9`` of a worker in the middle of an analysis (its analysis process, then the whole
  worker role): the other worker finishes after the lease runs out; one SR per study;
* ``kill -9`` of a receiver while DCMTK sends: every instance it acknowledged is on disk and in
  the index; the other receiver takes the whole study and it is analysed once;
* ``kill -9`` of the sender while an association to the archive is in progress: a new sender
  claims the rows once their lease runs out and delivers them with the same SOP Instance UIDs,
  duplicates at most the rows that were in flight (DICOM's at-least-once).

Leases are short here (``leases.job_s`` 4 s) so that a lost process is replaced within seconds.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.analysis import Analysis
from dicom_node.index.jobs import AnalysisJob
from dicom_node.index.models import Instance, StudyEvent
from dicom_node.index.models import Study as StudyRow
from dicom_node.index.outbox import OutboxItem
from tests.archives import StorescpArchive, echo, free_port
from tests.conftest import TEST_PEER, ServeProcess, settings_overrides
from tests.factory import Study, write_ct_stroke_study
from tests.peers import DCMTK, drop_postgres_schema, fresh_postgres_schema, postgres_base_url
from tests.training_support import reduced_checkpoint

pytestmark = pytest.mark.xdist_group("roles")

DONE = {"delivered", "partly_delivered", "dead_lettered", "not_analysed", "not_eligible", "report_failed"}
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
JOB_LEASE_S = 4.0
WAIT_S = 150.0


@dataclass
class Cluster:
    """The five processes, their shared config, the archive and a view of the index."""

    root: Path
    config: Path
    env: dict[str, str]
    archive: StorescpArchive
    engine: Engine
    sessions: sessionmaker[Session]
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ServeProcess] = field(default_factory=dict)

    def launch(self, name: str) -> ServeProcess:
        role = name.split("-")[0]
        args = ["--role", role]
        if role == "receiver":
            args += ["--host", "127.0.0.1", "--port", str(self.ports[name])]
        process = ServeProcess(config=self.config, log_path=self.root / f"{name}.log", env=self.env, args=args)
        self.processes[name] = process.launch()
        return process

    def start(self, *names: str) -> None:
        for name in names:
            self.launch(name)
        for name in names:
            self.processes[name].wait_started(90)
        for name in names:
            if name.startswith("worker"):
                _until(functools.partial(self.model_loaded, name), 120, f"{name} loads its model")

    def model_loaded(self, name: str) -> bool:
        return "inference worker ready" in self.log(name)

    def kill(self, name: str) -> None:
        self.processes[name].kill()

    def log(self, name: str) -> str:
        return self.processes[name].log_text()

    def state(self, study_uid: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(StudyRow.state).where(StudyRow.study_uid == study_uid))

    def wait_done(self, study_uids: list[str], timeout_s: float = WAIT_S) -> dict[str, str | None]:
        _until(lambda: all(self.state(uid) in DONE for uid in study_uids), timeout_s,
               f"studies done: { {uid[-8:]: self.state(uid) for uid in study_uids} }", self.diagnostics)
        return {uid: self.state(uid) for uid in study_uids}

    def running_job(self, study_uid: str) -> AnalysisJob | None:
        with self.sessions() as session:
            return session.scalars(
                select(AnalysisJob).join(StudyRow, StudyRow.id == AnalysisJob.study_pk)
                .where(StudyRow.study_uid == study_uid, AnalysisJob.state == "running")
            ).first()

    def count(self, model: Any, study_uid: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(
                select(func.count()).select_from(model).join(StudyRow, StudyRow.id == model.study_pk)
                .where(StudyRow.study_uid == study_uid)) or 0)

    def timeline(self, study_uid: str) -> list[str]:
        with self.sessions() as session:
            return [detail or "" for detail in session.scalars(
                select(StudyEvent.detail).join(StudyRow).where(StudyRow.study_uid == study_uid).order_by(StudyEvent.id))]

    def outbox_objects(self, study_uid: str) -> set[str]:
        with self.sessions() as session:
            return set(session.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.study_uid == study_uid)))

    def archived(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of what the archive holds for the study."""
        found = {}
        for path in self.archive.received_files():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.StudyInstanceUID) == study_uid:
                found[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
        return found

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name}\n{process.log_text()[-3000:]}" for name, process in self.processes.items())


def _until(predicate: Callable[[], bool], timeout_s: float, what: str, diagnostics: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s:g} s: {what}\n{diagnostics() if diagnostics else ''}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("roles")
    data_dir = root / "shared-storage"
    data_dir.mkdir()
    base = postgres_base_url()
    pg_url, schema = fresh_postgres_schema(base)
    archive = StorescpArchive(root / "archive")
    archive.start()
    overrides = settings_overrides(
        data_dir, index={"url": pg_url}, storage={"fsync": False},
        inference={"checkpoint": str(reduced_checkpoint(root / "model.pt")), "device": "cpu", "torch_threads": 1,
                   "workers": 1},
        completion={"series_quiet_s": 0.5, "study_timeout_s": 4.0},
        leases={"job_s": JOB_LEASE_S, "outbox_s": JOB_LEASE_S, "completion_s": 3.0},
        delivery={"retry_initial_s": 0.5, "retry_max_s": 1.0, "deadline_s": 300, "scan_interval_s": 0.3,
                  "association_timeout_s": 60},
        reports={"secondary_capture": True, "pdf": False},
        peers=[TEST_PEER, {"name": "archive", "ae_titles": [archive.ae_title], "host": archive.host,
                           "port": archive.port, "roles": ["destination"]}],
    )
    config = root / "site.yaml"
    config.write_text(yaml.safe_dump(overrides))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    engine = create_engine(pg_url)
    running = Cluster(root, config, env, archive, engine, sessionmaker(engine),
                      ports={"receiver-a": free_port(), "receiver-b": free_port()})
    try:
        running.start("receiver-a")  # migrates the new schema; the others find it at head
        running.start("receiver-b", "worker-1", "worker-2", "sender-1")
        yield running
    finally:
        for process in running.processes.values():
            process.kill()
        archive.stop()
        engine.dispose()
        drop_postgres_schema(base, schema)


_seed = iter(range(400, 500))


def _study(folder: Path, **options: Any) -> Study:
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    return write_ct_stroke_study(
        folder, rows=32, thin_slices=36, cta_slices=44, with_thick=False, seed=next(_seed),
        study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"), with_localizer=False,
        with_dose_report=False, with_reformats=False, with_mips=False, **options,
    )


def _send(dcmtk: DCMTK, port: int, files: list[Path] | Path) -> None:
    if isinstance(files, list):
        result = dcmtk.storescu(port, files, env={"TCP_NODELAY": "1"})
    else:  # a folder, with its subfolders
        result = dcmtk.storescu(port, [files], extra=["+r"], env={"TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stdout + result.stderr


def _one_sr_and_nothing_twice(cluster: Cluster, study_uid: str) -> None:
    archived = cluster.archived(study_uid)
    srs = [uid for uid, sop_class in archived.items() if sop_class.startswith(SR_PREFIX)]
    assert len(srs) == 1, f"study {study_uid}: {len(srs)} SRs in the archive"
    assert set(archived) == cluster.outbox_objects(study_uid)  # what the outbox holds, by SOP Instance UID
    assert cluster.count(Analysis, study_uid) == 1  # one analysis recorded, whatever else ran


def test_studies_sent_to_two_receivers_get_one_sr_each(cluster: Cluster, dcmtk: DCMTK, tmp_path: Path) -> None:
    to_a, to_b, split = _study(tmp_path / "a"), _study(tmp_path / "b"), _study(tmp_path / "split")
    _send(dcmtk, cluster.ports["receiver-a"], tmp_path / "a")
    _send(dcmtk, cluster.ports["receiver-b"], tmp_path / "b")
    _send(dcmtk, cluster.ports["receiver-a"], list(split.role("ncct").paths))  # one study, two receivers
    _send(dcmtk, cluster.ports["receiver-b"], list(split.role("cta").paths))
    studies = [to_a.study_uid, to_b.study_uid, split.study_uid]
    assert set(cluster.wait_done(studies).values()) == {"delivered"}
    for study_uid in studies:
        _one_sr_and_nothing_twice(cluster, study_uid)
    requests = Counter(cluster.archive.store_requests())
    assert max(requests.values()) == 1  # no sender was killed: each object stored exactly once
    with cluster.sessions() as session:
        analysis = session.scalars(select(Analysis).join(StudyRow).where(StudyRow.study_uid == split.study_uid)).one()
        assert set(analysis.series_used_dict()) == {"ncct", "cta"}  # judged on both receivers' series


def _catch_running(cluster: Cluster, study_uid: str) -> tuple[AnalysisJob, int]:
    """The study's job once a worker claims it, and the PID of the analysis process holding it."""
    holder: list[AnalysisJob] = []

    def claimed() -> bool:
        job = cluster.running_job(study_uid)
        if job is not None and job.claimed_by:
            holder.append(job)
            return True
        return False

    _until(claimed, WAIT_S, f"a worker claims study {study_uid}", cluster.diagnostics)
    job = holder[-1]
    pid = int(str(job.claimed_by).rsplit(":", 2)[1])  # host:pid:nonce
    return job, pid


def test_a_paused_worker_is_fenced_out_after_the_other_finishes(cluster: Cluster, dcmtk: DCMTK, tmp_path: Path) -> None:
    for trial in range(3):  # a trial where the worker committed before it could be paused proves nothing
        study = _study(tmp_path / f"paused-{trial}")
        _send(dcmtk, cluster.ports["receiver-a"], tmp_path / f"paused-{trial}")
        job, pid = _catch_running(cluster, study.study_uid)
        os.kill(pid, signal.SIGSTOP)
        try:
            if cluster.state(study.study_uid) != "analysing":
                cluster.wait_done([study.study_uid])
                continue
            assert cluster.wait_done([study.study_uid], timeout_s=JOB_LEASE_S * 3 + WAIT_S)[study.study_uid] == "delivered"
            with cluster.sessions() as session:
                fences = list(session.scalars(select(AnalysisJob.fence).where(AnalysisJob.id == job.id)))
            assert fences and fences[0] > job.fence  # another worker re-claimed it
        finally:
            os.kill(pid, signal.SIGCONT)
        logs = lambda: cluster.log("worker-1") + cluster.log("worker-2")  # noqa: E731
        _until(lambda: f"study {study.study_uid}: run not recorded" in logs(), WAIT_S,
               "the paused worker reports its commit refused", cluster.diagnostics)
        time.sleep(1.0)  # anything it might still send would show now
        _one_sr_and_nothing_twice(cluster, study.study_uid)
        assert any("ran out" in detail for detail in cluster.timeline(study.study_uid))
        return
    pytest.fail("no trial caught a worker in the middle of an analysis")


def test_a_killed_worker_s_study_is_finished_by_the_other(cluster: Cluster, dcmtk: DCMTK, tmp_path: Path) -> None:
    # Trial 1: kill -9 of the analysis process (its role process starts a new one);
    # trial 2: kill -9 of the whole worker role (its analysis process dies with it).
    finished = 0
    for trial, whole_role in enumerate((False, True, False, True)):
        study = _study(tmp_path / f"killed-{trial}")
        _send(dcmtk, cluster.ports["receiver-b"], tmp_path / f"killed-{trial}")
        _job, pid = _catch_running(cluster, study.study_uid)
        victim = next(name for name in ("worker-1", "worker-2")
                      if pid in _pids_under(cluster.processes[name].process.pid))  # type: ignore[union-attr]
        if whole_role:
            cluster.kill(victim)
        else:
            os.kill(pid, signal.SIGKILL)
        caught = cluster.state(study.study_uid) == "analysing"
        assert cluster.wait_done([study.study_uid], timeout_s=JOB_LEASE_S * 3 + WAIT_S)[study.study_uid] == "delivered"
        _one_sr_and_nothing_twice(cluster, study.study_uid)
        if whole_role:
            cluster.start(victim)  # what a supervisor (systemd, Kubernetes) does
        if caught:
            assert any("ran out" in detail for detail in cluster.timeline(study.study_uid))
            finished += 1
        if finished >= 2 and trial >= 1:
            break
    assert finished >= 1, "no trial caught a worker in the middle of an analysis"


def _pids_under(root: int) -> set[int]:
    """``root`` and every process below it (/proc parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


_SENDING = re.compile(r"Sending file: (\S+)")


def test_a_receiver_killed_while_dcmtk_sends_loses_no_acknowledged_instance(
    cluster: Cluster, dcmtk: DCMTK, tmp_path: Path
) -> None:
    study = _study(tmp_path / "study")
    output = tmp_path / "storescu.log"
    with open(output, "wb") as log:
        sending = subprocess.Popen(
            [dcmtk.tool("storescu"), "-v", "-aet", "STORESCU", "-aec", "FPENODE", "+sd", "+r", "127.0.0.1",
             str(cluster.ports["receiver-a"]), str(tmp_path / "study")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
        )
    try:
        _until(lambda: output.read_text().count("Received Store Response (Success)") >= 20, 60,
               "DCMTK has 20 instances acknowledged")
        cluster.kill("receiver-a")
        sending.wait(60)
    finally:
        if sending.poll() is None:
            sending.kill()
    acknowledged = _acknowledged(output.read_text())
    assert 20 <= len(acknowledged) < len(study.paths())
    uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in acknowledged}
    with cluster.sessions() as session:
        stored = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)
                                      .where(Instance.sop_instance_uid.in_(uids))).all())
    assert set(stored) == uids  # every acknowledged instance is in the index
    storage = Path(yaml.safe_load(cluster.config.read_text())["storage"]["data_dir"])
    assert all((storage / relative).is_file() for relative in stored.values())  # and on disk

    assert echo("127.0.0.1", cluster.ports["receiver-b"], "FPENODE", "ECHOSCU")  # the other keeps accepting
    _send(dcmtk, cluster.ports["receiver-b"], tmp_path / "study")  # the PACS sends the study again
    assert cluster.wait_done([study.study_uid])[study.study_uid] == "delivered"
    _one_sr_and_nothing_twice(cluster, study.study_uid)
    cluster.start("receiver-a")
    assert echo("127.0.0.1", cluster.ports["receiver-a"], "FPENODE", "ECHOSCU")


def _acknowledged(verbose: str) -> list[Path]:
    """Files DCMTK ``storescu -v`` saw a Success response for."""
    done, current = [], None
    for line in verbose.splitlines():
        match = _SENDING.search(line)
        if match:
            current = Path(match.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_a_sender_killed_during_delivery_delivers_everything_once_more_at_most(
    cluster: Cluster, dcmtk: DCMTK, tmp_path: Path
) -> None:
    archive_pid = cluster.archive._proc.pid  # type: ignore[union-attr]
    study = _study(tmp_path / "study")
    before = Counter(cluster.archive.store_requests())
    os.kill(archive_pid, signal.SIGSTOP)  # the archive hangs: the sender's association stays in progress
    try:
        _send(dcmtk, cluster.ports["receiver-b"], tmp_path / "study")

        def in_flight() -> bool:
            with cluster.sessions() as session:
                return bool(session.scalar(select(func.count()).select_from(OutboxItem).where(
                    OutboxItem.study_uid == study.study_uid, OutboxItem.claimed_by.is_not(None))))

        _until(in_flight, WAIT_S, "the sender claims the study's results", cluster.diagnostics)
        time.sleep(0.5)
        cluster.kill("sender-1")
    finally:
        os.kill(archive_pid, signal.SIGCONT)
    with cluster.sessions() as session:
        claimed = int(session.scalar(select(func.count()).select_from(OutboxItem).where(
            OutboxItem.study_uid == study.study_uid, OutboxItem.claimed_by.is_not(None))) or 0)
    cluster.start("sender-1")  # a new sender: it takes the rows once their lease ran out
    assert cluster.wait_done([study.study_uid], timeout_s=JOB_LEASE_S * 3 + WAIT_S)[study.study_uid] == "delivered"
    archived = cluster.archived(study.study_uid)
    assert set(archived) == cluster.outbox_objects(study.study_uid)  # same SOP Instance UIDs, all there
    assert sum(1 for sop_class in archived.values() if sop_class.startswith(SR_PREFIX)) == 1
    requests = Counter(cluster.archive.store_requests()) - before
    duplicates = sum(count - 1 for uid, count in requests.items() if uid in archived)
    assert duplicates <= claimed  # at least once: at most the rows that were in flight came twice
