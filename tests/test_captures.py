"""Captures that read at a glance, measured on a real MR and a CT the predictor analysed.

A real whole-brain MR (Siemens XA30 classic TRACEW + ADC from ../shared/data, the study's FLAIR
synthesised) and a synthetic CT stroke study go through the predictor (demonstration weights)
and the capture builders; the test measures what a reader relies on: every capture's size, the
brain's extent in pixels (the preprocessing mask mapped into the capture), the room the text
band takes, colour only inside the brain and on every slice whose attention reaches the floor,
and a valid summary capture. The real MR's captures and summary are saved as PNG under
``test-output/captures/`` (or ``$FPENODE_TEST_OUTPUT/captures``) for a person to look at.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from inference.result import Prediction
from reports.capture import ATTENTION_FLOOR, BRAIN_PIXELS, CaptureSet
from reports.sc import SC_STORAGE, build_secondary_captures, build_summary_capture, capture_set
from reports.sr import ReportContext
from reports.uids import UIDFactory
from tests.conftest import REPO_ROOT, direct_outcome, require_shared_data
from tests.factory import Patient, StudyIdentity, _uid, copy_into_study, write_ct_stroke_study, write_flair_for
from tests.validators import dciodvfy_errors, dciodvfy_output, read_strict

UIDS = UIDFactory("1.2.3.998")
CONTEXT = ReportContext(software_version="0.1.0", device_uid=UIDS.for_name("FPENODE"), institution_name="Test Hospital")
OUTPUT = Path(os.environ.get("FPENODE_TEST_OUTPUT", REPO_ROOT / "test-output")) / "captures"


@dataclass
class Analysed:
    prediction: Prediction
    sources: list[Dataset]  # headers of the primary series
    captures: CaptureSet
    slice_captures: list[Dataset]
    summary: Dataset


@pytest.fixture(scope="module")
def predictor() -> Any:
    from inference.predictor import Predictor

    return Predictor.load(None, device="cpu", torch_threads=1)


def _analyse(folder: Path, tmp_path: Path, predictor: Any) -> Analysed:
    from dicom_node.settings import load_settings

    config = tmp_path / "site.yaml"
    config.write_text("inference:\n  device: cpu\n", encoding="utf-8")
    kept: list[object] = []
    outcome = direct_outcome([folder], load_settings(config, environ={}), predictor, keep=kept)
    prediction = kept[0]
    assert isinstance(prediction, Prediction), outcome
    primary_series = prediction.series_used[prediction.primary_role]
    headers = (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*")) if p.is_file())
    sources = [h for h in headers if h.SeriesInstanceUID == primary_series]
    captures = capture_set(prediction, sources)
    slices = build_secondary_captures(prediction, sources, UIDS, CONTEXT, captures=captures)
    summary = build_summary_capture(prediction, sources, UIDS, CONTEXT, captures=captures)
    return Analysed(prediction, sources, captures, slices, summary)


@pytest.fixture(scope="module")
def real_mr(tmp_path_factory: pytest.TempPathFactory, predictor: Any) -> Analysed:
    root = tmp_path_factory.mktemp("real_mr")
    data = require_shared_data("mr_siemens_xa30i_classic")
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    identity = StudyIdentity(
        study_uid=str(_uid("captures", "real-mr")),
        patient=Patient(name="CAPTURES^MR", patient_id="CAPT001", issuer="TEST", birth_date="19480101", sex="O"),
        study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"),
        accession="CAPT001", description="MR HEAD STROKE",
    )
    copied = copy_into_study(sorted(p for p in data.rglob("*") if p.is_file() and p.name != "MANIFEST.md"),
                             root / "study" / "real", identity)
    trace = [p for p in copied if "ADC" not in str(pydicom.dcmread(p, stop_before_pixels=True).ImageType)]
    write_flair_for(root / "study", trace, seed=3)
    return _analyse(root / "study", root, predictor)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory, predictor: Any) -> Analysed:
    root = tmp_path_factory.mktemp("ct")
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    write_ct_stroke_study(root / "study", rows=96, thin_slices=36, with_thick=False, with_reformats=False,
                          with_mips=False, with_localizer=False, with_dose_report=False, cta_rows=64, cta_slices=40,
                          cta_spacing=3.0, seed=21, study_date=acquired.strftime("%Y%m%d"),
                          study_time=acquired.strftime("%H%M%S"))
    return _analyse(root / "study", root, predictor)


def _coloured(picture: np.ndarray) -> np.ndarray:
    """Pixels that are not grey (R, G, B not all equal)."""
    rgb = picture.astype(np.int16)
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def _extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels of the box around a mask."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)


def _brain_in_capture(analysed: Analysed) -> list[np.ndarray]:
    """Each capture's brain: the predictor's mask of its plane mapped into the capture grid by the
    frame's geometry (linear, taken at 0.5, the mask's own rule)."""
    frame = analysed.captures.frame
    return [frame.resample(np.asarray(s.brain, dtype=np.float32), cubic=False, outside=0.0) >= 0.5
            for s in analysed.prediction.attention]


def _check_captures(analysed: Analysed, tmp_path: Path, *, validate_all: bool) -> dict[str, float]:
    prediction, frame = analysed.prediction, analysed.captures.frame
    captures = analysed.slice_captures
    assert len(captures) == len(prediction.attention) == 25
    assert all(s.brain is not None and s.relative_attention is not None for s in prediction.attention)
    sizes = {(int(c.Rows), int(c.Columns)) for c in captures}
    assert len(sizes) == 1
    rows, columns = sizes.pop()
    # Text band: below the image, never more room than the image.
    band_fraction = (rows - frame.rows) / rows
    assert 0 < band_fraction <= 0.5 and columns == frame.columns
    # The brain (mask extent over the case) at least 512 px across in every capture; the widest slice's own too.
    brains = _brain_in_capture(analysed)
    union = np.logical_or.reduce(brains)
    height, width = _extent(union)
    assert min(height, width) >= 512, (height, width)
    assert max(max(_extent(b)) for b in brains if b.any()) >= 512
    by_uid = {ds.SOPInstanceUID: ds for ds in analysed.sources}
    coloured_slices = 0
    for capture, attention, brain in zip(captures, prediction.attention, brains):
        picture = capture.pixel_array[: frame.rows]
        coloured = _coloured(picture)
        assert not (coloured & ~brain).any(), f"colour outside the brain on slice {attention.model_slice + 1}"
        top = float(np.max(attention.relative_attention))  # type: ignore[arg-type]
        if top > ATTENTION_FLOOR + 0.05:
            assert coloured.sum() > 50, f"slice {attention.model_slice + 1} (attention {top:.2f}) shows no colour"
            coloured_slices += 1
        elif top <= ATTENTION_FLOOR:
            assert not coloured.any()
        # The capture names the source image it shows, one of the primary's.
        (item,) = capture.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == attention.source.sop_instance_uid
        assert by_uid[item.ReferencedSOPInstanceUID].SOPClassUID == item.ReferencedSOPClassUID
    assert coloured_slices >= 10, f"only {coloured_slices} of 25 captures show attention"
    # Every object is valid (dciodvfy) and reads back strictly (the CT: first, peak, last and the summary).
    checked = [*captures, analysed.summary] if validate_all else [
        captures[0], captures[prediction.peak.model_slice if prediction.peak else 12], captures[-1], analysed.summary]
    for index, capture in enumerate(checked):
        path = tmp_path / f"capture_{index}.dcm"
        capture.save_as(path, enforce_file_format=True)
        assert not dciodvfy_errors(path), dciodvfy_output(path)
        assert read_strict(path).SOPClassUID == SC_STORAGE
    return {"band_fraction": band_fraction, "brain_px": float(min(height, width))}


def _check_summary(analysed: Analysed) -> None:
    summary, prediction = analysed.summary, analysed.prediction
    assert summary.SeriesInstanceUID not in {c.SeriesInstanceUID for c in analysed.slice_captures}
    assert summary.StudyInstanceUID == analysed.sources[0].StudyInstanceUID
    assert "summary" in summary.SeriesDescription and "research use" in summary.SeriesDescription
    referenced = [item.ReferencedSOPInstanceUID for item in summary.SourceImageSequence]
    assert prediction.peak is not None and prediction.peak.source.sop_instance_uid in referenced
    assert 2 <= len(referenced) <= 3
    pixels = summary.pixel_array
    assert pixels.shape[1] >= 3 * 400 and pixels.shape[0] < pixels.shape[1]  # a row of slices
    header = pixels[:60].astype(int)
    assert (header.min(axis=-1) > 200).sum() > 200  # the result in large white text
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)).sum() > 100  # the red warning


def _save_png(analysed: Analysed, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for capture in analysed.slice_captures:
        Image.fromarray(capture.pixel_array).save(folder / f"capture_{int(capture.InstanceNumber):02d}.png")
    Image.fromarray(analysed.summary.pixel_array).save(folder / "summary.png")


def test_real_mr_captures_read_at_a_glance(real_mr: Analysed, tmp_path: Path) -> None:
    _save_png(real_mr, OUTPUT / "real_mr")
    figures = _check_captures(real_mr, tmp_path, validate_all=True)
    _check_summary(real_mr)
    # MR: the window is the source image's own (Window Center / Width of the TRACEW images).
    peak = real_mr.prediction.peak
    assert peak is not None
    header = next(h for h in real_mr.sources if h.SOPInstanceUID == peak.source.sop_instance_uid)
    assert real_mr.captures.window.centre == float(header.WindowCenter)
    assert figures["brain_px"] >= BRAIN_PIXELS - 2


def test_ct_captures_read_at_a_glance(ct: Analysed, tmp_path: Path) -> None:
    _check_captures(ct, tmp_path, validate_all=False)
    _check_summary(ct)
    assert (ct.captures.window.centre, ct.captures.window.width) == (40.0, 80.0)
