"""Serving precision: bf16 on CPUs with native bf16 only when the card's bf16 check changed no decision.

The model is the suite's trained phantom checkpoint (:mod:`tests.training_support`); its bf16
check is made by ``fpe-node evaluate --record-bf16`` on the phantom cohort, exactly as a
researcher records it. Expected precisions are computed from
:func:`inference.model.precision.cpu_has_native_bf16`, so the tests hold on any CPU; the
capability is replaced only to see a CPU without native bf16 refuse a forced bf16.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.dataset import Dataset

from inference.case import nifti_case
from inference.model.checkpoint import CheckpointError, ModelCard, load_checkpoint, read_payload, record_bf16_check
from inference.model.precision import (
    NATIVE_BF16_FLAGS,
    Bf16Check,
    PrecisionSettingError,
    cpu_flags,
    cpu_has_native_bf16,
    serving_precision,
)
from inference.model.runtime import run
from inference.predictor import Predictor, result_summary
from inference.result import Prediction
from inference.training.manifest import load_manifest
from reports.sr import ReportContext, build_sr
from reports.uids import UIDFactory
from tests import factory
from tests.studyindex import Index, add_study, index  # noqa: F401 - the index fixture
from tests.training_support import TrainedModel, trained_checkpoint
from tests.validators import fake_prediction, read_strict, sorted_by_position

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UIDS = UIDFactory(None)
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"), device_name="FPENODE")


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def checked(trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained checkpoint whose card holds the bf16 check of ``fpe-node evaluate --record-bf16``."""
    from dicom_node.cli import main

    folder = tmp_path_factory.mktemp("checked")
    checkpoint = folder / "fold0.pt"
    shutil.copyfile(trained_model.checkpoint, checkpoint)
    code = main(["evaluate", str(checkpoint), str(trained_model.manifest), "--out", str(folder / "report"),
                 "--bootstrap", "50", "--cache", str(trained_model.cache_dir), "--record-bf16"])
    assert code == 0
    return checkpoint


@pytest.fixture(scope="module")
def first_case(trained_model: TrainedModel) -> object:
    return nifti_case(load_manifest(trained_model.manifest)[0].series)


def expected_auto() -> str:
    return "bf16" if cpu_has_native_bf16() else "fp32"


def test_native_bf16_follows_torch_and_the_cpu_flags() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu_has_native_bf16() == (capability.startswith("AVX512") and bool(NATIVE_BF16_FLAGS & cpu_flags()))
    assert cpu_flags(Path("/nonexistent/cpuinfo")) == frozenset()


def test_evaluate_records_the_check_and_keeps_the_weights(trained_model: TrainedModel, checked: Path) -> None:
    original = load_checkpoint(trained_model.checkpoint).card
    card = load_checkpoint(checked).card
    assert original.bf16_check is None  # a checkpoint never checked
    check = card.bf16_check
    assert check is not None
    report = json.loads((checked.parent / "report" / "report.json").read_text())
    assert report["bf16_vs_fp32"] == check.to_dict()
    assert check.cases == report["cases"]["n"] == 40
    assert check.decisions_changed == 0 and check.max_abs_score_difference < 0.01
    assert check.weights_sha256 == card.weights_sha256 == original.weights_sha256
    assert check.threshold == card.threshold and check.torch_version == torch.__version__
    assert replace(card, bf16_check=None) == original


def test_auto_serves_bf16_on_native_bf16_when_no_decision_changed(checked: Path, first_case: object,
                                                                   tmp_path: Path) -> None:
    predictor = Predictor.load(checked, device="cpu", precision="auto")
    assert predictor.precision == expected_auto()
    prediction = predictor.predict(first_case)  # type: ignore[arg-type]
    assert isinstance(prediction, Prediction)
    assert prediction.model.precision == expected_auto()
    assert result_summary(prediction)["model"]["precision"] == expected_auto()  # type: ignore[index]
    assert f"precision={expected_auto()}" in _sr_algorithm_parameters(prediction, tmp_path)


def test_bf16_and_fp32_scores_of_a_case_are_close(checked: Path, first_case: object) -> None:
    predictor = Predictor.load(checked, device="cpu", precision="fp32")
    volume = torch.from_numpy(predictor.preprocess(first_case).tensor).unsqueeze(0)  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    scores = {precision: predictor.card.calibration.apply(float(run(predictor.model, volume, cpu, precision).logits[0, 0]))
              for precision in ("fp32", "bf16")}  # bf16 autocast runs on any CPU (emulated without native bf16)
    assert abs(scores["bf16"] - scores["fp32"]) < 0.01
    assert (scores["bf16"] >= predictor.card.threshold) == (scores["fp32"] >= predictor.card.threshold)
    served = Predictor.load(checked, device="cpu", precision="auto").predict(first_case)  # type: ignore[arg-type]
    assert isinstance(served, Prediction)
    assert served.score == pytest.approx(scores[expected_auto()], abs=1e-6)


def test_without_a_check_auto_serves_fp32(trained_model: TrainedModel) -> None:
    predictor = Predictor.load(trained_model.checkpoint, device="cpu", precision="auto")
    assert predictor.precision == "fp32" and predictor.model_info.precision == "fp32"
    assert Predictor.load(None, device="cpu").precision == "fp32"  # demonstration weights: no check


def test_fp32_setting_forces_fp32(checked: Path) -> None:
    predictor = Predictor.load(checked, device="cpu", precision="fp32")
    assert predictor.precision == "fp32" and predictor.model_info.precision == "fp32"


def test_a_check_with_changed_decisions_or_other_weights_keeps_fp32(checked: Path) -> None:
    loaded = load_checkpoint(checked)
    check = loaded.card.bf16_check
    assert check is not None
    flipped = replace(check, decisions_changed=1)
    other_weights = replace(check, weights_sha256="0" * 64)
    other_threshold = replace(check, threshold=min(1.0, check.threshold + 0.01))
    for record in (flipped, other_weights, other_threshold):
        predictor = Predictor(replace(loaded, card=replace(loaded.card, bf16_check=record)), device="cpu")
        assert predictor.precision == "fp32"
    with pytest.raises(CheckpointError, match="other weights|bf16 check was made for weights"):
        record_bf16_check(checked, other_weights)
    assert load_checkpoint(checked).card.bf16_check == check  # the refused record left the file as it was


def test_forced_bf16_without_native_bf16_is_refused_naming_the_setting(checked: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inference.model.precision.cpu_has_native_bf16", lambda: False)
    with pytest.raises(PrecisionSettingError, match=r"inference\.precision"):
        Predictor.load(checked, device="cpu", precision="bf16")
    assert Predictor.load(checked, device="cpu", precision="auto").precision == "fp32"


def test_forced_bf16_on_native_bf16_serves_bf16(trained_model: TrainedModel) -> None:
    if cpu_has_native_bf16():
        assert Predictor.load(trained_model.checkpoint, device="cpu", precision="bf16").precision == "bf16"
    else:
        with pytest.raises(PrecisionSettingError, match=r"inference\.precision"):
            Predictor.load(trained_model.checkpoint, device="cpu", precision="bf16")


def test_cards_without_the_record_still_load(checked: Path) -> None:
    values = dict(read_payload(checked)["card"])
    assert values["bf16_check"] is not None
    old = {key: value for key, value in values.items() if key != "bf16_check"}
    assert ModelCard.from_dict(old).bf16_check is None
    assert ModelCard.from_dict(values).bf16_check == Bf16Check.from_dict(values["bf16_check"])
    with pytest.raises(ValueError, match="decisions_changed"):
        Bf16Check.from_dict({**values["bf16_check"], "decisions_changed": values["bf16_check"]["cases"] + 1})


def test_a_bad_precision_setting_names_the_field(make_settings: object) -> None:
    from dicom_node.settings import SettingsError

    with pytest.raises(SettingsError, match=r"inference\.precision"):
        make_settings(inference={"precision": "fp16"})  # type: ignore[operator]


def test_ensemble_card_carries_its_own_check(trained_model: TrainedModel, tmp_path: Path) -> None:
    from inference.training.evaluate import evaluate_manifest

    ensemble = tmp_path / "ensemble.pt"
    shutil.copyfile(trained_model.ensemble, ensemble)
    evaluation = evaluate_manifest(ensemble, trained_model.manifest, tmp_path / "eval", cache_dir=trained_model.cache_dir,
                                   n_resamples=20, record_bf16=True)
    served = load_checkpoint(ensemble)
    assert served.card.bf16_check == evaluation.bf16_check
    assert served.card.weights_sha256 == load_checkpoint(trained_model.ensemble).card.weights_sha256
    check = evaluation.bf16_check
    assert check is not None and check.cases == 40
    expected = "bf16" if cpu_has_native_bf16() and check.decisions_changed == 0 else "fp32"
    assert Predictor(served, device="cpu").precision == expected


@pytest.mark.parametrize("index", ["sqlite"], indirect=True)
def test_the_analysis_row_and_the_study_detail_name_the_precision(index: Index, checked: Path,
                                                                  first_case: object) -> None:
    from dicom_node.index.analysis import record_analysis
    from dicom_node.index.db import write_session
    from dicom_node.web.queries import study_detail

    prediction = Predictor.load(checked, device="cpu").predict(first_case)  # type: ignore[arg-type]
    study_uid = UIDS.for_name("precision-study")
    study_pk = add_study(index.sessions, study_uid)
    with write_session(index.sessions) as session:
        row = record_analysis(session, study_pk, "analysed", result_summary(prediction))
        assert json.loads(row.summary)["model"]["precision"] == expected_auto()
    with index.sessions() as session:
        detail = study_detail(session, study_uid)
    assert detail is not None and [run.precision for run in detail.analyses] == [expected_auto()]


def _sr_algorithm_parameters(prediction: Prediction, folder: Path) -> list[str]:
    """The TID 4019 Algorithm Parameters of the SR built for ``prediction``, read back strictly."""
    series = factory.write_ct_series(folder / "ct", n_slices=10, rows=64)
    sources: list[Dataset] = sorted_by_position([pydicom.dcmread(p) for p in series.paths])
    sr = build_sr(fake_prediction(sources, score=prediction.score, model=prediction.model), sources, UIDS, CONTEXT)
    path = folder / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    parameters = []
    stack = list(read_strict(path).ContentSequence)
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        code = item.ConceptNameCodeSequence[0]
        if (code.CodeValue, code.CodingSchemeDesignator) == ("111002", "DCM"):  # Algorithm Parameters, TID 4019
            parameters.append(str(item.TextValue))
    return parameters


def test_cuda_serves_the_precision_the_card_was_validated_in(trained_model: TrainedModel) -> None:
    card = load_checkpoint(trained_model.checkpoint).card
    cuda = torch.device("cuda")  # the rule only: no CUDA device is needed to decide
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert serving_precision("auto", replace(card, precision="fp16"), cuda).precision == "fp16"
    assert serving_precision("auto", replace(card, precision="bf16"), cuda).precision == ("bf16" if cuda_bf16 else "fp32")
    assert serving_precision("fp32", replace(card, precision="bf16"), cuda).precision == "fp32"
    if not cuda_bf16:
        with pytest.raises(PrecisionSettingError, match=r"inference\.precision"):
            serving_precision("bf16", card, cuda)
