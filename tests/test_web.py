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
