"""Burst: 20 CT studies sent at once by 4 DCMTK senders, then one live study behind that backlog.

Runs the node as deployed (``fpe-node serve`` subprocesses: SCP, completion timers, warm
inference workers, delivery) with a DCMTK ``storescp`` archive as its destination, once per
worker count (``--workers 1 2`` by default, one fresh node, index and archive each):

1. N (20) distinct synthetic CT stroke studies (NCCT + CTA, distinct patients and UIDs) from
   the factory, acquired 2 days ago and earlier: backlog, not live (the queue serves studies
   acquired within ``completion.live_window_s`` first, :meth:`dicom_node.lifecycle.Lifecycle.claim_next`).
   The bundled eligibility rules turn away studies older than 24 h (prefetched priors); the
   benchmark's rules lift that limit (``max_study_age_h: null``, a site catching up on a
   backlog), so every prior is analysed and reported.
2. They are sent "at once" by 4 concurrent ``/usr/bin/storescu`` processes (``TCP_NODELAY=1``),
   each sender sending its share (5 studies) one after the other, one association per study
   (one ``storescu`` run per study: a PACS forwarding studies as they come).
3. Once every prior is acknowledged and queued (an analysis job exists for each), one live study
   (StudyDate/StudyTime = now) is sent by a fifth ``storescu`` and goes ahead of the backlog.

Time to result of a study: from its last instance acknowledged (the end of its ``storescu``
run, i.e. after the A-RELEASE) to the last result object acknowledged by the archive
(``outbox_item.sent_at`` in the node's index, as ``benchmarks/time_to_result.py``). Also given
from the burst start (the moment the 4 senders start). Reported per worker count:

- studies/h over the burst: N priors / (last prior result - burst start);
- median and p95 (nearest rank) time to result of the priors;
- the live study's time to result, its queue position when it was queued (priors waiting +
  being analysed) and, for comparison, its time to result if served first come first served:
  the queue would have served it last, so with priors of equal cost its result would have come
  when the last prior's came (last prior result - live study acknowledged);
- per study, mean seconds along the timeline: analysis (``analysing -> analysed``: the worker
  runs inference, then builds and writes the result objects, and records both in one
  transaction), of which the results' building (load_sources + build + write, from the
  ``reporting`` entry's timings), ``analysed -> reporting`` (the wait for whoever builds the
  results when that is not the worker: before the transactional outbox, the serving process's
  one result thread, first come first served; about 0 s now) and sending; the same for the
  live study; the CPU seconds of each node process over the burst (``child`` processes: the
  inference workers, and multiprocessing's resource tracker at 0 s), the node's share of all
  cores and the machine's busy share (anyone's): what limits the scaling.

Topologies: ``embedded`` (default: one ``fpe-node serve`` with ``inference.workers: N``, SQLite)
and ``split`` (PostgreSQL: ``serve --role receiver``, N x ``serve --role worker`` with one
worker each, ``serve --role sender``, all with the same config file; the server from
``--postgres-url`` or ``FPENODE_TEST_POSTGRES_URL``, else a throw-away cluster as
``deploy/test-postgres.sh`` makes one; a fresh database per worker count).

Usage::

    .venv/bin/python benchmarks/burst.py [--studies 20] [--senders 4] [--workers 1 2]
        [--topology embedded|split] [--postgres-url URL] [--rows 256] [--ncct-slices 40]
        [--cta-slices 50] [--quiet-s 2] [--torch-threads 0] [--checkpoint PATH]
        [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dicom_node.index.jobs import AnalysisJob  # noqa: E402
from dicom_node.index.models import Instance, Series, Study, StudyEvent  # noqa: E402
from dicom_node.index.outbox import OutboxItem  # noqa: E402
from tests.archives import StorescpArchive, free_port  # noqa: E402
from tests.factory import default_patient, write_ct_stroke_study  # noqa: E402

STORESCU = Path("/usr/bin/storescu")
NODE_AE = "FPENODE"
LIVE_SENDER_AE = "BURSTLIVE"
FINAL_STATES = {"delivered", "partly_delivered", "dead_lettered", "not_analysed", "not_eligible", "report_failed"}
QUEUED_OR_LATER = FINAL_STATES | {"queued", "analysing", "analysed", "reporting"}
PRIOR_AGE = dt.timedelta(days=2)
_SERVING = re.compile(r"serving AE \S+ on \S+ port (\d+)")
_WORKER_READY = "inference worker ready"
_STAGE = re.compile(r"(\w+) ([0-9.]+) s")  # the reporting entry: "... (load_sources 0.01 s, build 1.8 s, ...)"
REPORT_WORK_STAGES = ("load_sources", "build", "write")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def sender_ae(index: int) -> str:
    return f"BURST{index + 1}"


# --- the machine --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model (``lscpu``), usable cores and whether the CPU has avx512_bf16."""
    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in listing.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "avx512_bf16": "avx512_bf16" in flags}


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process (``/proc/PID/stat``), 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (one level: the node's inference workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            stat = (entry / "stat").read_text(encoding="ascii")
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


# --- the studies --------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstStudy:
    """One written study: a prior of the backlog or the live study."""

    key: str
    study_uid: str
    paths: tuple[Path, ...]
    live: bool


def write_studies(folder: Path, args: argparse.Namespace) -> tuple[list[BurstStudy], BurstStudy]:
    """The priors (acquired 2 days ago and earlier, one hour apart) and the live study (now).

    Distinct patients (``default_patient(seed)``), hence distinct Study Instance UIDs; the node
    reads StudyDate/StudyTime in its local time zone, so they are written in local time.
    """
    now = dt.datetime.now()

    def one(key: str, seed: int, acquired: dt.datetime, live: bool) -> BurstStudy:
        study = write_ct_stroke_study(
            folder / key, patient=default_patient(seed), rows=args.rows, thin_slices=args.ncct_slices,
            cta_slices=args.cta_slices, with_thick=False, with_reformats=False, with_mips=False,
            with_localizer=True, with_dose_report=True, accession=f"BURST{seed:04d}", seed=seed,
            study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"),
        )
        return BurstStudy(key, study.study_uid, tuple(study.paths()), live)

    priors = [one(f"prior{i + 1:02d}", 100 + i, now - PRIOR_AGE - dt.timedelta(hours=i), False)
              for i in range(args.studies)]
    return priors, one("live", 99, now, True)


# --- the node -----------------------------------------------------------------------------


def eligibility_rules(work: Path) -> Path:
    """The bundled eligibility rules without the age limit: the backlog's priors are analysed."""
    rules = yaml.safe_load((REPO_ROOT / "config" / "eligibility.yaml").read_text(encoding="utf-8"))
    rules["max_study_age_h"] = None
    path = work / "eligibility.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    return path


def site_config(
    work: Path, archive: StorescpArchive, args: argparse.Namespace, *, workers: int, torch_threads: int,
    index_url: str | None,
) -> Path:
    """The node's site YAML: loopback, short completion timers, the archive as destination, no console."""
    senders = [sender_ae(i) for i in range(args.senders)] + [LIVE_SENDER_AE]
    config: dict[str, Any] = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(work / "node")},
        "completion": {"series_quiet_s": args.quiet_s, "study_timeout_s": study_timeout_s(args)},
        "inference": {"checkpoint": args.checkpoint, "workers": workers, "torch_threads": torch_threads,
                      "eligibility_rules": str(eligibility_rules(work))},
        "delivery": {"allow_demonstration_results": args.checkpoint is None, "scan_interval_s": 0.5,
                     "retry_initial_s": 1.0},
        "console": {"enabled": False},
        "peers": [
            {"name": "burst-senders", "ae_titles": senders, "host": "127.0.0.1", "roles": ["source"]},
            {"name": "archive", "ae_titles": [archive.ae_title], "host": archive.host, "port": archive.port,
             "roles": ["destination"]},
        ],
    }
    if index_url is not None:
        config["index"] = {"url": index_url}
    path = work / "site.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def study_timeout_s(args: argparse.Namespace) -> float:
    return max(30.0, args.quiet_s * 5)


@dataclass
class NodeProcess:
    """One ``fpe-node serve`` subprocess (its own process group) and its log."""

    label: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def pids(self) -> list[int]:
        """The process and its children (inference workers)."""
        return [self.proc.pid, *children_of(self.proc.pid)]


def launch(config: Path, log_path: Path, role: str | None, label: str) -> NodeProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    command = [sys.executable, "-m", "dicom_node", "--config", str(config), "serve"]
    if role is not None:
        command += ["--role", role]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return NodeProcess(label, proc, log_path)


def wait_ready(processes: Sequence[NodeProcess], workers: int, timeout_s: float = 240.0) -> int:
    """Wait until the SCP serves and ``workers`` inference workers have loaded the model; the SCP port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = [p.log_text() for p in processes]
        ports = [int(m.group(1)) for text_ in logs if (m := _SERVING.search(text_))]
        ready = sum(text_.count(_WORKER_READY) for text_ in logs)
        if ports and ready >= workers:
            return ports[0]
        for p in processes:
            if p.proc.poll() is not None:
                raise RuntimeError(f"fpe-node serve ({p.label}) exited:\n{p.log_text()[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"the node was not ready within {timeout_s} s ({ready} of {workers} workers)")


def stop_all(processes: Sequence[NodeProcess]) -> None:
    """SIGTERM every node process, wait, then SIGKILL its process group if it is still there."""
    for p in processes:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.proc.pid, signal.SIGKILL)  # the group we started: left-over workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(10)


# --- PostgreSQL (split topology) ----------------------------------------------------------


class ThrowAwayPostgres:
    """A PostgreSQL cluster for this run only, made as ``deploy/test-postgres.sh`` makes one.

    initdb into a temporary folder, ``pg_ctl start`` on a free port on 127.0.0.1 only (trust
    authentication, no fsync); as root the server runs as the ``postgres`` user. :meth:`stop`
    stops it (``-m immediate``) and removes the folder.
    """

    def __init__(self) -> None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                            key=lambda p: [int(v) for v in re.findall(r"\d+", p.parts[-3])])
        if not candidates:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql/*/bin (install 'postgresql')")
        self.bindir = candidates[-1].parent
        self.as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.folder = Path(tempfile.mkdtemp(prefix="fpe-burst-pg-"))
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://fpenode:fpenode@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.folder.chmod(0o700)
        if self.as_server:
            shutil.chown(self.folder, "postgres")
        data = self.folder / "data"
        subprocess.run([*self.as_server, str(self.bindir / "initdb"), "-D", str(data), "-U", "fpenode",
                        "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run([*self.as_server, str(self.bindir / "pg_ctl"), "-D", str(data), "-l",
                        str(self.folder / "server.log"), "-w", "-t", "60", "-o", options, "start"],
                       check=True, capture_output=True, timeout=90)

    def stop(self) -> None:
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run([*self.as_server, str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(args: argparse.Namespace) -> Iterator[str]:
    """A server URL: ``--postgres-url``, ``FPENODE_TEST_POSTGRES_URL``, or a throw-away cluster's."""
    given = args.postgres_url or os.environ.get("FPENODE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    cluster = ThrowAwayPostgres()
    try:
        cluster.start()
        print(f"throw-away PostgreSQL on 127.0.0.1:{cluster.port} ({cluster.bindir.parent.name})")
        yield cluster.url
    finally:
        cluster.stop()


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server for one run (dropped afterwards); its URL."""
    name = f"fpenode_burst_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin.url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# --- sending ------------------------------------------------------------------------------


@dataclass
class Sent:
    """One study's association: when its ``storescu`` started and when it ended (last ack)."""

    study: BurstStudy
    sender: str
    started: dt.datetime
    acked: dt.datetime


def storescu(study: BurstStudy, port: int, calling_ae: str, timeout_s: float) -> Sent:
    """Send a study in one association with DCMTK ``storescu`` (``TCP_NODELAY=1``)."""
    env = dict(os.environ, TCP_NODELAY="1")
    started = utc_now()
    result = subprocess.run(
        [str(STORESCU), "-aet", calling_ae, "-aec", NODE_AE, "-to", "30", "-ta", "30", "-td", "60",
         "127.0.0.1", str(port), *map(str, study.paths)],
        env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    acked = utc_now()
    if result.returncode != 0:
        raise RuntimeError(f"storescu ({study.key}) exited {result.returncode}: {result.stderr[-2000:]}")
    return Sent(study, calling_ae, started, acked)


def send_burst(priors: Sequence[BurstStudy], port: int, senders: int, timeout_s: float) -> list[Sent]:
    """``senders`` threads start together; sender k sends priors k, k+senders, ... one by one."""
    barrier = threading.Barrier(senders)
    results: list[Sent] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        barrier.wait()
        try:
            for study in priors[index::senders]:
                sent = storescu(study, port, sender_ae(index), timeout_s)
                with lock:
                    results.append(sent)
        except BaseException as exc:  # re-raised below, in the caller's thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"sender-{i + 1}") for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# --- the index ----------------------------------------------------------------------------


def wait_states(index_url: str, study_uids: Sequence[str], states: set[str], timeout_s: float) -> None:
    """Wait until every study is in one of ``states``."""
    engine = create_engine(index_url)
    deadline = time.monotonic() + timeout_s
    pending: set[str] = set(study_uids)
    try:
        while time.monotonic() < deadline:
            with Session(engine) as session:
                rows = session.execute(select(Study.study_uid, Study.state).where(Study.study_uid.in_(pending))).all()
            pending -= {uid for uid, state in rows if state in states}
            if not pending:
                return
            time.sleep(0.25)
    finally:
        engine.dispose()
    raise TimeoutError(f"{len(pending)} studies not in {sorted(states)} within {timeout_s} s")


@dataclass
class StudyFigures:
    """What the index says about one study after the run."""

    state: str
    instances: int
    results_sent: int
    last_result: dt.datetime | None
    queued: dt.datetime | None
    analysing: dt.datetime | None
    analysed: dt.datetime | None
    reporting: dt.datetime | None
    enqueued_at: dt.datetime | None
    claimed_at: dt.datetime | None
    finished_at: dt.datetime | None
    report_work_s: float | None


def read_study(session: Session, study_uid: str) -> StudyFigures:
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
    events = session.execute(
        select(StudyEvent.state, StudyEvent.at, StudyEvent.detail)
        .where(StudyEvent.study_pk == study.id).order_by(StudyEvent.id)
    ).all()
    first: dict[str, dt.datetime] = {}
    report_work_s = None
    for state, at, detail in events:
        if state not in first and state == "reporting":
            stages = {name: float(value) for name, value in _STAGE.findall(detail or "")}
            if stages:
                report_work_s = round(sum(stages.get(name, 0.0) for name in REPORT_WORK_STAGES), 3)
        first.setdefault(state, as_utc(at))
    sent = session.scalars(select(OutboxItem.sent_at).where(OutboxItem.study_uid == study_uid)).all()
    job = session.execute(
        select(AnalysisJob.enqueued_at, AnalysisJob.claimed_at, AnalysisJob.finished_at).where(AnalysisJob.study_pk == study.id)
        .order_by(AnalysisJob.id).limit(1)
    ).first()
    instances = session.execute(
        select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id).where(Series.study_pk == study.id)
    ).scalar_one()
    return StudyFigures(
        state=study.state, instances=int(instances), results_sent=sum(t is not None for t in sent),
        last_result=max((as_utc(t) for t in sent if t is not None), default=None),
        queued=first.get("queued"), analysing=first.get("analysing"), analysed=first.get("analysed"),
        reporting=first.get("reporting"),
        enqueued_at=None if job is None else as_utc(job[0]),
        claimed_at=None if job is None or job[1] is None else as_utc(job[1]),
        finished_at=None if job is None or job[2] is None else as_utc(job[2]),
        report_work_s=report_work_s,
    )


def seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (p95 of 20 values: the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 3) if present else None


def queue_position(live: StudyFigures, priors: Sequence[StudyFigures]) -> tuple[int, int]:
    """(priors still waiting, priors being analysed) when the live study's job was queued."""
    at = live.enqueued_at
    if at is None:
        return 0, 0
    waiting = sum(1 for p in priors if p.enqueued_at is not None and p.enqueued_at <= at
                  and (p.claimed_at is None or p.claimed_at > at))
    running = sum(1 for p in priors if p.claimed_at is not None and p.claimed_at <= at
                  and (p.finished_at is None or p.finished_at > at))
    return waiting, running


# --- one configuration --------------------------------------------------------------------


def torch_threads_for(args: argparse.Namespace, workers: int, cores: int) -> int:
    """``--torch-threads``, or the cores shared out between the workers (at least 1 each)."""
    return args.torch_threads if args.torch_threads > 0 else max(1, cores // workers)


def run_configuration(
    args: argparse.Namespace, work: Path, priors: Sequence[BurstStudy], live: BurstStudy, workers: int,
    cores: int, server_url: str | None,
) -> dict[str, Any]:
    """One fresh node (and archive, and index) with ``workers`` workers; the burst, then the live study."""
    threads = torch_threads_for(args, workers, cores)
    with contextlib.ExitStack() as stack:
        archive = StorescpArchive(work / "archive")
        archive.start()
        stack.callback(archive.stop)
        if args.topology == "split":
            assert server_url is not None
            index_url: str = stack.enter_context(fresh_database(server_url))
            config = site_config(work, archive, args, workers=1, torch_threads=threads, index_url=index_url)
            roles: list[str | None] = ["receiver", *["worker"] * workers, "sender"]
        else:
            index_url = f"sqlite:///{work / 'node' / 'index.sqlite3'}"
            config = site_config(work, archive, args, workers=workers, torch_threads=threads, index_url=None)
            roles = [None]  # one process, no --role
        processes: list[NodeProcess] = []
        stack.callback(stop_all, processes)
        for number, role in enumerate(roles):
            label = role or "embedded"
            if roles.count(role) > 1:  # worker1, worker2, ...
                label += str(roles[:number + 1].count(role))
            processes.append(launch(config, work / f"serve-{label}.log", role, label))
            if role == "receiver":  # the receiver creates the schema before the others start
                wait_ready(processes[:1], 0)
        port = wait_ready(processes, workers)

        cpu_before = {pid: process_cpu_s(pid) for p in processes for pid in p.pids()}
        busy_before, total_before = cpu_jiffies()
        burst_start = utc_now()
        sent = send_burst(priors, port, args.senders, args.timeout_s)
        prior_uids = [s.study_uid for s in priors]
        wait_states(index_url, prior_uids, QUEUED_OR_LATER, args.timeout_s)  # the backlog is queued
        live_sent = storescu(live, port, LIVE_SENDER_AE, args.timeout_s)
        wait_states(index_url, [*prior_uids, live.study_uid], FINAL_STATES, args.timeout_s)
        burst_end = utc_now()
        busy_after, total_after = cpu_jiffies()
        cpu_by_process: dict[str, float] = {}
        for p in processes:
            for n, pid in enumerate(p.pids()):
                name = p.label if n == 0 else f"{p.label}-child{n}"
                cpu_by_process[name] = round(cpu_by_process.get(name, 0.0) + process_cpu_s(pid)
                                             - cpu_before.get(pid, 0.0), 1)

        engine = create_engine(index_url)
        try:
            with Session(engine) as session:
                prior_figures = {s.study_uid: read_study(session, s.study_uid) for s in priors}
                live_figures = read_study(session, live.study_uid)
        finally:
            engine.dispose()
    return summarise(
        workers=workers, threads=threads, sent=sent, live_sent=live_sent, prior_figures=prior_figures,
        live_figures=live_figures, burst_start=burst_start, burst_end=burst_end, cpu_by_process=cpu_by_process,
        machine_busy=(busy_after - busy_before) / max(1, total_after - total_before), cores=cores,
    )


def study_row(sent: Sent, f: StudyFigures, burst_start: dt.datetime) -> dict[str, Any]:
    """One study's figures: time to result and its breakdown along the timeline.

    ``report_building_s`` is analysed -> reporting; ``report_work_s`` the results' own building
    (load_sources + build + write) from the reporting entry, done within ``analysis_s`` when
    the worker builds them before recording ``analysed``.
    """
    return {
        "study": sent.study.key, "sender": sent.sender, "state": f.state,
        "instances": f"{f.instances}/{len(sent.study.paths)}", "results_sent": f.results_sent,
        "send_s": seconds(sent.started, sent.acked),
        "time_to_result_s": seconds(sent.acked, f.last_result),
        "from_burst_start_s": seconds(burst_start, f.last_result),
        "completion_wait_s": seconds(sent.acked, f.queued), "queue_s": seconds(f.queued, f.analysing),
        "analysis_s": seconds(f.analysing, f.analysed), "report_building_s": seconds(f.analysed, f.reporting),
        "report_work_s": f.report_work_s,
        "sending_s": seconds(f.reporting, f.last_result),
    }


def summarise(
    *, workers: int, threads: int, sent: Sequence[Sent], live_sent: Sent, prior_figures: dict[str, StudyFigures],
    live_figures: StudyFigures, burst_start: dt.datetime, burst_end: dt.datetime, cpu_by_process: dict[str, float],
    machine_busy: float, cores: int,
) -> dict[str, Any]:
    """The figures of one configuration, and one row per study."""
    per_study = [study_row(item, prior_figures[item.study.study_uid], burst_start)
                 for item in sorted(sent, key=lambda s: s.study.key)]
    live_row = study_row(live_sent, live_figures, burst_start)
    ttr = [r["time_to_result_s"] for r in per_study if r["time_to_result_s"] is not None]
    from_start = [r["from_burst_start_s"] for r in per_study if r["from_burst_start_s"] is not None]
    last_prior = max((f.last_result for f in prior_figures.values() if f.last_result is not None), default=None)
    span = seconds(burst_start, last_prior)
    waiting, running = queue_position(live_figures, list(prior_figures.values()))
    delivered = sum(f.state == "delivered" for f in prior_figures.values())
    analysed = sum(f.analysed is not None for f in prior_figures.values())
    return {
        "workers": workers,
        "torch_threads": threads,
        "priors_analysed": f"{analysed}/{len(prior_figures)}",
        "priors_delivered": f"{delivered}/{len(prior_figures)}",
        "live_state": live_figures.state,
        "burst_ingest_s": seconds(burst_start, max(s.acked for s in sent)),
        "burst_span_s": span,
        "studies_per_h": None if not span else round(len(prior_figures) * 3600 / span, 1),
        "time_to_result_median_s": round(statistics.median(ttr), 2) if ttr else None,
        "time_to_result_p95_s": round(nearest_rank(ttr, 0.95), 2) if ttr else None,
        "from_burst_start_median_s": round(statistics.median(from_start), 2) if from_start else None,
        "live_time_to_result_s": live_row["time_to_result_s"],
        "live_queue_s": live_row["queue_s"],
        "live_analysis_s": live_row["analysis_s"],
        "live_report_building_s": live_row["report_building_s"],
        "live_queue_waiting": waiting,
        "live_queue_running": running,
        "live_fifo_estimate_s": seconds(live_sent.acked, last_prior),
        "mean_completion_wait_s": mean([r["completion_wait_s"] for r in per_study]),
        "mean_analysis_s": mean([r["analysis_s"] for r in per_study]),
        "mean_report_building_s": mean([r["report_building_s"] for r in per_study]),
        "mean_report_work_s": mean([r["report_work_s"] for r in per_study]),
        "mean_sending_s": mean([r["sending_s"] for r in per_study]),
        "cpu_s_by_process": cpu_by_process,
        "machine_busy_pct": round(100 * machine_busy, 1),
        "node_cpu_pct": round(100 * sum(cpu_by_process.values()) / (cores * (burst_end - burst_start).total_seconds()), 1),
        "wall_s": seconds(burst_start, burst_end),
        "studies": per_study,
        "live": live_row,
    }


# --- output -------------------------------------------------------------------------------

ROWS = (
    ("torch threads per worker", "torch_threads"),
    ("priors analysed", "priors_analysed"),
    ("priors delivered", "priors_delivered"),
    ("burst ingest (all priors acknowledged), s", "burst_ingest_s"),
    ("burst span (start -> last prior result), s", "burst_span_s"),
    ("studies/h", "studies_per_h"),
    ("time to result median, s", "time_to_result_median_s"),
    ("time to result p95, s", "time_to_result_p95_s"),
    ("result from burst start, median, s", "from_burst_start_median_s"),
    ("live: time to result, s", "live_time_to_result_s"),
    ("live: priors waiting when queued", "live_queue_waiting"),
    ("live: priors being analysed then", "live_queue_running"),
    ("live: if FIFO (estimate), s", "live_fifo_estimate_s"),
    ("live: queue (queued -> analysing), s", "live_queue_s"),
    ("live: analysis (incl. results), s", "live_analysis_s"),
    ("live: analysed -> reporting, s", "live_report_building_s"),
    ("mean completion wait, s", "mean_completion_wait_s"),
    ("mean analysis (incl. results), s", "mean_analysis_s"),
    ("mean results building (sources, build, write), s", "mean_report_work_s"),
    ("mean analysed -> reporting, s", "mean_report_building_s"),
    ("mean sending, s", "mean_sending_s"),
    ("machine busy (all cores, anyone), %", "machine_busy_pct"),
    ("node processes' CPU (of all cores), %", "node_cpu_pct"),
    ("wall (burst start -> all done), s", "wall_s"),
)


def print_table(results: Sequence[dict[str, Any]]) -> None:
    headers = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in results]
    width = max(len(label) for label, _ in ROWS) + 2
    print("".ljust(width) + "".join(h.rjust(12) for h in headers))
    for label, key in ROWS:
        print(label.ljust(width) + "".join(str(r[key]).rjust(12) for r in results))
    for r in results:
        cpu = ", ".join(f"{name} {value:g}" for name, value in r["cpu_s_by_process"].items()
                        if value or "-child" not in name)  # idle children: multiprocessing's resource tracker
        print(f"CPU s over the burst, {r['workers']} worker(s): {cpu}")
    rates = {r["workers"]: r["studies_per_h"] for r in results}
    if 1 in rates and 2 in rates and rates[1] and rates[2]:
        print(f"ratio 2-worker/1-worker studies/h: {rates[2] / rates[1]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="priors in the burst")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu senders")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, one run each")
    parser.add_argument("--topology", choices=("embedded", "split"), default="embedded")
    parser.add_argument("--postgres-url", default=None, help="split: PostgreSQL server (default: "
                        "FPENODE_TEST_POSTGRES_URL, else a throw-away cluster)")
    parser.add_argument("--rows", type=int, default=256, help="matrix of the NCCT (CTA gets rows+16)")
    parser.add_argument("--ncct-slices", type=int, default=40)
    parser.add_argument("--cta-slices", type=int, default=50)
    parser.add_argument("--quiet-s", type=float, default=2.0, help="completion.series_quiet_s")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="inference.torch_threads (default: the cores shared out between the workers)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: demonstration weights)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="bound on each wait")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep studies, logs and indexes here")
    args = parser.parse_args(argv)
    if not STORESCU.exists():
        raise SystemExit(f"{STORESCU} is missing (Debian package dcmtk)")

    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores, avx512_bf16 {'yes' if host['avx512_bf16'] else 'no'}")
    print(f"studies: {args.studies} priors (acquired {PRIOR_AGE.days}+ days ago) + 1 live, NCCT {args.rows}x{args.rows}"
          f"x{args.ncct_slices} + CTA {args.rows + 16}x{args.rows + 16}x{args.cta_slices} + localizer + dose report; "
          f"{args.senders} storescu senders, one association per study")
    print(f"completion: series_quiet_s {args.quiet_s:g}, study_timeout_s {study_timeout_s(args):g}, "
          "release shortens the quiet period (node default); eligibility: max_study_age_h null")
    print("torch threads: " + ", ".join(f"{w} worker(s) -> {torch_threads_for(args, w, host['cores'])}"
                                        for w in args.workers) + f"; topology {args.topology}")
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            root = args.workdir
            root.mkdir(parents=True, exist_ok=False)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fpe-burst-")))
        started = time.perf_counter()
        priors, live = write_studies(root / "studies", args)
        print(f"wrote {len(priors) + 1} studies, {sum(len(s.paths) for s in priors) + len(live.paths)} files "
              f"in {time.perf_counter() - started:.1f} s")
        server_url = stack.enter_context(postgres_server(args)) if args.topology == "split" else None
        results = []
        for workers in args.workers:
            work = root / f"workers{workers}"
            work.mkdir()
            figures = run_configuration(args, work, priors, live, workers, host["cores"], server_url)
            figures["topology"] = args.topology
            results.append(figures)
            print(f"{workers} worker(s): {figures['studies_per_h']} studies/h, "
                  f"live {figures['live_time_to_result_s']} s, wall {figures['wall_s']} s")
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": host, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
