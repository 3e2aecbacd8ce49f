"""`make demo` wiring: Orthanc, fpe-node and the viewer on loopback bring a study's results back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.archives import free_port
from tests.conftest import REPO_ROOT
from tests.viewer import require_viewer_tools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_demo_prints_the_viewer_url_once_results_are_back(tmp_path: Path) -> None:
    require_viewer_tools()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy" / "demo.py"), "--once", "--workdir", str(tmp_path / "demo"),
         "--viewer-port", str(free_port())],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=360,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "results back in Orthanc" in done.stdout
    assert "FPE AI result DEMO" in done.stdout and "FPE attention map DEMO" in done.stdout
    assert "/viewer?StudyInstanceUIDs=" in done.stdout
