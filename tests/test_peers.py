"""``fpe-node peers``: list/add/remove/echo/import/export, audit rows, and changes that a
running ``fpe-node serve`` honours without a restart (checked with DCMTK echoscu)."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node import cli
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.peers import PeerError, PeerInfo, PeerRegistry, host_matches, peers_from_yaml
from dicom_node.settings import load_settings
from tests.conftest import free_port
from tests.peers import DCMTK


@pytest.fixture
def peers_env(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the CLI at the test's data directory through the environment."""
    for key in list(os.environ):
        if key.startswith("FPENODE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(data_dir))
    return data_dir


def _cli(*argv: str) -> int:
    return cli.main(["peers", *argv])


def _registry(data_dir: Path) -> Iterator[PeerRegistry]:
    settings = load_settings(environ={}, overrides={"storage": {"data_dir": str(data_dir)}})
    engine = build_engine(settings)
    upgrade_to_head(engine)
    yield PeerRegistry(build_session_factory(engine))
    engine.dispose()


def test_add_list_remove_with_audit(peers_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("list") == 0
    assert "no peers registered" in capsys.readouterr().out
    assert _cli("add", "PACS", "--ae-title", "PACS_STORE", "--ae-title", "PACS_QR", "--host", "10.1.2.3",
                "--port", "104", "--role", "source", "--role", "destination") == 0
    assert _cli("list", "--json") == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert listed == [{"name": "PACS", "ae_titles": ["PACS_STORE", "PACS_QR"], "host": "10.1.2.3", "port": 104,
                       "roles": ["destination", "source"], "tls": False, "tls_verify": True}]
    # An AE title belongs to one system only; a name exists once unless --replace.
    assert _cli("add", "OTHER", "--ae-title", "PACS_QR") == 1
    assert "already belongs to peer 'PACS'" in capsys.readouterr().err
    assert _cli("add", "PACS", "--ae-title", "X") == 1
    assert _cli("add", "PACS", "--ae-title", "PACS_STORE", "--replace") == 0
    assert _cli("add", "BAD", "--ae-title", "A" * 17) == 1
    assert "ae_titles" in capsys.readouterr().err
    assert _cli("remove", "PACS") == 0
    assert _cli("remove", "PACS") == 1
    (registry,) = list(_registry(peers_env))
    assert registry.list_peers() == []
    entries = registry.audit_entries()
    assert [e.action for e in entries] == ["peer.remove", "peer.update", "peer.add"]
    user = getpass.getuser()
    assert entries[0].actor == f"fpe-node peers remove ({user})"
    assert entries[2].actor == f"fpe-node peers add ({user})"
    assert json.loads(entries[2].detail or "{}")["ae_titles"] == ["PACS_STORE", "PACS_QR"]


def test_export_then_import_round_trip(peers_env: Path, tmp_path: Path) -> None:
    assert _cli("add", "CT1", "--ae-title", "CT_SCANNER") == 0
    assert _cli("add", "ARCH", "--ae-title", "ARCHIVE", "--host", "127.0.0.1", "--port", "11113", "--role", "destination") == 0
    exported = tmp_path / "peers.yaml"
    assert _cli("export", str(exported)) == 0
    data = yaml.safe_load(exported.read_text())
    assert [p["name"] for p in data["peers"]] == ["ARCH", "CT1"]
    data["peers"] = [p for p in data["peers"] if p["name"] == "ARCH"] + [
        {"name": "MR1", "ae_titles": ["MR_SCANNER"], "host": "*", "roles": ["source"]}
    ]
    exported.write_text(yaml.safe_dump(data))
    assert _cli("import", str(exported), "--replace-all") == 0
    (registry,) = list(_registry(peers_env))
    assert [p.name for p in registry.list_peers()] == ["ARCH", "MR1"]
    assert registry.get("ARCH") == PeerInfo("ARCH", ("ARCHIVE",), "127.0.0.1", 11113, ("destination",))


def test_import_names_the_bad_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers:\n  - name: OK\n    ae_titles: [OKAE]\n  - name: DEST\n    ae_titles: [D]\n    roles: [destination]\n")
    with pytest.raises(PeerError, match=r"(?s)peers\[1\].*destination needs a host"):
        peers_from_yaml(bad)


def test_host_matching() -> None:
    assert host_matches("*", "10.0.0.1")
    assert host_matches("127.0.0.1", "127.0.0.1")
    assert host_matches("127.0.0.1", "::ffff:127.0.0.1")
    assert host_matches("localhost", "127.0.0.1")
    assert not host_matches("10.0.0.2", "10.0.0.1")


def test_running_node_honours_peer_changes_without_restart(
    serve_process: Callable[..., Any], dcmtk: DCMTK, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("FPENODE_"):
            monkeypatch.delenv(key)
    server = serve_process()
    assert dcmtk.echoscu(server.port, calling="LATECOMER").returncode != 0
    # The command runs in this process, the node in its own: they share only the index.
    assert cli.main(["--config", str(server.config), "peers", "add", "LATE", "--ae-title", "LATECOMER", "--host", "127.0.0.1"]) == 0
    echo = dcmtk.echoscu(server.port, calling="LATECOMER")
    assert echo.returncode == 0, echo.stderr
    assert cli.main(["--config", str(server.config), "peers", "remove", "LATE"]) == 0
    assert dcmtk.echoscu(server.port, calling="LATECOMER").returncode != 0
    assert "LATECOMER" in server.log_text()  # the refusal is logged with the calling AE title


def test_echo_a_destination(peers_env: Path, dcmtk: DCMTK, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    archive = subprocess.Popen(
        [dcmtk.tool("storescp"), "-od", str(tmp_path), str(port)],
        env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        assert _cli("add", "ARCH", "--ae-title", "ARCHIVE", "--host", "127.0.0.1", "--port", str(port), "--role", "destination") == 0
        assert _cli("echo", "ARCH") == 0
        assert "C-ECHO status 0x0000" in capsys.readouterr().out
        assert _cli("add", "GONE", "--ae-title", "GONE", "--host", "127.0.0.1", "--port", str(free_port()), "--role", "destination") == 0
        assert _cli("echo", "GONE", "--timeout", "3") == 1
    finally:
        archive.terminate()
        archive.wait(30)
