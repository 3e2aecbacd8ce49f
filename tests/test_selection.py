"""Series selection: roles, exclusions with reasons, DWI plans, cases across studies, re-runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from inference.dicom_headers import SeriesHeader, read_series_headers
from inference.selection import (
    Selector,
    SelectionRules,
    classify,
    load_selection_rules,
    would_change_selection,
)
from tests import factory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL = {"rows": 32}


def _by_description(headers: list[SeriesHeader]) -> dict[str, SeriesHeader]:
    return {h.series_description: h for h in headers}


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[factory.Study, list[SeriesHeader]]:
    folder = tmp_path_factory.mktemp("ct")
    study = factory.write_ct_stroke_study(folder, thin_slices=30, cta_slices=40, **SMALL)
    return study, read_series_headers([folder])


def test_ct_study_roles_and_exclusions(ct_study: tuple[factory.Study, list[SeriesHeader]]) -> None:
    study, headers = ct_study
    explanation = Selector().explain(headers)
    decisions = {d.series_uid: d for d in explanation.series}
    assert decisions[study.series["ncct_thin"].series_uid].role == "ncct"
    assert decisions[study.series["cta"].series_uid].role == "cta"
    thick = decisions[study.series["ncct_thick"].series_uid]
    assert thick.role is None and "preferred" in thick.reason and "ncct" in thick.candidate_roles
    assert "localizer" in decisions[study.series["localizer"].series_uid].reason
    assert "not an image" in decisions[study.series["dose_report"].series_uid].reason
    assert "MIP" in decisions[study.series["cta_mip"].series_uid].reason
    assert "reformat" in decisions[study.series["ncct_coronal"].series_uid].reason
    assert "reformat" in decisions[study.series["ncct_sagittal"].series_uid].reason
    ct = explanation.pipelines["CT"]
    assert ct.ready and explanation.chosen == "CT"
    assert ct.series_used == {"ncct": study.series["ncct_thin"].series_uid, "cta": study.series["cta"].series_uid}
    assert ct.primary_study_uid == study.study_uid
    assert explanation.pipelines["MR"].lacking == ("no dwi series",)


@pytest.mark.parametrize("dwi", ["public", "ge", "siemens", "philips"])
def test_mr_b_values_from_public_and_private_tags(tmp_path: Path, dwi: str) -> None:
    study = factory.write_mr_stroke_study(tmp_path, dwi=dwi, n_slices=16, **SMALL)
    explanation = Selector().explain(read_series_headers([tmp_path]))
    mr = explanation.pipelines["MR"]
    assert mr.ready and explanation.chosen == "MR", mr.lacking
    assert mr.roles["dwi"].series_uid == study.series["dwi"].series_uid
    assert mr.roles["dwi"].b_value == 1000.0
    assert "several b-values" in mr.roles["dwi"].derivation  # b0 and b1000 split
    assert mr.roles["adc"].series_uid == study.series["adc"].series_uid
    assert mr.roles["flair"].series_uid == study.series["flair"].series_uid


def test_directional_dwi_without_adc_plans_trace_and_adc(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path, dwi="directional", with_adc=False, n_slices=16, **SMALL)
    mr = Selector().explain(read_series_headers([tmp_path])).pipelines["MR"]
    assert mr.ready
    assert "geometric mean of 3 directions" in mr.roles["dwi"].derivation
    assert mr.roles["adc"].derived_from == "dwi" and mr.roles["adc"].series_uid == study.series["dwi"].series_uid
    assert any("ADC computed from b0 and trace" in w for w in mr.warnings)


def test_trace_only_without_adc_lacks_adc_and_enhanced_mr_selects(tmp_path: Path) -> None:
    factory.write_mr_stroke_study(tmp_path / "a", dwi="trace", with_adc=False, n_slices=16, **SMALL)
    mr = Selector().explain(read_series_headers([tmp_path / "a"])).pipelines["MR"]
    assert not mr.ready and mr.lacking == ("no adc series",)
    study = factory.write_mr_stroke_study(tmp_path / "b", enhanced=True, with_flair=False, n_slices=16, **SMALL)
    mr = Selector().explain(read_series_headers([tmp_path / "b"])).pipelines["MR"]
    assert mr.roles["dwi"].series_uid == study.series["dwi"].series_uid and mr.lacking == ("no flair series",)


def test_gantry_tilt_is_axial_but_40_degrees_is_not(tmp_path: Path) -> None:
    tilted = factory.write_tilted_ct(tmp_path, tilt_deg=25.0, n_slices=20, **SMALL)
    steep = factory.write_tilted_ct(tmp_path, tilt_deg=40.0, n_slices=20, key="steep", **SMALL)
    headers = {h.series_uid: h for h in read_series_headers([tmp_path])}
    rules = load_selection_rules()
    assert "ncct" in classify(headers[tilted.series_uid], rules).candidate_roles
    failures = classify(headers[steep.series_uid], rules).role_failures["ncct"]
    assert any("not axial" in f for f in failures)


def test_truncated_series_is_not_a_candidate(tmp_path: Path) -> None:
    truncated = factory.write_ct_truncated(tmp_path, **SMALL)
    explanation = Selector().explain(read_series_headers([tmp_path]))
    (decision,) = [d for d in explanation.series if d.series_uid == truncated.series_uid]
    assert decision.role is None and "covers 35 mm" in decision.reason


def test_perfusion_and_ai_results_are_never_chosen(tmp_path: Path) -> None:
    perfusion = factory.write_perfusion_ct(tmp_path, **SMALL)
    ai = factory.write_ct_series(tmp_path, key="ai", description="RAPID ASPECTS", n_slices=20, **SMALL)
    study = factory.Study(ai.study_uid, factory.default_patient(0), tmp_path, {"ai": ai})
    screenshot = factory.write_ai_result_sc(tmp_path, study)
    decisions = {d.series_uid: d for d in Selector().explain(read_series_headers([tmp_path])).series}
    assert decisions[perfusion.series_uid].reason == "perfusion series"
    assert decisions[ai.series_uid].reason.startswith("AI or post-processing result")
    assert decisions[screenshot.series_uid].reason == "AI or post-processing result (secondary capture)"


def test_case_across_two_studies_of_one_patient(tmp_path: Path) -> None:
    ncct, cta = factory.write_split_ct_studies(tmp_path, with_reformats=False, thin_slices=30, **SMALL)
    headers = read_series_headers([tmp_path])
    ct = Selector().explain(headers).pipelines["CT"]
    assert ct.ready and ct.primary_study_uid == ncct.study_uid
    assert ct.roles["cta"].study_uid == cta.study_uid
    assert "cta taken from another study of the same patient" in ct.warnings
    # a window shorter than the 30 minutes between the studies keeps the CTA out
    narrow = Selector(case_window_h=0.25).explain(headers).pipelines["CT"]
    assert narrow.ready and "cta" not in narrow.roles and narrow.absent_optional == ("cta",)


def test_other_patient_is_not_mixed_in(tmp_path: Path) -> None:
    factory.write_ct_stroke_study(tmp_path / "a", with_cta=False, with_reformats=False, thin_slices=30, seed=1, **SMALL)
    factory.write_ct_series(tmp_path / "b", kind="cta", n_slices=40, slice_spacing=2.0, seed=2, **SMALL)
    explanations = Selector().explain_all(read_series_headers([tmp_path]))
    assert len(explanations) == 2
    assert all("cta" not in e.pipelines["CT"].roles or "ncct" not in e.pipelines["CT"].roles for e in explanations)


def test_would_change_selection_only_for_a_better_series(tmp_path: Path) -> None:
    selector = Selector()
    thick = factory.write_ct_series(tmp_path, key="thick", n_slices=20, slice_spacing=5.0, series_number=3, **SMALL)
    old = selector.select(read_series_headers([tmp_path / "thick"]))
    assert old is not None and old.roles["ncct"].series_uid == thick.series_uid
    # a localizer or an equal series arriving later changes nothing
    factory.write_ct_series(tmp_path, key="again", n_slices=20, slice_spacing=5.0, series_number=4,
                            study_time="093500", **SMALL)
    study_uid = thick.study_uid
    same = selector.select(read_series_headers([tmp_path]))
    assert same is not None
    assert same.roles["ncct"].series_uid == thick.series_uid and not would_change_selection(old, same)
    # a thinner NCCT does
    factory.write_ct_series(tmp_path, key="thin", n_slices=40, slice_spacing=2.5, series_number=2, **SMALL)
    better = selector.select(read_series_headers([tmp_path]))
    assert better is not None and better.roles["ncct"].series_uid != thick.series_uid
    assert would_change_selection(old, better)
    # so does an optional CTA that was missing
    factory.write_ct_series(tmp_path, key="cta", kind="cta", n_slices=40, slice_spacing=2.0, **SMALL)
    with_cta = selector.select(read_series_headers([tmp_path]))
    assert with_cta is not None and with_cta.primary_study_uid == study_uid
    assert would_change_selection(better, with_cta)
    assert not would_change_selection(with_cta, with_cta)
    assert not would_change_selection(with_cta, None)


def test_could_use_and_pipeline_ready(ct_study: tuple[factory.Study, list[SeriesHeader]]) -> None:
    study, headers = ct_study
    selector = Selector()
    by_uid = {h.series_uid: h for h in headers}
    assert selector.could_use(by_uid[study.series["ncct_thin"].series_uid])
    assert not selector.could_use(by_uid[study.series["localizer"].series_uid])
    assert not selector.could_use(by_uid[study.series["dose_report"].series_uid])
    # the first instance of a series is enough to say it could be used
    first_only = read_series_headers(study.series["cta"].paths[:1])
    assert selector.could_use(first_only[0])
    assert selector.pipeline_ready(headers)
    assert not selector.pipeline_ready([by_uid[study.series["cta"].series_uid]])


def test_pipeline_preference(ct_study: tuple[factory.Study, list[SeriesHeader]], tmp_path: Path) -> None:
    factory.write_mr_stroke_study(tmp_path / "mr", n_slices=16, with_adc=False, dwi="directional", **SMALL)
    headers = ct_study[1] + read_series_headers([tmp_path])
    assert Selector().explain(headers).chosen == "MR"
    assert Selector(prefer_pipeline="CT").explain(headers).chosen == "CT"


def test_recipe_required_roles_override_the_rules(ct_study: tuple[factory.Study, list[SeriesHeader]]) -> None:
    study, headers = ct_study
    without_cta = [h for h in headers if h.series_uid != study.series["cta"].series_uid]
    assert Selector().pipeline_ready(without_cta)  # rules file: CTA optional
    strict = Selector(required_roles={"CT": ("ncct", "cta")})
    plan = strict.explain(without_cta).pipelines["CT"]
    assert not plan.ready and plan.lacking == ("no cta series",)
    assert strict.pipeline_ready(headers)
    with pytest.raises(ValidationError):
        Selector(required_roles={"CT": ("cta",)})  # the primary role cannot be left out


def test_rules_are_validated() -> None:
    data = load_selection_rules().model_dump()
    data["pipelines"]["CT"]["required"] = ["ncct", "dwi"]
    with pytest.raises(ValidationError, match="belongs to pipeline MR"):
        SelectionRules.model_validate(data)
    data = load_selection_rules().model_dump()
    data["roles"]["flair"]["description_any"] = ["(flair"]
    with pytest.raises(ValidationError, match="bad regular expression"):
        SelectionRules.model_validate(data)
    data = load_selection_rules().model_dump()
    data["never"] = [*data["never"], {"reason": "empty"}]
    with pytest.raises(ValidationError, match="names no criterion"):
        SelectionRules.model_validate(data)


def test_real_data_roles_and_what_pipelines_lack() -> None:
    explanations = Selector().explain_all(read_series_headers([SHARED]))
    roles = {d.description: d.role for e in explanations for d in e.series}
    assert roles["STD BRAIN 1MM, iDose"] == "ncct"
    assert roles["DWI_dir80_PA_TRACEW"] == "dwi"
    assert roles["DWI_dir80_PA_ADC"] == "adc"
    assert roles["DWI_dir80_PA"] is None  # directional; the scanner's trace is preferred
    mr = next(e for e in explanations if any(d.description == "DWI_dir80_PA_TRACEW" for d in e.series))
    assert mr.pipelines["MR"].lacking == ("no flair series",)
    assert mr.pipelines["MR"].roles["dwi"].b_value == 2500.0
    ct = next(e for e in explanations if any(d.description == "STD BRAIN 1MM, iDose" for d in e.series))
    assert ct.chosen == "CT" and ct.pipelines["CT"].absent_optional == ("cta",)


def test_real_adc_arriving_replaces_a_computed_one(tmp_path: Path) -> None:
    factory.write_mr_stroke_study(tmp_path / "first", dwi="directional", with_adc=False, n_slices=16, **SMALL)
    headers = read_series_headers([tmp_path / "first"])
    old = Selector().select(headers)
    assert old is not None and old.roles["adc"].derived_from == "dwi"
    # the scanner's ADC map of the same study arrives later
    study = factory.write_mr_stroke_study(
        tmp_path / "later", dwi="directional", with_flair=False, n_slices=16, **SMALL
    )
    adc = read_series_headers(study.series["adc"].paths)
    new = Selector().select(headers + adc)
    assert new is not None and new.roles["adc"].derived_from is None
    assert would_change_selection(old, new)
    assert not any("ADC computed" in w for w in new.warnings)


def test_3d_sagittal_flair_is_used_but_a_2d_sagittal_series_is_not(tmp_path: Path) -> None:
    study = factory.write_mr_stroke_study(tmp_path, flair_3d_sagittal=True, n_slices=16, **SMALL)
    headers = read_series_headers([tmp_path])
    mr = Selector().explain(headers).pipelines["MR"]
    assert mr.ready and mr.roles["flair"].series_uid == study.series["flair"].series_uid
    (flair,) = [h for h in headers if h.series_uid == study.series["flair"].series_uid]
    as_2d = dataclasses.replace(flair, mr_acquisition_type="2D")
    failures = classify(as_2d, load_selection_rules()).role_failures["flair"]
    assert any("not axial" in f for f in failures)


def test_mixed_thickness_series_is_judged_the_same_in_any_order(tmp_path: Path) -> None:
    """A GE head CT (4 mm posterior fossa, 7 mm above, gantry tilt): one summary, one verdict, any order."""
    from inference.dicom_headers import read_instance_header, summarise_series

    series = factory.write_ct_mixed_thickness(tmp_path, rows=16)
    instances = [read_instance_header(path) for path in series.paths]
    assert all(i is not None for i in instances)
    by_thickness = sorted(instances, key=lambda i: i.frames[0].slice_thickness)  # type: ignore[union-attr]
    orders = [by_thickness, by_thickness[::-1], instances[::-1], [instances[k] for k in (7, 3, 20, 0, 11)]]
    summaries = [summarise_series(order) for order in orders[:3]]  # type: ignore[arg-type]
    assert summaries[0] == summaries[1] == summaries[2]
    summary = summaries[0]
    assert [(p.n_positions, round(p.thickness or 0, 2)) for p in summary.parts] == [(10, 3.86), (14, 6.76)]
    assert summary.slice_thickness == pytest.approx(3.86, abs=0.01)
    assert summary.slice_thickness_max == pytest.approx(6.76, abs=0.01)
    selector = Selector()
    assert selector.could_use(summary, complete=True)
    assert selector.explain([summary]).series[0].role == "ncct"
    # a uniformly 7 mm series is refused, naming its thickness
    thick = summarise_series([i for i in instances if i.frames[0].slice_thickness > 6])  # type: ignore[union-attr]
    failures = classify(thick, load_selection_rules()).role_failures["ncct"]
    assert any(f.startswith("slice thickness 6.76148 mm not 0.5-6") for f in failures)
    assert summarise_series(orders[3]) == summarise_series(orders[3][::-1])  # type: ignore[arg-type]



def test_a_cta_without_ncct_is_unused_for_want_of_an_ncct_not_outside_the_window(
    ct_study: tuple[factory.Study, list[SeriesHeader]],
) -> None:
    study, headers = ct_study
    without_ncct = [h for h in headers if h.series_uid not in {s.series_uid for k, s in study.series.items() if k.startswith("ncct")}]
    decisions = {d.series_uid: d for d in Selector().explain(without_ncct).series}
    assert decisions[study.series["cta"].series_uid].reason == "cta candidate, unused: the CT pipeline has no ncct series"
