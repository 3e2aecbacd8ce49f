"""``/health/ready`` follows the index: 503 naming the index while PostgreSQL is stopped, 200 again
once it is back, answering quickly throughout.

The shared PostgreSQL cluster is never touched: the test starts a throw-away cluster of the
installed server (``initdb`` + ``pg_ctl`` from /usr/lib/postgresql/<version>/bin, as the
``postgres`` user when run as root) in a temporary folder on a free port, points a node at it
(in-process, its console served by uvicorn over HTTP as ``fpe-node serve`` does), then stops and
starts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.archives import free_port
from tests.conftest import SettingsFactory

PG_BIN_ROOT = Path("/usr/lib/postgresql")
READY_WITHIN_S = 3.0  # the probe's index check is bounded by 2 s
WAIT_S = 30.0


def _pg_bin() -> Path:
    versions = sorted(PG_BIN_ROOT.glob("*/bin/pg_ctl"), key=lambda path: int(path.parts[-3]))
    if not versions:
        pytest.fail(f"no PostgreSQL server under {PG_BIN_ROOT} (deploy/debian-packages.sh installs it)")
    return versions[-1].parent


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own in a temporary folder (trust authentication, loopback only)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="fpe-health-pg-"))  # not under pytest's 0700 root-owned tmp
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout_s: float = 60.0) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=self.root)
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout}\n{done.stderr}"

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def served_node(make_settings: SettingsFactory, throwaway_postgres: ThrowawayPostgres) -> Iterator[str]:
    """The node on the throw-away cluster, with its console served over HTTP by uvicorn as ``fpe-node serve`` does;
    yields the console's base URL."""
    from dicom_node.bootstrap import build_node
    from dicom_node.web.app import create_app
    from dicom_node.web.context import WebContext
    from dicom_node.web.server import WebServer

    node = build_node(make_settings(index={"url": throwaway_postgres.url}))
    node.start("127.0.0.1", 0)
    web = WebServer(create_app(WebContext(node.settings, node.session_factory, node)), "127.0.0.1", 0)
    try:
        host, port = web.start()
        yield f"http://{host}:{port}/"
    finally:
        web.stop()
        node.stop(grace_s=1.0)


def _ready(base_url: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = httpx.get(base_url + "health/ready", timeout=10)
    return response.status_code, response.json(), time.monotonic() - started


def _until(base_url: str, status: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        code, body, took = _ready(base_url)
        assert took < READY_WITHIN_S, f"/health/ready took {took:.1f} s"
        if code == status:
            return body
        time.sleep(0.2)
    raise AssertionError(f"/health/ready did not answer {status} within {WAIT_S} s: {body}")


def test_ready_follows_postgresql_stopped_and_back(served_node: str, throwaway_postgres: ThrowawayPostgres) -> None:
    body = _until(served_node, 200)
    assert body["status"] == "ready" and body["failing"] == []
    assert set(body["checks"]) == {"index", "disk", "workers", "model", "scp", "sender"}
    assert httpx.get(served_node + "health/live", timeout=10).json() == {"status": "ok"}

    throwaway_postgres.stop()
    body = _until(served_node, 503)
    assert body["failing"] == ["index"] and body["checks"]["index"]["ok"] is False
    assert body["checks"]["scp"]["ok"] is True
    metrics = httpx.get(served_node + "metrics", timeout=10)
    assert metrics.status_code == 200 and "fpenode_index_up 0.0" in metrics.text

    throwaway_postgres.start()
    body = _until(served_node, 200)
    assert body["checks"]["index"] == {"ok": True, "detail": "reachable"}
    assert "fpenode_index_up 1.0" in httpx.get(served_node + "metrics", timeout=10).text


def test_ready_names_a_disk_above_the_watermark(make_settings: SettingsFactory) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.bootstrap import build_node
    from dicom_node.web.app import create_app
    from dicom_node.web.context import WebContext

    node = build_node(make_settings(retention={"disk_high_watermark_pct": 0.01, "disk_low_watermark_pct": 0.01}))
    node.start("127.0.0.1", 0)
    try:
        client = TestClient(create_app(WebContext(node.settings, node.session_factory, node)))
        response = client.get("/health/ready")
        assert response.status_code == 503 and response.json()["failing"] == ["disk"]
        assert "high watermark 0.01%" in response.json()["checks"]["disk"]["detail"]
    finally:
        node.stop(grace_s=1.0)
    assert client.get("/health/ready").json()["checks"]["scp"] == {"ok": False, "detail": "not listening"}


def test_ready_counts_a_tls_only_listener(make_settings: SettingsFactory, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicom_node.bootstrap import build_node
    from dicom_node.web.app import create_app
    from dicom_node.web.context import WebContext
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"enabled": True, "port": free_port(), "plain_listener": False, "certificate": str(pki.server.cert),
           "private_key": str(pki.server.key), "ca_bundle": str(pki.ca), "client_certificates": "optional"}
    node = build_node(make_settings(network={"tls": tls}))
    node.start()
    try:
        client = TestClient(create_app(WebContext(node.settings, node.session_factory, node)))
        assert client.get("/health/ready").json()["checks"]["scp"] == {"ok": True, "detail": "listening"}
        assert "fpenode_scp_listening 1.0" in client.get("/metrics").text
    finally:
        node.stop(grace_s=1.0)
