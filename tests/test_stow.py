"""DICOMweb destinations: results stored by STOW-RS in Orthanc's DICOMweb plugin, with HTTP basic auth.

Orthanc (Debian, with ``orthanc-dicomweb``) runs with authentication on and one registered user.
The node runs in-process with the reduced test checkpoint: a synthetic CT study is sent to it
by C-STORE, analysed for real (:class:`dicom_node.worker.Analyst`), and its SR and captures
go through the outbox to a destination registered with ``fpe-node peers add --kind dicomweb``
(the password in a file). The test finds them through QIDO-RS and retrieves the SR by WADO-RS.
With a wrong password the archive answers 401 at each retry and the rows end as dead letters,
shown by ``fpe-node studies`` with the reason.

What Orthanc cannot be made to answer (a partial 202 in XML, a permanent FailureReason, 0x0122
for an SR class, bearer tokens, TLS with client certificates) comes from a small loopback HTTP
server that parses each multipart request for real and answers as PS3.18 10.5.3 allows.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import io
import ipaddress
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
import yaml

from dicom_node.bootstrap import Node, build_node
from dicom_node.delivery import sr_recoder
from dicom_node.cli import main
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.lifecycle import StudyState
from dicom_node.outbox import Outbox, ResultFile, RoutingContext, SenderByKind, StudyDelivery
from dicom_node.peers import PeerRegistry
from dicom_node.scu import COMPREHENSIVE_SR, OutgoingObject, StoreScu
from dicom_node.settings import DicomWebSettings, SettingsError, load_settings
from dicom_node.stow import StowClient, StowDestination, interpret_response, multipart_body, parse_response_body
from dicom_node.worker import Analyst
from reports.uids import UIDFactory
from tests.archives import make_sc, make_sr
from tests.conftest import NodeLog, SettingsFactory, wait_study_state
from tests.factory import Study, write_ct_stroke_study
from tests.peers import send_datasets
from tests.training_support import reduced_checkpoint
from tests.viewer import OrthancDicomWeb

USER = "fpe-node"
PASSWORD = "Stow-s3cret-9"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class AuthenticatedOrthanc(OrthancDicomWeb):
    """Orthanc's DICOMweb plugin behind HTTP basic authentication (one registered user)."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = {USER: PASSWORD}
        return config

    def request(self, method: str, path: str, body: bytes | None = None, timeout_s: float = 60.0,
                accept: str | None = None) -> Any:
        """One REST call with the registered user's credentials (JSON decoded, else bytes)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        if accept is not None:
            req.add_header("Accept", accept)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            payload = response.read()
            return json.loads(payload) if "json" in response.headers.get("Content-Type", "") else payload

    def qido_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies/{uid}/instances`` (PS3.18 10.6); [] when the study is unknown."""
        found = self.request("GET", f"/dicom-web/studies/{study_uid}/instances", accept="application/dicom+json")
        return list(found) if isinstance(found, list) else []

    def wado_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> pydicom.Dataset:
        """WADO-RS retrieve of one instance (PS3.18 10.4): the single application/dicom part."""
        path = f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        req = urllib.request.Request(self.url + path, headers={
            "Accept": 'multipart/related; type="application/dicom"',
            "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        })
        with urllib.request.urlopen(req, timeout=30) as response:
            head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.read())
        parts = [part.get_payload(decode=True) for part in message.iter_parts()]
        assert len(parts) == 1
        return pydicom.dcmread(io.BytesIO(parts[0]))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthenticatedOrthanc]:
    archive = AuthenticatedOrthanc(tmp_path_factory.mktemp("orthanc"))
    archive.start()
    try:
        yield archive
    finally:
        archive.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return reduced_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", name="res25-stow-test")


@pytest.fixture(autouse=True)
def node_records(node_log: NodeLog) -> NodeLog:
    """The node's log records (tests/conftest.py NodeLog: the CLI's logging set-up replaces root handlers)."""
    return node_log


def _site_file(tmp_path: Path, data_dir: Path) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"storage": {"data_dir": str(data_dir)}}), encoding="utf-8")
    return site


def _register(site: Path, orthanc: AuthenticatedOrthanc, secret_file: Path) -> None:
    """``fpe-node peers add`` of the Orthanc DICOMweb service as a destination, password in a file."""
    assert main(["--config", str(site), "peers", "add", "orthanc-web", "--kind", "dicomweb", "--role", "destination",
                 "--url", f"{orthanc.url}/dicom-web", "--auth", "basic", "--username", USER,
                 "--password-file", str(secret_file)]) == 0


def _analysed_and_queued(node: Node, tmp_path: Path) -> tuple[Study, list[str]]:
    """A CT study sent by C-STORE, analysed by the reduced model, its results queued; their SOP UIDs."""
    now = dt.datetime.now() - dt.timedelta(minutes=5)
    study = write_ct_stroke_study(  # the smallest study the CT pipeline accepts: 88 mm NCCT, 84 mm CTA
        tmp_path / "study", rows=48, thin_slices=22, thin_spacing=4.0, cta_slices=28, cta_spacing=3.0, with_thick=False,
        with_localizer=False, with_mips=False, with_dose_report=False, with_reformats=False,
        study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
    )
    assert set(send_datasets(node.scp.address[1], [pydicom.dcmread(p) for p in study.paths()])) == {0}
    wait_study_state(node.lifecycle, study.study_uid, {StudyState.QUEUED}, timeout_s=60.0, poll_s=0.2)
    outcome = Analyst(node.settings, session_factory=node.session_factory).run_next()
    assert outcome is not None and outcome.state is StudyState.ANALYSED
    report = node.delivery.on_result(study.study_uid, outcome.result)  # type: ignore[arg-type]
    assert report.sending and report.failed_reason is None
    return study, [f.sop_instance_uid for f in report.files]


@pytest.fixture
def stow_node(make_settings: SettingsFactory, checkpoint: Path) -> Iterator[Any]:
    """``start(**delivery)``: the node with the reduced checkpoint, started; stopped after the test."""
    started: list[Node] = []

    def start(**delivery: Any) -> Node:
        settings = make_settings(
            inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1},
            completion={"series_quiet_s": 0.5, "study_timeout_s": 30.0},
            delivery={"scan_interval_s": 0.3, **delivery},
        )
        node = build_node(settings)
        node.start("127.0.0.1", 0)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(grace_s=1.0)


def test_results_arrive_by_stow_rs_with_basic_auth(
    stow_node: Any, orthanc: AuthenticatedOrthanc, data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], node_records: NodeLog,
) -> None:
    site = _site_file(tmp_path, data_dir)
    secret = tmp_path / "orthanc.secret"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    _register(site, orthanc, secret)
    assert main(["--config", str(site), "peers", "echo", "orthanc-web"]) == 0  # QIDO-RS with the credentials
    node = stow_node(retry_initial_s=0.5)
    study, sop_uids = _analysed_and_queued(node, tmp_path)
    assert wait_study_state(node.lifecycle, study.study_uid, {StudyState.DELIVERED, StudyState.DEAD_LETTERED,
                                                            StudyState.PARTLY_DELIVERED}, timeout_s=60.0) \
        is StudyState.DELIVERED

    rows = node.delivery.outbox.rows(study.study_uid)
    assert {row.sop_instance_uid for row in rows} == set(sop_uids)
    assert {(row.destination, row.state, row.last_http_status) for row in rows} == {("orthanc-web", "sent", 200)}
    found = orthanc.qido_instances(study.study_uid)
    by_uid = {item["00080018"]["Value"][0]: item for item in found}
    assert set(sop_uids) <= set(by_uid)
    classes = {by_uid[uid]["00080016"]["Value"][0] for uid in sop_uids}
    assert classes == {SR_CLASS, SC_CLASS}  # the SR and the attention captures
    (sr_row,) = [row for row in rows if row.kind == "sr"]
    series_uid = by_uid[sr_row.sop_instance_uid]["0020000E"]["Value"][0]
    retrieved = orthanc.wado_instance(study.study_uid, series_uid, sr_row.sop_instance_uid)
    sent = pydicom.dcmread(data_dir / "results" / study.study_uid / series_uid / f"{sr_row.sop_instance_uid}.dcm")
    assert retrieved.SOPClassUID == SR_CLASS and retrieved.StudyInstanceUID == study.study_uid
    assert retrieved.ContentSequence == sent.ContentSequence  # the SR's content arrived as written

    # the password is nowhere the node shows or logs: peers list/export, config show, the log
    capsys.readouterr()
    for command in (["peers", "list"], ["peers", "export"], ["peers", "list", "--json"], ["config", "show"]):
        assert main(["--config", str(site), *command]) == 0
    shown = capsys.readouterr()
    assert f"{orthanc.url}/dicom-web" in shown.out and str(secret) in shown.out
    assert PASSWORD not in shown.out + shown.err
    assert any("credentials sent over plain HTTP" in line for line in node_records.lines)
    assert not any(PASSWORD in line for line in node_records.lines)
    assert not any("open to other users" in line for line in node_records.lines)  # mode 600


def test_wrong_password_is_dead_lettered_after_the_retries(
    stow_node: Any, orthanc: AuthenticatedOrthanc, data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], node_records: NodeLog,
) -> None:
    site = _site_file(tmp_path, data_dir)
    secret = tmp_path / "wrong.secret"
    secret.write_text("not-the-password\n", encoding="utf-8")
    secret.chmod(0o644)
    _register(site, orthanc, secret)
    node = stow_node(retry_initial_s=0.4, retry_max_s=0.8, deadline_s=2.5)
    study, sop_uids = _analysed_and_queued(node, tmp_path)
    assert wait_study_state(node.lifecycle, study.study_uid, {StudyState.DELIVERED, StudyState.DEAD_LETTERED,
                                                            StudyState.PARTLY_DELIVERED}, timeout_s=60.0) \
        is StudyState.DEAD_LETTERED
    assert orthanc.qido_instances(study.study_uid) == []

    capsys.readouterr()
    assert main(["--config", str(site), "studies", "--state", "dead_lettered", "--json"]) == 0
    (listed,) = [row for row in json.loads(capsys.readouterr().out) if row["study_uid"] == study.study_uid]
    assert listed["dead_letters"] == len(sop_uids)
    assert main(["--config", str(site), "studies", "--study", study.study_uid]) == 0
    detail = capsys.readouterr().out
    assert "dead_lettered" in detail and "HTTP 401 Unauthorized" in detail
    rows = node.delivery.outbox.rows(study.study_uid)
    assert {(row.state, row.last_http_status, row.last_error) for row in rows} == {
        ("dead", 401, "STOW-RS HTTP 401 Unauthorized")}
    assert all(row.attempts >= 2 for row in rows)  # retried with the backoff before the dead letter
    assert any("open to other users (mode 0644)" in line for line in node_records.lines)


def test_per_instance_failure_reasons_are_read_from_the_archive(orthanc: AuthenticatedOrthanc, tmp_path: Path) -> None:
    """Orthanc's own 409 answer (a study-restricted STOW-RS request, PS3.18 10.5.1, given instances of
    another study) names each instance's FailureReason; the same in Native DICOM Model XML."""
    study_uid = "2.25.4242"
    objects = []
    for number, dataset in enumerate([make_sr(tmp_path / "sr.dcm", study_uid),
                                      make_sc(tmp_path / "sc.dcm", study_uid, "2.25.4243")]):
        path = tmp_path / ("sr.dcm", "sc.dcm")[number]
        objects.append(OutgoingObject(path, str(dataset.SOPInstanceUID), str(dataset.SOPClassUID)))
    body, content_type = multipart_body([o.path.read_bytes() for o in objects])
    request = urllib.request.Request(f"{orthanc.url}/dicom-web/studies/2.25.1", data=body, method="POST", headers={
        "Content-Type": content_type, "Accept": "application/dicom+json",
        "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
    })
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("Orthanc stored instances of another study")
    except urllib.error.HTTPError as refused:
        status, answer, answer_type = refused.code, refused.read(), refused.headers.get("Content-Type", "")
    assert status == 409
    outcomes = interpret_response(status, answer_type, answer, objects)
    assert [(o.ok, o.status, o.http_status) for o in outcomes] == [(False, 0x0110, 409)] * 2
    assert all("FailureReason 0x0110 (processing failure)" in (o.error or "") for o in outcomes)
    assert not any(o.permanent for o in outcomes)  # a processing failure may pass: retried

    xml = (
        '<?xml version="1.0" encoding="utf-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        '<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">'
        '<DicomAttribute tag="00081150" vr="UI"><Value number="1">' + objects[1].sop_class_uid + '</Value></DicomAttribute>'
        '<DicomAttribute tag="00081155" vr="UI"><Value number="1">' + objects[1].sop_instance_uid + '</Value></DicomAttribute>'
        '<DicomAttribute tag="00081197" vr="US"><Value number="1">43264</Value></DicomAttribute></Item></DicomAttribute>'
        '<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence"><Item number="1">'
        '<DicomAttribute tag="00081150" vr="UI"><Value number="1">' + objects[0].sop_class_uid + '</Value></DicomAttribute>'
        '<DicomAttribute tag="00081155" vr="UI"><Value number="1">' + objects[0].sop_instance_uid + '</Value></DicomAttribute>'
        '</Item></DicomAttribute></NativeDicomModel>'
    ).encode()
    assert parse_response_body("application/dicom+xml", xml) is not None
    stored, failed = interpret_response(202, "application/dicom+xml", xml, objects)
    assert stored.ok and stored.sent_sop_class_uid == objects[0].sop_class_uid
    assert not failed.ok and failed.status == 0xA900 and failed.permanent  # data set does not match: for good
    assert DicomWebSettings(url=f"{orthanc.url}/dicom-web/").url == f"{orthanc.url}/dicom-web"


# --- what Orthanc does not answer: a partial 202 in XML, a permanent reason, bearer tokens -------------


def _native_item(sop_class: str, sop_uid: str, reason: int | None = None) -> str:
    text = (f'<Item number="1"><DicomAttribute tag="00081150" vr="UI"><Value number="1">{sop_class}</Value>'
            f'</DicomAttribute><DicomAttribute tag="00081155" vr="UI"><Value number="1">{sop_uid}</Value></DicomAttribute>')
    if reason is not None:
        text += f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value></DicomAttribute>'
    return text + "</Item>"


class _ScriptedStowArchive(ThreadingHTTPServer):
    """A loopback HTTP server answering STOW-RS as PS3.18 10.5.3 allows but Orthanc never does:
    401 unless the bearer token matches, else 202 (Native DICOM Model XML) with the FailureReason
    ``refusals`` gives an instance's SOP class (stored when it gives none). It parses each
    request's multipart body for real."""

    token: str | None = "tok-" + "7" * 12
    scheme = "http"

    def __init__(self, refusals: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.refusals = refusals
        self.requests: list[tuple[str, str, list[str]]] = []  # (path, content type, part types)
        self.classes: list[list[str]] = []  # the SOP classes of each authorised request's parts

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/wado"

    def serve_tls(self, context: ssl.SSLContext) -> None:
        """Answer over TLS (handshakes, client certificates and all, as ``context`` says); no token."""
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.scheme, self.token = "https", None


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: _ScriptedStowArchive

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        parts = list(message.iter_parts())
        self.server.requests.append((self.path, self.headers["Content-Type"], [p.get_content_type() for p in parts]))
        if self.server.token is not None and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        stored, failed = [], []
        datasets = [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in parts]
        self.server.classes.append([str(ds.SOPClassUID) for ds in datasets])
        for dataset in datasets:
            reason = self.server.refusals.get(str(dataset.SOPClassUID))
            item = _native_item(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), reason)
            (stored if reason is None else failed).append(item)
        answer = ('<?xml version="1.0" encoding="utf-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
                  'NativeDICOM"><DicomAttribute tag="00081198" vr="SQ">' + "".join(failed) + '</DicomAttribute>'
                  '<DicomAttribute tag="00081199" vr="SQ">' + "".join(stored) + "</DicomAttribute></NativeDicomModel>")
        payload = answer.encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/dicom+xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def scripted_outbox(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[_ScriptedStowArchive, Outbox, list[dt.datetime]]]:
    """The scripted archive (refusals from the test's parameter), an outbox on a fresh SQLite index
    with one SR and one capture of study 2.25.77 queued for it, and the outbox's clock."""
    archive = _ScriptedStowArchive(request.param)
    thread = threading.Thread(target=archive.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / "data")},
        "delivery": {"retry_initial_s": 10, "retry_max_s": 40, "deadline_s": 300},
    })
    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        service = DicomWebSettings(url=archive.url, auth="bearer", secret_env="FPE_TEST_STOW_TOKEN")
        clock = [dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)]
        stow = StowClient(10.0, recoder=sr_recoder(UIDFactory(None)))
        outbox = Outbox(build_session_factory(engine), settings.delivery, settings.storage.data_dir,
                        SenderByKind(StoreScu("FPENODE"), stow), lambda: [StowDestination("web", service)],
                        clock=lambda: clock[0])
        folder = settings.storage.results_dir / "2.25.77"
        folder.mkdir(parents=True)
        sr, sc = make_sr(folder / "sr.dcm", "2.25.77"), make_sc(folder / "sc.dcm", "2.25.77", "2.25.78")
        outbox.enqueue([
            ResultFile(folder / "sr.dcm", "2.25.77", str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID), SR_CLASS, "sr"),
            ResultFile(folder / "sc.dcm", "2.25.77", "2.25.78", str(sc.SOPInstanceUID), SC_CLASS, "sc"),
        ], RoutingContext(), demonstration=False)
        yield archive, outbox, clock
    finally:
        engine.dispose()
        archive.shutdown()
        archive.server_close()


@pytest.mark.parametrize("scripted_outbox", [{SC_CLASS: 0xA900}], indirect=True)
def test_partial_answer_records_each_instance_and_dead_letters_the_refused_at_once(
    scripted_outbox: tuple[_ScriptedStowArchive, Outbox, list[dt.datetime]], monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, outbox, clock = scripted_outbox
    monkeypatch.setenv("FPE_TEST_STOW_TOKEN", "stale-token")
    first = outbox.run_once()
    assert (first.failed, first.dead) == (2, 0)  # 401: retried with the backoff
    assert {(r.state, r.last_http_status) for r in outbox.rows()} == {("failed", 401)}

    monkeypatch.setenv("FPE_TEST_STOW_TOKEN", archive.token)  # read at each delivery: no registry change
    clock[0] += dt.timedelta(seconds=11)
    second = outbox.run_once()
    assert (second.sent, second.dead) == (1, 1)
    assert second.settled == {"2.25.77": StudyDelivery.PARTLY_DELIVERED}
    by_kind = {row.kind: row for row in outbox.rows()}
    assert (by_kind["sr"].state, by_kind["sr"].last_http_status, by_kind["sr"].last_status) == ("sent", 202, 0)
    refused = by_kind["sc"]
    assert (refused.state, refused.attempts, refused.last_status) == ("dead", 2, 0xA900)
    assert refused.last_error == "STOW-RS FailureReason 0xA900 (data set does not match SOP class) (HTTP 202 Accepted)"
    path, content_type, part_types = archive.requests[-1]
    assert path == "/wado/studies" and content_type.startswith('multipart/related; type="application/dicom"')
    assert part_types == ["application/dicom", "application/dicom"]


@pytest.mark.parametrize("scripted_outbox", [{SR_CLASS: 0x0122}], indirect=True)
def test_sr_refused_as_3d_is_stored_as_comprehensive_sr(
    scripted_outbox: tuple[_ScriptedStowArchive, Outbox, list[dt.datetime]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SR class fallback of the C-STORE SCU, by STOW-RS: 0x0122 for Comprehensive 3D SR, then
    the same content as Comprehensive SR with a UID derived from the original's."""
    archive, outbox, _ = scripted_outbox
    monkeypatch.setenv("FPE_TEST_STOW_TOKEN", archive.token)
    report = outbox.run_once()
    assert (report.sent, report.failed, report.dead) == (2, 0, 0)
    assert report.settled == {"2.25.77": StudyDelivery.DELIVERED}
    assert archive.classes == [[SR_CLASS, SC_CLASS], [COMPREHENSIVE_SR]]
    sr_row = next(row for row in outbox.rows() if row.kind == "sr")
    assert sr_row.sent_sop_class_uid == COMPREHENSIVE_SR
    assert sr_row.sent_sop_instance_uid not in (None, sr_row.sop_instance_uid)


def test_dicomweb_peers_are_checked_and_secrets_never_inline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site_file(tmp_path, tmp_path / "data")
    refused = {
        ("--url", "https://fpe:pw@pacs.example.org/dicom-web"): "not in the URL",
        ("--url", "https://pacs.example.org/dicom-web", "--auth", "basic", "--username", "u"): "needs secret_env",
        ("--url", "https://pacs.example.org/dicom-web", "--auth", "bearer", "--password-file", "x"): "go with --auth basic",
        ("--url", "http://pacs.example.org/dicom-web", "--auth", "client-certificate", "--client-cert", "c.pem"):
            "needs an https:// URL",
        ("--url", "ftp://pacs.example.org/"): "http:// or https://",
    }
    for options, message in refused.items():
        code = main(["--config", str(site), "peers", "add", "web", "--kind", "dicomweb", "--role", "destination",
                     *options])
        assert code == 1 and message in capsys.readouterr().err, options
    with pytest.raises(SettingsError, match="dicomweb section"):
        load_settings(environ={}, overrides={"peers": [{"name": "web", "kind": "dicomweb", "roles": ["destination"]}]})

    # a dicomweb peer of the site file is seeded at start-up; export and import keep where its
    # token is read, never a value
    seeded = load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path / "data")}, "peers": [
        {"name": "web", "kind": "dicomweb", "roles": ["destination"], "dicomweb": {
            "url": "https://pacs.example.org/dicom-web/", "auth": "bearer", "secret_env": "PACS_TOKEN",
            "ca_bundle": "/etc/fpe-node/ca.pem"}}]})
    engine = build_engine(seeded)
    try:
        upgrade_to_head(engine)
        registry = PeerRegistry(build_session_factory(engine))
        assert registry.seed(seeded.peers) == 1 and registry.seed(seeded.peers) == 0  # unchanged: no new audit row
        peer = registry.get("web")
        assert peer is not None and peer.kind == "dicomweb" and peer.dicomweb == seeded.peers[0].dicomweb
        assert peer.dicomweb.url == "https://pacs.example.org/dicom-web"
    finally:
        engine.dispose()
    exported = tmp_path / "peers.yaml"
    assert main(["--config", str(site), "peers", "export", str(exported)]) == 0
    (tmp_path / "other").mkdir()
    other = _site_file(tmp_path / "other", tmp_path / "other" / "data")
    assert main(["--config", str(other), "peers", "import", str(exported)]) == 0
    capsys.readouterr()
    assert main(["--config", str(other), "peers", "list", "--json"]) == 0
    (imported,) = json.loads(capsys.readouterr().out)
    assert imported["kind"] == "dicomweb" and imported["dicomweb"] == {
        "url": "https://pacs.example.org/dicom-web", "auth": "bearer", "secret_env": "PACS_TOKEN",
        "ca_bundle": "/etc/fpe-node/ca.pem"}


# --- TLS: server verification, its opt-out, client-certificate authentication ------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    files: dict[str, Path] = {}

    def issue(name: str, subject: str, issuer: tuple[Any, Any] | None, *, ca: bool = False,
              usage: Any = None, ip: str | None = None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
        builder = (x509.CertificateBuilder().subject_name(subject_name)
                   .issuer_name(subject_name if issuer_cert is None else issuer_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                            critical=False)
        certificate = builder.sign(issuer_key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        files[name], files[f"{name}_key"] = folder / f"{name}.pem", folder / f"{name}.key"
        return certificate, key

    ca = issue("ca", "fpe-node test CA", None, ca=True)
    issue("server", "127.0.0.1", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, ip="127.0.0.1")
    issue("client", "fpe-node", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return files


def test_tls_verification_and_client_certificates(tmp_path: Path, node_records: NodeLog) -> None:
    pem = _certificates(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pem["ca"]))
    server_context.load_cert_chain(str(pem["server"]), str(pem["server_key"]))
    server_context.verify_mode = ssl.CERT_REQUIRED  # the archive authenticates the node by its certificate
    archive = _ScriptedStowArchive({})
    archive.serve_tls(server_context)
    thread = threading.Thread(target=archive.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    sr = make_sr(tmp_path / "sr.dcm", "2.25.91")
    objects = [OutgoingObject(tmp_path / "sr.dcm", str(sr.SOPInstanceUID), SR_CLASS)]
    client_auth = {"auth": "client-certificate", "client_cert": pem["client"], "client_key": pem["client_key"]}

    def send(default_ca: Path | None = None, **service: Any) -> Any:
        client = StowClient(10.0, default_ca_bundle=default_ca)
        (outcome,) = client.send(StowDestination("tls-web", DicomWebSettings(url=archive.url, **service)), objects)
        return outcome

    try:
        assert send(ca_bundle=pem["ca"], **client_auth).ok  # verified with the site's CA, certificate accepted
        assert send(default_ca=pem["ca"], **client_auth).ok  # the node's delivery.tls CA when the peer has none
        untrusted = send(**client_auth)  # the system's CAs do not know the test CA
        assert not untrusted.ok and not untrusted.permanent and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
        assert not any("TLS verification is switched off" in line for line in node_records.lines)
        assert send(verify_tls=False, **client_auth).ok  # the opt-out works, and says so
        assert any("tls-web: TLS verification is switched off" in line for line in node_records.lines)
        without_certificate = send(ca_bundle=pem["ca"])
        assert not without_certificate.ok and without_certificate.http_status is None  # refused in the handshake
        missing = send(ca_bundle=pem["ca"], auth="client-certificate", client_cert=tmp_path / "absent.pem")
        assert not missing.ok and "not attempted" in (missing.error or "")
        assert len(archive.requests) == 3  # only the verified, authenticated sends reached the archive
    finally:
        archive.shutdown()
        archive.server_close()
