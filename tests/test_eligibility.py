"""Study eligibility: rules as data, decisions with reasons, priors excluded by age."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from inference.dicom_headers import read_series_headers
from inference.eligibility import EligibilityRules, check_study, load_eligibility_rules
from tests import factory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STUDY_TIME = datetime(2026, 1, 1, 9, 30)


@pytest.fixture(scope="module")
def ct_headers(tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("ct")
    factory.write_ct_stroke_study(folder, thin_slices=6, cta_slices=6, with_reformats=False, with_mips=False)
    return read_series_headers([folder])


def test_bundled_rules_validate() -> None:
    rules = load_eligibility_rules()
    assert "CT" in rules.modalities and rules.max_study_age_h == 24


def test_code_stroke_ct_is_eligible(ct_headers: list) -> None:
    decision = check_study(ct_headers, load_eligibility_rules(), now=STUDY_TIME + timedelta(minutes=10))
    assert decision.eligible, decision.reason


def test_prior_study_is_not_eligible(ct_headers: list) -> None:
    decision = check_study(ct_headers, load_eligibility_rules(), now=STUDY_TIME + timedelta(days=30))
    assert not decision.eligible
    assert "prior" in decision.reason and "720 h" in decision.reason


def test_senders_and_excluded_descriptions(tmp_path: Path, ct_headers: list) -> None:
    rules = load_eligibility_rules().model_copy(update={"senders": ("CTSCANNER",)})
    assert check_study(ct_headers, rules, calling_ae_title="CTSCANNER").eligible
    refused = check_study(ct_headers, rules, calling_ae_title="OTHERPACS")
    assert not refused.eligible and "OTHERPACS" in refused.reason
    factory.write_ct_series(tmp_path, n_slices=3, study_description="CT CHEST WITH CONTRAST", description="AXIAL")
    chest = check_study(read_series_headers([tmp_path]), load_eligibility_rules())
    assert not chest.eligible and "CHEST" in chest.reason


def test_no_image_of_accepted_modality(tmp_path: Path) -> None:
    study = factory.write_ct_stroke_study(tmp_path, thin_slices=3, with_cta=False, with_thick=False, with_reformats=False)
    dose_only = read_series_headers(study.series["dose_report"].paths)
    decision = check_study(dose_only, load_eligibility_rules())
    assert not decision.eligible and "modality" in decision.reason


def test_bad_rules_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("include: ['(unclosed']\nmax_study_age_h: -1\n")
    with pytest.raises(ValidationError) as excinfo:
        load_eligibility_rules(bad)
    text = str(excinfo.value)
    assert "include" in text and "max_study_age_h" in text
    with pytest.raises(ValidationError):
        EligibilityRules.model_validate({"include": ["x"], "unknown_field": 1})


def test_real_philips_head_ct_is_eligible_when_not_dated() -> None:
    headers = read_series_headers([SHARED / "ct_philips_headphantom_1mm"])
    rules = load_eligibility_rules()
    assert check_study(headers, rules).eligible
    # scanned in 2015: arriving today it is a prior
    assert not check_study(headers, rules, now=datetime(2026, 1, 1)).eligible


def test_body_part_qualifies_and_plain_ct_does_not(tmp_path: Path) -> None:
    factory.write_ct_series(tmp_path / "a", n_slices=3, study_description="CT", description="AXIAL 5MM")
    headers = read_series_headers([tmp_path / "a"])
    assert headers[0].body_part == "HEAD"
    rules = load_eligibility_rules()
    assert check_study(headers, rules).eligible  # BodyPartExamined HEAD
    no_body_part = rules.model_copy(update={"body_parts": ()})
    decision = check_study(headers, no_body_part)
    assert not decision.eligible and "names a head/stroke examination" in decision.reason
