"""ATNA audit (issue 12): the audit table reaches a syslog collector as PS3.15 A.5 messages.

A syslog listener in the test is the collector. Every message it gets must be RFC 5424 framed
(PRI 85, APP-NAME fpe-node, MSGID DICOM+RFC3881) with an XML AuditMessage in the A.5.1 order
(EventIdentification, ActiveParticipant..., AuditSourceIdentification,
ParticipantObjectIdentification...), and carry no patient name, ID or birth date.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset

from dicom_node import audit
from dicom_node.atna import EVENTS, AuditConfigError, AuditContext, AuditExporter, build_exporter
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head, write_session
from dicom_node.index.models import AuditEntry
from dicom_node.outbox import Outbox, ResultFile, RoutingContext
from dicom_node.peers import PeerInfo, PeerRegistry
from dicom_node.scu import Destination, ScuTimeouts, StoreScu
from dicom_node.settings import load_settings
from tests.archives import SC_STORAGE, StorescpArchive, free_port, make_sc, make_sr
from tests.conftest import REPO_ROOT, ServeProcess
from tests.peers import DCMTK, drop_postgres_schema, fresh_postgres_schema, postgres_base_url, tiny_ct

PATIENT_IDS = ("ATNAPAT001", "ATNAPAT002")
PATIENT_NAMES = ("AUDIT^ALICE", "AUDIT^BOB")
BIRTH_DATE = "19400101"  # tiny_ct's
_SYSLOG = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - (.*)$", re.DOTALL)
WAIT_S = 20.0


# --- the collector -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One syslog message as the collector got it."""

    raw: bytes
    pri: int
    app_name: str
    msgid: str
    root: ET.Element

    @property
    def event_id(self) -> str:
        return str(_one(self.root, "EventIdentification/EventID").get("csd-code"))

    @property
    def event_type(self) -> str | None:
        code = self.root.find("EventIdentification/EventTypeCode")
        return None if code is None else code.get("csd-code")

    def object_ids(self) -> list[str]:
        return [str(o.get("ParticipantObjectID")) for o in self.root.findall("ParticipantObjectIdentification")]


def _one(root: ET.Element, path: str) -> ET.Element:
    found = root.find(path)
    assert found is not None, f"{path} missing in {ET.tostring(root)[:300]!r}"
    return found


def parse_syslog(raw: bytes) -> Received:
    """Parse one RFC 5424 message whose MSG is an A.5 AuditMessage; assert the A.5.1 structure."""
    match = _SYSLOG.match(raw)
    assert match, f"not RFC 5424: {raw[:120]!r}"
    pri, _timestamp, _host, app_name, _procid, msgid, msg = match.groups()
    assert msg.startswith(b"\xef\xbb\xbf"), "MSG is not marked UTF-8 (BOM)"
    root = ET.fromstring(msg[3:])
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    participants = [i for i, tag in enumerate(tags) if tag == "ActiveParticipant"]
    source = tags.index("AuditSourceIdentification")
    objects = [i for i, tag in enumerate(tags) if tag == "ParticipantObjectIdentification"]
    assert participants and participants == list(range(1, source)), tags
    assert objects == list(range(source + 1, len(tags))), tags
    event = root[0]
    assert event.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert event.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", event.get("EventDateTime", ""))
    assert _one(event, "EventID").get("codeSystemName") == "DCM"
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID") and participant.get("UserIsRequestor") in {"true", "false"}
    assert root[source].get("AuditSourceID")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID") and obj.find("ParticipantObjectIDTypeCode") is not None
    return Received(raw, int(pri), app_name.decode(), msgid.decode(), root)


class Collector:
    """Received messages, with a condition to wait on."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()

    def add(self, raw: bytes) -> None:
        received = parse_syslog(raw)
        with self._cond:
            self.messages.append(received)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Received]], bool], what: str, timeout_s: float = WAIT_S) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"collector did not get {what} in {timeout_s} s; got {len(self.messages)} messages")
                self._cond.wait(remaining)
            return list(self.messages)


class TcpSyslogListener(Collector):
    """RFC 6587 octet-counting TCP syslog receiver that can be stopped and started on its port."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.port = port
        self.tls = tls
        self._server: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        self._server = server
        self._spawn(self._accept, server)

    def stop(self) -> None:
        """Close the listening socket and every connection (as a collector that goes down)."""
        assert self._server is not None
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._server.close()
        for client in self._clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()
        for thread in self._threads:
            thread.join(5)
        self._clients, self._threads, self._server = [], [], None

    def _spawn(self, target: Callable[[socket.socket], None], sock: socket.socket) -> None:
        thread = threading.Thread(target=target, args=(sock,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            self._clients.append(client)
            self._spawn(self._read, client)

    def _read(self, client: socket.socket) -> None:
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                return  # the node refused our certificate (a test that expects it)
            self._clients.append(client)
        buffer = b""
        while True:
            try:
                chunk = client.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b" " in buffer:
                length_text, _, rest = buffer.partition(b" ")
                length = int(length_text)
                if len(rest) < length:
                    break
                try:
                    self.add(rest[:length])
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    self.errors.append(exc)
                buffer = rest[length:]


class UdpSyslogListener(Collector):
    """RFC 5426: one message per datagram."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.add(data)


@pytest.fixture
def tcp_listener() -> Iterator[TcpSyslogListener]:
    listener = TcpSyslogListener(free_port())
    listener.start()
    yield listener
    if listener._server is not None:
        listener.stop()
    assert not listener.errors, listener.errors


def _no_patient_data(messages: list[Received]) -> None:
    for message in messages:
        for secret in (*PATIENT_IDS, *PATIENT_NAMES, BIRTH_DATE, "AUDIT"):
            assert secret.encode() not in message.raw, f"{secret} in an audit message"


def _audit_settings(port: int, transport: str) -> dict[str, Any]:
    return {
        "enabled": True, "host": "127.0.0.1", "port": port, "transport": transport,
        "poll_interval_s": 0.2, "retry_initial_s": 0.2, "retry_max_s": 0.5,
    }


def _write_study(folder: Path, patient: int, count: int) -> tuple[str, list[Path]]:
    study_uid = f"2.25.{uuid.uuid4().int}"
    series_uid = f"2.25.{uuid.uuid4().int}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        ds = tiny_ct(study_uid=study_uid, series_uid=series_uid, patient_id=PATIENT_IDS[patient],
                     patient_name=PATIENT_NAMES[patient], instance_number=number)
        path = folder / f"{study_uid}-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def _transfers(messages: list[Received]) -> list[Received]:
    return [m for m in messages if m.event_id == "110104"]


def _has_objects(ids: set[str]) -> Callable[[list[Received]], bool]:
    return lambda messages: ids <= {i for m in messages for i in m.object_ids()}


# --- the node as a service, a DCMTK sender, the peers CLI -----------------------------------------


def test_node_events_reach_the_collector_and_survive_its_restart(
    serve_process: Callable[..., ServeProcess], dcmtk: DCMTK, tcp_listener: TcpSyslogListener, tmp_path: Path
) -> None:
    node = serve_process(audit=_audit_settings(tcp_listener.port, "tcp"))
    started = tcp_listener.wait_for(lambda ms: any(m.event_type == "110120" for m in ms), "Application Start")
    assert all((m.pri, m.app_name, m.msgid) == (85, "fpe-node", "DICOM+RFC3881") for m in started)

    # One association from DCMTK storescu: two studies of two patients -> one message per patient (A.5.3.7).
    study_a, files_a = _write_study(tmp_path / "send", 0, 2)
    study_b, files_b = _write_study(tmp_path / "send", 1, 1)
    done = dcmtk.storescu(node.port, [*files_a, *files_b], timeout_s=60)
    assert done.returncode == 0, done.stderr
    messages = tcp_listener.wait_for(lambda ms: len(_transfers(ms)) >= 2, "two DICOM Instances Transferred")
    by_study = {m.object_ids()[0]: m for m in _transfers(messages)}
    assert set(by_study) == {study_a, study_b}
    received_a = by_study[study_a].root
    assert received_a.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    source, destination = received_a.findall("ActiveParticipant")
    assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID")) == (
        "STORESCU", "true", "127.0.0.1")
    assert _one(source, "RoleIDCode").get("csd-code") == "110153"
    assert (destination.get("UserID"), _one(destination, "RoleIDCode").get("csd-code")) == ("FPENODE", "110152")
    study_object, patient_object = received_a.findall("ParticipantObjectIdentification")
    assert (study_object.get("ParticipantObjectTypeCode"), study_object.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert _one(study_object, "ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert _one(study_object, "SOPClass").attrib == {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": "2"}
    assert (patient_object.get("ParticipantObjectTypeCode"), patient_object.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    patients = {m.object_ids()[1] for m in _transfers(messages)}
    assert len(patients) == 2  # one tag per patient, never the Patient ID

    # A peer change made with the CLI while the node runs: a Security Alert naming the peer.
    added = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(node.config), "peers", "add", "ATNA-CLI",
         "--ae-title", "ATNACLI", "--host", "127.0.0.1"],
        cwd=REPO_ROOT, env=node.env, capture_output=True, text=True, timeout=60,
    )
    assert added.returncode == 0, added.stderr
    alert = [m for m in tcp_listener.wait_for(_has_objects({"ATNA-CLI"}), "the peer.add alert") if "ATNA-CLI" in m.object_ids()][0]
    assert (alert.event_id, alert.event_type) == ("110113", "110129")
    person = [p for p in alert.root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"][0]
    assert person.get("UserName") == "fpe-node peers add"

    # The collector goes down; events keep happening; it comes back on the same port.
    tcp_listener.stop()
    during = [f"ATNA-DOWN-{n}" for n in range(3)]
    registry = PeerRegistry(build_session_factory(build_engine(load_settings(node.config, environ={}))))
    for name in during:
        registry.add(PeerInfo(name=name, ae_titles=(name[-6:].replace("-", ""),)), actor="test (collector down)")
    study_c, files_c = _write_study(tmp_path / "send-down", 0, 1)
    done = dcmtk.storescu(node.port, files_c, timeout_s=60)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + WAIT_S
    while "audit collector 127.0.0.1:" not in node.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "unavailable" in node.log_text(), "the exporter never noticed the collector was down"
    tcp_listener.start()
    tcp_listener.wait_for(_has_objects({*during, study_c}), "every event made while the collector was down")

    assert node.terminate() == 0
    final = tcp_listener.wait_for(lambda ms: any(m.event_type == "110121" for m in ms), "Application Stop", 10)
    _no_patient_data(final)


# --- every action's message; the cursor; UDP --------------------------------------------------------


def _entries() -> list[tuple[str, str, dict[str, Any]]]:
    transfer = {"study_uid": "2.25.77", "patient": audit.patient_tag("X"), "sop_classes": {"1.2.3": 2}, "new": 2,
                "replaced": 0, "duplicates": 0}
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("fpe-node (ops)", audit.NODE_START, audit.node_detail("FPENODE", "0.0.0.0", 11112)),
        ("CT1@10.0.0.5", audit.INSTANCES_RECEIVED, {"calling_ae": "CT1", "called_ae": "FPENODE", "address": "10.0.0.5",
                                                    "outcome": "aborted", "studies": [transfer]}),
        ("fpe-node delivery", audit.RESULTS_SENT, {"destination": "pacs", "ae_title": "PACS", "host": "pacs.example",
                                                   "port": 104, "studies": [transfer]}),
        ("alice", "user.login", {"user": "alice", "address": "10.0.0.9"}),
        ("alice", "user.login_failed", {"user": "alice", "address": "10.0.0.9", "reason": "bad password"}),
        ("alice", "user.logout", {"user": "alice", "address": "10.0.0.9"}),
        ("alice", "api.query", {"user": "alice", "address": "10.0.0.9", "path": "/api/studies", "query": "state=failed"}),
        ("fpe-node peers add (ops)", "peer.add", {"name": "PACS", "ae_titles": ["PACS"], "host": "10.0.0.2"}),
        ("fpe-node peers add (ops)", "peer.update", {"name": "PACS", "ae_titles": ["PACS"], "host": "10.0.0.3"}),
        ("fpe-node peers remove (ops)", "peer.remove", {"name": "PACS"}),
        ("admin", "user.add", {"name": "bob", "role": "viewer", "password": "never-sent"}),
        ("admin", "user.change", {"name": "bob", "role": "admin"}),
        ("admin", "user.remove", {"name": "bob"}),
        ("admin", "token.add", {"name": "ci", "token_hash": "never-sent-either"}),
        ("admin", "token.remove", {"name": "ci"}),
        ("admin", "settings.change", {"key": "index.url", "value": "postgresql://u:pw-not-sent@db/x"}),
        ("fpe-node peers echo (ops)", "peer.echo", {"name": "PACS", "ok": True}),
        ("fpe-node stop", audit.NODE_STOP, audit.node_detail("FPENODE", "0.0.0.0", 11112)),
    ]
    return rows


def test_every_action_is_an_a5_message_over_udp_and_the_cursor_holds(make_settings: Callable[..., Any]) -> None:
    listener = UdpSyslogListener()
    settings = make_settings(audit=_audit_settings(listener.port, "udp"))
    engine = build_engine(settings)
    upgrade_to_head(engine)
    sessions = build_session_factory(engine)
    rows = _entries()
    with write_session(sessions) as session:
        for actor, action, detail in rows:
            audit.add_entry(session, actor=actor, action=action, detail=detail)
    exporter = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
    assert exporter.run_pass() == len(rows)
    messages = listener.wait_for(lambda ms: len(ms) == len(rows), f"{len(rows)} datagrams")
    expected = {action: EVENTS[action] for _, action, _ in rows if action in EVENTS}
    for (_, action, _), message in zip(rows, messages, strict=True):
        spec = expected.get(action)
        wanted = (spec.event_id.value, None if spec.type_code is None else spec.type_code.value) if spec else ("110113", "110132")
        assert (message.event_id, message.event_type) == wanted, action
    outcome = {action: m.root[0].get("EventOutcomeIndicator") for (_, action, _), m in zip(rows, messages)}
    assert outcome["user.login_failed"] == "4" and outcome["user.login"] == "0"
    assert outcome[audit.INSTANCES_RECEIVED] == "4"  # aborted after storing
    sent = messages[2].root
    assert sent[0].get("EventActionCode") == "R"  # A.5.3.7: the sender does not know what the receiver held
    assert [p.get("UserID") for p in sent.findall("ActiveParticipant")] == ["FPENODE", "PACS"]
    assert all(b"never-sent" not in m.raw and b"pw-not-sent" not in m.raw for m in messages)
    unknown = messages[[action for _, action, _ in rows].index("peer.echo")]
    descriptions = [base64.b64decode(d.get("value", "")).decode() for d in unknown.root.iter("ParticipantObjectDetail")]
    assert any(text.startswith("peer.echo: ") for text in descriptions), descriptions

    with sessions() as session:
        last_id = max(entry.id for entry in session.query(AuditEntry))
    assert exporter.delivered_through == last_id
    restarted = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
    assert restarted.run_pass() == 0  # a restart sends nothing twice over UDP
    engine.dispose()


# --- results sent: the outbox storing into a real archive -----------------------------------------------


def test_results_sent_to_an_archive_are_audited(make_settings: Callable[..., Any], tcp_listener: TcpSyslogListener) -> None:
    settings = make_settings(audit=_audit_settings(tcp_listener.port, "tcp"))
    engine = build_engine(settings)
    upgrade_to_head(engine)
    sessions = build_session_factory(engine)
    study_uid = f"2.25.{uuid.uuid4().int}"
    folder = settings.storage.results_dir / study_uid
    folder.mkdir(parents=True)
    sr: Dataset = make_sr(folder / "sr.dcm", study_uid)
    sc: Dataset = make_sc(folder / "sc.dcm", study_uid, f"{study_uid}.9", number=1)
    files = [
        ResultFile(folder / "sr.dcm", study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.SOPClassUID, "sr"),
        ResultFile(folder / "sc.dcm", study_uid, f"{study_uid}.9", sc.SOPInstanceUID, SC_STORAGE, "sc"),
    ]
    with StorescpArchive(settings.storage.data_dir.parent / "archive") as archive:
        destination = Destination("pacs", archive.ae_title, archive.host, archive.port)
        outbox = Outbox(sessions, settings.delivery, settings.storage.data_dir,
                        StoreScu("FPENODE", ScuTimeouts(acse_s=5, dimse_s=10, network_s=10, connect_s=3)),
                        lambda: [destination])
        outbox.enqueue(files, RoutingContext("CT"), demonstration=False)
        assert outbox.run_once().sent == 2
    exporter = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
    exporter.start()
    try:
        message = _transfers(tcp_listener.wait_for(lambda ms: bool(_transfers(ms)), "the results-sent message"))[0]
    finally:
        exporter.stop()
        engine.dispose()
    assert message.object_ids()[0] == study_uid
    participants = message.root.findall("ActiveParticipant")
    assert [(p.get("UserID"), p.get("UserIsRequestor")) for p in participants] == [("FPENODE", "true"), (archive.ae_title, "false")]
    classes = {s.get("UID"): s.get("NumberOfInstances") for s in message.root.iter("SOPClass")}
    assert sum(int(n or 0) for n in classes.values()) == 2


# --- TLS (RFC 5425): the collector's certificate is checked ------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a collector certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
              ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("fpe-node test CA", None, ca_key, ca_key, True)
    cert = build("collector", ca_cert.subject, key, ca_key, False)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def test_tls_collector_certificate_is_checked(make_settings: Callable[..., Any], tmp_path: Path) -> None:
    missing = make_settings(audit={**_audit_settings(free_port(), "tls"), "ca_file": str(tmp_path / "no-ca.pem")})
    with pytest.raises(AuditConfigError, match="audit.ca_file"):
        build_exporter(missing, build_session_factory(build_engine(missing)))  # start-up stops, naming the field
    ca, cert, key = _certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    listener = TcpSyslogListener(free_port(), tls=server)
    listener.start()
    try:
        untrusted = make_settings(audit={**_audit_settings(listener.port, "tls"), "ca_file": str(cert)})
        engine = build_engine(untrusted)
        upgrade_to_head(engine)
        sessions = build_session_factory(engine)
        audit.record(sessions, actor="fpe-node peers add (ops)", action="peer.add", detail={"name": "TLSPEER"})
        with pytest.raises(ssl.SSLCertVerificationError):
            AuditExporter(untrusted.audit, AuditContext.from_settings(untrusted), sessions).run_pass()
        assert AuditExporter(untrusted.audit, AuditContext.from_settings(untrusted), sessions).delivered_through == 0

        trusted = make_settings(audit={**_audit_settings(listener.port, "tls"), "ca_file": str(ca)})
        exporter = AuditExporter(trusted.audit, AuditContext.from_settings(trusted), sessions)
        assert exporter.run_pass() == 1
        message = listener.wait_for(_has_objects({"TLSPEER"}), "the message over TLS")[0]
        assert (message.event_id, message.msgid) == ("110113", "DICOM+RFC3881")
        assert exporter.run_pass() == 0
        assert exporter.delivered_through == 1  # confirmed: the connection was still open
        engine.dispose()
    finally:
        listener.stop()


def test_conformance_statement_lists_every_audit_action() -> None:
    text = (REPO_ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    section = text.split("## 7b. Audit trail", 1)[1].split("\n## ", 1)[0]
    for action, spec in EVENTS.items():
        assert f"`{action}`" in section, action
        assert spec.event_id.value in section and (spec.type_code is None or spec.type_code.value in section), action


# --- at least once: a node that dies before a send was confirmed; ids committed out of order ------------


def test_a_node_killed_before_confirmation_sends_again(make_settings: Callable[..., Any], tcp_listener: TcpSyslogListener) -> None:
    settings = make_settings(audit=_audit_settings(tcp_listener.port, "tcp"))
    engine = build_engine(settings)
    upgrade_to_head(engine)
    sessions = build_session_factory(engine)
    names = [f"KILLED-{n}" for n in range(3)]
    for name in names:
        audit.record(sessions, actor="fpe-node peers add (ops)", action="peer.add", detail={"name": name})
    first = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
    assert first.run_pass() == 3
    tcp_listener.wait_for(_has_objects(set(names)), "the first sending")
    assert first.delivered_through == 0 and first.backlog() == 3  # written, not yet confirmed
    # The process dies here (no stop, no confirmation); the next start sends the rows again.
    second = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
    assert second.run_pass() == 3
    messages = tcp_listener.wait_for(lambda ms: len(ms) == 6, "every row a second time")
    assert sorted(i for m in messages for i in m.object_ids()) == sorted(names * 2)
    assert second.run_pass() == 0 and second.delivered_through == 3 and second.backlog() == 0  # confirmed now
    engine.dispose()


def test_an_id_committed_late_is_not_skipped(tmp_path: Path, tcp_listener: TcpSyslogListener) -> None:
    """PostgreSQL hands out ids before commit: a row with a higher id can be visible first."""
    base = postgres_base_url()
    url, schema = fresh_postgres_schema(base)
    try:
        settings = load_settings(environ={}, overrides={
            "storage": {"data_dir": str(tmp_path / "data")}, "index": {"url": url},
            "audit": _audit_settings(tcp_listener.port, "tcp"),
        })
        engine = build_engine(settings)
        upgrade_to_head(engine)
        sessions = build_session_factory(engine)
        exporter = AuditExporter(settings.audit, AuditContext.from_settings(settings), sessions)
        with write_session(sessions) as slow:
            audit.add_entry(slow, actor="admin", action="peer.add", detail={"name": "LATE"})
            slow.flush()  # id taken, not committed
            audit.record(sessions, actor="admin", action="peer.add", detail={"name": "EARLY"})
            assert exporter.run_pass() == 0  # EARLY is visible, but the id before it is not: wait
        assert exporter.run_pass() == 2
        messages = tcp_listener.wait_for(lambda ms: len(ms) == 2, "both rows")
        assert [m.object_ids()[0] for m in messages] == ["LATE", "EARLY"]
        engine.dispose()
    finally:
        drop_postgres_schema(base, schema)
