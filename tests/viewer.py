"""Viewer test harness: Orthanc with DICOMweb, the prebuilt OHIF viewer, headless Chromium.

Everything runs on loopback: Orthanc (Debian, with the ``orthanc-dicomweb`` plugin), a
same-origin server for OHIF's static build that forwards ``/dicom-web/`` to Orthanc
(``deploy/viewer/server.py``), and Debian's Chromium driven by Playwright (never a downloaded
browser). The OHIF build is installed by ``deploy/viewer/install_ohif.sh`` (``make test`` and
``.ci/run`` run it); a test that needs it fails when it is missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from deploy.viewer.server import ViewerServer
from tests.archives import OrthancArchive

REPO = Path(__file__).resolve().parents[1]
OHIF_VERSION = os.environ.get("OHIF_VERSION", "3.13.2")
OHIF_DIST = Path(os.environ.get("FPENODE_OHIF_DIST", REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"))
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium as root
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def require_viewer_tools() -> None:
    """Fail (never skip) with the missing piece named."""
    missing = [str(p) for p in (DICOMWEB_PLUGIN, CHROMIUM, OHIF_DIST / "index.html") if not p.exists()]
    if missing:
        raise AssertionError(
            "viewer harness incomplete, missing: " + ", ".join(missing) + " (run .ci/run or deploy/viewer/install_ohif.sh)"
        )


class OrthancDicomWeb(OrthancArchive):
    """Orthanc with its DICOMweb plugin enabled at ``/dicom-web/``."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        }
        return config


@contextmanager
def viewer_server(orthanc_url: str) -> Iterator[ViewerServer]:
    """OHIF served on a free loopback port, its DICOMweb root forwarded to ``orthanc_url``."""
    server = ViewerServer(OHIF_DIST, orthanc_url).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Playwright page in Debian's headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            # OHIF's onboarding tour would cover the viewport: mark it as seen.
            context.add_init_script(
                "try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}"
            )
            yield context.new_page()
        finally:
            browser.close()


def skip_tours(page: Any) -> None:
    """Close OHIF's onboarding pop-ups if any are shown."""
    for _ in range(3):
        button = page.get_by_text("Skip all")
        if button.count() == 0:
            return
        try:
            button.first.click(timeout=2000)
        except Exception:  # noqa: BLE001 - the tour may close itself between count and click
            return
        time.sleep(0.3)


def wait_for_text(page: Any, text: str, timeout_s: float = 60.0) -> None:
    """Wait until ``text`` is visible anywhere in the page (DOM or SVG annotation layer)."""
    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=timeout_s * 1000)


def svg_texts(page: Any, timeout_s: float = 20.0) -> list[str]:
    """Text drawn by Cornerstone's SVG annotation layer (measurement labels).

    Fails, rather than waiting for ever, when the page's script thread is stuck.
    """
    handle = page.wait_for_function(
        "() => Array.from(document.querySelectorAll('svg text')).map(e => e.textContent)",
        timeout=timeout_s * 1000,
    )
    return [t.strip() for t in handle.json_value() if t and t.strip()]


def coloured_fraction(png: bytes) -> float:
    """Share of clearly coloured (not grey) pixels in a screenshot: the attention overlay."""
    from io import BytesIO

    from PIL import Image

    rgb = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float((spread > 60).mean())
