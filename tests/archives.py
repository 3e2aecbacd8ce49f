"""Real archives on loopback for delivery tests: DCMTK ``storescp`` and Orthanc.

Both run as subprocesses in a test's ``tmp_path``, on free loopback ports, with
``TCP_NODELAY=1`` in their environment, and every wait is bounded in time.

- :class:`StorescpArchive`: DCMTK ``/usr/bin/storescp`` in debug mode. It overwrites files
  of the same SOP Instance UID, so counting files cannot show re-sends; the log can:
  :meth:`StorescpArchive.store_requests` lists the Affected SOP Instance UID of every C-STORE
  request it received (across restarts). It can be restricted to a set of SOP classes (an
  association configuration profile, ``-xf``) to play an archive that refuses some SR classes.
- :class:`OrthancArchive`: Debian's ``/usr/sbin/Orthanc`` with its own JSON configuration
  (loopback DICOM and HTTP ports, storage in the tmp dir, no remote access, no authentication,
  the node as a DICOM modality) and a few REST helpers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE

STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
VERIFICATION = "1.2.840.10008.1.1"
START_TIMEOUT_S = 20.0
_AFFECTED_UID = re.compile(r"Affected SOP Instance UID\s*:\s*([0-9.]+)")
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


# Ports handed to peers that bind later (storescp, Orthanc): below Linux's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default). A port the kernel picks
# with bind(0) lies inside it, and the flood and fuzz tests' thousands of outgoing connections
# can take it as their source port (or leave it in TIME_WAIT) before the peer binds it:
# "TCP Initialization Error: Address already in use".
_PEER_PORTS = range(20_000, 32_000)
_port_picker = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside the ephemeral range when one is (bounded tries)."""
    for _ in range(200):
        port = _port_picker.choice(_PEER_PORTS)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nodelay_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def echo(host: str, port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout_s: float = 3.0) -> bool:
    """True when a C-ECHO to the SCP succeeds."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def _wait_until(predicate: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout_s} s")


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def _launch(
    command: Sequence[str], log_path: Path, cwd: Path, checks: Sequence[tuple[Callable[[], bool], str]]
) -> subprocess.Popen[bytes]:
    """Start ``command`` (``TCP_NODELAY=1``, output appended to ``log_path``) and wait, bounded, until
    every ``(predicate, what)`` check answers; when one fails or times out, stop it and re-raise."""
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(list(command), stdout=log_file, stderr=subprocess.STDOUT, env=_nodelay_env(), cwd=cwd)
    try:
        for predicate, what in checks:
            _wait_until(predicate, START_TIMEOUT_S, what, proc)
    except BaseException:
        _stop_process(proc)
        raise
    return proc


def _storescp_config(sop_classes: Sequence[str]) -> str:
    """An association configuration file (DCMTK ``-xf``) accepting only ``sop_classes``."""
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(_UNCOMPRESSED, start=1)]
    lines += ["[[PresentationContexts]]", "[Accepted]"]
    for i, uid in enumerate((VERIFICATION, *sop_classes), start=1):
        lines.append(f"PresentationContext{i} = {uid}\\Uncompressed")
    lines += ["[[Profiles]]", "[Restricted]", "PresentationContexts = Accepted", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class StorescpTLS:
    """``storescp +tls``: its certificate and key, and the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    ca: Path


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class StorescpArchive:
    """DCMTK ``storescp`` as an archive that can be stopped and restarted on the same port.

    Parameters
    ----------
    workdir:
        Folder for received files, the log and the configuration.
    ae_title:
        Its AE title.
    sop_classes:
        Accept only these storage SOP classes (uncompressed), or every class DCMTK knows
        with any transfer syntax when ``None``.
    """

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ARCHIVE",
        sop_classes: Sequence[str] | None = None,
        tls: StorescpTLS | None = None,
    ) -> None:
        if not STORESCP.exists():
            raise RuntimeError(f"{STORESCP} is missing (Debian package dcmtk)")
        self.workdir = workdir
        self.ae_title = ae_title
        self.sop_classes = tuple(sop_classes) if sop_classes is not None else None
        self.tls = tls
        self.port = free_port()
        self.host = "127.0.0.1"
        self.store_dir = workdir / "received"
        self.log_path = workdir / "storescp.log"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        cmd = [str(STORESCP), "-d", "-aet", self.ae_title, "-od", str(self.store_dir), "-dhl", "-ta", "10", "-td", "30"]
        if self.sop_classes is None:
            cmd.append("+xa")
        else:
            config = self.workdir / "storescp.cfg"
            config.write_text(_storescp_config(self.sop_classes), encoding="ascii")
            cmd += ["-xf", str(config), "Restricted"]
        if self.tls is not None:
            # DCMTK's default profile is BCP 195 non-downgrading; -rc: a client certificate is required.
            cmd += ["+tls", str(self.tls.key), str(self.tls.cert), "+cf", str(self.tls.ca), "-rc"]
        return [*cmd, str(self.port)]

    def start(self) -> None:
        """Start and wait until it answers C-ECHO."""
        if self.running:
            return
        if self.tls is None:
            ready = (lambda: echo(self.host, self.port, self.ae_title), "storescp")
        else:  # a TLS archive only answers a client it trusts: ready once it accepts connections
            ready = (lambda: _accepts(self.host, self.port), "storescp +tls")
        self._proc = _launch(self._command(), self.log_path, self.workdir, [ready])

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); received files and the log stay."""
        _stop_process(self._proc)
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def store_requests(self) -> list[str]:
        """Affected SOP Instance UID of every C-STORE request logged so far, in order."""
        if not self.log_path.exists():
            return []
        return _AFFECTED_UID.findall(self.log_path.read_text(encoding="utf-8", errors="replace"))

    def received_files(self) -> list[Path]:
        """The files on disk (one per SOP Instance UID: storescp overwrites)."""
        return sorted(p for p in self.store_dir.iterdir() if p.is_file())

    def __enter__(self) -> "StorescpArchive":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OrthancArchive:
    """Orthanc from Debian with its own configuration, on loopback ports.

    Parameters
    ----------
    workdir:
        Folder for its configuration, storage, index and log.
    modalities:
        DICOM modalities it knows, name -> (AE title, host, port); the node is one of them.
    ae_title:
        Orthanc's own AE title.
    """

    def __init__(
        self, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None, ae_title: str = "ORTHANC"
    ) -> None:
        if not ORTHANC.exists():
            raise RuntimeError(f"{ORTHANC} is missing (Debian package orthanc)")
        self.workdir = workdir
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.log_path = workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        return {
            "Name": "fpe-node-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "StableAge": 60,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 10,
            "SaveJobs": False,
        }

    def start(self) -> None:
        """Start and wait until both its REST API and its DICOM server answer."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        checks = [
            (self._rest_ready, "Orthanc REST"),
            (lambda: echo(self.host, self.dicom_port, self.ae_title), "Orthanc DICOM"),
        ]
        self._proc = _launch([str(ORTHANC), "--no-jobs", str(config_path)], self.log_path, self.workdir, checks)

    def stop(self) -> None:
        _stop_process(self._proc)
        self._proc = None

    def _rest_ready(self) -> bool:
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return True

    # --- REST helpers -------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, timeout_s: float = 60.0) -> Any:
        """One REST call; JSON answers are decoded, others returned as bytes."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            payload = response.read()
            if "json" in response.headers.get("Content-Type", ""):
                return json.loads(payload)
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, data: Any, timeout_s: float = 120.0) -> Any:
        return self.request("POST", path, json.dumps(data).encode("utf-8"), timeout_s=timeout_s)

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """Store files through REST (POST /instances); their Orthanc instance IDs."""
        return [str(self.request("POST", "/instances", Path(p).read_bytes())["ID"]) for p in paths]

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of a study, from its Study Instance UID."""
        found = self.post_json("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return str(found[0]) if found else None

    def send_study(self, study_uid: str, modality: str, timeout_s: float = 120.0) -> Any:
        """Ask Orthanc to C-STORE a study to a modality (synchronous job)."""
        study_id = self.study_id(study_uid)
        if study_id is None:
            raise KeyError(f"study {study_uid} not in Orthanc")
        return self.post_json(f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True},
                              timeout_s=timeout_s)

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series of a study with their main DICOM tags and instance IDs."""
        study_id = self.study_id(study_uid)
        if study_id is None:
            return []
        return list(self.get(f"/studies/{study_id}/series"))

    def series_instances(self, series_id: str) -> list[dict[str, Any]]:
        """Instances of a series (Orthanc IDs and main tags)."""
        return list(self.get(f"/series/{series_id}/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``simplified-tags`` of an instance."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file as Orthanc stored it."""
        return bytes(self.get(f"/instances/{instance_id}/file"))

    def __enter__(self) -> "OrthancArchive":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running(archive: StorescpArchive | OrthancArchive) -> Iterator[StorescpArchive | OrthancArchive]:
    """Start an archive for the duration of a ``with`` block."""
    archive.start()
    try:
        yield archive
    finally:
        archive.stop()


def require_tool(path: Path) -> None:
    """Fail (not skip) when a Debian tool the test needs is missing."""
    if not path.exists() and shutil.which(path.name) is None:
        raise RuntimeError(f"{path} is missing; .ci/run installs it")


# --- small result-like objects to deliver ------------------------------------------------

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _new_uid() -> str:
    import uuid

    return f"2.25.{uuid.uuid4().int}"


def _common(ds: Any, sop_class: str, study_uid: str, series_uid: str, modality: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _new_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Delivery^Test"
    ds.PatientID = "DELIV-1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "fpe-node"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def make_sr(path: Path, study_uid: str, *, with_3d: bool = False, by_reference: bool = False) -> Any:
    """A small Comprehensive 3D SR (container, text, numeric, 2-D region) written to ``path``.

    ``with_3d`` adds a SCOORD3D item (no fallback possible); ``by_reference`` adds a
    by-reference relationship (no Enhanced SR fallback).
    """
    from pydicom.dataset import Dataset

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    ds = Dataset()
    _common(ds, COMPREHENSIVE_3D_SR, study_uid, _new_uid(), "SR")
    ds.ContentDate, ds.ContentTime = "20260101", "120100"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [code("126000", "DCM", "Imaging Measurement Report")]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = [code("121106", "DCM", "Comment")]
    text.TextValue = "Research use only, not for diagnosis."
    num = Dataset()
    num.RelationshipType, num.ValueType = "CONTAINS", "NUM"
    num.ConceptNameCodeSequence = [code("FPE", "99FPENODE", "First pass effect score")]
    measured = Dataset()
    measured.NumericValue = "0.42"
    measured.MeasurementUnitsCodeSequence = [code("{ratio}", "UCUM", "ratio")]
    num.MeasuredValueSequence = [measured]
    region = Dataset()
    region.RelationshipType, region.ValueType = "INFERRED FROM", "SCOORD"
    region.GraphicType = "POLYLINE"
    region.GraphicData = [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 1.0]
    num.ContentSequence = [region]
    ds.ContentSequence = [text, num]
    if with_3d:
        region3d = Dataset()
        region3d.RelationshipType, region3d.ValueType = "CONTAINS", "SCOORD3D"
        region3d.ConceptNameCodeSequence = [code("111030", "DCM", "Image Region")]
        region3d.GraphicType = "POINT"
        region3d.GraphicData = [1.0, 2.0, 3.0]
        region3d.ReferencedFrameOfReferenceUID = _new_uid()
        ds.ContentSequence.append(region3d)
    if by_reference:
        ref = Dataset()
        ref.RelationshipType = "INFERRED FROM"
        ref.ReferencedContentItemIdentifier = [1, 2]
        num.ContentSequence.append(ref)
    ds.save_as(path, enforce_file_format=True)
    return ds


def make_sc(path: Path, study_uid: str, series_uid: str, number: int = 1, size: int = 16) -> Any:
    """A small single-frame Secondary Capture image written to ``path``."""
    import numpy as np
    from pydicom.dataset import Dataset

    ds = Dataset()
    _common(ds, SC_STORAGE, study_uid, series_uid, "OT")
    ds.InstanceNumber = number
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(size * size, dtype=np.uint8) % 251).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


# --- the whole node in-process ---------------------------------------------------------------


@contextmanager
def full_node(settings: Any) -> Iterator[Any]:
    """The node in-process with everything ``fpe-node serve`` runs (SCP, completion, inference
    workers, delivery), as :func:`dicom_node.bootstrap.build_node` wires it; stopped afterwards."""
    from dicom_node.bootstrap import build_node

    node = build_node(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_s=2.0)
