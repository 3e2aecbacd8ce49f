"""Time to result: from the last instance of a study acknowledged to the last result acknowledged.

Runs the node as ``fpe-node serve`` (a subprocess, exactly as deployed: SCP, completion
timers, a warm inference worker process, delivery) with completion timers of a few seconds, a DCMTK ``storescp`` archive as its destination, and sends a synthetic CT
stroke study (NCCT + CTA by default) from the factory with a pynetdicom SCU. The clock starts
when the node acknowledges the study's last instance and stops at the last result the archive
acknowledged (``outbox_item.sent_at``, recorded right after the archive's C-STORE responses).

Breakdown, from the study's timeline and the outbox in the node's index:

- completion wait: last instance acknowledged -> study queued (quiet period, readiness);
- queue: queued -> a worker started analysing;
- analysis: analysing -> analysed, split into the worker's own per-stage timings when it
  records them (load, decode, select, volume, register, preprocess, infer, attention);
- report building: analysed -> reporting (source headers, SR and captures built, files written,
  queued);
- sending: reporting -> last result acknowledged by the archive.

Targets (issue 4): under 20 s end to end on this 2-core machine; report building plus sending
under 2 s.

Usage::

    .venv/bin/python benchmarks/time_to_result.py [--rows 512] [--ncct-slices 60] [--cta-slices 80]
        [--quiet-s 2] [--runs 1] [--checkpoint PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dicom_node.index.analysis import latest_analysis  # noqa: E402
from dicom_node.index.models import Study, StudyEvent  # noqa: E402
from dicom_node.index.outbox import OutboxItem  # noqa: E402
from tests.archives import StorescpArchive, free_port  # noqa: E402
from tests.factory import write_ct_stroke_study  # noqa: E402

SENDER_AE = "BENCHSCU"
NODE_AE = "FPENODE"
FINAL_STATES = {"delivered", "partly_delivered", "dead_lettered", "not_analysed", "not_eligible"}
_SERVING = re.compile(r"serving AE \S+ on \S+ port (\d+)")
_WORKER_READY = "inference worker ready"
_STAGE = re.compile(r"(\w+) ([0-9.]+) s")


def as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def site_config(work: Path, archive: StorescpArchive, args: argparse.Namespace) -> Path:
    """The node's site YAML: loopback, short completion timers, the archive as destination."""
    config: dict[str, Any] = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(work / "node")},
        "completion": {"series_quiet_s": args.quiet_s, "study_timeout_s": max(30.0, args.quiet_s * 5)},
        "inference": {"checkpoint": args.checkpoint, "workers": 1},
        "delivery": {"allow_demonstration_results": args.checkpoint is None, "scan_interval_s": 0.5,
                     "retry_initial_s": 1.0},
        "peers": [
            {"name": "bench-sender", "ae_titles": [SENDER_AE], "host": "127.0.0.1", "roles": ["source"]},
            {"name": "archive", "ae_titles": [archive.ae_title], "host": archive.host, "port": archive.port,
             "roles": ["destination"]},
        ],
    }
    path = work / "site.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_node(config: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    log_file = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(config), "serve"],
                            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        match = _SERVING.search(text)
        if match and _WORKER_READY in text:  # a warm node: the worker has loaded its model
            return proc, int(match.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"fpe-node serve exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fpe-node serve did not start")


def send_study(paths: list[Path], port: int) -> dt.datetime:
    """Send every file in one association; the time the last C-STORE was acknowledged (UTC)."""
    ae = AE(ae_title=SENDER_AE)
    ae.requested_contexts = StoragePresentationContexts
    ae.maximum_pdu_size = 4_194_304
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, max_pdu=4_194_304)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    last_ack = None
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if int(status.Status) != 0:
                raise RuntimeError(f"C-STORE of {path.name} failed: 0x{int(status.Status):04X}")
            last_ack = dt.datetime.now(dt.timezone.utc)
    finally:
        assoc.release()
    assert last_ack is not None
    return last_ack


def wait_final(index_url: str, study_uid: str, timeout_s: float) -> str:
    engine = create_engine(index_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with Session(engine) as session:
                state = session.scalars(select(Study.state).where(Study.study_uid == study_uid)).first()
            if state in FINAL_STATES:
                return str(state)
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise TimeoutError(f"study not delivered within {timeout_s} s (state {state})")


def analysis_timings(session: Session, study_uid: str) -> dict[str, float]:
    """The worker's per-stage timings for the study (its ``analysis`` row)."""
    row = latest_analysis(session, study_uid)
    return {} if row is None else {k: round(float(v), 3) for k, v in row.timings_dict().items()}


def breakdown(index_url: str, study_uid: str, last_ack: dt.datetime) -> dict[str, Any]:
    engine = create_engine(index_url)
    try:
        with Session(engine) as session:
            study_pk = session.scalars(select(Study.id).where(Study.study_uid == study_uid)).one()
            events = session.execute(
                select(StudyEvent.state, StudyEvent.at, StudyEvent.detail)
                .where(StudyEvent.study_pk == study_pk).order_by(StudyEvent.id)
            ).all()
            sent = session.scalars(select(OutboxItem.sent_at).where(OutboxItem.study_uid == study_uid)).all()
            stages = analysis_timings(session, study_uid)
            reason = session.scalars(select(Study.state_reason).where(Study.study_uid == study_uid)).one()
    finally:
        engine.dispose()
    first: dict[str, dt.datetime] = {}
    report_stages: dict[str, float] = {}
    for state, at, detail in events:
        first.setdefault(state, as_utc(at))  # first entry into each state
        if state == "reporting" and not report_stages:  # "... (load_sources 0.01 s, build_sr 0.6 s, ...)"
            report_stages = {name: float(value) for name, value in _STAGE.findall(detail or "")}

    def span(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
        return None if a is None or b is None else round((b - a).total_seconds(), 3)

    last_result = max((as_utc(t) for t in sent if t is not None), default=None)
    figures = {
        "completion_wait_s": span(last_ack, first.get("queued")),
        "queue_s": span(first.get("queued"), first.get("analysing")),
        "analysis_s": span(first.get("analysing"), first.get("analysed")),
        "report_building_s": span(first.get("analysed"), first.get("reporting")),
        "sending_s": span(first.get("reporting"), last_result),
        "total_s": span(last_ack, last_result),
        "analysis_stages_s": stages,
        "report_stages_s": report_stages,
        "results_sent": sum(t is not None for t in sent),
        "reason": reason,
    }
    if figures["report_building_s"] is not None and figures["sending_s"] is not None:
        figures["reports_plus_sending_s"] = round(figures["report_building_s"] + figures["sending_s"], 3)
    return figures


def one_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    archive = StorescpArchive(work / "archive")
    archive.start()
    acquired = dt.datetime.now() - dt.timedelta(minutes=5)  # a live study (eligibility turns away priors)
    study = write_ct_stroke_study(
        work / "study", rows=args.rows, thin_slices=args.ncct_slices, cta_slices=args.cta_slices,
        with_thick=False, with_reformats=False, with_mips=False, with_localizer=True, with_dose_report=True,
        study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"),
    )
    config = site_config(work, archive, args)
    node, port = start_node(config, work / "serve.log")
    try:
        paths = study.paths()
        started = time.perf_counter()
        last_ack = send_study(paths, port)
        send_s = time.perf_counter() - started
        index_url = f"sqlite:///{work / 'node' / 'index.sqlite3'}"
        state = wait_final(index_url, study.study_uid, args.timeout_s)
        figures = breakdown(index_url, study.study_uid, last_ack)
        figures.update({"state": state, "instances": len(paths), "ingest_s": round(send_s, 3)})
        return figures
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        archive.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="matrix of the NCCT (CTA gets rows+16)")
    parser.add_argument("--ncct-slices", type=int, default=60)
    parser.add_argument("--cta-slices", type=int, default=80)
    parser.add_argument("--quiet-s", type=float, default=2.0, help="completion.series_quiet_s")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: demonstration weights)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep study, logs and index here")
    args = parser.parse_args(argv)
    results = []
    for run in range(args.runs):
        if args.workdir is not None:
            work = args.workdir / f"run{run + 1}"
            work.mkdir(parents=True, exist_ok=False)
            figures = one_run(args, work)
        else:
            with tempfile.TemporaryDirectory(prefix="fpe-ttr-") as tmp:
                figures = one_run(args, Path(tmp))
        results.append(figures)
        print(f"run {run + 1}: " + json.dumps(figures))
    totals = [r["total_s"] for r in results if r["total_s"] is not None]
    if totals:
        rs = statistics.median(r.get("reports_plus_sending_s") or 0.0 for r in results)
        print(f"time to result: median {statistics.median(totals):.2f} s, min {min(totals):.2f} s, max {max(totals):.2f} s "
              f"(target < 20 s); reports + sending median {rs:.2f} s (target < 2 s)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
