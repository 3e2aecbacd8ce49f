"""Ingest benchmark: how fast the node takes a real CT from DCMTK ``storescu``.

The Philips 140-slice head CT (``../shared/data/ct_philips_headphantom_1mm``) is sent by
``/usr/bin/storescu`` to three receivers on loopback, interleaved round by round:

(a) DCMTK ``storescp`` (with ``TCP_NODELAY=1``), writing files, no fsync;
(b) ``python -m pynetdicom storescp``, writing files, no fsync;
(c) ``fpe-node serve`` with its defaults: fsync of each file and folder, SQLite index in WAL
    mode with ``synchronous=FULL``, each C-STORE answered after both.

Medians and ratios (receiver speed relative to fpe-node; > 1 means fpe-node is faster) are
printed. Targets (issue 2): at least 1.2x pynetdicom's storescp and 0.6x DCMTK's.

After each fpe-node round, **readiness** is timed on the index that round left behind: the
selection readiness the node's completion uses (``SelectionReadiness``, fresh, so nothing is
cached) judges every series complete and asks whether a pipeline is ready, five times; the
median is printed per round, and for ``--baseline-tree`` the same runs with the baseline's code
on the index its own node wrote (it re-read every instance header from its file; the node now
reads the headers its C-STORE handler stored in the index).

Then 8 ``storescu`` processes send 8 distinct copies of the CT at once to fpe-node: every store
must succeed and every instance be indexed.

Run::

    .venv/bin/python benchmarks/ingest.py [--rounds 5] [--senders 8] [--slices-per-sender 40]
        [--without-fsync] [--baseline-tree DIR]

This is a benchmark, not a test: it needs DCMTK and the shared data, takes a minute or two,
and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = REPO_ROOT.parent / "shared" / "data" / "ct_philips_headphantom_1mm"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
NODE_AE = "FPENODE"
CALLING_AE = "STORESCU"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


@dataclass
class Receiver:
    """A receiver started per round in a fresh folder: name, command factory, called AE."""

    name: str
    command: Callable[[Path, int], list[str]]
    called_ae: str
    env: dict[str, str]
    cwd: Path = REPO_ROOT


def dcmtk_storescp(folder: Path, port: int) -> list[str]:
    """DCMTK storescp writing into ``folder``."""
    return [STORESCP, "-od", str(folder), str(port)]


def pynetdicom_storescp(folder: Path, port: int) -> list[str]:
    """pynetdicom's storescp application writing into ``folder``."""
    return [sys.executable, "-m", "pynetdicom", "storescp", "-q", "-od", str(folder), str(port)]


def fpe_node_serve(folder: Path, port: int, *, fsync: bool = True) -> list[str]:
    """``fpe-node serve`` with its defaults, data directory ``folder``, the sender registered."""
    config = folder.parent / f"{folder.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "network": {"port": port, "host": "127.0.0.1"},
                "storage": {"data_dir": str(folder), "fsync": fsync},
                "logging": {"level": "WARNING"},
                "peers": [{"name": "bench", "ae_titles": [CALLING_AE], "host": "127.0.0.1"}],
            }
        )
    )
    return [sys.executable, "-m", "dicom_node", "--config", str(config), "serve"]


def fpe_node_serve_without_fsync(folder: Path, port: int) -> list[str]:
    """``fpe-node serve`` with ``storage.fsync: false`` (to show what durability costs)."""
    return fpe_node_serve(folder, port, fsync=False)


def receivers(*, without_fsync: bool = False, baseline_tree: Path | None = None) -> list[Receiver]:
    """The three receivers compared (plus fpe-node without fsync, or from another tree, when asked).

    ``baseline_tree`` is a checkout of another revision (e.g. ``git archive HEAD~3 | tar -x``):
    its ``fpe-node serve`` runs in the same rounds as ``fpe-node-baseline``, so a change is
    measured against the code before it under the same machine load.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    chosen = [
        Receiver("dcmtk-storescp", dcmtk_storescp, "ANY-SCP", dict(base, TCP_NODELAY="1")),
        Receiver("pynetdicom-storescp", pynetdicom_storescp, "ANY-SCP", base),
        Receiver("fpe-node", fpe_node_serve, NODE_AE, base),
    ]
    if without_fsync:
        chosen.append(Receiver("fpe-node-no-fsync", fpe_node_serve_without_fsync, NODE_AE, base))
    if baseline_tree is not None:
        chosen.append(Receiver("fpe-node-baseline", fpe_node_serve, NODE_AE, base, cwd=baseline_tree.resolve()))
    return chosen


@contextmanager
def running(receiver: Receiver, folder: Path) -> Iterator[int]:
    """Start ``receiver`` on a free port writing into ``folder``; stop it afterwards."""
    folder.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(
        receiver.command(folder, port),
        cwd=receiver.cwd,
        env=receiver.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def send(port: int, called_ae: str, source: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Time one ``storescu`` run sending every file under ``source``."""
    started = time.perf_counter()
    result = subprocess.run(
        [STORESCU, "-aet", CALLING_AE, "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return time.perf_counter() - started, result


def check_tools(source: Path) -> None:
    """Fail early with a clear message when DCMTK or the data is missing."""
    for tool in (STORESCU, STORESCP):
        version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        if "dcmtk" not in version.lower():
            raise SystemExit(f"{tool} is not DCMTK")
    if not source.is_dir():
        raise SystemExit(f"test data missing: {source}")


def stored_count(folder: Path) -> int:
    """Files a receiver wrote (fpe-node: under dicom/)."""
    return sum(1 for path in folder.rglob("*") if path.is_file() and not path.name.startswith("index.sqlite3"))


def interleaved_rounds(
    source: Path, rounds: int, workdir: Path, *, without_fsync: bool, baseline_tree: Path | None = None,
    readiness: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per receiver, the seconds of each round; receivers alternate in a rotating order.

    ``readiness``: when given, receives per fpe-node receiver the readiness seconds of each round.
    """
    times: dict[str, list[float]] = {}
    n_files = sum(1 for p in source.iterdir() if p.is_file())
    contenders = receivers(without_fsync=without_fsync, baseline_tree=baseline_tree)
    for number in range(rounds):
        order = contenders[number % len(contenders) :] + contenders[: number % len(contenders)]
        for receiver in order:
            folder = workdir / f"{receiver.name}-{number}"
            with running(receiver, folder) as port:
                seconds, result = send(port, receiver.called_ae, source)
            if result.returncode != 0:
                raise SystemExit(f"{receiver.name}: storescu failed:\n{result.stderr[-2000:]}")
            written = stored_count(folder)
            if written < n_files:
                raise SystemExit(f"{receiver.name}: {written} files written, expected {n_files}")
            times.setdefault(receiver.name, []).append(seconds)
            judged = ""
            if readiness is not None and receiver.name in ("fpe-node", "fpe-node-baseline"):
                readiness.setdefault(receiver.name, []).append(readiness_seconds(receiver, folder))
                judged = f"  readiness {readiness[receiver.name][-1] * 1000:7.1f} ms"
            print(f"round {number + 1}: {receiver.name:<20} {seconds:6.2f} s{judged}", flush=True)
            shutil.rmtree(folder)
    return times


# Run with the receiver's own code (its tree as working directory): times SelectionReadiness on
# every series of the data directory given, complete, then pipeline_ready on the usable ones.
_READINESS_SNIPPET = """
import statistics, sys, time
from pathlib import Path
from sqlalchemy import select
from dicom_node.completion import SelectionReadiness, SeriesInfo
from dicom_node.index.db import build_engine, build_session_factory
from dicom_node.index.models import Instance, Series, Study
from dicom_node.selector import build_selector
from dicom_node.settings import load_settings

settings = load_settings(environ={}, overrides={"storage": {"data_dir": sys.argv[1]}})
sessions = build_session_factory(build_engine(settings))
with sessions() as session:
    rows = session.execute(
        select(Study.study_uid, Series.series_uid, Series.modality, Series.instance_count,
               Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Series, Series.study_pk == Study.id).join(Instance, Instance.series_pk == Series.id)
    ).all()
infos = {}
for row in rows:
    infos.setdefault(row.series_uid, SeriesInfo(row.study_uid, row.series_uid, row.sop_class_uid, row.sop_instance_uid,
                                                modality=row.modality, instance_count=row.instance_count, complete=True))
selector = build_selector(settings)
times = []
for _ in range(5):
    readiness = SelectionReadiness(selector, sessions, settings.storage.data_dir)
    started = time.perf_counter()
    usable = [info for info in infos.values() if readiness.could_use(info)]
    ready = readiness.pipeline_ready(usable)
    times.append(time.perf_counter() - started)
print(statistics.median(times), len(usable), ready)
"""


def readiness_seconds(receiver: Receiver, folder: Path) -> float:
    """Median seconds of one readiness judgement of the study in ``folder``, with ``receiver``'s code."""
    env = {k: v for k, v in receiver.env.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", _READINESS_SNIPPET, str(folder)], cwd=receiver.cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{receiver.name}: readiness timing failed:\n{result.stderr[-2000:]}")
    seconds, usable, ready = result.stdout.split()
    if usable == "0" or ready != "False" and ready != "True":
        raise SystemExit(f"{receiver.name}: readiness judged no usable series ({result.stdout!r})")
    return float(seconds)


def report_readiness(readiness: dict[str, list[float]]) -> None:
    """Median readiness seconds per node, and the ratio against the baseline (> 1: faster now)."""
    if not readiness:
        return
    print("\nreadiness (every series judged complete + pipeline_ready), median of rounds:")
    for name, values in readiness.items():
        print(f"  {name:<20} {statistics.median(values) * 1000:8.1f} ms")
    if "fpe-node-baseline" in readiness:
        paired = statistics.median(old / new for old, new in zip(readiness["fpe-node-baseline"], readiness["fpe-node"]))
        print(f"fpe-node readiness vs fpe-node-baseline: {paired:.1f}x faster (median of per-round ratios)")


def report(times: dict[str, list[float]], n_files: int) -> None:
    """Medians, throughput and ratios."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedian of {len(next(iter(times.values())))} rounds, {n_files} instances:")
    for name, median in medians.items():
        print(f"  {name:<20} {median:6.2f} s  {n_files / median:6.1f} instances/s")
    node = medians["fpe-node"]
    print("fpe-node speed relative to:")
    for name in ("pynetdicom-storescp", "dcmtk-storescp"):
        target = 1.2 if name.startswith("pynetdicom") else 0.6
        ratio = medians[name] / node
        verdict = "meets" if ratio >= target else "BELOW"
        print(f"  {name:<20} {ratio:5.2f}x (target >= {target}x: {verdict})")
    # Each round runs the receivers back to back, so per-round ratios cancel slow drifts of a
    # shared machine's load better than ratios of medians.
    for name in ("pynetdicom-storescp", "dcmtk-storescp"):
        paired = statistics.median(other / mine for other, mine in zip(times[name], times["fpe-node"]))
        print(f"  {name:<20} {paired:5.2f}x median of per-round ratios")
    if "fpe-node-baseline" in medians:
        baseline = times["fpe-node-baseline"]
        for name in ("pynetdicom-storescp", "dcmtk-storescp"):
            paired = statistics.median(other / mine for other, mine in zip(times[name], baseline))
            print(f"fpe-node-baseline vs {name:<20} {medians[name] / medians['fpe-node-baseline']:5.2f}x, "
                  f"{paired:5.2f}x median of per-round ratios")
        speedup = statistics.median(old / new for old, new in zip(baseline, times["fpe-node"]))
        print(f"fpe-node vs fpe-node-baseline: {speedup:.2f}x median of per-round ratios")
    if "fpe-node-no-fsync" in medians:
        unsynced = medians["fpe-node-no-fsync"]
        print(f"fpe-node without fsync: {medians['pynetdicom-storescp'] / unsynced:.2f}x pynetdicom, "
              f"{medians['dcmtk-storescp'] / unsynced:.2f}x DCMTK (durability costs {node - unsynced:.2f} s)")


def distinct_copies(source: Path, senders: int, slices: int, workdir: Path) -> list[Path]:
    """``senders`` folders, each a copy of the first ``slices`` slices with new study/series/SOP UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    files = sorted(p for p in source.iterdir() if p.is_file())[:slices]
    folders = []
    for sender in range(senders):
        folder = workdir / f"copy-{sender}"
        folder.mkdir(parents=True)
        study_uid, series_uid = generate_uid(prefix="2.25."), generate_uid(prefix="2.25.")
        for path in files:
            ds = dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid(prefix="2.25.")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / path.name, enforce_file_format=True)
        folders.append(folder)
    return folders


def concurrent_senders(source: Path, senders: int, slices: int, workdir: Path) -> bool:
    """``senders`` storescu processes at once to fpe-node; True if no store failed."""
    folders = distinct_copies(source, senders, slices, workdir / "copies")
    node = receivers()[2]
    data = workdir / "fpe-node-concurrent"
    with running(node, data) as port:
        started = time.perf_counter()
        processes = [
            subprocess.Popen(
                [STORESCU, "-aet", CALLING_AE, "-aec", NODE_AE, "+sd", "127.0.0.1", str(port), str(folder)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for folder in folders
        ]
        outputs = [process.communicate(timeout=900) for process in processes]
        seconds = time.perf_counter() - started
    failures = sum(1 for process in processes if process.returncode != 0)
    failed_stores = sum(len(re.findall(r"Store Failed|Store SCU Failed", err)) for _, err in outputs)
    stored = len(list((data / "dicom").rglob("*.dcm")))
    expected = senders * slices
    indexed = indexed_instances(data)
    print(
        f"\n{senders} concurrent senders x {slices} instances: {seconds:.2f} s, "
        f"{expected / seconds:.1f} instances/s; senders failed: {failures}, failed stores: {failed_stores}, "
        f"files: {stored}/{expected}, indexed: {indexed}/{expected}"
    )
    return failures == 0 and failed_stores == 0 and stored == expected and indexed == expected


def indexed_instances(data_dir: Path) -> int:
    """Rows in the instance table of an fpe-node data directory."""
    import sqlite3

    with sqlite3.connect(data_dir / "index.sqlite3") as connection:
        return int(connection.execute("SELECT count(*) FROM instance").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved comparison, then the concurrent senders."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="folder of DICOM files to send")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--slices-per-sender", type=int, default=40)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--without-fsync", action="store_true", help="also time fpe-node with storage.fsync off")
    parser.add_argument("--baseline-tree", type=Path, help="also time fpe-node from this checkout (another revision)")
    args = parser.parse_args(argv)
    check_tools(args.source)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fpe-ingest-"))
    try:
        readiness: dict[str, list[float]] = {}
        times = interleaved_rounds(
            args.source, args.rounds, workdir, without_fsync=args.without_fsync, baseline_tree=args.baseline_tree,
            readiness=readiness,
        )
        report(times, sum(1 for p in args.source.iterdir() if p.is_file()))
        report_readiness(readiness)
        ok = concurrent_senders(args.source, args.senders, args.slices_per_sender, workdir) if args.senders else True
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
