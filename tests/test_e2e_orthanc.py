"""End to end with a real PACS: Orthanc sends a study to ``fpe-node serve``, results come back.

Orthanc (Debian, own loopback configuration) holds a synthetic CT study and a synthetic MR
study from the factory. The test asks Orthanc's REST API to C-STORE each study to the node
(in-process, with everything ``fpe-node serve`` runs: SCP, completion timers, inference worker
process, delivery); with nobody touching the node, it completes the study, predicts, and sends
the SR and the attention-map captures back to Orthanc (a peer with the source and destination
roles). The
test finds them in the same Orthanc study, validates the SR, and checks that its value is the
one ``fpe-node predict`` gives for the same study files. The MR study is served by the
checkpoint trained on the training issue's synthetic cohort (so the value means something);
the CT study by demonstration weights (no CT cohort is trained in the suite).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset, dcmread

from dicom_node.lifecycle import StudyState
from dicom_node.settings import load_settings
from tests.archives import OrthancArchive, free_port, full_node
from tests.conftest import REPO_ROOT, TEST_PEER
from tests.factory import Study, write_ct_stroke_study, write_mr_stroke_study
from tests.training_support import TrainedModel, trained_checkpoint
from tests.validators import dciodvfy_errors, dsrdump, pixelmed_sr_errors, read_strict

pytestmark = pytest.mark.slow

NODE_AE = "FPENODE"
RESULT_TIMEOUT_S = 180.0
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
VALUE_CODES = {"FPE002": 0.01, "FPE003": 1.0}  # probability in %, uncalibrated score in {score}


def _write_study(kind: str, folder: Path) -> Study:
    """A study acquired a few minutes ago (eligibility turns away older priors)."""
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    when = {"study_date": acquired.strftime("%Y%m%d"), "study_time": acquired.strftime("%H%M%S")}
    if kind == "CT":
        return write_ct_stroke_study(folder, rows=64, thin_slices=40, with_thick=False, with_reformats=False,
                                     with_mips=False, seed=11, **when)
    return write_mr_stroke_study(folder, rows=64, n_slices=24, seed=12, **when)


def _iter_items(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _iter_items(item.get("ContentSequence", []))


def sr_value(sr: Dataset) -> float:
    """The study-level numeric result of the node's SR, as a fraction in [0, 1]."""
    for item in _iter_items(sr.ContentSequence):
        if item.get("ValueType") != "NUM":
            continue
        code = item.ConceptNameCodeSequence[0].CodeValue
        if code in VALUE_CODES:
            return float(item.MeasuredValueSequence[0].NumericValue) * VALUE_CODES[code]
    raise AssertionError("no first-pass-effect value in the SR")


def predicted(study: Study, out: Path, settings_file: Path) -> dict[str, Any]:
    """What ``fpe-node predict`` says for the same study files (its JSON summary)."""
    completed = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(settings_file), "predict", str(study.directory),
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result.get("analysed") is True, result
    return dict(result)


def split_summary(scs: list[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    """The per-slice attention captures and the summary capture(s) (its own series) among ``scs``."""
    summaries = [sc for sc in scs if "summary" in str(sc.get("SeriesDescription", "")).lower()]
    return [sc for sc in scs if sc not in summaries], summaries


def _results_in_orthanc(orthanc: OrthancArchive, study_uid: str) -> tuple[list[Dataset], list[Dataset]]:
    srs, scs = [], []
    for series in orthanc.study_series(study_uid):
        if series["MainDicomTags"].get("Modality") not in ("SR", "OT"):
            continue
        for instance in orthanc.series_instances(series["ID"]):
            dataset = dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
            if getattr(dataset, "Manufacturer", "") != "fpe-node":
                continue
            if str(dataset.SOPClassUID) in SR_CLASSES:
                srs.append(dataset)
            elif str(dataset.SOPClassUID) == SC_CLASS:
                scs.append(dataset)
    return srs, scs


def _wait_for_results(
    orthanc: OrthancArchive, study_uid: str, n_sc: int, log: Callable[[], str], gave_up: Callable[[], bool]
) -> tuple[list[Dataset], list[Dataset]]:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline and not gave_up():
        srs, scs = _results_in_orthanc(orthanc, study_uid)
        if srs and len(scs) >= n_sc:
            return srs, scs
        time.sleep(1.0)
    raise AssertionError(f"no results in Orthanc; study timeline:\n{log()[-4000:]}")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """The MR checkpoint the training issue's phantom cohort trains once per session."""
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture
def orthanc_and_node(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[OrthancArchive, Any, Path]]:
    """Orthanc and the whole node in-process (SCP, completion, workers, delivery), wired together.

    MR runs the checkpoint trained on the synthetic cohort: its results leave the node with
    ``allow_demonstration_results`` off, as at a site. CT has no trained checkpoint (the
    cohort is MR), so it runs demonstration weights and this test node allows sending them.
    """
    checkpoint = None
    if request.node.callspec.params["kind"] == "MR":
        checkpoint = str(request.getfixturevalue("trained_model").checkpoint)
    node_port = free_port()
    orthanc = OrthancArchive(tmp_path / "orthanc", modalities={"fpenode": (NODE_AE, "127.0.0.1", node_port)})
    sections: dict[str, Any] = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port},
        "storage": {"data_dir": str(tmp_path / "node"), "fsync": False},
        "completion": {"series_quiet_s": 1.0, "study_timeout_s": 30.0},
        "inference": {"torch_threads": 1, "workers": 1, "checkpoint": checkpoint},
        "delivery": {"allow_demonstration_results": checkpoint is None, "retry_initial_s": 1.0,
                     "scan_interval_s": 0.5},
        "peers": [
            TEST_PEER,
            {"name": "orthanc", "ae_titles": [orthanc.ae_title], "host": "127.0.0.1", "port": orthanc.dicom_port,
             "roles": ["source", "destination"]},
        ],
    }
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump(sections), encoding="utf-8")
    settings = load_settings(config, environ={})
    try:
        orthanc.start()
        with full_node(settings) as node:
            yield orthanc, node, config
    finally:
        orthanc.stop()


@pytest.mark.parametrize("kind", ["CT", "MR"])
def test_study_from_orthanc_comes_back_with_results(
    kind: str, tmp_path: Path, orthanc_and_node: tuple[OrthancArchive, Any, Path]
) -> None:
    orthanc, node, config = orthanc_and_node
    study = _write_study(kind, tmp_path / f"study_{kind}")
    orthanc.upload(study.paths())
    orthanc.send_study(study.study_uid, "fpenode")
    expected = predicted(study, tmp_path / f"{kind}_predict.json", config)
    n_slices = len(expected["slice_weights"])
    assert expected["model"]["demonstration"] is (kind == "CT")

    ended_without_result = {StudyState.NOT_ELIGIBLE, StudyState.DEAD_LETTERED}
    srs, scs = _wait_for_results(
        orthanc, study.study_uid, n_sc=n_slices + 1, log=lambda: _timeline(node, study.study_uid),
        gave_up=lambda: node.lifecycle.state_of(study.study_uid) in ended_without_result,
    )
    scs, summaries = split_summary(scs)
    assert len(summaries) == 1 and summaries[0].SeriesInstanceUID not in {sc.SeriesInstanceUID for sc in scs}
    assert len(srs) == 1
    sr = srs[0]
    assert sr.StudyInstanceUID == study.study_uid
    assert sr.PatientID == study.patient.patient_id
    assert sr.VerificationFlag == "UNVERIFIED"
    assert all(sc.StudyInstanceUID == study.study_uid and sc.BurnedInAnnotation == "YES" for sc in scs)
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1 and len(scs) == n_slices
    sr_path, sc_path = tmp_path / f"{kind}_sr.dcm", tmp_path / f"{kind}_sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    scs[0].save_as(sc_path, enforce_file_format=True)
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(sc_path) == []
    assert pixelmed_sr_errors(sr_path) == []
    assert "research use" in dsrdump(sr_path).lower()
    assert sr_value(read_strict(sr_path)) == sr_value(sr)

    assert sr_value(sr) == pytest.approx(float(expected["score"]), abs=1.01e-4)
    deadline = time.monotonic() + 30
    while node.lifecycle.state_of(study.study_uid) is not StudyState.DELIVERED and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.lifecycle.state_of(study.study_uid) is StudyState.DELIVERED


def _timeline(node: Any, study_uid: str) -> str:
    from dicom_node.index.models import Study as StudyRow
    from dicom_node.index.models import StudyEvent

    with node.session_factory() as session:
        rows = session.query(StudyEvent).join(StudyRow).filter(StudyRow.study_uid == study_uid).order_by(StudyEvent.id)
        return "\n".join(f"{e.at} {e.state} {e.detail or ''}" for e in rows)
