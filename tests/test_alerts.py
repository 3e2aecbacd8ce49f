"""Alerts reach a local webhook server and a local SMTP server (aiosmtpd), retried, rate-limited,
recorded, and without the patient's name or ID.

The node runs in-process with its scheduler evaluating the rules every 0.3 s; a study with a
planted patient name arrives over a real association, waits (no worker: ``no_analysis``), then
fails its analysis (``analysis_failed``) and its results, sent to a destination that is down,
are dead-lettered (``dead_letter``). A second failure of the same rule is suppressed by the rate
limit. The webhook answers 500 to its first request: the retry is seen by the server and in the
alert record.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import inspect

from dicom_node import alerts
from dicom_node.bootstrap import Node, build_node
from dicom_node.index.analysis import record_analysis
from dicom_node.index.db import write_session
from dicom_node.lifecycle import StudyState
from dicom_node.status import Status
from dicom_node.worker import INTERNAL_ERROR_REASON
from inference.predictor import result_summary
from inference.result import NotAnalysed
from tests.archives import free_port
from tests.conftest import TEST_PEER, SettingsFactory, wait_study_state
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url, send_datasets, tiny_ct

PLANTED_NAME = "Plantedname^Zelda"
PLANTED_ID = "PLANTED-ID-4711"
DEADLINE_S = 20.0


@dataclass
class WebhookServer:
    """Records every POST; answers 500 to the first ``fail_first`` requests of each path."""

    fail_first: int = 1
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    seen = sum(1 for path, _ in server.requests if path == self.path)
                    server.requests.append((self.path, body))
                    status = 500 if seen < server.fail_first else 200
                    server.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        return Handler

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for seen, body in self.requests if seen == path]


@pytest.fixture
def webhook() -> Iterator[tuple[WebhookServer, str]]:
    recorder = WebhookServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), recorder.handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Mailbox:
    """An aiosmtpd handler keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login == b"alerts" and data.password == b"s3cret"
        if ok:
            mailbox.logins.append(data.login.decode())
        return AuthResult(success=ok)

    port = free_port()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, authenticator=authenticate, auth_require_tls=False,
    )
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _records(node: Node) -> list[alerts.SentAlert]:
    with node.session_factory() as session:
        return alerts.recent(session, 100)


def _by(node: Node, rule: str, channel: str) -> list[alerts.SentAlert]:
    return [record for record in _records(node) if record.rule == rule and record.channel == channel]


def _fail_analysis(node: Node, study_uid: str, *, deliver: bool = True) -> None:
    """What the worker does for a run that raised: the analysis row, ``not_analysed``, the results."""
    job = node.lifecycle.claim_next("test-worker")
    assert job is not None and job.study_uid == study_uid
    result = NotAnalysed(f"{INTERNAL_ERROR_REASON} (RuntimeError); see the node's log")
    with write_session(node.session_factory) as session:
        record_analysis(session, job.study_pk, StudyState.NOT_ANALYSED.value, result_summary(result), job_id=job.job_id)
    node.lifecycle.finish(study_uid, StudyState.NOT_ANALYSED, result.reason)
    if deliver:
        assert node.delivery.on_result(study_uid, result).sending


def _send_study(node: Node) -> str:
    ds = tiny_ct(patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
    assert send_datasets(node.scp.address[1], [ds]) == [Status.SUCCESS]
    wait_study_state(node.lifecycle, ds.StudyInstanceUID, {StudyState.QUEUED}, timeout_s=DEADLINE_S)
    return str(ds.StudyInstanceUID)


def test_alerts_reach_webhook_and_smtp_retried_rate_limited_without_patient_data(
    make_settings: SettingsFactory, webhook: tuple[WebhookServer, str], smtp: tuple[Mailbox, int]
) -> None:
    server, base_url = webhook
    mailbox, smtp_port = smtp
    archive = {"name": "ARCHIVE", "ae_titles": ["ARCHIVE"], "host": "127.0.0.1", "port": free_port(),
               "roles": ["destination"]}  # nothing listens there: every attempt fails
    settings = make_settings(
        peers=[TEST_PEER, archive],
        completion={"series_quiet_s": 0.3, "study_timeout_s": 0.6},
        delivery={"allow_demonstration_results": True, "deadline_s": 1.0, "retry_initial_s": 0.2, "retry_max_s": 0.3, "scan_interval_s": 0.2,
                  "association_timeout_s": 2.0},
        alerts={
            "check_interval_s": 0.3, "rate_limit_s": 3600, "retry_attempts": 3, "retry_initial_s": 0.05,
            "no_analysis_after_s": 1.0,
            "webhooks": [
                {"name": "ops-json", "url": f"{base_url}/json", "template": "json"},
                {"name": "ops-slack", "url": f"{base_url}/slack", "template": "slack"},
            ],
            "emails": [{"name": "ops-mail", "host": "127.0.0.1", "port": smtp_port, "username": "alerts",
                        "password": "s3cret", "sender": "fpe-node@example.org", "recipients": ["pacs@example.org"]}],
        },
    )
    node = build_node(settings)
    node.start("127.0.0.1", 0)
    try:
        first = _send_study(node)
        # 1. the study waits with no worker: no_analysis; the webhook's first answer is 500, retried
        _wait(lambda: any(r.outcome == "sent" for r in _by(node, "no_analysis", "webhook:ops-json")), "no_analysis alert")
        (no_analysis,) = [r for r in _by(node, "no_analysis", "webhook:ops-json") if r.outcome == "sent"]
        assert no_analysis.attempts == 2 and server.statuses[:2] == [500, 200]
        tried, retried = ({k: v for k, v in body.items() if k != "at"} for body in server.bodies("/json")[:2])
        assert tried == retried and tried["rule"] == "no_analysis"  # the same alert, sent again

        # 2. its analysis fails and its results cannot be delivered
        _fail_analysis(node, first)
        wait_study_state(node.lifecycle, first, {StudyState.DEAD_LETTERED}, timeout_s=DEADLINE_S)
        channels = ("webhook:ops-json", "webhook:ops-slack", "email:ops-mail")
        for rule in ("analysis_failed", "dead_letter"):
            _wait(lambda rule=rule: all(any(r.outcome == "sent" for r in _by(node, rule, c)) for c in channels), rule)

        # 3. a second failure of the same rule within rate_limit_s: recorded as suppressed, not sent
        requests_before = len(server.requests)
        mails_before = len(mailbox.messages)
        second = _send_study(node)
        _fail_analysis(node, second)
        _wait(lambda: all(any(r.outcome == "suppressed" for r in _by(node, "analysis_failed", c)) for c in channels),
              "suppressed analysis_failed")
        assert [b for _p, b in server.requests[requests_before:] if b.get("rule") == "analysis_failed"] == []
        assert not any(b"analysis_failed" in message for message in mailbox.messages[mails_before:])
    finally:
        node.stop(grace_s=1.0)

    json_bodies = {body["rule"]: body for body in server.bodies("/json")}
    assert json_bodies["dead_letter"]["fields"]["destinations"] == ["ARCHIVE"]
    assert first in json_bodies["dead_letter"]["fields"]["studies"]
    assert first in json_bodies["analysis_failed"]["text"] and json_bodies["analysis_failed"]["severity"] == "critical"
    assert all(set(body) == {"text"} for body in server.bodies("/slack"))
    assert any(first in body["text"] and "dead-lettered" in body["text"] for body in server.bodies("/slack"))
    subjects = [message_from_bytes(message)["Subject"] for message in mailbox.messages]
    assert any("dead-lettered" in subject for subject in subjects) and mailbox.logins
    everything = json.dumps(server.requests) + "".join(m.decode("utf-8", "replace") for m in mailbox.messages)
    everything += "".join(r.text + r.title + (r.error or "") for r in _records(node))
    for planted in (PLANTED_NAME, "Plantedname", "Zelda", PLANTED_ID):
        assert planted not in everything


def test_disk_above_watermark_alerts_with_a_teams_card(
    make_settings: SettingsFactory, webhook: tuple[WebhookServer, str]
) -> None:
    server, base_url = webhook
    server.fail_first = 0
    settings = make_settings(
        retention={"disk_high_watermark_pct": 0.01, "disk_low_watermark_pct": 0.01},
        alerts={"check_interval_s": 0.3, "rules": ["disk_high"],
                "webhooks": [{"name": "teams", "url": f"{base_url}/teams", "template": "teams"}]},
    )
    node = build_node(settings)
    node.start("127.0.0.1", 0)
    try:
        _wait(lambda: bool(_by(node, "disk_high", "webhook:teams")), "disk_high alert")
        _wait(lambda: node.alerts is not None and node.alerts.evaluations >= 3, "more evaluations")
    finally:
        node.stop(grace_s=1.0)
    records = _by(node, "disk_high", "webhook:teams")
    assert [r.outcome for r in records][-1] == "sent" and {r.outcome for r in records[:-1]} == {"suppressed"}
    (card,) = server.bodies("/teams")  # later evaluations were rate-limited
    assert card["@type"] == "MessageCard" and "high watermark" in card["title"]


def test_patient_id_only_when_allowed_and_never_the_name(
    make_settings: SettingsFactory, webhook: tuple[WebhookServer, str]
) -> None:
    server, base_url = webhook
    server.fail_first = 0
    settings = make_settings(
        completion={"series_quiet_s": 0.3, "study_timeout_s": 0.6},
        alerts={"check_interval_s": 0.3, "rules": ["analysis_failed"], "include_patient_data": True,
                "webhooks": [{"name": "ops", "url": f"{base_url}/json"}]},
    )
    node = build_node(settings)
    node.start("127.0.0.1", 0)
    try:
        study_uid = _send_study(node)
        _fail_analysis(node, study_uid, deliver=False)
        _wait(lambda: bool(server.bodies("/json")), "analysis_failed alert")
    finally:
        node.stop(grace_s=1.0)
    (body,) = server.bodies("/json")
    assert study_uid in body["text"] and f"patient ID {PLANTED_ID}" in body["text"] and "accession ACC1" in body["text"]
    assert "Plantedname" not in json.dumps(body) and "Zelda" not in json.dumps(body)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The index of a test node: the default SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return {}
    url, schema = fresh_postgres_schema(postgres_base_url())
    request.addfinalizer(lambda: drop_postgres_schema(postgres_base_url(), schema))
    return {"url": url}


def test_a_restart_neither_misses_nor_repeats_an_alert(
    make_settings: SettingsFactory, webhook: tuple[WebhookServer, str], index_section: dict[str, Any]
) -> None:
    """A failure the stopped node never evaluated is alerted after the restart, once."""
    server, base_url = webhook
    server.fail_first = 0
    settings = make_settings(
        index=index_section,
        completion={"series_quiet_s": 0.3, "study_timeout_s": 0.6},
        alerts={"check_interval_s": 3600, "rules": ["analysis_failed"], "rate_limit_s": 0,
                "webhooks": [{"name": "ops", "url": f"{base_url}/json"}]},
    )
    node = build_node(settings)
    node.start("127.0.0.1", 0)
    try:
        study_uid = _send_study(node)
        _fail_analysis(node, study_uid, deliver=False)
    finally:
        node.stop(grace_s=1.0)  # before any evaluation
    assert server.requests == []
    for _restart in range(2):
        restarted = build_node(settings)
        try:
            assert restarted.alerts is not None
            deadline = time.monotonic() + DEADLINE_S  # the event settles for alerts.SETTLE_S first
            while not server.requests and time.monotonic() < deadline:
                restarted.alerts.evaluate()
                time.sleep(0.2)
            assert restarted.alerts.evaluate() == []
        finally:
            restarted.stop(grace_s=1.0)
    (body,) = server.bodies("/json")
    assert body["rule"] == "analysis_failed" and study_uid in body["text"]


def test_alert_table_matches_its_migration(node: Node) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from dicom_node.index.base import Base

    with node.session_factory() as session:
        connection = session.connection()
        assert {"alert", "alert_cursor"} <= set(inspect(connection).get_table_names())
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert [item for item in diff if {"alert", "alert_cursor"} & _tables_named(item)] == []


def _tables_named(diff_item: Any) -> set[str]:
    """Table names a compare_metadata entry is about (a table, an index, a column or a (modify...) list)."""
    names: set[str] = set()
    for part in diff_item if isinstance(diff_item, list) else [diff_item]:
        for value in part:
            table = getattr(value, "table", None)
            if table is not None:
                names.add(table.name)
            elif hasattr(value, "columns") and hasattr(value, "name"):
                names.add(value.name)
        if isinstance(part, tuple) and len(part) > 2 and isinstance(part[2], str):
            names.add(part[2])
    return names


def test_config_show_never_prints_alert_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main
    from dicom_node.settings import load_settings

    site = tmp_path / "site.yaml"
    site.write_text(json.dumps({"alerts": {
        "webhooks": [{"name": "slack", "url": "https://hooks.example.org/services/T000/B000/XSECRETX", "template": "slack"}],
        "emails": [{"name": "mail", "host": "smtp.example.org", "port": 587, "starttls": True, "username": "fpe",
                    "password": "pw-SECRET-pw", "sender": "fpe@example.org", "recipients": ["pacs@example.org"]}],
    }}))
    assert main(["--config", str(site), "config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "https://hooks.example.org/***" in shown and "smtp.example.org" in shown
    settings = load_settings(site, environ={})
    for text in (shown, repr(settings)):
        assert "XSECRETX" not in text and "pw-SECRET-pw" not in text


def test_email_over_starttls_verified_with_the_site_ca(make_settings: SettingsFactory, tmp_path: Path) -> None:
    import ssl

    from tests.certs import make_authority, issue

    authority = make_authority(tmp_path, "Site CA")
    ca, server = authority.cert_path, issue(authority, tmp_path, "smtp server")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(server.cert, server.key)
    mailbox = Mailbox()
    port = free_port()

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        mailbox.logins.append(data.login.decode())
        return AuthResult(success=data.password == b"s3cret")

    controller = Controller(mailbox, hostname="127.0.0.1", port=port, tls_context=server_tls, require_starttls=True,
                            authenticator=authenticate, auth_require_tls=True)
    controller.start()
    channel = {"name": "tls", "host": "127.0.0.1", "port": port, "starttls": True, "username": "alerts",
               "password": "s3cret", "sender": "fpe-node@example.org", "recipients": ["pacs@example.org"]}
    seen: list[alerts.SentAlert] = []
    try:
        for ca_file, outcome in ((None, "failed"), (str(ca), "sent")):  # the system's CAs do not know the test CA
            settings = make_settings(
                retention={"disk_high_watermark_pct": 0.01, "disk_low_watermark_pct": 0.01},
                alerts={"rules": ["disk_high"], "retry_attempts": 1, "rate_limit_s": 0,
                        "emails": [{**channel, "ca_file": ca_file}]},
            )
            node = build_node(settings)
            try:
                assert node.alerts is not None
                (record,) = node.alerts.evaluate()
            finally:
                node.stop(grace_s=1.0)
            assert record.outcome == outcome, record
            seen.append(record)
    finally:
        controller.stop()
    assert "CERTIFICATE_VERIFY_FAILED" in (seen[0].error or "")
    (message,) = mailbox.messages
    assert b"high watermark" in message and mailbox.logins == ["alerts"]  # logged in only over TLS
