"""The AI-results SR: content, validity (dciodvfy, PixelMed, dsrdump), read-back, versions, fallbacks."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.result import NotAnalysed, Prediction, SourceInstance
from reports.codes import PRIVATE_SCHEME, Fpe, Std
from reports.sr import (
    RESEARCH_STATEMENT,
    SR_CLASS_UIDS,
    PriorReport,
    ReportContext,
    build_sr,
    reencode_sr,
)
from reports.uids import UIDFactory
from tests import factory
from tests.validators import (
    dciodvfy_errors,
    dciodvfy_output,
    dsrdump,
    fake_prediction,
    model_info,
    pixelmed_errors_in,
    pixelmed_sr_outputs,
    read_strict,
    sorted_by_position,
)

UIDS = UIDFactory(None)
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"), device_name="FPENODE")


@pytest.fixture(scope="module")
def ct_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    series = factory.write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=10, rows=64)
    return sorted_by_position([pydicom.dcmread(p) for p in series.paths])


def _save(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _items(ds: Dataset) -> list[Dataset]:
    """Every content item of the tree, depth first."""
    found: list[Dataset] = []
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop(0)
        found.append(item)
        stack[0:0] = list(item.get("ContentSequence", []))
    return found


def _named(ds: Dataset, concept: hd.sr.CodedConcept) -> list[Dataset]:
    return [
        item
        for item in _items(ds)
        if item.ConceptNameCodeSequence[0].CodeValue == concept.value
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == concept.scheme_designator
    ]


def _assert_valid(path: Path) -> None:
    errors = dciodvfy_errors(path)
    assert not errors, dciodvfy_output(path)


def test_prediction_sr_content_and_read_back(ct_sources: list[Dataset], tmp_path: Path) -> None:
    prediction = fake_prediction(ct_sources, score=0.73)
    sr = build_sr(prediction, ct_sources, UIDS, CONTEXT)
    path = _save(sr, tmp_path, "sr.dcm")
    _assert_valid(path)
    back = read_strict(path)
    source = ct_sources[0]

    # Header: same patient and study, new series, unverified, node as contributing equipment.
    assert back.SOPClassUID == SR_CLASS_UIDS["comprehensive3d"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber", "StudyID"):
        assert back.get(keyword) == source.get(keyword), keyword
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.Modality == "SR"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.CompletionFlag == "COMPLETE"
    assert "research use" in back.SeriesDescription
    purposes = {
        (item.Manufacturer, item.PurposeOfReferenceCodeSequence[0].CodeValue) for item in back.ContributingEquipmentSequence
    }
    assert ("fpe-node", "109103") in purposes
    node = next(i for i in back.ContributingEquipmentSequence if i.Manufacturer == "fpe-node")
    assert node.ManufacturerModelName == "res25"
    assert "0.1.0" in node.SoftwareVersions
    schemes = {item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence}
    assert {PRIVATE_SCHEME.designator, "DCM", "SCT", "LN", "UCUM", "UMLS"} <= schemes
    assert all(uid.startswith("2.25.") for uid in (back.SOPInstanceUID, back.SeriesInstanceUID))

    # Evidence: every source instance.
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {s.sop_instance_uid for s in prediction.sources}

    # Content: procedure = imaging procedure (CID 100), device observer, value, finding, statement.
    procedure = _named(back, Std.PROCEDURE_REPORTED)[0].ConceptCodeSequence[0]
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("25045-6", "LN")
    values = _named(back, Fpe.PROBABILITY)
    assert len(values) == 1
    measured = values[0].MeasuredValueSequence[0]
    assert float(measured.NumericValue) == pytest.approx(73.0)
    assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    threshold = _named(back, Fpe.DECISION_THRESHOLD)[0].MeasuredValueSequence[0]
    assert float(threshold.NumericValue) == pytest.approx(50.0)
    findings = {i.ConceptCodeSequence[0].CodeValue for i in _named(back, Fpe.FIRST_PASS_EFFECT)}
    assert findings == {Fpe.LIKELY.value}
    assert _named(back, Fpe.INTENDED_USE)[0].TextValue == RESEARCH_STATEMENT
    assert _named(back, Fpe.DEMONSTRATION_WEIGHTS)[0].ConceptCodeSequence[0].CodeValue == Std.NO.value
    assert not _named(back, Fpe.SCORE)

    # Read back through highdicom's TID 1500 parser: the same values and the anchored ROI.
    report = hd.sr.srread(path)
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_identifier == "FPE 73% (research use)"
    assert group.get_measurements(name=Fpe.PROBABILITY)[0].value == pytest.approx(73.0)
    region = group.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    peak = prediction.peak
    assert peak is not None
    np.testing.assert_allclose(region.value, np.asarray(peak.outline), rtol=1e-5)
    image = region.ContentSequence[0]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == peak.source.sop_instance_uid
    names = {i.TextValue for i in _named(back, hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"))}
    assert names == {"res25"}
    parameters = {i.TextValue for i in _named(back, hd.sr.CodedConcept("111002", "DCM", "Algorithm Parameters"))}
    assert {"threshold=0.5", f"weights_sha256={'ab' * 32}", "variant=nonlocal"} <= parameters

    rendered = dsrdump(path)
    assert "FPE 73% (research use)" in rendered
    assert "Probability of first pass effect" in rendered
    assert "Research use only" in rendered


def test_uncalibrated_demonstration_result_is_a_score(ct_sources: list[Dataset], tmp_path: Path) -> None:
    model = model_info(calibrated=False, demonstration=True, threshold=0.6)
    prediction = fake_prediction(ct_sources, score=0.42, model=model)
    path = _save(build_sr(prediction, ct_sources, UIDS, CONTEXT), tmp_path, "score.dcm")
    _assert_valid(path)
    back = read_strict(path)
    assert not _named(back, Fpe.PROBABILITY)
    value = _named(back, Fpe.SCORE)[0].MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(0.42)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "{score}"
    finding = {i.ConceptCodeSequence[0].CodeValue for i in _named(back, Fpe.FIRST_PASS_EFFECT)}
    assert finding == {Fpe.UNLIKELY.value}
    assert _named(back, Fpe.DEMONSTRATION_WEIGHTS)[0].ConceptCodeSequence[0].CodeValue == Std.YES.value
    assert "DEMO" in back.SeriesDescription
    rendered = dsrdump(path)
    assert "robability" not in rendered
    assert "FPE score 0.42 DEMO (research use)" in rendered
    assert "demonstration weights" in rendered.lower()


def test_not_analysed_sr_says_why(ct_sources: list[Dataset], tmp_path: Path) -> None:
    result = NotAnalysed(reason="No non-contrast CT series covering the head", pipeline="CT")
    path = _save(build_sr(result, ct_sources, UIDS, CONTEXT), tmp_path, "na.dcm")
    _assert_valid(path)
    back = read_strict(path)
    assert _named(back, Fpe.REASON_NOT_ANALYSED)[0].TextValue == result.reason
    assert _named(back, Fpe.FIRST_PASS_EFFECT)[0].ConceptCodeSequence[0].CodeValue == Fpe.NOT_ANALYSED.value
    assert not _named(back, Fpe.PROBABILITY) and not _named(back, Fpe.SCORE)
    assert "not analysed" in back.SeriesDescription
    assert result.reason in dsrdump(path)


def test_mr_procedure_and_evidence_from_another_study(ct_sources: list[Dataset]) -> None:
    prediction = fake_prediction(ct_sources, pipeline="MR", primary_role="dwi")
    other = SourceInstance(
        study_uid=UIDS.new(), series_uid=UIDS.new(), sop_class_uid=str(ct_sources[0].SOPClassUID), sop_instance_uid=UIDS.new()
    )
    prediction = dataclasses.replace(prediction, sources=(*prediction.sources, other))
    sr = build_sr(prediction, ct_sources, UIDS, CONTEXT)
    procedure = _named(sr, Std.PROCEDURE_REPORTED)[0].ConceptCodeSequence[0]
    assert procedure.CodeValue == Std.MR_PROCEDURE.value
    other_refs = [
        item.ReferencedSOPInstanceUID
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert other_refs == [other.sop_instance_uid]


def test_rerun_names_the_sr_it_supersedes(ct_sources: list[Dataset], tmp_path: Path) -> None:
    first = build_sr(fake_prediction(ct_sources, score=0.7), ct_sources, UIDS, CONTEXT)
    second = build_sr(
        fake_prediction(ct_sources, score=0.8),
        ct_sources,
        UIDS,
        CONTEXT,
        series_uid=str(first.SeriesInstanceUID),
        instance_number=2,
        predecessors=[PriorReport.from_dataset(first)],
    )
    path = _save(second, tmp_path, "v2.dcm")
    _assert_valid(path)
    back = read_strict(path)
    assert back.SOPInstanceUID != first.SOPInstanceUID
    study = back.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == first.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == first.SOPClassUID


def test_fallback_classes_keep_content_with_stable_derived_uids(ct_sources: list[Dataset], tmp_path: Path) -> None:
    original = build_sr(fake_prediction(ct_sources), ct_sources, UIDS, CONTEXT)
    for sr_class in ("comprehensive", "enhanced"):
        copy_a = reencode_sr(original, sr_class, UIDS)  # type: ignore[arg-type]
        copy_b = reencode_sr(original, sr_class, UIDS)  # type: ignore[arg-type]
        assert copy_a.SOPClassUID == SR_CLASS_UIDS[sr_class]  # type: ignore[index]
        assert copy_a.file_meta.MediaStorageSOPClassUID == copy_a.SOPClassUID
        assert copy_a.SOPInstanceUID == copy_b.SOPInstanceUID != original.SOPInstanceUID
        assert copy_a.file_meta.MediaStorageSOPInstanceUID == copy_a.SOPInstanceUID
        assert copy_a.SeriesInstanceUID == original.SeriesInstanceUID
        assert copy_a.ContentSequence == original.ContentSequence
        path = _save(copy_a, tmp_path, f"{sr_class}.dcm")
        _assert_valid(path)
        assert read_strict(path).SOPClassUID == SR_CLASS_UIDS[sr_class]  # type: ignore[index]
    built = build_sr(fake_prediction(ct_sources), ct_sources, UIDS, CONTEXT, sr_class="enhanced")
    assert built.SOPClassUID == SR_CLASS_UIDS["enhanced"]
    assert reencode_sr(original, "comprehensive3d", UIDS).SOPInstanceUID == original.SOPInstanceUID


def test_reencode_refuses_3d_coordinates(ct_sources: list[Dataset]) -> None:
    sr = build_sr(fake_prediction(ct_sources), ct_sources, UIDS, CONTEXT)
    sr.ContentSequence[-1].ContentSequence[0].ValueType = "SCOORD3D"
    with pytest.raises(ValueError, match="SCOORD3D"):
        reencode_sr(sr, "comprehensive", UIDS)


def test_peak_on_a_frame_of_a_multiframe_source(ct_sources: list[Dataset]) -> None:
    prediction = fake_prediction(ct_sources)
    assert prediction.peak is not None
    peak = dataclasses.replace(prediction.peak, source=dataclasses.replace(prediction.peak.source, frame=7))
    sr = build_sr(dataclasses.replace(prediction, peak=peak), ct_sources, UIDS, CONTEXT)
    image = next(item for item in _items(sr) if item.ValueType == "IMAGE")
    assert image.ReferencedSOPSequence[0].ReferencedFrameNumber == 7


def test_prediction_without_peak_keeps_a_study_level_group(ct_sources: list[Dataset]) -> None:
    prediction = dataclasses.replace(fake_prediction(ct_sources), peak=None)
    sr = build_sr(prediction, ct_sources, UIDS, CONTEXT)
    assert not [item for item in _items(sr) if item.ValueType == "SCOORD"]
    assert len(_named(sr, Fpe.PROBABILITY)) == 1


def test_invalid_inputs_are_refused(ct_sources: list[Dataset]) -> None:
    prediction = fake_prediction(ct_sources)
    with pytest.raises(ValueError, match="source dataset"):
        build_sr(prediction, [], UIDS, CONTEXT)
    assert prediction.peak is not None
    flat = dataclasses.replace(prediction.peak, outline=((1.0, 1.0), (2.0, 2.0), (1.0, 1.0)))
    with pytest.raises(ValueError, match="outline"):
        build_sr(dataclasses.replace(prediction, peak=flat), ct_sources, UIDS, CONTEXT)


def test_pixelmed_finds_no_errors(ct_sources: list[Dataset], tmp_path: Path) -> None:
    """PixelMed checks TID 1500 and its context groups; three runs (about a JVM each)."""
    prediction: Prediction = fake_prediction(ct_sources)
    sr3d = build_sr(prediction, ct_sources, UIDS, CONTEXT)
    paths = [
        _save(sr3d, tmp_path, "3d.dcm"),
        _save(reencode_sr(sr3d, "enhanced", UIDS), tmp_path, "enhanced.dcm"),
        _save(
            build_sr(NotAnalysed(reason="no eligible series", pipeline="MR"), ct_sources, UIDS, CONTEXT, sr_class="comprehensive"),
            tmp_path,
            "na.dcm",
        ),
    ]
    for path, output in pixelmed_sr_outputs(paths).items():
        assert "Found Root Template TID_1500" in output, output
        assert not pixelmed_errors_in(output), f"{path.name}:\n{output}"


def test_uid_factory() -> None:
    site = UIDFactory("1.2.3.4.5678")
    uid = site.new()
    assert uid.startswith("1.2.3.4.5678.") and len(uid) <= 64
    long_root = UIDFactory("1." + "2" * 38)
    assert len(long_root.new()) <= 64
    assert UIDS.new().startswith("2.25.") and UIDS.new() != UIDS.new()
    assert site.derive(uid, "a") == site.derive(uid, "a") != site.derive(uid, "b")
    assert UIDS.for_name("FPENODE") == UIDFactory("").for_name("FPENODE")
    for bad in ("1.2.826.0.1.3680043.8.498", "1.2.840.10008.9", "1..2", "abc", "1." + "2" * 45):
        with pytest.raises(ValueError):
            UIDFactory(bad)


def test_private_codes_are_documented_once() -> None:
    """Every private code is defined once and listed in the README with its meaning."""
    from reports.codes import PRIVATE_CODES

    values = [code.value for code in PRIVATE_CODES]
    assert len(values) == len(set(values))
    assert all(code.scheme_designator == PRIVATE_SCHEME.designator for code in PRIVATE_CODES)
    doc = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for code in PRIVATE_CODES:
        assert f"| `{code.value}` | {code.meaning} |" in doc, code


@pytest.mark.parametrize("source_charset", [None, "ISO_IR 100"])
def test_non_ascii_text_is_written_under_a_declared_character_set(
    ct_sources: list[Dataset], tmp_path: Path, source_charset: str | None
) -> None:
    """Strict writer: accented names from the source or the settings never go out undeclared."""
    from reports.pdf import build_pdf
    from reports.sc import build_secondary_captures

    sources = [copy.deepcopy(ds) for ds in ct_sources[:4]]
    for ds in sources:
        ds.pop("SpecificCharacterSet", None)
        if source_charset:
            ds.SpecificCharacterSet = source_charset
            ds.PatientName = "Müller^Jürgen"
    context = dataclasses.replace(CONTEXT, institution_name="Hôpital Nord")
    prediction = fake_prediction(sources, n_slices=5)
    objects = {
        "sr": build_sr(prediction, sources, UIDS, context),
        "sc": build_secondary_captures(prediction, sources, UIDS, context)[2],
        "pdf": build_pdf(prediction, sources, UIDS, context),
    }
    for name, ds in objects.items():
        path = _save(ds, tmp_path, f"{name}.dcm")
        _assert_valid(path)
        back = read_strict(path)
        assert back.SpecificCharacterSet == "ISO_IR 192", name
        assert back.InstitutionName == "Hôpital Nord"
        assert back.PatientName == sources[0].PatientName


def test_report_context_refuses_a_bad_device_uid() -> None:
    with pytest.raises(ValueError, match="device_uid"):
        ReportContext(software_version="0.1.0", device_uid="not-a-uid")


def test_building_from_a_single_component_name_does_not_print_it(ct_sources: list[Dataset], tmp_path: Path) -> None:
    """highdicom's person-name warning quotes the name; the node must not let it reach its logs."""
    import subprocess
    import sys

    source = copy.deepcopy(ct_sources[0])
    source.PatientName = "SECRETNAME"
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    script = (
        "import logging, sys, pydicom\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "logging.captureWarnings(True)\n"
        "from reports.sr import ReportContext, build_sr\n"
        "from reports.sc import build_secondary_captures\n"
        "from reports.uids import UIDFactory\n"
        "from tests.validators import fake_prediction\n"
        f"ds = pydicom.dcmread({str(path)!r})\n"
        "uids = UIDFactory(None)\n"
        "context = ReportContext(software_version='0.1.0', device_uid=uids.for_name('X'))\n"
        "prediction = fake_prediction([ds], n_slices=2)\n"
        "build_sr(prediction, [ds], uids, context)\n"
        "build_secondary_captures(prediction, [ds], uids, context)\n"
        "print('built')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", script], cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr
    assert "SECRETNAME" not in proc.stdout + proc.stderr
