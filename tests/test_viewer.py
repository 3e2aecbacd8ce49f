"""What a radiologist sees: fpe-node's results in the OHIF viewer over Orthanc, in a real browser.

A CT study and an MR study go from Orthanc (with its DICOMweb plugin) through ``fpe-node
serve`` and back; the test then opens ``/viewer?StudyInstanceUIDs=<uid>`` in Debian's headless
Chromium and checks what a radiologist would see:

* the study browser lists the SR and the attention-map series with their descriptions;
* opening the SR draws the outline of the attention peak on its source slice, labelled with
  the probability (or score) text;
* the attention-map series displays a coloured overlay (its burned-in text says "not for
  diagnostic use", checked in the DICOM pixel data by the reports tests).

Screenshots are saved under ``test-output/viewer/`` (or ``$FPENODE_TEST_OUTPUT/viewer``) so a
person can look at them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from tests.archives import free_port
from tests.conftest import REPO_ROOT, TEST_PEER
from tests.factory import Study, write_ct_stroke_study, write_mr_stroke_study
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
SCREENSHOTS = Path(os.environ.get("FPENODE_TEST_OUTPUT", REPO_ROOT / "test-output")) / "viewer"


def _write_study(kind: str, folder: Path) -> Study:
    """A CT or MR stroke study acquired a few minutes ago.

    The MR's DWI is a b1000 trace series (as Siemens' TRACEW): OHIF 3.13 shows a series holding
    b0 and b1000 at the same positions as a 4-D volume and hangs when an SR asks it to draw a
    region on one of its images (see docs/reports.md, "How viewers show it").
    """
    acquired = dt.datetime.now() - dt.timedelta(minutes=10)
    when = {"study_date": acquired.strftime("%Y%m%d"), "study_time": acquired.strftime("%H%M%S")}
    if kind == "CT":
        return write_ct_stroke_study(folder, rows=128, thin_slices=40, with_thick=False, with_reformats=False,
                                     with_mips=False, seed=11, **when)
    return write_mr_stroke_study(folder, rows=96, n_slices=24, dwi="trace", seed=12, **when)


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
