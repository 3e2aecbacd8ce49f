"""What a radiologist sees: fpe-node's results in the OHIF viewer over Orthanc, in a real browser.

A CT study and an MR study go from Orthanc (with its DICOMweb plugin) through ``fpe-node
serve`` and back; the test then opens ``/viewer?StudyInstanceUIDs=<uid>`` in Debian's headless
Chromium and checks what a radiologist would see:

* the study browser lists the SR and the attention-map series with their descriptions;
* opening the SR draws the outline of the attention peak on its source slice, labelled with
  the probability (or score) text;
* the attention-map series displays a coloured overlay (its burned-in text says "not for
  diagnostic use", checked in the DICOM pixel data by the reports tests);
* the Parametric Map of the attention is listed, and opened it is drawn over the source series
  on the peak slice: the screen pixels over the brain's high-attention pixels are coloured, those
  over pixels outside the brain are not.

The CT is the factory's; the MR is real (../shared/data, Siemens XA30 trace-weighted DWI and ADC,
with a synthetic FLAIR). Screenshots are saved under ``test-output/viewer/`` (or ``$FPENODE_TEST_OUTPUT/viewer``) so a
person can look at them.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread

from reports.pmap import PARAMETRIC_MAP_STORAGE
from tests.archives import free_port
from tests.conftest import REPO_ROOT, TEST_PEER, require_shared_data
from tests.factory import Patient, StudyIdentity, copy_into_study, write_ct_stroke_study, write_flair_for
from tests.test_e2e_orthanc import _wait_for_results, split_summary
from tests.viewer import (
    OrthancDicomWeb,
    chromium_page,
    coloured_fraction,
    require_viewer_tools,
    skip_tours,
    svg_texts,
    viewer_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("viewer"), pytest.mark.timeout(600)]

NODE_AE = "FPENODE"
SR_DESCRIPTION = "FPE AI result"
SC_DESCRIPTION = "FPE attention map"
PM_DESCRIPTION = "FPE attention overlay"
REAL_MR = "mr_siemens_xa30i_classic"
SCREENSHOTS = Path(os.environ.get("FPENODE_TEST_OUTPUT", REPO_ROOT / "test-output")) / "viewer"


@dataclass
class SentStudy:
    """The files of a study sent to Orthanc."""

    study_uid: str
    files: list[Path] = field(default_factory=list)

    def paths(self) -> list[Path]:
        return list(self.files)


def _write_study(kind: str, folder: Path) -> SentStudy:
    """A CT or MR stroke study acquired a few minutes ago.

    CT: the factory's. MR: a real one, the Siemens XA30 trace-weighted DWI (TRACEW, one b-value,
    as OHIF needs: it shows a series holding b0 and b1000 at the same positions as a 4-D volume
    and hangs when an SR asks it to draw a region on one of its images, see docs/reports.md,
    "How viewers show it") and the scanner's ADC, copied into a fresh study, with a factory FLAIR.
    """
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    when = {"study_date": acquired.strftime("%Y%m%d"), "study_time": acquired.strftime("%H%M%S")}
    if kind == "CT":
        study = write_ct_stroke_study(folder, rows=128, thin_slices=40, with_thick=False, with_reformats=False,
                                      with_mips=False, seed=11, **when)
        return SentStudy(study.study_uid, study.paths())
    identity = StudyIdentity(
        study_uid="2.25.7340017123456789012345678901234567", accession="VIEWMR1", description="MR HEAD STROKE",
        patient=Patient(name="VIEWER^REALMR", patient_id="VIEWMR001", issuer="TEST", birth_date="19500101", sex="O"),
        **when,
    )
    real = require_shared_data(REAL_MR)
    files = copy_into_study(sorted(p for p in real.rglob("*") if p.is_file()), folder / "real", identity)
    trace = [p for p in files if "TRACEW" in str(dcmread(p, stop_before_pixels=True).ImageType)]
    flair = write_flair_for(folder, trace, seed=12)
    return SentStudy(identity.study_uid, files + list(flair.paths))


@pytest.fixture
def orthanc_node_viewer(tmp_path: Path, serve_process: Any) -> Iterator[tuple[OrthancDicomWeb, Any, str]]:
    require_viewer_tools()
    node_port = free_port()
    orthanc = OrthancDicomWeb(tmp_path / "orthanc", modalities={"fpenode": (NODE_AE, "127.0.0.1", node_port)})
    orthanc.start()
    node = serve_process(
        network={"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port},
        completion={"series_quiet_s": 1.0, "study_timeout_s": 30.0},
        inference={"torch_threads": 1, "workers": 1},
        delivery={"allow_demonstration_results": True, "retry_initial_s": 1.0, "scan_interval_s": 0.5},
        reports={"parametric_map": True},
        peers=[
            TEST_PEER,
            {"name": "orthanc", "ae_titles": [orthanc.ae_title], "host": "127.0.0.1", "port": orthanc.dicom_port,
             "roles": ["source", "destination"]},
        ],
    )
    try:
        with viewer_server(orthanc.url) as server:
            yield orthanc, node, server.url
    finally:
        orthanc.stop()


def _open_series(page: Any, description: str) -> None:
    thumbnail = page.get_by_text(description).first
    thumbnail.wait_for(state="visible", timeout=60_000)
    skip_tours(page)
    thumbnail.dblclick()


def _wait_for_svg_label(page: Any, needle: str, timeout_s: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    texts: list[str] = []
    while time.monotonic() < deadline:
        texts = svg_texts(page)
        if any(needle in text.lower() for text in texts):
            return texts
        time.sleep(0.5)
    return texts


CODE_LABEL = re.compile(r"(^|\s)\d{4,}\s*:")  # a value labelled by a code number, e.g. "363698007: Brain"


def code_labels(texts: list[str]) -> list[str]:
    """SVG texts that label a value with a code number instead of words."""
    return [text for text in texts if CODE_LABEL.search(text)]


def _capture_on(scs: list[Dataset], sop_instance_uid: str) -> int:
    """Instance number of the capture drawn over the given source image."""
    for sc in scs:
        if any(item.ReferencedSOPInstanceUID == sop_instance_uid for item in sc.SourceImageSequence):
            return int(sc.InstanceNumber)
    raise AssertionError("no capture shows the attention peak's source image")


def _anchored_instance(sr: Dataset) -> str:
    """SOP Instance UID of the image the SR's region (SCOORD) is drawn on."""
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        if item.get("ValueType") == "SCOORD":
            return str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        stack.extend(item.get("ContentSequence", []))
    raise AssertionError("the SR holds no image-anchored region")


def _instance_number(study: Any, sop_instance_uid: str) -> int:
    for path in study.paths():
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "InstanceNumber"])
        if header.SOPInstanceUID == sop_instance_uid:
            return int(header.InstanceNumber)
    raise AssertionError(f"source instance {sop_instance_uid} is not in the study sent")


def _parametric_map(orthanc: OrthancDicomWeb, study_uid: str, timeout_s: float = 120.0) -> Dataset:
    """The node's Parametric Map in Orthanc (it is queued with the SR; bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for series in orthanc.study_series(study_uid):
            for instance in orthanc.series_instances(series["ID"]):
                dataset = dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
                if str(dataset.SOPClassUID) == PARAMETRIC_MAP_STORAGE:
                    return dataset
        time.sleep(1.0)
    raise AssertionError("no Parametric Map in Orthanc")


def _frame_on(pm: Dataset, sop_instance_uid: str) -> np.ndarray:
    """The attention frame of the Parametric Map that lies on the given source image."""
    for index, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        if source.ReferencedSOPInstanceUID == sop_instance_uid:
            return np.asarray(pm.pixel_array[index], dtype=np.float32)
    raise AssertionError("no Parametric Map frame lies on the attention peak's source image")


def _go_to_instance(page: Any, wanted: int, count: int) -> None:
    """Scroll the viewport until its overlay says it shows instance ``wanted``."""
    page.mouse.move(800, 450)
    for key in ("ArrowDown", "ArrowUp"):
        for _ in range(count):
            if f"I:{wanted} (" in page.inner_text("body"):
                return
            page.keyboard.press(key)
            time.sleep(0.2)
    assert f"I:{wanted} (" in page.inner_text("body"), f"viewport not scrolled to instance {wanted}"


def _near(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown


def _overlay_on_screen(page: Any, frame: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float, float, bytes]:
    """Share of coloured screen pixels over high attention (>= 0.6), just off the brain, far off it.

    The viewport shows the image fitted to its canvas and centred (Cornerstone's default camera),
    so image pixel (r, c) is drawn at ``centre + ((c, r) + 0.5 - (columns, rows) / 2) * spacing * scale``.
    "Just off": 0 in the map, 2 to 6 pixels from the brain (where a wash or a blocky map would
    spill: skull, scalp); "far off": more than 6 pixels away (the rest of the field of view).
    The viewer's linear interpolation may colour the first pixel beyond the brain's edge.
    """
    x, y, width, height = page.evaluate(
        "() => { const c = Array.from(document.querySelectorAll('canvas'))"
        ".sort((a, b) => b.clientWidth * b.clientHeight - a.clientWidth * a.clientHeight)[0];"
        " const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }"
    )
    png = page.screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 60
    rows, columns = frame.shape
    row_mm, column_mm = spacing
    scale = min(width / (columns * column_mm), height / (rows * row_mm))
    centre = (x + width / 2.0, y + height / 2.0)

    def share(mask: np.ndarray) -> float:
        r, c = np.nonzero(mask)
        sx = np.clip((centre[0] + (c + 0.5 - columns / 2.0) * column_mm * scale).astype(int), 0, rgb.shape[1] - 1)
        sy = np.clip((centre[1] + (r + 0.5 - rows / 2.0) * row_mm * scale).astype(int), 0, rgb.shape[0] - 1)
        return float(coloured[sy, sx].mean()) if len(r) else 0.0

    brain = frame > 0
    return share(frame >= 0.6), share(_near(brain, 6) & ~_near(brain, 2)), share(~_near(brain, 6)), png


def _check_overlay_drawn(page: Any, pm: Dataset, anchor: str, wanted: int, kind: str) -> None:
    """Open the Parametric Map on the peak slice: coloured over the brain's hot pixels, not outside."""
    assert pm.SeriesDescription in page.inner_text("body")
    _open_series(page, PM_DESCRIPTION)
    frame = _frame_on(pm, anchor)
    spacing = tuple(float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    time.sleep(2)
    _go_to_instance(page, wanted, int(pm.NumberOfFrames))
    deadline = time.monotonic() + 90.0
    inside, near, far, png = 0.0, 1.0, 1.0, b""
    while time.monotonic() < deadline:  # the overlay volume loads after the source images
        inside, near, far, png = _overlay_on_screen(page, frame, spacing)  # type: ignore[arg-type]
        if inside >= 0.8:
            break
        time.sleep(1.0)
    (SCREENSHOTS / f"{kind}_overlay.png").write_bytes(png)
    assert f"I:{wanted} (" in page.inner_text("body"), "the overlay view left the peak slice"
    assert inside >= 0.8, f"high attention not drawn in colour ({inside:.0%} of its pixels coloured)"
    assert near <= 0.05, f"colour just outside the brain ({near:.1%} of those pixels)"
    assert far <= 0.01, f"colour far outside the brain ({far:.1%} of those pixels)"


@pytest.mark.parametrize("kind", ["CT", "MR"])
def test_radiologist_sees_results_in_ohif(kind: str, tmp_path: Path, orthanc_node_viewer: tuple[OrthancDicomWeb, Any, str]) -> None:
    orthanc, node, viewer_url = orthanc_node_viewer
    study = _write_study(kind, tmp_path / f"study_{kind}")
    orthanc.upload(study.paths())
    orthanc.send_study(study.study_uid, "fpenode")
    srs, scs = _wait_for_results(
        orthanc, study.study_uid, n_sc=25 + 1, log=node.log_text, gave_up=lambda: node.process.poll() is not None
    )
    scs, _ = split_summary(scs)  # the 25 slice captures (the summary is a series of its own)
    sr = srs[0]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with chromium_page() as page:
        page.goto(f"{viewer_url}/viewer?StudyInstanceUIDs={study.study_uid}")
        # The study browser lists both result series with their descriptions.
        page.get_by_text(SR_DESCRIPTION).first.wait_for(state="visible", timeout=90_000)
        page.get_by_text(SC_DESCRIPTION).first.wait_for(state="visible", timeout=30_000)
        body = page.inner_text("body")
        assert sr.SeriesDescription in body
        assert scs[0].SeriesDescription in body

        # Opening the SR draws the peak outline on its source slice, labelled with the value.
        _open_series(page, SR_DESCRIPTION)
        texts = _wait_for_svg_label(page, "first pass effect", timeout_s=90.0)
        if not any("first pass effect" in t.lower() for t in texts):
            # A slow software renderer can miss the first hydration; open the SR once more.
            _open_series(page, SR_DESCRIPTION)
            texts = _wait_for_svg_label(page, "first pass effect", timeout_s=90.0)
        page.screenshot(path=str(SCREENSHOTS / f"{kind}_sr.png"))
        label = next((t for t in texts if "first pass effect" in t.lower()), None)
        assert label is not None, f"no measurement label drawn over the slice; SVG text: {texts}"
        assert "%" in label or "score" in label.lower()
        assert not code_labels(texts), f"the SR's labels show code numbers, not words: {code_labels(texts)}"
        outlines = page.eval_on_selector_all("svg path, svg polyline, svg polygon", "els => els.length")
        assert outlines > 0
        # ... on the right slice: the viewport shows the source image the region references.
        anchor = _anchored_instance(sr)
        wanted = _instance_number(study, anchor)
        assert f"I:{wanted} (" in page.inner_text("body"), f"viewport is not on instance {wanted}"

        # The attention-map series, scrolled to the capture of the peak slice, shows the overlay.
        _open_series(page, SC_DESCRIPTION)
        time.sleep(3)
        peak_capture = _capture_on(scs, anchor)
        page.mouse.move(800, 450)
        for _ in range(peak_capture - 1):
            page.keyboard.press("ArrowDown")
        time.sleep(2)
        png = page.screenshot(path=str(SCREENSHOTS / f"{kind}_attention.png"))
        assert f"I:{peak_capture} (" in page.inner_text("body"), f"captures not scrolled to {peak_capture}"
        assert coloured_fraction(png) > 0.01, "the attention overlay is not visible"

        # The Parametric Map is listed and drawn over the source series on the peak slice.
        _check_overlay_drawn(page, _parametric_map(orthanc, study.study_uid), anchor, wanted, kind)
