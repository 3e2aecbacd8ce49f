"""Corpus acceptance test (issue 9): every real series of ``../shared/data`` through a real PACS.

The real series come from different real studies; :func:`assemble_corpus` copies them (never
touching ``../shared``) into studies of their own, with a fake patient each, a fresh Study
Instance UID and dates of a few minutes ago, and adds the series the factory builds on their
geometry so that each study is one a site would send:

========================  ==================================================================
``ct_philips``            real Philips NCCT (head phantom, 1 mm) + a CTA the factory makes from
                          it on another grid and frame of reference
``mr_philips_dti``        real Philips DTI (tilted, isotropic image among the directions) +
                          factory FLAIR on its geometry + a Philips private-class object
                          (examcard, 1.3.46.670589.11.0.0.12.4) a PACS routes with the study
``mr_canon_dti``          real Canon DTI, classic and enhanced copies of one series + FLAIR
``mr_siemens_xa30_enh``   real Siemens XA30 enhanced DWI, ADC and TRACEW + FLAIR
``mr_siemens_xa30i``      real Siemens XA30 classic ADC + TRACEW (tiny pixel values) + FLAIR
``mr_one_image_9_ts``     the Siemens MR image in nine encodings (nothing a pipeline can use)
========================  ==================================================================

The reference outcome of each study is the run on its complete folder (the worker's selection,
volumes and model, no network). Each sender then delivers the whole corpus to a fresh node (the
whole node in-process: SCP, completion, an inference worker process, delivery) that sends its
results to a DCMTK ``storescp`` archive:

- ``orthanc``: the corpus uploaded to Orthanc over REST, then a REST-triggered C-STORE per
  study (Orthanc picks its order);
- ``storescu-reversed`` and ``storescu-shuffled-<seed>``: DCMTK ``storescu`` with every file of
  each study in reversed or shuffled order (the studies one after another, in shuffled order
  for the shuffled senders), one association per run of files that need the same proposal
  (``-R`` plus ``-xs``/``-xv``/... for compressed files; DCMTK ``dcmsend -nuc`` for the private
  class, which ``storescu`` refuses to send).

For every study and sender: the study ends ``analysed``, or ``not_analysed`` with a reason
naming the series or the role it lacks; the archive holds exactly one SR of it; and the outcome
(decision, score, series used, or the reason) is the reference's. ``fpe-node explain`` on each
study folder gives the same verdict as the run (issue 9: explain runs every check the run does).

The model is a seeded reduced res25 (:func:`tests.training_support.reduced_checkpoint`), so the
whole module stays within a few minutes on two cores.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import random
import re
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread

from dicom_node.cli import main
from dicom_node.index.analysis import latest_analysis
from dicom_node.lifecycle import StudyState
from dicom_node.settings import Settings, load_settings
from tests.archives import OrthancArchive, StorescpArchive, free_port, full_node
from tests.conftest import TEST_PEER, Outcome, direct_outcome, outcome_from_summary, require_shared_data
from tests.factory import (
    Patient,
    StudyIdentity,
    _uid,
    copy_into_study,
    write_cta_for,
    write_flair_for,
    write_private_object,
)
from tests.peers import DCMTK
from tests.training_support import reduced_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NODE_AE = "FPENODE"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}
FINAL_STATES = {StudyState.DELIVERED, StudyState.PARTLY_DELIVERED, StudyState.DEAD_LETTERED, StudyState.NOT_ELIGIBLE}
RESULT_TIMEOUT_S = 300.0
SENDERS = ("orthanc", "storescu-reversed", "storescu-shuffled-1", "storescu-shuffled-2")

# storescu proposes one preferred transfer syntax set per run (PS3.8 9.3.2.2); compressed files
# need their own option (DCMTK storescu: -xs JPEG lossless, -xt JPEG-LS lossless, -xv JPEG 2000
# lossless, -xr RLE, -xd deflated). Uncompressed files all go with the default proposal.
_STORESCU_OPTION = {
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


@dataclass
class CorpusStudy:
    """One assembled study: its folder, files and what each series is called."""

    name: str
    study_uid: str
    folder: Path
    paths: list[Path] = field(default_factory=list)
    series: dict[str, str] = field(default_factory=dict)  # SeriesInstanceUID -> description

    def names_a_series(self, reason: str) -> bool:
        """The reason names one of the study's series (UID or description) or the role it lacks."""
        lacking = ("no ncct series", "no cta series", "no dwi series", "no adc series", "no flair series")
        return any(uid in reason for uid in self.series) or any(
            d and d in reason for d in self.series.values()) or any(role in reason for role in lacking)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.md")


def assemble_corpus(root: Path) -> list[CorpusStudy]:
    """Copy every real series into its corpus study and add the factory's series (module docstring)."""
    data = require_shared_data()
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)  # eligibility turns older studies away as priors
    specs: list[tuple[str, list[Path]]] = [
        ("ct_philips", _files(data / "ct_philips_headphantom_1mm")),
        ("mr_philips_dti", _files(data / "mr_philips_achieva_dti_tilted")),
        ("mr_canon_dti", _files(data / "mr_canon_galan_dti" / "classic") + _files(data / "mr_canon_galan_dti" / "enhanced")),
        ("mr_siemens_xa30_enh", _files(data / "mr_siemens_xa30_dwi_enh")),
        ("mr_siemens_xa30i", _files(data / "mr_siemens_xa30i_classic")),
        ("mr_one_image_9_ts", _files(data / "ts_siemens_mr_transfer_syntaxes")),
    ]
    studies = []
    for number, (name, sources) in enumerate(specs, start=1):
        folder = root / name
        identity = StudyIdentity(
            study_uid=str(_uid("corpus", name)),
            patient=Patient(name=f"CORPUS^{name.upper()}", patient_id=f"CORPUS{number:03d}", issuer="CORPUS",
                            birth_date="19480101", sex="O"),
            study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"),
            accession=f"CORP{number:03d}", description=f"{name[:2].upper()} HEAD STROKE (corpus {name})",
        )
        copied = copy_into_study(sources, folder / "real", identity)
        if name == "ct_philips":
            write_cta_for(folder, copied, seed=number)
        elif name.startswith("mr_") and name != "mr_one_image_9_ts":
            dwi = [p for p in copied if "ADC" not in str(dcmread(p, stop_before_pixels=True).ImageType)]
            write_flair_for(folder, dwi, seed=number)
            if name == "mr_philips_dti":
                write_private_object(folder, copied[0])
        study = CorpusStudy(name, identity.study_uid, folder, _files(folder))
        for path in study.paths:
            header = dcmread(path, stop_before_pixels=True)
            assert header.StudyInstanceUID == study.study_uid
            study.series[str(header.SeriesInstanceUID)] = str(header.get("SeriesDescription", ""))
        studies.append(study)
    return studies


# -- the reference: each study's complete folder, run without the network -------------------


@dataclass
class Corpus:
    studies: list[CorpusStudy]
    checkpoint: Path
    config: Path  # a site YAML naming the checkpoint (for ``fpe-node explain``)
    reference: dict[str, Outcome]


def _build_corpus(root: Path) -> None:
    from inference.predictor import Predictor

    checkpoint = reduced_checkpoint(root / "model.pt", name="res25-corpus-test")
    studies = assemble_corpus(root / "studies")
    config = root / "site.yaml"
    config.write_text(yaml.safe_dump({"inference": {"checkpoint": str(checkpoint), "device": "cpu"}}), encoding="utf-8")
    settings = load_settings(config, environ={})
    predictor = Predictor.load(checkpoint, device="cpu", torch_threads=1)
    reference = {s.name: direct_outcome([s.folder], settings, predictor).__dict__ for s in studies}
    manifest = {"studies": [{"name": s.name, "study_uid": s.study_uid, "folder": str(s.folder),
                             "paths": [str(p) for p in s.paths], "series": s.series} for s in studies],
                "reference": reference}
    (root / "corpus.json").write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The assembled corpus, the model and each study's reference outcome: built once per test
    session (under xdist the first worker builds, the others wait on a lock and reuse it)."""
    basetemp = tmp_path_factory.getbasetemp()
    root = (basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp) / "fpe-corpus"
    root.mkdir(exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "corpus.json").exists():
                _build_corpus(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    manifest = json.loads((root / "corpus.json").read_text(encoding="utf-8"))
    studies = [CorpusStudy(s["name"], s["study_uid"], Path(s["folder"]), [Path(p) for p in s["paths"]], s["series"])
               for s in manifest["studies"]]
    reference = {name: Outcome(**{**values, "series_used": tuple(tuple(pair) for pair in values["series_used"])})
                 for name, values in manifest["reference"].items()}
    return Corpus(studies, root / "model.pt", root / "site.yaml", reference)


def _assert_answered(study: CorpusStudy, outcome: Outcome, who: str) -> None:
    assert outcome.outcome in ("analysed", "not_analysed"), f"{who}: {study.name} ended {outcome}"
    if outcome.outcome == "not_analysed":
        assert outcome.reason and study.names_a_series(outcome.reason), (
            f"{who}: {study.name} not analysed, reason names no series: {outcome.reason!r}")
    else:
        assert outcome.score is not None and outcome.positive is not None and outcome.series_used


@pytest.mark.xdist_group("corpus-0")
def test_corpus_reference_every_study_is_answered(corpus: Corpus) -> None:
    """Run on the complete folders, each study is analysed or not analysed for a named reason."""
    for study in corpus.studies:
        _assert_answered(study, corpus.reference[study.name], "direct run")
    # The corpus is worth running only if studies of both pipelines are analysed.
    analysed = {corpus.reference[s.name].pipeline for s in corpus.studies if corpus.reference[s.name].outcome == "analysed"}
    assert analysed == {"CT", "MR"}, {s.name: corpus.reference[s.name] for s in corpus.studies}


@pytest.mark.xdist_group("corpus-0")
def test_explain_verdict_is_the_run_verdict(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    """``fpe-node explain`` runs every check the run does: ready exactly when the run analyses,
    with the series the run used; not ready naming what the run's reason names."""
    disagreements = []
    for study in corpus.studies:
        assert main(["--config", str(corpus.config), "explain", "--json", str(study.folder)]) == 0
        (patient,) = json.loads(capsys.readouterr().out)
        run = corpus.reference[study.name]
        chosen = patient["chosen_pipeline"]
        if run.outcome == "analysed":
            plan = patient["pipelines"].get(chosen or "", {})
            used = tuple(sorted((role, choice["series_uid"]) for role, choice in plan.get("roles", {}).items()))
            if chosen != run.pipeline or not set(run.series_used) <= set(used):
                disagreements.append(f"{study.name}: run analysed with {run.pipeline} {run.series_used}, "
                                     f"explain chose {chosen} {used}")
        elif chosen is not None:
            disagreements.append(f"{study.name}: explain says {chosen} ready, the run says {run.reason!r}")
        else:
            lacking = [item for plan in patient["pipelines"].values() for item in plan["lacking"]]
            if not lacking or not all(item in (run.reason or "") for item in lacking):
                disagreements.append(f"{study.name}: explain lacks {lacking}, the run says {run.reason!r}")
    assert not disagreements, "\n".join(disagreements)


# -- the senders --------------------------------------------------------------------------------


def _storescu_runs(paths: Sequence[Path]) -> list[tuple[str, list[str], list[Path]]]:
    """Consecutive files grouped by the DCMTK tool and options they need: storescu ``-R`` plus the
    option for a compressed transfer syntax; DCMTK's ``dcmsend -nuc`` for SOP classes outside the
    standard (storescu refuses them: "unknown storage SOP class")."""
    runs: list[tuple[str, list[str], list[Path]]] = []
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        syntax = str(header.file_meta.TransferSyntaxUID)
        if not str(header.SOPClassUID).startswith("1.2.840.10008."):
            tool, option = "dcmsend", ["-nuc", "-v"]
        else:
            tool, option = "storescu", ["-R"] + ([_STORESCU_OPTION[syntax]] if syntax in _STORESCU_OPTION else [])
        if runs and runs[-1][:2] == (tool, option):
            runs[-1][2].append(path)
        else:
            runs.append((tool, option, [path]))
    return runs


def send_with_storescu(port: int, paths: Sequence[Path]) -> list[str]:
    """DCMTK storescu (dcmsend for private classes), the files in exactly this order, one
    association per run; what failed (a run that fails is reported and the next runs still go,
    so the outcome of every study can be seen)."""
    dcmtk = DCMTK()
    failures = []
    for tool, option, files in _storescu_runs(paths):
        if tool == "storescu":
            completed = dcmtk.storescu(port, files, extra=option, timeout_s=600)
        else:
            completed = dcmtk.run("dcmsend", [*option, "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", str(port),
                                              *map(str, files)], timeout_s=600)
        output = completed.stdout + completed.stderr
        refused = re.search(r"NOT sent to the peer\s*:\s*[1-9]", output)
        if completed.returncode != 0 or "Store Failed" in output or refused:
            errors = [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
            failures.append(f"{tool} {' '.join(option)} ({len(files)} files from {files[0].parent.name}/{files[0].name}) "
                            f"failed: {' | '.join(errors[:4])}")
    return failures


def _order(studies: Sequence[CorpusStudy], sender: str) -> list[Path]:
    """Every file of the corpus, study after study as a PACS sends them: each study's files
    reversed, or shuffled (the studies in a shuffled order too) with the sender's seed."""
    if sender == "storescu-reversed":
        return [p for s in studies for p in s.paths[::-1]]
    rng = random.Random(int(sender.rsplit("-", 1)[1]))
    shuffled = list(studies)
    rng.shuffle(shuffled)
    paths = []
    for study in shuffled:
        files = list(study.paths)
        rng.shuffle(files)
        paths += files
    return paths


def _node_settings(tmp_path: Path, corpus: Corpus, port: int, archive: StorescpArchive, orthanc_ae: str) -> Settings:
    sections: dict[str, Any] = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(tmp_path / "node"), "fsync": False},
        "completion": {"series_quiet_s": 8.0, "study_timeout_s": 30.0},  # a site's quiet period
        "inference": {"workers": 1, "torch_threads": 1, "device": "cpu", "checkpoint": str(corpus.checkpoint)},
        "delivery": {"retry_initial_s": 1.0, "scan_interval_s": 0.5},
        "peers": [
            TEST_PEER,
            {"name": "orthanc", "ae_titles": [orthanc_ae], "host": "127.0.0.1", "roles": ["source"]},
            {"name": "archive", "ae_titles": [archive.ae_title], "host": "127.0.0.1", "port": archive.port,
             "roles": ["destination"]},
        ],
    }
    return load_settings(environ={}, overrides=sections)


def _wait_final(node: Any, studies: Sequence[CorpusStudy], timeout_s: float = RESULT_TIMEOUT_S) -> dict[str, StudyState | None]:
    """Wait until every study reached a final state (delivered, ...); the states seen."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, StudyState | None] = {}
    while time.monotonic() < deadline:
        states = {s.name: node.lifecycle.state_of(s.study_uid) for s in studies}
        if all(state in FINAL_STATES for state in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"studies without a final state after {timeout_s} s: {states}")


def _srs_in_archive(archive: StorescpArchive) -> dict[str, set[str]]:
    """SR SOP Instance UIDs the archive holds, by Study Instance UID."""
    found: dict[str, set[str]] = {}
    for path in archive.received_files():
        header = dcmread(path, stop_before_pixels=True)
        if str(header.SOPClassUID) in SR_CLASSES:
            found.setdefault(str(header.StudyInstanceUID), set()).add(str(header.SOPInstanceUID))
    return found


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[StorescpArchive]:
    with StorescpArchive(tmp_path / "archive") as running:
        yield running


@pytest.mark.parametrize(
    "sender", [pytest.param(sender, marks=pytest.mark.xdist_group(f"corpus-{i % 2}")) for i, sender in enumerate(SENDERS)]
)
def test_corpus_through_a_pacs_same_outcome_in_every_order(
    sender: str, corpus: Corpus, tmp_path: Path, archive: StorescpArchive
) -> None:
    port = free_port()
    failures: list[str] = []
    orthanc = OrthancArchive(tmp_path / "orthanc", modalities={"fpenode": (NODE_AE, "127.0.0.1", port)})
    settings = _node_settings(tmp_path, corpus, port, archive, orthanc.ae_title)
    try:
        if sender == "orthanc":
            orthanc.start()
            for study in corpus.studies:
                orthanc.upload(study.paths)
        with full_node(settings) as node:
            if sender == "orthanc":
                for study in corpus.studies:
                    try:
                        orthanc.send_study(study.study_uid, "fpenode", timeout_s=600)
                    except urllib.error.HTTPError as exc:  # the store job failed: an instance was refused
                        failures.append(f"Orthanc could not send {study.name}: HTTP {exc.code} {exc.read()[:300]!r}")
            else:
                failures = send_with_storescu(port, _order(corpus.studies, sender))
            states = _wait_final(node, corpus.studies)
            with node.session_factory() as session:
                rows = {s.name: latest_analysis(session, s.study_uid) for s in corpus.studies}
    finally:
        orthanc.stop()
    srs = _srs_in_archive(archive)
    problems = list(failures)
    table = []
    for study in corpus.studies:
        row = rows[study.name]
        assert row is not None, f"{sender}: {study.name} was never analysed (state {states[study.name]})"
        seen = outcome_from_summary(row.outcome, json.loads(row.summary))
        expected = corpus.reference[study.name]
        table.append(f"{study.name:<22} {states[study.name]!s:<16} {seen.outcome:<13} "
                     f"{seen.pipeline or '-':<3} {seen.score if seen.score is not None else '-'} {seen.reason or ''}")
        try:
            _assert_answered(study, seen, sender)
        except AssertionError as exc:
            problems.append(str(exc))
        if not seen.same_as(expected):
            problems.append(f"{study.name}: {sender} gives {seen}, the complete study gives {expected}")
        if states[study.name] is not StudyState.DELIVERED:
            problems.append(f"{study.name}: ended {states[study.name]}, not delivered")
        n_sr = len(srs.get(study.study_uid, ()))
        if n_sr != 1:
            problems.append(f"{study.name}: the archive holds {n_sr} SRs of it, not one")
    print("\n".join(table))
    assert not problems, "\n".join(problems + ["", *table])
