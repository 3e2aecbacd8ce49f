"""``make demo``: Orthanc, the OHIF viewer and fpe-node wired together on loopback.

It starts Orthanc (Debian, with DICOMweb), ``fpe-node serve`` (demonstration weights, whose
results it explicitly allows into this Orthanc only), and the OHIF viewer on one origin;
generates a synthetic CT stroke study, stores it in Orthanc and asks Orthanc to send it to
fpe-node; waits for the SR and attention-map captures to come back, then prints the URL
where a newcomer sees the result in their own browser. Ctrl-C stops everything cleanly.

Everything it writes lives under ``--workdir`` (default ``var/demo`` in the repository).
The study is synthetic (a phantom head) and the weights are untrained: the results say so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import yaml
from pydicom import dcmread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.viewer.server import ViewerServer  # noqa: E402
from tests.archives import free_port  # noqa: E402
from tests.factory import write_ct_stroke_study  # noqa: E402
from tests.viewer import OHIF_DIST, OrthancDicomWeb  # noqa: E402

NODE_AE = "FPENODE"
RESULT_TIMEOUT_S = 300.0


def _node_config(workdir: Path, node_port: int, orthanc: OrthancDicomWeb) -> Path:
    config = {
        "network": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port},
        "storage": {"data_dir": str(workdir / "node")},
        "completion": {"series_quiet_s": 2.0, "study_timeout_s": 60.0},
        # The demo's own Orthanc may receive demonstration results; a clinical archive never does
        # unless its site configuration says so.
        "delivery": {"allow_demonstration_results": True, "retry_initial_s": 1.0},
        "peers": [
            {
                "name": "demo-orthanc",
                "ae_titles": [orthanc.ae_title],
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "roles": ["source", "destination"],
            }
        ],
    }
    path = workdir / "fpe-node-demo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _wait_until_listening(port: int, node: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    """Wait until fpe-node accepts TCP connections (start-up migrates the index and loads libraries)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError("fpe-node serve stopped during start-up; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"fpe-node did not listen on port {port} within {timeout_s:.0f} s")


def _wait_for_results(orthanc: OrthancDicomWeb, study_uid: str, node: subprocess.Popen[bytes]) -> list[str]:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError("fpe-node serve stopped; see its log")
        found = []
        for series in orthanc.study_series(study_uid):
            instances = orthanc.series_instances(series["ID"])
            if not instances:
                continue
            header = dcmread(io.BytesIO(orthanc.instance_file(instances[0]["ID"])), stop_before_pixels=True)
            if getattr(header, "Manufacturer", "") == "fpe-node":
                found.append(str(header.get("SeriesDescription", "")))
        if any("result" in d for d in found) and any("attention" in d for d in found):
            return found
        time.sleep(1.0)
    raise TimeoutError(f"no results in Orthanc after {RESULT_TIMEOUT_S:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fpe-node demo: Orthanc + OHIF + fpe-node on loopback")
    parser.add_argument("--workdir", type=Path, default=REPO / "var" / "demo")
    parser.add_argument("--viewer-port", type=int, default=3000)
    parser.add_argument("--once", action="store_true", help="exit once the results are in Orthanc (for tests)")
    args = parser.parse_args(argv)

    if not (OHIF_DIST / "index.html").exists():
        subprocess.run(["bash", str(REPO / "deploy" / "viewer" / "install_ohif.sh")], check=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)

    node_port = free_port()
    orthanc = OrthancDicomWeb(args.workdir / "orthanc", modalities={"fpenode": (NODE_AE, "127.0.0.1", node_port)})
    node: subprocess.Popen[bytes] | None = None
    viewer: ViewerServer | None = None
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        print("starting Orthanc ...", flush=True)
        orthanc.start()
        config = _node_config(args.workdir, node_port, orthanc)
        log = (args.workdir / "fpe-node.log").open("wb")
        print(f"starting fpe-node (AE {NODE_AE}, port {node_port}, log {log.name}) ...", flush=True)
        node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--config", str(config), "serve"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        viewer = ViewerServer(OHIF_DIST, orthanc.url, args.viewer_port).start()
        _wait_until_listening(node_port, node)

        # Acquired a few minutes ago: eligibility turns away older studies (a PACS's prefetched priors).
        acquired = dt.datetime.now() - dt.timedelta(minutes=5)
        study = write_ct_stroke_study(args.workdir / "study", rows=128, thin_slices=60, with_thick=False,
                                      with_reformats=False, with_mips=False, seed=7,
                                      study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"))
        print(f"sending a synthetic CT stroke study ({len(study.paths())} images) Orthanc -> fpe-node ...", flush=True)
        orthanc.upload(study.paths())
        time.sleep(1.0)
        orthanc.send_study(study.study_uid, "fpenode")
        series = _wait_for_results(orthanc, study.study_uid, node)
        print("results back in Orthanc: " + "; ".join(sorted(series)), flush=True)
        print("")
        print(f"  Open in your browser:  {viewer.url}/viewer?StudyInstanceUIDs={study.study_uid}")
        print(f"  Orthanc explorer:      {orthanc.url}/app/explorer.html")
        print("  (untrained demonstration weights: the result is random; research use only)")
        print("")
        if args.once:
            return 0
        print("Ctrl-C stops the demo.", flush=True)
        while not stopping and node.poll() is None:
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", flush=True)
        if viewer is not None:
            viewer.stop()
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        orthanc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
