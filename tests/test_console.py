"""The web console in a real browser: what an administrator, an operator and a viewer rely on.

One ``fpe-node serve`` (SCP, completion, an inference worker with the reduced checkpoint,
delivery) runs for the module, with a DCMTK ``storescp`` as its archive destination and short
retry settings; Debian's headless Chromium, driven by Playwright exactly as the viewer tests do
(``tests/viewer.py``), uses the console as a person would:

* an admin (created with ``fpe-node users add``) logs in (a wrong password is refused without
  saying which field was wrong), adds a peer and C-ECHOes it: a DCMTK ``storescp`` answers, a
  port with nobody listening does not, and the page says so; it adds and removes a user, and
  logs out;
* a study sent by DCMTK ``storescu`` appears on the studies page and reaches ``delivered``;
  its page shows the series, timeline, analysis and delivery;
* with the archive down, a resend dead-letters the result; once the archive is back, the dead
  letter is retried from the dead-letter page and the SR arrives in the archive; delivery is
  suspended and resumed from the dashboard;
* a viewer sees the pages and the patient's name, its action buttons are disabled, and the
  server refuses the same POSTs (403) and changes nothing.

Patient names and IDs never appear in a URL the browser asked for nor in the node's log.
The dashboard's screenshot goes to ``test-output/console/dashboard.png`` (or
``$FPENODE_TEST_OUTPUT/console``); the README shows a copy (docs/images/console-dashboard.png).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.index.db import build_engine, build_session_factory
from dicom_node.peers import PeerRegistry
from dicom_node.settings import load_settings
from dicom_node.web import auth
from dicom_node.web.context import WebContext
from tests.archives import StorescpArchive, free_port
from tests.conftest import NODE_AE, REPO_ROOT, TEST_PEER, ServeProcess, settings_overrides
from tests.factory import Patient, Study, write_ct_stroke_study
from tests.test_alerts import WebhookServer
from tests.peers import DCMTK
from tests.training_support import reduced_checkpoint
from tests.viewer import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("console"), pytest.mark.timeout(420)]

SCREENSHOTS = Path(os.environ.get("FPENODE_TEST_OUTPUT", REPO_ROOT / "test-output")) / "console"
PATIENT = Patient(name="PLANTED^CONSOLE", patient_id="PLANT4711", issuer="FAKE-HOSPITAL", birth_date="19470203")
PASSWORDS = {"admin": "admin pass phrase 1", "viewer": "viewer pass phrase 2"}
RESULT_TIMEOUT_S = 240.0
PAGE_TIMEOUT_MS = 15_000


@dataclass
class ConsoleNode:
    """The served node, its archive and the study sent to it."""

    serve: ServeProcess
    archive: StorescpArchive
    config: Path
    study: Study
    registry: PeerRegistry  # the node's peer registry, read from its index
    hook: WebhookServer  # the alert channel's recorder
    urls: list[str] = field(default_factory=list)  # every URL a browser page of this module asked for

    @property
    def url(self) -> str:
        return self.serve.console_url


def _cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), *args],
        cwd=REPO_ROOT, env=environ, input=stdin, capture_output=True, text=True, timeout=120,
    )


def _add_user(config: Path, name: str, role: str) -> None:
    done = _cli(config, "users", "add", name, "--role", role, "--password-stdin", stdin=PASSWORDS[name] + "\n")
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def console_node(tmp_path_factory: pytest.TempPathFactory, dcmtk: DCMTK) -> Iterator[ConsoleNode]:
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)")
    root = tmp_path_factory.mktemp("console")
    checkpoint = reduced_checkpoint(root / "model.pt", name="res25-console-test")
    archive = StorescpArchive(root / "archive", ae_title="ARCHIVE")
    archive.start()
    # A webhook channel for the alerts page (the alert tests' recorder, answering 200 at once).
    hook = WebhookServer(fail_first=0)
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), hook.handler())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sections = settings_overrides(
        root / "node",
        network={"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        storage={"data_dir": str(root / "node"), "fsync": False},
        completion={"series_quiet_s": 1.0, "study_timeout_s": 30.0},
        inference={"checkpoint": str(checkpoint), "device": "cpu", "torch_threads": 1, "workers": 1},
        # One result object (the SR) per study; a result not stored 4 s after it was queued is dead.
        reports={"secondary_capture": False, "summary_capture": False},
        delivery={"retry_initial_s": 0.5, "retry_max_s": 1.0, "deadline_s": 4.0, "scan_interval_s": 0.5},
        alerts={"check_interval_s": 1.0, "rules": ["dead_letter"],
                "webhooks": [{"name": "ops-hook", "url": f"http://127.0.0.1:{httpd.server_address[1]}/hook"}]},
        peers=[
            TEST_PEER,
            {"name": "archive", "ae_titles": ["ARCHIVE"], "host": "127.0.0.1", "port": archive.port,
             "roles": ["destination"]},
        ],
    )
    (root / "node").mkdir()
    config = root / "site.yaml"
    config.write_text(yaml.safe_dump(sections))
    # The first admin as a site creates it; the viewer through the same function, in-process (cheaper).
    _add_user(config, "admin", "admin")
    settings = load_settings(config, environ={})
    engine = build_engine(settings)
    context = WebContext(settings, build_session_factory(engine))
    auth.add_user(context, "viewer", "viewer", PASSWORDS["viewer"], actor="test", source="test")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FPENODE_")}
    serve = ServeProcess(config=config, log_path=root / "serve.log", env=environ).start()
    try:
        acquired = dt.datetime.now() - dt.timedelta(minutes=5)
        study = write_ct_stroke_study(
            root / "study", patient=PATIENT, rows=48, thin_slices=40, with_thick=False, with_reformats=False,
            with_mips=False, with_dose_report=False, cta_slices=50, seed=21,
            study_date=acquired.strftime("%Y%m%d"), study_time=acquired.strftime("%H%M%S"),
        )
        sent = dcmtk.storescu(serve.port, study.paths(), called=NODE_AE, env={"TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr[-2000:]
        node = ConsoleNode(serve=serve, archive=archive, config=config, study=study,
                           registry=PeerRegistry(context.session_factory), hook=hook)
        yield node
        assert node.urls
        for url in node.urls:
            assert PATIENT.name not in url and PATIENT.patient_id not in url, url
            assert url.startswith(node.url), f"the console fetched {url} from elsewhere (no CDN at run time)"
        # Whatever alerts went out (the dead-letter test checks that one did) name no patient.
        assert PATIENT.name not in repr(hook.requests) and PATIENT.patient_id not in repr(hook.requests)
        log_text = serve.log_text()
        assert PATIENT.name not in log_text and PATIENT.patient_id not in log_text
    finally:
        if serve.process is not None and serve.process.poll() is None:
            serve.terminate()
        archive.stop()
        httpd.shutdown()
        httpd.server_close()
        engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium, launched as tests/viewer.py does, once for the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def browser_page(console_node: ConsoleNode, browser: Any) -> Iterator[Any]:
    """A page in a fresh browser context (no cookies) at 1280 x 800, recording every URL it asks for;
    confirm dialogs are accepted."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("request", lambda request: console_node.urls.append(request.url))
        page.on("dialog", lambda dialog: dialog.accept())
        yield page
    finally:
        context.close()


def _log_in(page: Any, node: ConsoleNode, name: str, *, start: str = "") -> None:
    page.goto(node.url + start)
    page.wait_for_url("**/login**")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_selector(".who")
    assert name in page.inner_text(".who")


def _reload_until(page: Any, url: str, selector: str, found: Callable[[str], bool], timeout_s: float, what: str) -> str:
    """Open ``url`` again every second until ``found`` holds for the text of ``selector`` (``""`` when it
    is not on the page); fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        page.goto(url)
        located = page.locator(selector)
        text = located.first.inner_text() if located.count() else ""
        if found(text):
            return text
        time.sleep(1.0)
    raise AssertionError(f"{what} not shown after {timeout_s} s; {selector}:\n{text[-2000:]}\npage:\n{page.inner_text('main')[-2000:]}")


def _flash(page: Any) -> str:
    return str(page.inner_text(".flash"))


def test_admin_logs_in_manages_peers_with_c_echo_and_users(console_node: ConsoleNode, browser_page: Any, tmp_path: Path) -> None:
    page, node = browser_page, console_node
    # Not logged in: every page leads to the login form; a wrong password says nothing about which field.
    page.goto(node.url + "peers")
    page.wait_for_url("**/login?next=/peers")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    refused = page.inner_text(".flash.error")
    assert "user name or password" in refused
    page.fill("input[name=username]", "nobody")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.inner_text(".flash.error") == refused
    # A login posted without the form's CSRF token (from another site) is refused, right password or not.
    forged = page.request.post(node.url + "login", form={"username": "admin", "password": PASSWORDS["admin"]},
                               max_redirects=0)
    assert forged.status == 403 and "fpenode_session" not in forged.headers.get("set-cookie", "")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", PASSWORDS["admin"])
    page.click("button[type=submit]")
    page.wait_for_url("**/peers")

    with StorescpArchive(tmp_path / "echo", ae_title="ECHOSCP") as echo_scp:
        form = page.locator("form#add-peer")
        form.locator("input[name=name]").fill("echo-peer")
        form.locator("input[name=ae_titles]").fill("ECHOSCP")
        form.locator("input[name=host]").fill("127.0.0.1")
        form.locator("input[name=port]").fill(str(echo_scp.port))
        # A source (a modality or PACS that sends and answers C-ECHO): as a destination it would
        # also get the other test's results while it exists.
        assert form.locator("input[name=roles][value=source]").is_checked()
        form.locator("button[type=submit]").click()
        assert "echo-peer added" in _flash(page)
        row = page.locator("tr", has_text="echo-peer")
        assert "ECHOSCP" in row.inner_text() and str(echo_scp.port) in row.inner_text()
        row.get_by_role("button", name="C-ECHO").click()
        assert "C-ECHO echo-peer: success" in _flash(page)

        # The same peer moved to a port where nobody listens: the echo fails, and the page says so.
        page.locator("tr", has_text="echo-peer").get_by_role("link", name="Change").click()
        form = page.locator("form#change-peer")
        form.locator("input[name=port]").fill(str(free_port()))
        form.locator("button[type=submit]").click()
        assert "echo-peer changed" in _flash(page)
        page.locator("tr", has_text="echo-peer").get_by_role("button", name="C-ECHO").click()
        assert "C-ECHO echo-peer: failed" in _flash(page)

    page.locator("tr", has_text="echo-peer").get_by_role("button", name="Remove").click()
    assert "echo-peer removed" in _flash(page)
    assert "echo-peer" not in page.inner_text("table#peers")
    assert {peer.name for peer in node.registry.list_peers()} == {"archive", "TESTSCU"}

    # Users: an operator added from the page can log in; removed, it is gone.
    page.goto(node.url + "users")
    form = page.locator("form#add-user")
    form.locator("input[name=name]").fill("night-operator")
    form.locator("select[name=role]").select_option("operator")
    form.locator("input[name=password]").fill("night operator pass 3")
    form.locator("button[type=submit]").click()
    assert "night-operator added" in _flash(page)
    assert "operator" in page.locator("#users tr", has_text="night-operator").inner_text()
    page.locator("#users tr", has_text="night-operator").get_by_role("button", name="Remove").click()
    assert "night-operator removed" in _flash(page)
    assert "night-operator" not in page.inner_text("#users")

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")
    page.goto(node.url + "peers")
    page.wait_for_url("**/login?next=/peers")


def test_study_is_delivered_and_a_dead_letter_is_retried_from_the_page(
    console_node: ConsoleNode, browser_page: Any
) -> None:
    page, node = browser_page, console_node
    study_uid = node.study.study_uid
    _log_in(page, node, "admin", start="studies")

    # The study sent by storescu appears, and reaches `delivered` (the list refreshes on reload).
    row = f"#studies tr:has(a:text-is('{study_uid}'))"
    _reload_until(page, node.url + "studies", row, bool, 60.0, "the study")
    _reload_until(page, node.url + "studies", f"{row} td.study-state .state", lambda text: text == "delivered",
                  RESULT_TIMEOUT_S, "the study delivered")
    row_text = page.locator(row).inner_text()
    assert PATIENT.name in row_text and PATIENT.patient_id in row_text
    sr_uids = set(node.archive.store_requests())
    assert sr_uids, "the archive received nothing"

    # The study page: series, timeline, analysis, delivery to the archive.
    page.get_by_role("link", name=study_uid).click()
    page.wait_for_url(f"**/studies/{study_uid}")
    text = page.inner_text("main")
    for heading in ("Series", "Timeline", "Analyses", "Deliveries"):
        assert page.get_by_role("heading", name=heading).count() == 1, heading
    assert "archive" in page.inner_text("#deliveries") and "sent" in page.inner_text("#deliveries")
    assert "delivered" in page.inner_text("#timeline")
    assert page.locator("#analyses .state").first.inner_text() == "analysed", page.inner_text("#analyses")
    assert "FPE likely" in page.inner_text("#analyses") or "FPE unlikely" in page.inner_text("#analyses")
    assert node.study.role("ncct").series_uid in text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "study.png"), full_page=True)

    # Archive down: a resend from the page dead-letters the SR once its 4 s deadline passes.
    node.archive.stop()
    requests_before = len(node.archive.store_requests())
    page.get_by_role("button", name="Resend results").click()
    assert "queued again" in _flash(page)
    dead = _reload_until(page, node.url + "dead-letters", "#dead-letters tbody", lambda text: study_uid in text, 60.0,
                         "the dead letter")
    assert "archive" in dead and "SR" in dead
    page.screenshot(path=str(SCREENSHOTS / "dead_letters.png"), full_page=True)
    _reload_until(page, node.url + f"studies/{study_uid}", "#state .state", lambda text: text == "dead lettered", 30.0,
                  "the study dead-lettered")
    # ... and the alerts page shows the dead-letter alert the webhook received.
    _reload_until(page, node.url + "alerts", "#alerts tbody",
                  lambda text: "dead letter" in text and "webhook:ops-hook" in text and "sent" in text, 30.0,
                  "the dead-letter alert")
    assert node.hook.requests, "the webhook received no dead-letter alert"
    page.screenshot(path=str(SCREENSHOTS / "alerts.png"), full_page=True)

    # Archive back: retry from the dead-letter page; the SR arrives and the study is delivered again.
    node.archive.start()
    page.goto(node.url + "dead-letters")
    page.locator("tr", has_text=study_uid).first.get_by_role("button", name="Retry").click()
    assert "queued again" in _flash(page)
    deadline = time.monotonic() + 60.0
    while len(node.archive.store_requests()) <= requests_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(node.archive.store_requests()[requests_before:]) & sr_uids, "the retried SR did not arrive"
    _reload_until(page, node.url + "dead-letters", "#dead-letters tbody", lambda text: study_uid not in text, 30.0,
                  "the dead letter gone")
    _reload_until(page, node.url + f"studies/{study_uid}", "#state .state", lambda text: text == "delivered", 30.0,
                  "the study delivered again")

    # The dashboard, as the README shows it; delivery suspended node-wide and resumed from it.
    page.goto(node.url)
    page.get_by_role("button", name="Suspend delivery").click()
    assert "delivery suspended" in _flash(page)
    assert "suspended" in page.locator("#suspension div", has_text="Delivery").inner_text()
    page.get_by_role("button", name="Resume delivery").click()
    assert "delivery resumed" in _flash(page)
    page.goto(node.url)
    dashboard = page.inner_text("main")
    for what in ("Arrived", "Waiting", "Delivered", "Failures", "Disk", "Queue", "Worker", "Model"):
        assert what.lower() in dashboard.lower(), what
    assert study_uid in page.inner_text("#studies")
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)


def test_viewer_sees_the_pages_but_the_server_refuses_its_actions(console_node: ConsoleNode, browser_page: Any) -> None:
    page, node = browser_page, console_node
    study_uid = node.study.study_uid
    _log_in(page, node, "viewer")
    assert page.locator("nav.main a", has_text="Users").count() == 0
    row = _reload_until(page, node.url + "studies", f"#studies tr:has(a:text-is('{study_uid}'))", bool, 60.0, "the study")
    assert PATIENT.name in row and PATIENT.patient_id in row
    # The filters: by state, by sender (AE title or peer name), by arrival day.
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    for query, listed in (("state=not_eligible", False), ("sender=STORESCU", True), ("sender=archive", False),
                          (f"since={today}", True), ("since=2999-01-01", False)):
        page.goto(node.url + "studies?" + query)
        assert (study_uid in page.inner_text("#studies")) is listed, query

    page.goto(node.url + f"studies/{study_uid}")
    for name in ("Force complete", "Re-run analysis", "Resend results"):
        assert page.get_by_role("button", name=name).is_disabled(), name
    page.goto(node.url)
    for button in page.locator("main form button").all():
        assert button.is_disabled(), button.inner_text()
    page.goto(node.url + "peers")
    assert page.locator("form#add-peer").count() == 0
    assert "archive" in page.inner_text("table#peers")
    for path in ("dead-letters", "alerts", "peers/archive"):
        assert page.goto(node.url + path).status == 200, path
    assert page.locator("form#change-peer").count() == 0
    assert page.goto(node.url + "users").status == 403
    assert page.goto(node.url + "studies/1.2.3.4").status == 404
    assert "not in the index" in page.inner_text("main")

    # The same requests a button would make, with the viewer's session and CSRF token: refused.
    token = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert token
    refused = {
        f"studies/{study_uid}/resend": {},
        f"studies/{study_uid}/rerun": {},
        f"studies/{study_uid}/complete": {},
        "dead-letters/1/retry": {},
        "dead-letters/1/drop": {},
        "suspend": {"what": "delivery"},
        "peers": {"name": "sneaky", "ae_titles": "SNEAKY", "host": "127.0.0.1", "port": "104", "roles": "destination"},
        "peers/archive/remove": {},
        "peers/archive/echo": {},
        "users": {"name": "sneaky", "role": "admin", "password": "x" * 16},
    }
    for path, fields in refused.items():
        response = page.request.post(node.url + path, form={"csrf_token": token, **fields}, max_redirects=0)
        assert response.status == 403, (path, response.status)
    assert {peer.name for peer in node.registry.list_peers()} == {"archive", "TESTSCU"}
    page.goto(node.url)
    assert "suspended" not in page.inner_text("#suspension").lower()
