"""DICOM over TLS both ways (PS3.15 Annex B secure transport).

Certificates are made in the test (:mod:`tests.certs`). Receiving: DCMTK ``storescu +tls`` sends
the real CT to the node's TLS listener; a sender without a client certificate, with an expired
or untrusted one, one that does not trust the node, plain DICOM on the TLS port and a silent or
dripping connection are refused with the reason logged, while the node keeps serving. A source
flagged ``tls`` is rejected on the plain port. Sending: the outbox delivers results to DCMTK ``storescp +tls`` (which requires the node's
client certificate) with verification on, and fails, logged and retried, against an archive
whose certificate is untrusted or names another host, unless verification is switched off.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node import transport
from dicom_node.bootstrap import Node, build_node
from dicom_node.cli import main
from dicom_node.delivery import build_store_scu, destinations_from_registry
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.index.models import Series
from dicom_node.outbox import Outbox, ResultFile, RoutingContext
from dicom_node.peers import PeerInfo, PeerRegistry
from dicom_node.settings import Settings, SettingsError, load_settings
from dicom_node.tls import server_context
from reports.uids import UIDFactory
from tests.archives import SC_STORAGE, StorescpArchive, StorescpTLS, make_sc, make_sr
from tests.certs import PKI, issue, make_authority, make_pki
from tests.conftest import CT_PHILIPS, TEST_PEER, NodeLog, SettingsFactory, require_shared_data
from tests.peers import DCMTK

STUDY = "2.25.3000001"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """One CA with server, client, expired and untrusted certificates for the whole module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_network(pki: PKI, **tls: Any) -> dict[str, Any]:
    from tests.archives import free_port

    values = {
        "enabled": True, "port": free_port(), "certificate": str(pki.server.cert), "private_key": str(pki.server.key),
        "ca_bundle": str(pki.ca), "client_certificates": "required",
    }
    values.update(tls)
    return {"tls": values, "associate_rq_timeout_s": 2.0}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main()`` configures the root logger for a console; give the next tests theirs back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
def tls_node(make_settings: SettingsFactory, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    """The node in-process with its TLS listener; every refusal logged (no rate limit)."""
    monkeypatch.setattr(transport, "REFUSAL_LOG_INTERVAL_S", 0.0)
    tls_peer = dict(TEST_PEER, tls=True)
    built = build_node(make_settings(network=_tls_network(pki), peers=[tls_peer]))
    built.start()
    try:
        yield built
    finally:
        built.stop(grace_s=1.0)


def _tls_args(issued: Any, ca: Path) -> list[str]:
    return ["+tls", str(issued.key), str(issued.cert), "+cf", str(ca)]


def _refusal_logs(node_log: NodeLog, reason: str) -> list[str]:
    return [r.getMessage() for r in node_log.records if r.name == "dicom_node.transport" and f"({reason})" in r.getMessage()]


def _wait_count(node: Node, reason: str, at_least: int, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while node.scp.refusals[reason] < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return node.scp.refusals[reason]


def _drip(sock: socket.socket, data: bytes, every_s: float) -> None:
    """Send ``data`` one byte every ``every_s`` seconds until the other side closes."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        time.sleep(every_s)


def _series_counts(node: Node) -> dict[str, int]:
    with node.session_factory() as session:
        return {row.series_uid: row.instance_count for row in session.scalars(select(Series))}


# -- start-up checks --------------------------------------------------------------------------
def test_bad_certificate_key_or_password_stops_start_up_naming_the_field(
    tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    authority = pki.authority
    locked = issue(authority, tmp_path / "locked", "locked node", password="Sesame-42")
    expired_site = issue(authority, tmp_path / "old", "old node", valid_days=(-10, -2))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")

    def settings(**tls: Any) -> Settings:
        network = _tls_network(pki, **tls)
        return load_settings(environ={}, overrides={"storage": {"data_dir": str(tmp_path / "d")}, "network": network})

    cases = [
        ({"certificate": str(garbage)}, r"network\.tls\.certificate: .*holds no PEM certificate"),
        ({"certificate": str(tmp_path / "missing.crt")}, r"network\.tls\.certificate: cannot read"),
        ({"certificate": str(expired_site.cert), "private_key": str(expired_site.key)}, r"network\.tls\.certificate: .*expired"),
        ({"private_key": str(pki.client.key)}, r"network\.tls\.private_key: .* is not the key of network\.tls\.certificate"),
        ({"certificate": str(locked.cert), "private_key": str(locked.key)}, r"network\.tls\.private_key_password: .*encrypted and no password"),
        ({"certificate": str(locked.cert), "private_key": str(locked.key), "private_key_password": "wrong"},
         r"network\.tls\.private_key_password: wrong password"),
        ({"ca_bundle": str(garbage)}, r"network\.tls\.ca_bundle: .*holds no PEM certificate"),
    ]
    for tls, message in cases:
        with pytest.raises(SettingsError, match=message):
            server_context(settings(**tls).network.tls)
    good = settings(certificate=str(locked.cert), private_key=str(locked.key), private_key_password="Sesame-42")
    assert server_context(good.network.tls).verify_mode.name == "CERT_REQUIRED"
    with pytest.raises(SettingsError, match=r"network\.tls\.certificate, network\.tls\.private_key is not set"):
        load_settings(environ={}, overrides={"network": {"tls": {"enabled": True, "client_certificates": "none"}}})

    # An administrator sees the same before a restart; the password is never shown.
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FPENODE_NETWORK__TLS__ENABLED", "true")
    monkeypatch.setenv("FPENODE_NETWORK__TLS__CERTIFICATE", str(locked.cert))
    monkeypatch.setenv("FPENODE_NETWORK__TLS__PRIVATE_KEY", str(locked.key))
    monkeypatch.setenv("FPENODE_NETWORK__TLS__CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("FPENODE_NETWORK__TLS__PRIVATE_KEY_PASSWORD", "Wrong-Pw-7")
    assert main(["config", "check"]) == 2
    assert "network.tls.private_key_password: wrong password" in capsys.readouterr().err
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # serve's handlers stay out of pytest
    assert main(["serve"]) == 2  # before anything listens or is written
    assert "network.tls.private_key_password: wrong password" in capsys.readouterr().err
    assert not (tmp_path / "d" / "index.sqlite3").exists()
    monkeypatch.setenv("FPENODE_NETWORK__TLS__PRIVATE_KEY_PASSWORD", "Sesame-42")
    assert main(["config", "check"]) == 0
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "Sesame-42" not in shown and "private_key_password: '**********'" in shown
    assert "Sesame-42" not in repr(load_settings())


# -- receiving --------------------------------------------------------------------------------
def test_storescu_over_tls_is_indexed_and_bad_clients_are_refused_with_the_reason(
    tls_node: Node, pki: PKI, dcmtk: DCMTK, node_log: NodeLog
) -> None:
    files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())
    first, rest = files[:10], files[10:20]
    _, tls_port = tls_node.scp.tls_address

    sent = dcmtk.storescu(tls_port, first, extra=_tls_args(pki.client, pki.ca), timeout_s=120)
    assert sent.returncode == 0, sent.stderr
    assert list(_series_counts(tls_node).values()) == [len(first)]

    refused = {
        "tls_no_certificate": (["+tla", "+cf", str(pki.ca)], "no client certificate"),
        "tls_certificate": (_tls_args(pki.expired, pki.ca), "certificate verification failed: certificate has expired"),
        "tls_not_tls": ([], "not a TLS client hello"),
        # A sender that does not trust the node's certificate ends the handshake with an alert.
        "tls_handshake": (_tls_args(pki.client, pki.rogue_ca), "the peer ended the handshake: tlsv1 alert unknown ca"),
    }
    for reason, (extra, why) in refused.items():
        result = dcmtk.storescu(tls_port, first[:1], extra=extra, timeout_s=60)
        assert result.returncode != 0, reason
        assert _wait_count(tls_node, reason, 1) == 1, reason
        assert any(why in line for line in _refusal_logs(node_log, reason)), (reason, node_log.text[-2000:])
    untrusted = dcmtk.storescu(tls_port, first[:1], extra=_tls_args(pki.rogue, pki.ca), timeout_s=60)
    assert untrusted.returncode != 0
    assert _wait_count(tls_node, "tls_certificate", 2) == 2
    assert any("unable to get local issuer certificate" in line for line in _refusal_logs(node_log, "tls_certificate"))

    # A silent connection and one dripping a ClientHello a byte at a time do not hold up other
    # senders; both are closed at the deadline (2 s from connecting), however slowly they drip.
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", tls_port), timeout=10) as dripping:
        opened = time.monotonic()
        drip = threading.Thread(target=_drip, args=(dripping, hello, 0.2), daemon=True)
        drip.start()
        more = dcmtk.storescu(tls_port, rest, extra=_tls_args(pki.client, pki.ca), timeout_s=120)
        assert more.returncode == 0, more.stderr
        assert _wait_count(tls_node, "tls_timeout", 2) == 2
        drip.join(10)
        assert not drip.is_alive() and time.monotonic() - opened < 2.0 + 3.0  # ended by the node, not by the drip
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the node
    assert list(_series_counts(tls_node).values()) == [len(first) + len(rest)]
    deadline = time.monotonic() + 10
    while (tls_node.scp.door.pending or tls_node.scp.door.associations) and time.monotonic() < deadline:
        time.sleep(0.05)  # the last sender's association thread ends just after it exits
    assert tls_node.scp.door.pending == 0 and tls_node.scp.door.associations == 0
    # No patient data in what the refusals logged.
    assert "TRAUMA" not in node_log.text


def test_a_source_flagged_tls_is_rejected_on_the_plain_port(
    tls_node: Node, pki: PKI, dcmtk: DCMTK, node_log: NodeLog
) -> None:
    files = sorted(require_shared_data(CT_PHILIPS.name).iterdir())[:2]
    _, plain_port = tls_node.scp.address
    plain = dcmtk.storescu(plain_port, files, timeout_s=60)
    assert plain.returncode != 0 and "Association Rejected" in plain.stderr
    assert tls_node.scp.refusals["tls_required"] == 1
    assert any("peer TESTSCU must use TLS" in line for line in _refusal_logs(node_log, "tls_required"))
    assert _series_counts(tls_node) == {}
    echo = dcmtk.run("echoscu", [*_tls_args(pki.client, pki.ca), "-aec", "FPENODE", "127.0.0.1", str(tls_node.scp.tls_address[1])])
    assert echo.returncode == 0, echo.stderr


def test_peers_echo_reaches_a_tls_peer_over_tls(
    tls_node: Node, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    # The node itself as a TLS destination: `peers echo` presents the site certificate and checks the node's.
    _, tls_port = tls_node.scp.tls_address
    tls_node.peers.add(PeerInfo("SELF", ("FPENODE",), "127.0.0.1", tls_port, ("destination",), tls=True), actor="test")
    settings = tls_node.settings
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(settings.storage.data_dir))
    for name in ("certificate", "private_key", "ca_bundle"):
        monkeypatch.setenv(f"FPENODE_NETWORK__TLS__{name.upper()}", str(getattr(settings.network.tls, name)))
    assert main(["peers", "echo", "SELF", "--timeout", "10"]) == 0
    assert "C-ECHO status 0x0000" in capsys.readouterr().out
    assert tls_node.scp.refusals == {}


def test_tls_only_node_does_not_listen_in_plain(make_settings: SettingsFactory, pki: PKI) -> None:
    built = build_node(make_settings(network=_tls_network(pki, plain_listener=False, client_certificates="optional")))
    host, port = built.start()
    try:
        assert (host, port) == built.scp.tls_address
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", built.settings.network.port), timeout=5).close()
    finally:
        built.stop(grace_s=1.0)


# -- sending ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now


def _results(settings: Settings) -> list[ResultFile]:
    folder = settings.storage.results_dir / STUDY
    folder.mkdir(parents=True, exist_ok=True)
    sr = make_sr(folder / "sr.dcm", STUDY)
    sc = make_sc(folder / "sc.dcm", STUDY, f"{STUDY}.9")
    return [ResultFile(folder / "sr.dcm", STUDY, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.SOPClassUID, "sr"),
            ResultFile(folder / "sc.dcm", STUDY, f"{STUDY}.9", sc.SOPInstanceUID, SC_STORAGE, "sc")]


def _deliver(tmp_path: Path, pki: PKI, archive: StorescpArchive, *, verify: bool, name: str) -> tuple[Outbox, FakeClock]:
    """Queue an SR and a capture for ``archive`` (a registry destination flagged tls) and run one pass."""
    settings = load_settings(environ={}, overrides={
        "storage": {"data_dir": str(tmp_path / name)},
        # The node's site certificate is also its client certificate; the archive trusts the site CA.
        "network": {"tls": {"certificate": str(pki.server.cert), "private_key": str(pki.server.key), "ca_bundle": str(pki.ca)}},
        "delivery": {"retry_initial_s": 10, "deadline_s": 15, "association_timeout_s": 10},
    })
    engine = build_engine(settings)
    upgrade_to_head(engine)
    sessions = build_session_factory(engine)
    registry = PeerRegistry(sessions)
    registry.add(PeerInfo(name, (archive.ae_title,), archive.host, archive.port, ("destination",), tls=True, tls_verify=verify),
                 actor="test")
    clock = FakeClock()
    outbox = Outbox(sessions, settings.delivery, settings.storage.data_dir, build_store_scu(settings, UIDFactory(None)),
                    destinations_from_registry(registry), clock=clock)
    outbox.enqueue(_results(settings), RoutingContext("CT"), demonstration=False)
    outbox.run_once()
    return outbox, clock


def test_results_reach_storescp_over_tls_verified_and_never_an_unverified_archive(
    tmp_path: Path, pki: PKI, node_log: NodeLog
) -> None:
    trusted = StorescpTLS(pki.server.cert, pki.server.key, pki.ca)
    with StorescpArchive(tmp_path / "archive", tls=trusted) as archive:
        outbox, _ = _deliver(tmp_path, pki, archive, verify=True, name="trusted")
        assert {row.state for row in outbox.rows(STUDY)} == {"sent"}
        assert sorted(archive.store_requests()) == sorted(row.sop_instance_uid for row in outbox.rows(STUDY))

    rogue_ca = make_authority(tmp_path / "rogue", "Archive CA")
    rogue_cert = issue(rogue_ca, tmp_path / "rogue", "rogue archive")
    wrong_host = issue(pki.authority, tmp_path / "named", "named archive", hosts=("archive.invalid",))
    for label, server in (("untrusted", rogue_cert), ("other host", wrong_host)):
        with StorescpArchive(tmp_path / label, tls=StorescpTLS(server.cert, server.key, pki.ca)) as archive:
            outbox, clock = _deliver(tmp_path, pki, archive, verify=True, name=label.replace(" ", "_"))
            rows = outbox.rows(STUDY)
            assert {row.state for row in rows} == {"failed"}, label
            expected = "unable to get local issuer certificate" if label == "untrusted" else "IP address mismatch"
            assert all(expected in (row.last_error or "") for row in rows), (label, rows[0].last_error)
            assert archive.store_requests() == []
            clock.now += dt.timedelta(seconds=20)
            outbox.run_once()  # past the deadline: dead letters, logged
            assert {row.state for row in outbox.rows(STUDY)} == {"dead"}
    assert any("TLS handshake failed" in r.getMessage() and r.levelno == logging.WARNING for r in node_log.records)

    # The explicit opt-out sends to the untrusted archive, with a warning at the association.
    with StorescpArchive(tmp_path / "opt-out", tls=StorescpTLS(rogue_cert.cert, rogue_cert.key, pki.ca)) as archive:
        outbox, _ = _deliver(tmp_path, pki, archive, verify=False, name="opt_out")
        assert {row.state for row in outbox.rows(STUDY)} == {"sent"}
    assert any("WITHOUT certificate verification" in r.getMessage() for r in node_log.records if r.levelno == logging.WARNING)


def test_peers_cli_sets_and_shows_the_tls_flags(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(data_dir))
    assert main(["peers", "add", "ARCHIVE", "--ae-title", "ARCH", "--host", "10.0.0.9", "--port", "2762",
                 "--role", "destination", "--tls", "--no-tls-verify"]) == 0
    assert main(["peers", "add", "MODALITY", "--ae-title", "CT1", "--tls"]) == 0
    capsys.readouterr()
    assert main(["peers", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[-1] == "TLS"
    assert listing[1].startswith("ARCHIVE") and listing[1].endswith("yes, NOT verified")
    assert listing[2].startswith("MODALITY") and listing[2].endswith("yes")
    assert main(["peers", "list", "--json"]) == 0
    assert '"tls": true' in capsys.readouterr().out
