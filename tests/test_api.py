"""The REST API against a real ``fpe-node serve`` (PostgreSQL index) with httpx: every endpoint
refuses callers without credentials (401) or with too low a role (403), CSRF on session
requests, lock-out, no secret in any response, a valid OpenAPI document, audit rows with the
client address, and actions going through the same functions as the command line."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_spec_validator import validate

from dicom_node.cli import main
from dicom_node.index.db import build_engine, build_session_factory, write_session
from dicom_node.index.outbox import OutboxItem
from dicom_node.lifecycle import Lifecycle, StudyState
from dicom_node.settings import Settings, load_settings
from dicom_node.web import auth
from dicom_node.web.context import WebContext
from tests.conftest import ServeProcess, settings_overrides
from tests.peers import drop_postgres_schema, fresh_postgres_schema, postgres_base_url
from tests.factory import Patient as FakePatient
from tests.factory import write_ct_series
from tests.studyindex import Index, add_files, add_instances

PASSWORD = "a long enough password"
S = StudyState

# The role each endpoint needs (None: open). A new endpoint fails the walk until it is listed here.
ROLES: dict[tuple[str, str], str | None] = {
    ("post", "/api/v1/session"): None,
    ("get", "/api/v1/session"): "viewer",
    ("delete", "/api/v1/session"): "viewer",
    ("get", "/api/v1/studies"): "viewer",
    ("get", "/api/v1/studies/{study_uid}"): "viewer",
    ("post", "/api/v1/studies/{study_uid}/complete"): "operator",
    ("post", "/api/v1/studies/{study_uid}/rerun"): "operator",
    ("post", "/api/v1/studies/{study_uid}/resend"): "operator",
    ("get", "/api/v1/dead-letters"): "viewer",
    ("post", "/api/v1/dead-letters/{item_id}/retry"): "operator",
    ("delete", "/api/v1/dead-letters/{item_id}"): "operator",
    ("get", "/api/v1/suspended"): "viewer",
    ("post", "/api/v1/suspend"): "operator",
    ("post", "/api/v1/resume"): "operator",
    ("get", "/api/v1/dashboard"): "viewer",
    ("get", "/api/v1/peers"): "viewer",
    ("post", "/api/v1/peers"): "admin",
    ("put", "/api/v1/peers/{name}"): "admin",
    ("delete", "/api/v1/peers/{name}"): "admin",
    ("post", "/api/v1/peers/{name}/echo"): "admin",
    ("get", "/api/v1/users"): "admin",
    ("post", "/api/v1/users"): "admin",
    ("patch", "/api/v1/users/{name}"): "admin",
    ("delete", "/api/v1/users/{name}"): "admin",
    ("get", "/api/v1/tokens"): "admin",
    ("post", "/api/v1/tokens"): "admin",
    ("delete", "/api/v1/tokens/{token_id}"): "admin",
    ("get", "/api/v1/settings"): "admin",
    ("get", "/api/v1/audit"): "admin",
}
LOWER = {"viewer": [], "operator": ["viewer"], "admin": ["viewer", "operator"]}


@dataclass
class Api:
    """The served node, its index, and a bearer token per role."""

    served: ServeProcess
    settings: Settings
    context: WebContext
    index: Index
    tokens: dict[str, str]
    pg_url: str

    @property
    def base(self) -> str:
        return self.served.console_url.rstrip("/")

    def client(self, role: str | None = None) -> httpx.Client:
        headers = {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def audit(self, action: str) -> list[dict[str, Any]]:
        with self.client("admin") as client:
            response = client.get("/api/v1/audit", params={"action": action, "limit": 1000})
        assert response.status_code == 200, response.text
        entries: list[dict[str, Any]] = response.json()
        return entries


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One ``fpe-node serve`` on a PostgreSQL index for the module, with users and tokens of each role."""
    root = tmp_path_factory.mktemp("api")
    data_dir = root / "data"
    data_dir.mkdir()
    base = postgres_base_url()
    pg_url, schema = fresh_postgres_schema(base)
    overrides = settings_overrides(
        data_dir, index={"url": pg_url}, console={"lockout_failures": 3},
        delivery={"calling_ae_title": "ECHOSCU"},  # the test peer's title: the node may C-ECHO itself
        storage={"fsync": False},
    )
    config = root / "site.yaml"
    config.write_text(yaml.safe_dump(overrides))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    served = ServeProcess(config=config, log_path=root / "serve.log", env=environ).start()
    settings = load_settings(config, environ={})
    engine = build_engine(settings)
    sessions = build_session_factory(engine)
    context = WebContext(settings, sessions)
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        auth.add_user(context, role, role, PASSWORD, actor="test", source="local")
        tokens[role] = auth.add_token(context, role, f"{role}-script", actor="test", source="local")[1]
    try:
        yield Api(served, settings, context, Index(settings, engine, sessions), tokens, pg_url)
    finally:
        if served.process is not None and served.process.poll() is None:
            served.process.send_signal(signal.SIGTERM)
            try:
                served.process.wait(30)
            except subprocess.TimeoutExpired:
                served.kill()
        served._close_log()
        engine.dispose()
        drop_postgres_schema(base, schema)


def _openapi(api: Api) -> dict[str, Any]:
    response = httpx.get(api.base + "/api/openapi.json", timeout=30)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _endpoints(api: Api) -> list[tuple[str, str, str]]:
    """(method, template, concrete URL) of every operation in the OpenAPI document."""
    found = []
    for template, operations in _openapi(api)["paths"].items():
        url = re.sub(r"\{item_id\}|\{token_id\}", "999999", template)
        url = re.sub(r"\{[a-z_]+\}", "no-such-thing", url)
        for method in operations:
            found.append((method, template, url))
    return found


def _login(api: Api, client: httpx.Client, user: str, password: str = PASSWORD) -> httpx.Response:
    return client.post("/api/v1/session", json={"username": user, "password": password})


def test_openapi_document_validates_and_lists_every_endpoint(api: Api) -> None:
    document = _openapi(api)
    validate(document)  # raises on an invalid OpenAPI document
    operations = {(method, path) for path, ops in document["paths"].items() for method in ops if path.startswith("/api/")}
    assert operations == set(ROLES)
    assert httpx.get(api.base + "/api/docs", timeout=30).status_code == 200


def test_every_endpoint_needs_credentials_and_the_right_role(api: Api) -> None:
    endpoints = [e for e in _endpoints(api) if e[1].startswith("/api/")]
    assert len(endpoints) == len(ROLES)
    with httpx.Client(base_url=api.base, timeout=30) as anonymous:
        for method, template, url in endpoints:
            needed = ROLES[(method, template)]
            if needed is None:
                continue
            response = anonymous.request(method.upper(), url)
            assert response.status_code == 401, (method, url, response.status_code)
            bad = anonymous.request(method.upper(), url, headers={"Authorization": "Bearer fpe_not-a-token"})
            assert bad.status_code == 401, (method, url, bad.status_code)
            for lower in LOWER[needed]:
                with api.client(lower) as client:
                    refused = client.request(method.upper(), url)
                assert refused.status_code == 403, (lower, method, url, refused.status_code)


def test_session_requests_need_the_csrf_token_bearer_requests_do_not(api: Api) -> None:
    with httpx.Client(base_url=api.base, timeout=30) as browser:
        opened = _login(api, browser, "operator")
        assert opened.status_code == 200
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        csrf = opened.json()["csrf_token"]
        assert browser.get("/api/v1/suspended").json() == {"suspended": []}  # GET: no token needed
        assert browser.post("/api/v1/suspend", json={"what": "delivery"}).status_code == 403
        wrong = browser.post("/api/v1/suspend", json={"what": "delivery"}, headers={"X-CSRF-Token": "forged"})
        assert wrong.status_code == 403
        assert browser.get("/api/v1/suspended").json() == {"suspended": []}
        done = browser.post("/api/v1/suspend", json={"what": "delivery"}, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200 and done.json()["message"] == "delivery suspended"
        # a console form carries the token in its csrf_token field instead of the header
        assert browser.post("/api/v1/studies/9.9.9/complete", data={"other": "x"}).status_code == 403
        assert browser.post("/api/v1/studies/9.9.9/complete", data={"csrf_token": csrf}).status_code == 404
        assert browser.delete("/api/v1/session").status_code == 403  # logout is a change too
        assert browser.delete("/api/v1/session", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert browser.get("/api/v1/suspended").status_code == 401  # session ended
    with api.client("operator") as script:
        assert script.get("/api/v1/suspended").json() == {"suspended": ["delivery"]}
        assert script.post("/api/v1/resume", json={"what": "delivery"}).status_code == 200
    assert [e["source"] for e in api.audit("node.suspend")] == ["127.0.0.1"]
    logins = api.audit("user.login")
    assert logins[0]["actor"] == "operator" and logins[0]["source"] == "127.0.0.1"
    assert api.audit("user.logout")[0]["actor"] == "operator"


def test_lockout_after_repeated_failures(api: Api) -> None:
    auth.add_user(api.context, "mallory-target", "viewer", PASSWORD, actor="test", source="local")
    with httpx.Client(base_url=api.base, timeout=30) as client:
        for _ in range(3):  # console.lockout_failures
            assert _login(api, client, "mallory-target", "guess").status_code == 401
        locked = _login(api, client, "mallory-target")
        assert locked.status_code == 401 and "locked" in locked.json()["detail"]
        with api.client("admin") as admin:
            assert admin.patch("/api/v1/users/mallory-target", json={"unlock": True}).status_code == 200
        assert _login(api, client, "mallory-target").status_code == 200
    failed = [e for e in api.audit("user.login_failed") if e["actor"] == "mallory-target"]
    assert len(failed) == 4 and {e["source"] for e in failed} == {"127.0.0.1"}
    assert failed[0]["detail"] == {"reason": "account locked", "address": "127.0.0.1"}  # address: for ATNA


def test_admin_changes_peers_users_and_tokens_audited_with_the_source(api: Api) -> None:
    with api.client("admin") as admin:
        peer = {"name": "SELF", "ae_titles": ["FPENODE"], "host": "127.0.0.1", "port": api.served.port,
                "roles": ["destination"]}
        assert admin.post("/api/v1/peers", json=peer).status_code == 201
        assert admin.post("/api/v1/peers", json=peer).status_code == 409
        echo = admin.post("/api/v1/peers/SELF/echo")  # a real association to the node's own SCP
        assert echo.status_code == 200 and echo.json()["ok"] and echo.json()["status"] == 0, echo.text
        changed = admin.put("/api/v1/peers/SELF", json={**peer, "ae_titles": ["FPENODE", "FPENODE2"]})
        assert changed.status_code == 200 and changed.json()["ae_titles"] == ["FPENODE", "FPENODE2"]
        assert admin.put("/api/v1/peers/NOPE", json=peer).status_code == 404
        assert admin.delete("/api/v1/peers/SELF").status_code == 204
        assert admin.delete("/api/v1/peers/SELF").status_code == 404

        assert admin.post("/api/v1/users", json={"name": "dora", "role": "viewer", "password": "short"}).status_code == 409
        assert admin.post("/api/v1/users", json={"name": "dora", "role": "viewer", "password": PASSWORD}).status_code == 201
        made = admin.post("/api/v1/tokens", json={"owner": "dora", "name": "report", "role": "admin"})
        assert made.status_code == 409  # above the owner's role
        made = admin.post("/api/v1/tokens", json={"owner": "dora", "name": "report"})
        assert made.status_code == 201 and made.json()["role"] == "viewer"
        secret = made.json()["token"]
        assert httpx.get(api.base + "/api/v1/studies", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
        assert admin.delete(f"/api/v1/tokens/{made.json()['id']}").status_code == 204
        assert httpx.get(api.base + "/api/v1/studies", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
        assert admin.delete("/api/v1/users/dora").status_code == 204
        assert all(t["owner"] != "dora" for t in admin.get("/api/v1/tokens").json())
    for action in ("peer.add", "peer.update", "peer.echo", "peer.remove", "user.add", "token.add", "token.remove", "user.remove"):
        entries = [e for e in api.audit(action) if e["actor"] == "admin"]
        assert entries and entries[0]["source"] == "127.0.0.1", action


def test_cli_and_api_act_through_the_same_actions(api: Api, tmp_path: Path) -> None:
    index = api.index
    lifecycle = Lifecycle(index.sessions, index.settings.completion)
    add_instances(index, "1.7.1", "1.7.1.1", 2)  # after start-up: the node's completion does not time it
    with api.client("operator") as operator:
        assert operator.post("/api/v1/studies/1.7.1/rerun").status_code == 409  # still receiving
        assert operator.post("/api/v1/studies/1.7.1/complete").status_code == 200
        assert operator.post("/api/v1/studies/1.7.1/complete").status_code == 409
        assert operator.post("/api/v1/studies/9.9.9/complete").status_code == 404
        assert lifecycle.state_of("1.7.1") is S.QUEUED
        waiting = operator.get("/api/v1/dashboard").json()["waiting"]
        assert [(w["state"], w["why"]) for w in waiting if w["study_uid"] == "1.7.1"] == [("queued", "forced complete by operator")]
        detail = operator.get("/api/v1/studies/1.7.1").json()
        assert [e["state"] for e in detail["timeline"]] == ["complete", "queued"]
        assert detail["patient_name"] is None and detail["series_list"][0]["complete_at"] is not None

        # a dead letter, retried by the API
        job = lifecycle.claim_next("test-worker")
        assert job is not None and job.study_uid == "1.7.1"
        lifecycle.finish("1.7.1", S.ANALYSED)
        lifecycle.transition("1.7.1", S.REPORTING)
        lifecycle.transition("1.7.1", S.DEAD_LETTERED, "PACS unreachable")
        result = index.data_dir / "results" / "1.7.1" / "sr.dcm"
        result.parent.mkdir(parents=True)
        result.write_bytes(b"an SR")
        with write_session(index.sessions) as session:
            item = OutboxItem(
                study_uid="1.7.1", series_uid="2.25.70", sop_instance_uid="2.25.70.1", kind="sr", path="results/1.7.1/sr.dcm",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", destination="PACS", state="dead", attempts=3,
                last_error="association refused", deadline_at=dt.datetime.now(dt.timezone.utc),
            )
            session.add(item)
            session.flush()
            item_id = item.id
        dashboard = operator.get("/api/v1/dashboard").json()
        assert dashboard["dead_letters"] == 1 and dashboard["failures_24h"] == 1 and dashboard["queue_depth"] == 0
        assert [study["study_uid"] for study in dashboard["recent_failures"]] == ["1.7.1"]
        letters = operator.get("/api/v1/dead-letters").json()
        assert [(d["id"], d["study_state"]) for d in letters] == [(item_id, "dead_lettered")]
        assert operator.post(f"/api/v1/dead-letters/{item_id}/retry").status_code == 200
        assert operator.post(f"/api/v1/dead-letters/{item_id}/retry").status_code == 409
        assert lifecycle.state_of("1.7.1") is S.REPORTING
        assert operator.get("/api/v1/dead-letters").json() == []

    # resend from the command line and from the API: one function, two sources in the audit trail
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(index.data_dir)}, "index": {"url": api.pg_url}}))
    with redirect_stdout(io.StringIO()) as printed:
        assert main(["--config", str(config), "resend", "1.7.1"]) == 0
    assert "1 result objects of study 1.7.1 queued again" in printed.getvalue()
    with api.client("operator") as operator:
        answer = operator.post("/api/v1/studies/1.7.1/resend")
        assert answer.status_code == 200 and answer.json()["count"] == 1
    assert [e["source"] for e in api.audit("study.resend")] == ["127.0.0.1", "local"]
    retried = api.audit("dead_letter.retry")
    assert retried[0]["detail"] == {"destination": "PACS", "id": item_id, "study_uid": "1.7.1", "address": "127.0.0.1"}
    assert retried[0]["actor"] == "operator" and retried[0]["source"] == "127.0.0.1"


def test_no_response_carries_a_secret(api: Api) -> None:
    """The index URL's password, password hashes and token digests appear in no response."""
    password = re.search(r"://[^:/@]*:([^@]*)@", api.pg_url)
    assert password is not None
    planted = [api.pg_url, f":{password.group(1)}@", "$argon2", *api.tokens.values()]
    with api.client("admin") as admin:
        shown = admin.get("/api/v1/settings").json()
        assert shown["index"]["url"].startswith("postgresql+psycopg://") and ":***@" in shown["index"]["url"]
        assert "password_hash" not in admin.get("/api/v1/users").text
        for method, _template, url in _endpoints(api):
            if method != "get":
                continue
            response = admin.get(url)
            assert response.status_code == (404 if "no-such-thing" in url else 200), (url, response.text)
            for secret in planted:
                assert secret not in response.text, (url, secret[:12])
    with redirect_stdout(io.StringIO()) as printed:
        assert main(["--config", str(api.served.config), "config", "show"]) == 0
    text = printed.getvalue()
    assert ":***@" in text and f":{password.group(1)}@" not in text


def test_patient_name_only_when_asked_and_audited_never_logged(api: Api, tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "ct", patient=FakePatient(name="PLANTED^PATIENT", patient_id="PLANTED-ID"),
                             study_uid="1.7.2", n_slices=2, rows=16)
    add_files(api.index, "1.7.2", series.series_uid, series.paths)
    with api.client("viewer") as viewer:
        plain = viewer.get("/api/v1/studies/1.7.2")
        assert plain.status_code == 200 and "PLANTED" not in plain.text
        shown = viewer.get("/api/v1/studies/1.7.2", params={"patient": "true"}).json()
        assert shown["patient_name"] == "PLANTED^PATIENT"
        listed = viewer.get("/api/v1/studies", params={"patient": "true", "limit": 1000}).json()
        assert [s["patient_name"] for s in listed if s["study_uid"] == "1.7.2"] == ["PLANTED^PATIENT"]
    queries = [e for e in api.audit("api.query") if e["actor"] == "viewer"]
    assert len(queries) == 2 and queries[-1]["detail"] == {
        "path": "/api/v1/studies/1.7.2", "query": "patient=true", "studies": ["1.7.2"], "address": "127.0.0.1"
    }
    assert "PLANTED" not in api.served.log_text()
