"""SR, SC and PDF from source headers that lack attributes or hold values their VR forbids (issue 9).

De-identified data and some vendors omit type 2 attributes; the result objects must still be
built, carry those attributes empty (PS3.5 section 7.4), pass dciodvfy and read back under
pydicom strict validation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.result import NotAnalysed
from reports.header import TYPE2_ATTRIBUTES, source_header
from reports.pdf import build_pdf
from reports.sc import build_secondary_captures
from reports.sr import ReportContext, build_sr
from reports.uids import UIDFactory
from tests import factory
from tests.validators import dciodvfy_errors, dciodvfy_output, fake_prediction, read_strict, sorted_by_position

UIDS = UIDFactory(None)
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"), device_name="FPENODE")
OTHER_ATTRIBUTES = ("SeriesDate", "Manufacturer", "SpecificCharacterSet")


@pytest.fixture(scope="module")
def ct_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    series = factory.write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=4, rows=32)
    return sorted_by_position([pydicom.dcmread(p) for p in series.paths])


def _altered(sources: list[Dataset], change: Callable[[Dataset], None]) -> list[Dataset]:
    altered = [copy.deepcopy(ds) for ds in sources]
    for ds in altered:
        change(ds)
    return altered


def _every_object(sources: list[Dataset], folder: Path) -> dict[str, Dataset]:
    """Not-analysed SR, prediction SR, one secondary capture and the PDF, each valid and read back strictly."""
    prediction = fake_prediction(sources, n_slices=3)
    built = {
        "not-analysed sr": build_sr(NotAnalysed(reason="No usable series", pipeline="CT"), sources, UIDS, CONTEXT),
        "sr": build_sr(prediction, sources, UIDS, CONTEXT),
        "sc": build_secondary_captures(prediction, sources, UIDS, CONTEXT)[0],
        "pdf": build_pdf(prediction, sources, UIDS, CONTEXT),
    }
    back = {}
    for name, ds in built.items():
        path = folder / f"{name.replace(' ', '_')}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert not dciodvfy_errors(path), f"{name}: {dciodvfy_output(path)}"
        back[name] = read_strict(path)
    return back


@pytest.mark.parametrize("keyword", TYPE2_ATTRIBUTES + OTHER_ATTRIBUTES)
def test_objects_are_built_when_the_source_lacks_an_attribute(
    ct_sources: list[Dataset], tmp_path: Path, keyword: str
) -> None:
    sources = _altered(ct_sources, lambda ds: ds.pop(keyword, None))
    for name, back in _every_object(sources, tmp_path).items():
        assert back.StudyInstanceUID == ct_sources[0].StudyInstanceUID, name
        if keyword in TYPE2_ATTRIBUTES:
            assert keyword in back and back[keyword].is_empty, f"{name}: type 2 {keyword} must be present and empty"
        for other in TYPE2_ATTRIBUTES:
            if other != keyword:
                assert back.get(other) == ct_sources[0].get(other), f"{name}: {other}"


def test_objects_are_built_when_every_type2_attribute_is_empty(ct_sources: list[Dataset], tmp_path: Path) -> None:
    def empty(ds: Dataset) -> None:
        for keyword in TYPE2_ATTRIBUTES:
            ds[keyword].value = None

    for name, back in _every_object(_altered(ct_sources, empty), tmp_path).items():
        assert all(keyword in back and back[keyword].is_empty for keyword in TYPE2_ATTRIBUTES), name


@pytest.mark.parametrize(
    ("keyword", "value", "written"),
    [
        ("PatientSex", "U", ""),
        ("PatientSex", "m", "M"),
        ("PatientBirthDate", "UNKNOWN", ""),
        ("StudyTime", "9:30", ""),
        ("PatientName", ["A^B", "C^D"], "A^B"),
        ("SpecificCharacterSet", "UTF8", None),
    ],
)
def test_values_the_vr_forbids_are_written_valid(
    ct_sources: list[Dataset], tmp_path: Path, keyword: str, value: object, written: str | None
) -> None:
    """Tolerant reader, strict writer: a bad source value never stops a result nor goes out invalid."""
    sources = _altered(ct_sources, lambda ds: setattr(ds, keyword, value))
    for name, back in _every_object(sources, tmp_path).items():
        assert back.get(keyword, None) == written or (written == "" and back[keyword].is_empty), name


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 100", "Müller^Jürgen^^Dr."), ("ISO_IR 192", "Ñandú^Zoë=山田^太郎=やまだ^たろう")],
)
def test_non_ascii_names_keep_a_declared_character_set(
    ct_sources: list[Dataset], tmp_path: Path, charset: str, name: str
) -> None:
    def rename(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name

    for kind, back in _every_object(_altered(ct_sources, rename), tmp_path).items():
        assert back.SpecificCharacterSet == "ISO_IR 192", kind  # any non-ASCII text goes out as UTF-8
        assert str(back.PatientName) == name and str(back.ReferringPhysicianName) == name, kind


def test_not_analysed_sr_from_an_instance_of_a_class_highdicom_does_not_know(
    ct_sources: list[Dataset], tmp_path: Path
) -> None:
    """A study holding only a private-class object still gets its "not analysed" SR."""
    source = copy.deepcopy(ct_sources[0])
    source.SOPClassUID = "1.3.12.2.1107.5.9.1"  # Siemens CSA non-image storage
    del source.PatientBirthDate
    sr = build_sr(NotAnalysed(reason="No image series", pipeline="CT"), [source], UIDS, CONTEXT)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    back = read_strict(path)
    assert back.PatientName == source.PatientName and back.PatientBirthDate == ""
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPClassUID == "1.3.12.2.1107.5.9.1"


def test_a_source_without_its_study_uid_is_refused_by_name(ct_sources: list[Dataset]) -> None:
    source = copy.deepcopy(ct_sources[0])
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        source_header(source)


def test_real_scanner_headers_de_identified_further(shared_data: Path, tmp_path: Path) -> None:
    """Real Philips CT and Canon MR headers (no Specific Character Set) with PatientBirthDate,
    PatientSex and StudyID removed, as de-identification tools do: the not-analysed SR is valid."""
    for folder in ("ct_philips_headphantom_1mm", "mr_canon_galan_dti/enhanced"):
        first = min(path for path in (shared_data / folder).iterdir() if path.is_file())
        source = pydicom.dcmread(first, stop_before_pixels=True)
        for keyword in ("PatientBirthDate", "PatientSex", "StudyID"):
            source.pop(keyword, None)
        sr = build_sr(NotAnalysed(reason="No usable series", pipeline="CT"), [source], UIDS, CONTEXT)
        path = tmp_path / f"{first.parent.name}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert not dciodvfy_errors(path), dciodvfy_output(path)
        back = read_strict(path)
        assert back.PatientBirthDate == "" and back.PatientSex == "" and back.StudyID == ""
        assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID


def test_an_element_pydicom_cannot_decode_is_left_out(ct_sources: list[Dataset], tmp_path: Path) -> None:
    """A US value of odd length (a broken writer) in the source does not stop the SR."""
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import BytesLengthException
    from pydicom.tag import Tag

    source = copy.deepcopy(ct_sources[0])
    broken = Tag(0x0018, 0x1170)  # Generator Power, US; three bytes cannot be decoded
    source._dict[broken] = RawDataElement(broken, "US", 3, b"\x01\x00\x02", 0, False, True)
    with pytest.raises(BytesLengthException):
        source[broken]
    sr = build_sr(NotAnalysed(reason="No usable series", pipeline="CT"), [source], UIDS, CONTEXT)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    assert read_strict(path).PatientID == source.PatientID
