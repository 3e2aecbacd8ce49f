"""``fpe-node predict``: DICOM folders and NIfTI volumes to JSON, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dicom_node.cli import main
from inference.model.checkpoint import ModelCard, save_checkpoint
from inference.model.res25 import Res25, Res25Config, seeded_init_
from inference.recipe import DEFAULT_RECIPE
from tests.factory import write_ct_stroke_study, write_mr_stroke_study
from tests.test_registration import phantom_image

GRID = (10, 32, 32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small node-format checkpoint carrying the default recipe on a reduced grid."""
    torch.set_num_threads(1)
    config = Res25Config.reduced(n_slices=GRID[0])
    model = seeded_init_(Res25(config=config), seed=3).eval()
    card = ModelCard(
        name="res25-test", version="1.0", architecture=config, grid=GRID,
        recipe=DEFAULT_RECIPE.with_grid(GRID).to_dict(), threshold=0.4,
    )
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, card)
    return path


def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FPENODE_INFERENCE__DEVICE", "cpu")


def test_predict_dicom_ct_study(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    study = write_ct_stroke_study(tmp_path / "study", rows=48)
    out = tmp_path / "result.json"
    assert main(["predict", str(study.directory), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["analysed"] is True
    assert result["pipeline"] == "CT"
    assert result["series_used"] == {"ncct": study.role("ncct").series_uid, "cta": study.role("cta").series_uid}
    assert 0.0 <= result["score"] <= 1.0
    assert result["probability"] is None and result["calibrated"] is False  # uncalibrated: a score only
    assert result["threshold"] == 0.4
    assert result["positive"] == (result["score"] >= 0.4)
    assert result["model"]["name"] == "res25-test" and result["model"]["demonstration"] is False
    assert set(result["timings_s"]) >= {"load", "decode", "select", "volume", "register", "preprocess", "infer", "attention"}
    assert result["peak"]["sop_instance_uid"] in study.role("ncct").sop_instance_uids
    assert "not for diagnosis" in result["note"]


def test_predict_nifti_mr(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    _env(tmp_path, monkeypatch)
    hu = phantom_image((40, 48, 30), (3.5, 4.0, 5.0), (-70.0, -96.0, -55.0))
    array = sitk.GetArrayFromImage(hu)
    args = []
    for role, brain in {"dwi": 700.0, "adc": 800.0, "flair": 500.0}.items():
        image = sitk.GetImageFromArray(np.where(array == 35.0, brain, np.where(array > 0, brain / 3, 2.0)).astype(np.float32))
        image.CopyInformation(hu)
        path = tmp_path / f"{role}.nii.gz"
        sitk.WriteImage(image, str(path))
        args.append(f"{role}={path}")
    assert main(["predict", "--checkpoint", str(checkpoint), "--nifti", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["analysed"] is True and result["pipeline"] == "MR"
    assert result["series_used"]["dwi"] == "file:dwi.nii.gz"


def test_predict_not_analysed_says_why(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    study = write_mr_stroke_study(tmp_path / "mr", rows=32, with_flair=False)
    out = tmp_path / "result.json"
    assert main(["predict", str(study.directory), "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["analysed"] is False
    assert "flair" in result["reason"].lower()


def test_predict_bad_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(tmp_path, monkeypatch)
    assert main(["predict"]) == 2
    assert main(["predict", "--nifti", "bogus=x.nii"]) == 2
    assert main(["predict", str(tmp_path / "missing")]) == 2
