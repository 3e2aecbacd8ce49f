"""``fpe-node explain``: per series the role or why none, per pipeline ready or what it lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from tests import factory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _bundled_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FPENODE_CONFIG", "FPENODE_INFERENCE__PREFER_PIPELINE", "FPENODE_INFERENCE__CASE_WINDOW_H"):
        monkeypatch.delenv(name, raising=False)


def test_explain_synthetic_ct_study_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory.write_ct_stroke_study(tmp_path, rows=32, thin_slices=36, cta_slices=44)
    assert main(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("'")[1]: line for line in out.splitlines() if line.strip().startswith("#")}
    assert " ncct " in lines["HEAD NCCT 2.5mm STD"]
    assert " cta " in lines["CTA HEAD NECK 2mm"]
    assert "preferred" in lines["HEAD NCCT 5mm"]
    assert "localizer" in lines["Surview"]
    assert "not an image" in lines["Dose Report"]
    assert "MIP" in lines["CTA MIP AX 10mm"]
    assert "reformat" in lines["HEAD CORONAL MPR 5mm"]
    assert "CT: ready (ncct: 'HEAD NCCT 2.5mm STD', cta: 'CTA HEAD NECK 2mm')" in out
    assert "MR: not ready, lacks no dwi series" in out
    assert "Would run: CT pipeline" in out
    assert "STROKE^TEST" not in out and "FPE0000" not in out  # no patient name or ID printed


def test_explain_json_mr_with_computed_adc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory.write_mr_stroke_study(tmp_path, rows=32, n_slices=16, dwi="directional", with_adc=False)
    assert main(["explain", "--json", str(tmp_path)]) == 0
    (patient,) = json.loads(capsys.readouterr().out)
    mr = patient["pipelines"]["MR"]
    assert patient["chosen_pipeline"] == "MR" and mr["ready"]
    assert mr["roles"]["adc"]["derivation"] == "ADC computed from b0 and trace"
    assert any("geometric mean of 3 directions" in w for w in mr["warnings"])
    assert patient["studies"][0]["eligible"] is True


def test_explain_shared_data_says_what_each_pipeline_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--json", str(SHARED)]) == 0
    patients = json.loads(capsys.readouterr().out)
    by_description = {s["description"]: s for p in patients for s in p["series"]}
    assert by_description["STD BRAIN 1MM, iDose"]["role"] == "ncct"
    assert by_description["DWI_dir80_PA_TRACEW"]["role"] == "dwi"
    assert by_description["DWI_dir80_PA_ADC"]["role"] == "adc"
    assert "preferred" in by_description["DWI_dir80_PA"]["reason"]
    assert by_description["ax_asc_35sl"]["role"] is None and by_description["ax_asc_35sl"]["reason"].startswith("not dwi")
    mr_patient = next(p for p in patients if any(s["description"] == "DWI_dir80_PA_TRACEW" for s in p["series"]))
    assert mr_patient["pipelines"]["MR"]["lacking"] == ["no flair series"]
    ct_patient = next(p for p in patients if any(s["description"] == "STD BRAIN 1MM, iDose" for s in p["series"]))
    # the default recipe's CT pipeline has a CTA channel: without a CTA the CT pipeline is not ready
    assert ct_patient["chosen_pipeline"] is None
    assert ct_patient["pipelines"]["CT"]["lacking"] == ["no cta series"]


def test_explain_rules_only_makes_cta_optional(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--rules-only", str(SHARED / "ct_philips_headphantom_1mm")]) == 0
    out = capsys.readouterr().out
    assert "CT: ready (ncct: 'STD BRAIN 1MM, iDose')" in out and "optional roles absent: cta" in out
    assert "Would run: CT pipeline" in out


def test_explain_applies_study_age_only_with_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    factory.write_ct_series(tmp_path, n_slices=20, rows=32, study_date="20260101")
    assert main(["explain", "--now", "2026-03-01T00:00", str(tmp_path)]) == 0
    assert "NOT ELIGIBLE: study is 1406 h old (a prior)" in capsys.readouterr().out


def test_explain_without_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert main(["explain", str(tmp_path)]) == 1
    assert main(["explain", str(tmp_path / "absent")]) == 2
