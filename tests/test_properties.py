"""Property-based tests (issue 9): whatever order the instances come in, whatever optional
attributes a PACS left out, whatever the patient's name is written in, the node reaches the
outcome of the complete, sorted study, or gives a named reason; it never leaves a study
without an answer.

Hypothesis draws, over the factory's studies (a CT code-stroke study, an MR stroke study, and
a CT study whose NCCT is gantry-tilted with two slice thicknesses):

- an arrival order (a permutation of the study's files);
- a set of type 2 and type 3 attributes to remove from every file (PatientBirthDate,
  PatientSex, StudyID, AccessionNumber, ReferringPhysicianName, SeriesDate, ...:
  :data:`tests.factory.OPTIONAL_ATTRIBUTES`);
- a patient name, ASCII or not, under ISO_IR 100 (Latin-1) or ISO_IR 192 (UTF-8).

Two levels:

- :func:`test_any_order_and_missing_attributes_same_outcome_and_a_valid_sr` runs below the
  network (what the worker does with the files read in the drawn order, then the node's
  report builder) and checks the SR with ``dciodvfy``;
- :func:`test_over_an_association_the_node_answers_every_study` sends the drawn study over a
  real association to the whole node in-process (SCP, completion, an inference worker
  process, delivery to a DCMTK ``storescp``) and checks its answer and the one SR delivered.

Hypothesis runs derandomised, without an example database and with a few examples, so CI is
repeatable and the module stays within about two minutes on two cores.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread

from dicom_node.index.analysis import latest_analysis
from dicom_node.lifecycle import StudyState
from dicom_node.settings import Settings, load_settings
from tests.archives import StorescpArchive, free_port, full_node
from tests.conftest import TEST_PEER, Outcome, direct_outcome, outcome_from_summary
from tests.factory import (
    CTA_TRANSFORM,
    OPTIONAL_ATTRIBUTES,
    Patient,
    rewrite_files,
    write_ct_series,
    write_ct_stroke_study,
    write_mr_stroke_study,
    write_tilted_mixed_thickness_ct,
)
from tests.peers import send_datasets
from tests.training_support import reduced_checkpoint
from tests.validators import dciodvfy_errors

pytestmark = [pytest.mark.xdist_group("properties"), pytest.mark.timeout(600)]

KINDS = ("ct", "mr", "ct_tilted_mixed")
NAMES = (  # (PatientName, SpecificCharacterSet)
    ("STROKE^TEST", "ISO_IR 100"),
    ("MÜLLER^JÜRGEN", "ISO_IR 100"),
    ("DUPRÉ^RENÉE FRANÇOISE", "ISO_IR 100"),
    ("ØSTERGÅRD^SØREN", "ISO_IR 192"),
    ("ŁUKASIEWICZ^ŻANETA", "ISO_IR 192"),
    ("山田^太郎", "ISO_IR 192"),
    ("ΠΑΠΑΔΟΠΟΥΛΟΣ^ΓΙΑΝΝΗΣ", "ISO_IR 192"),
)
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}
FINAL_STATES = {StudyState.DELIVERED, StudyState.PARTLY_DELIVERED, StudyState.DEAD_LETTERED, StudyState.NOT_ELIGIBLE}
# No shrinking: each example costs seconds, and the drawn example is reported as it is.
PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
                         report_multiple_bugs=False,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def write_base_study(kind: str, folder: Path, seed: int) -> list[Path]:
    """A small factory study of ``kind`` acquired minutes ago (patient and study UIDs from ``seed``)."""
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    when = {"study_date": acquired.strftime("%Y%m%d"), "study_time": acquired.strftime("%H%M%S")}
    patient = Patient(name=f"STROKE^PROP{seed}", patient_id=f"PROP{seed:05d}")
    if kind == "mr":
        study = write_mr_stroke_study(folder, patient=patient, rows=32, n_slices=16, seed=seed, **when)
        return study.paths()
    if kind == "ct":
        study = write_ct_stroke_study(folder, patient=patient, rows=32, thin_slices=24, thin_spacing=5.0,
                                      with_thick=False, cta_slices=40, cta_spacing=3.0, with_reformats=False,
                                      with_mips=False, seed=seed, **when)
        return study.paths()
    study_uid = f"2.25.{900000 + seed}"
    ncct = write_tilted_mixed_thickness_ct(folder, patient=patient, study_uid=study_uid, rows=32, seed=seed,
                                           series_number=2, **when)
    cta = write_ct_series(folder, kind="cta", key="cta", patient=patient, study_uid=study_uid, rows=40,
                          fov_mm=220.0, n_slices=40, slice_spacing=3.0, bottom_mm=-90.0,
                          world_from_patient=CTA_TRANSFORM, series_number=5, seed=seed, **when)
    return ncct.paths + cta.paths


class Model:
    """The served model and the base studies: ``bases`` maps a kind to the files of the complete
    study and its outcome (a plain class with a short repr: hypothesis prints it with a failure)."""

    def __init__(self, checkpoint: Path, settings: Settings, predictor: Any,
                 bases: dict[str, tuple[list[Path], Outcome]]) -> None:
        self.checkpoint, self.settings, self.predictor, self.bases = checkpoint, settings, predictor, bases

    def __repr__(self) -> str:
        return f"Model({self.checkpoint.name}, bases={ {k: o.outcome for k, (_, o) in self.bases.items()} })"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The reduced model, and each base study with the outcome of its complete, sorted files."""
    from inference.predictor import Predictor

    root = tmp_path_factory.mktemp("properties")
    checkpoint = reduced_checkpoint(root / "model.pt", name="res25-property-test")
    node_settings = load_settings(environ={}, overrides={"inference": {"checkpoint": str(checkpoint), "device": "cpu"}})
    predictor = Predictor.load(checkpoint, device="cpu", torch_threads=1)
    bases = {}
    for kind in KINDS:
        paths = sorted(write_base_study(kind, root / kind, seed=KINDS.index(kind)))
        bases[kind] = (paths, direct_outcome(paths, node_settings, predictor))
    return Model(checkpoint, node_settings, predictor, bases)


def test_every_base_study_is_analysed(model: Model) -> None:
    """The complete, sorted factory studies are all analysed (else the properties test nothing)."""
    assert {kind: o.outcome for kind, (_, o) in model.bases.items()} == dict.fromkeys(KINDS, "analysed"), model.bases


def _named_reason(outcome: Outcome) -> bool:
    """Not analysed for a reason a user can act on (not a crash hidden behind "internal error")."""
    return (outcome.outcome in ("not_analysed", "not_eligible") and bool(outcome.reason)
            and "internal error" not in (outcome.reason or ""))


def _damaged_copy(paths: Sequence[Path], folder: Path, removed: Sequence[str], name: str, charset: str) -> list[Path]:
    copies = []
    for index, path in enumerate(paths):
        target = folder / f"{index:04d}.dcm"
        shutil.copyfile(path, target)
        copies.append(target)
    rewrite_files(copies, remove=removed, patient_name=name, character_set=charset)
    return copies


def _sources_for_report(result: Any, paths: Sequence[Path]) -> list[Dataset]:
    """The source headers the node's delivery stage copies into the reports (same choice)."""
    from dicom_node.delivery import _wanted_sources

    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    wanted = _wanted_sources(result) or list(by_uid)[:1]
    return [dcmread(by_uid[uid], stop_before_pixels=True) for uid in wanted if uid in by_uid]


study_damage = st.tuples(
    st.sampled_from(KINDS),
    st.lists(st.sampled_from(OPTIONAL_ATTRIBUTES), unique=True, max_size=len(OPTIONAL_ATTRIBUTES)),
    st.sampled_from(NAMES),
    st.randoms(use_true_random=False),
)


@settings(max_examples=12, **PROPERTY_SETTINGS)  # type: ignore[arg-type]
@given(damage=study_damage)
def test_any_order_and_missing_attributes_same_outcome_and_a_valid_sr(
    model: Model, damage: tuple[str, list[str], tuple[str, str], random.Random]
) -> None:
    from dicom_node.delivery import report_builder, report_context
    from reports.uids import UIDFactory

    kind, removed, (name, charset), rng = damage
    base_paths, expected = model.bases[kind]
    with tempfile.TemporaryDirectory(prefix="fpe-prop-") as tmp:
        folder = Path(tmp)
        copies = _damaged_copy(base_paths, folder, removed, name, charset)
        order = list(copies)
        rng.shuffle(order)
        kept: list[Any] = []
        sorted_outcome = direct_outcome(copies, model.settings, model.predictor)
        seen = direct_outcome(order, model.settings, model.predictor, keep=kept)
        assert seen.same_as(sorted_outcome), f"arrival order changed the outcome: {seen} vs {sorted_outcome}"
        assert seen.same_as(expected) or _named_reason(seen), (
            f"without {removed}, named {name!r} ({charset}): {seen}; the complete study: {expected}")
        uids = UIDFactory()
        build = report_builder(model.settings, uids, report_context(model.settings, uids))
        objects = build(kept[0], _sources_for_report(kept[0], copies), (), {})
        sr = next(ds for kind_, ds in objects if kind_ == "sr")
        assert str(sr.PatientName) == name, f"SR patient name {sr.PatientName!r} ({sr.get('SpecificCharacterSet')})"
        sr_path = folder / "sr.dcm"
        sr.save_as(sr_path, enforce_file_format=True)
        assert str(dcmread(sr_path).PatientName) == name
        assert dciodvfy_errors(sr_path) == [], f"SR without {removed}: {dciodvfy_errors(sr_path)}"


# -- over a real association --------------------------------------------------------------------


class RunningNode:
    """The node, its port and archive, and a folder for the drawn studies."""

    def __init__(self, node: Any, port: int, archive: StorescpArchive, root: Path) -> None:
        self.node, self.port, self.archive, self.root = node, port, archive, root

    def __repr__(self) -> str:
        return f"RunningNode(port={self.port})"


@pytest.fixture(scope="module")
def running_node(model: Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node for every drawn study (each has its own patient and Study Instance UID)."""
    root = tmp_path_factory.mktemp("property-node")
    port = free_port()
    with StorescpArchive(root / "archive") as archive:
        overrides = {
            "network": {"ae_title": "FPENODE", "host": "127.0.0.1", "port": port},
            "storage": {"data_dir": str(root / "node"), "fsync": False},
            "completion": {"series_quiet_s": 2.0, "study_timeout_s": 20.0},
            "inference": {"workers": 1, "torch_threads": 1, "device": "cpu", "checkpoint": str(model.checkpoint)},
            "delivery": {"retry_initial_s": 1.0, "scan_interval_s": 0.5},
            "peers": [TEST_PEER, {"name": "archive", "ae_titles": [archive.ae_title], "host": "127.0.0.1",
                                  "port": archive.port, "roles": ["destination"]}],
        }
        with full_node(load_settings(environ={}, overrides=overrides)) as node:
            yield RunningNode(node, port, archive, root)


_STUDY_SEEDS = itertools.count(100)


def _wait_final(node: Any, study_uid: str, timeout_s: float = 60.0) -> StudyState | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = node.lifecycle.state_of(study_uid)
        if state in FINAL_STATES:
            return state
        time.sleep(0.2)
    raise AssertionError(f"study {study_uid} left without an answer: {node.lifecycle.state_of(study_uid)}")


def _srs_of(archive: StorescpArchive, study_uid: str) -> list[Path]:
    return [p for p in archive.received_files()
            if (h := dcmread(p, stop_before_pixels=True)).StudyInstanceUID == study_uid and str(h.SOPClassUID) in SR_CLASSES]


@settings(max_examples=4, **PROPERTY_SETTINGS)  # type: ignore[arg-type]
@given(damage=study_damage)
def test_over_an_association_the_node_answers_every_study(
    model: Model, running_node: RunningNode, damage: tuple[str, list[str], tuple[str, str], random.Random]
) -> None:
    kind, removed, (name, charset), rng = damage
    seed = next(_STUDY_SEEDS)  # a new patient and study for every example (the node keeps them all)
    folder = running_node.root / f"study-{seed}-{kind}"
    paths = write_base_study(kind, folder / "files", seed=seed)
    rewrite_files(paths, remove=removed, patient_name=name, character_set=charset)
    expected = direct_outcome(sorted(paths), model.settings, model.predictor)
    order = list(paths)
    rng.shuffle(order)
    datasets = [dcmread(p) for p in order]
    study_uid = str(datasets[0].StudyInstanceUID)
    statuses = send_datasets(running_node.port, datasets, calling="STORESCU")
    assert statuses == [0] * len(datasets), f"C-STORE statuses without {removed}: {sorted(set(statuses))}"
    state = _wait_final(running_node.node, study_uid)
    with running_node.node.session_factory() as session:
        row = latest_analysis(session, study_uid)
    assert row is not None, f"study ended {state} without an analysis"
    seen = outcome_from_summary(row.outcome, json.loads(row.summary))
    assert seen.same_as(expected) or _named_reason(seen), f"node: {seen}; the complete, sorted study: {expected}"
    assert state is StudyState.DELIVERED or seen.outcome == "not_eligible", state
    if seen.outcome != "not_eligible":
        deadline = time.monotonic() + 30
        while not (srs := _srs_of(running_node.archive, study_uid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(srs) == 1, f"{len(srs)} SRs in the archive for the study"
        assert str(dcmread(srs[0]).PatientName) == name
