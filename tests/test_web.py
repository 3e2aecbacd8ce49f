"""The console's HTTP server runs inside ``fpe-node serve`` next to the SCP."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import ServeProcess


def test_serve_answers_the_liveness_probe_on_the_console_port(serve_process: Callable[..., ServeProcess]) -> None:
    served = serve_process()
    response = httpx.get(served.console_url + "health/live", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert served.terminate() == 0


def test_console_disabled_serves_the_scp_alone(serve_process: Callable[..., ServeProcess]) -> None:
    served = serve_process(console={"enabled": False})
    assert "fpe-node console on" not in served.log_text()
    assert served.terminate() == 0


def test_a_console_form_posted_without_a_session_goes_to_login_the_api_answers_401(
    serve_process: Callable[..., ServeProcess],
) -> None:
    served = serve_process()
    base = served.console_url.rstrip("/")
    form = httpx.post(base + "/peers/ARCHIVE/remove", data={"csrf_token": "x"}, timeout=10, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == "/login"
    api = httpx.get(base + "/api/v1/studies", timeout=10)
    assert api.status_code == 401 and api.json()["detail"] == "authentication required"
    assert served.terminate() == 0
