"""Optional one-page Encapsulated PDF summary."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from reports.pdf import ENCAPSULATED_PDF_STORAGE, build_pdf, key_slices, pdf_bytes
from reports.sr import ReportContext
from reports.uids import UIDFactory
from tests import factory
from tests.validators import dciodvfy_errors, dciodvfy_output, fake_prediction, model_info, read_strict, sorted_by_position

UIDS = UIDFactory(None)
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"))


@pytest.fixture(scope="module")
def ct_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    series = factory.write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=8, rows=64)
    return sorted_by_position([pydicom.dcmread(p) for p in series.paths])


def test_encapsulated_pdf_is_valid_one_page_in_the_study(ct_sources: list[Dataset], tmp_path: Path) -> None:
    prediction = fake_prediction(ct_sources, model=model_info(demonstration=True))
    ds = build_pdf(prediction, ct_sources, UIDS, CONTEXT)
    path = tmp_path / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert not dciodvfy_errors(path), dciodvfy_output(path)
    back = read_strict(path)
    source = ct_sources[0]
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.Modality == "DOC"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert back.get(keyword) == source.get(keyword), keyword
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(back.EncapsulatedDocument)[: int(back.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-") and document.rstrip(b"\0\n\r").endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page(?!s)", document)) == 1
    assert "research use" in back.DocumentTitle and "DEMO" in back.SeriesDescription
    referenced = {item.ReferencedSOPInstanceUID for item in back.SourceInstanceSequence}
    assert prediction.peak is not None and prediction.peak.source.sop_instance_uid in referenced
    assert ("fpe-node", "109103") in {
        (e.Manufacturer, e.PurposeOfReferenceCodeSequence[0].CodeValue) for e in back.ContributingEquipmentSequence
    }


def test_key_slices_start_at_the_attention_peak(ct_sources: list[Dataset]) -> None:
    prediction = fake_prediction(ct_sources)
    chosen = key_slices(prediction)
    assert prediction.peak is not None
    assert chosen[0].model_slice == prediction.peak.model_slice
    assert len(chosen) == 4 and len({s.source.sop_instance_uid for s in chosen}) == 4  # one per source image
    assert all(abs(s.model_slice - prediction.peak.model_slice) <= 6 for s in chosen)  # 10 images for 25 slices
    assert pdf_bytes(prediction).startswith(b"%PDF-")


def test_refuses_without_source_headers(ct_sources: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="headers"):
        build_pdf(fake_prediction(ct_sources), [], UIDS, CONTEXT)
