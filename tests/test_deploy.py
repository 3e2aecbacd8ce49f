"""Service units (issue 12): the systemd unit, the container recipe and the production example.

What can be checked here is checked for real: the production file loads with the node's own
``load_settings``; the unit passes ``systemd-analyze verify`` and ``systemd-analyze security``
(with the unit's ExecStart pointed at this checkout's ``fpe-node``, the only line that names
an installed path); the container recipe pins the CPU torch through its constraints file and
copies only paths that exist. The image is not built here (no container daemon on the test
machines), see README "Running as a service".
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dicom_node.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "fpe-node.service"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
CONTAINER_CONSTRAINTS = ROOT / "deploy" / "container" / "constraints.txt"
PRODUCTION = ROOT / "deploy" / "config" / "production.yaml"
INSTALLED_EXEC = "/opt/fpe-node/venv/bin/fpe-node"


def test_production_example_loads_with_the_node_settings() -> None:
    settings = load_settings(PRODUCTION, environ={})
    assert settings.index_url.startswith("postgresql+psycopg://")
    assert ":" not in settings.index_url.split("//", 1)[1].split("@", 1)[0], "no password in the example file"
    assert settings.audit.enabled and settings.audit.transport == "tls" and settings.audit.collector_port == 6514
    assert settings.audit.ca_file is not None and settings.audit.cert_file is not None
    assert str(settings.storage.data_dir) == "/var/lib/fpe-node"
    assert settings.network.port > 1024  # the unit grants no CAP_NET_BIND_SERVICE
    assert settings.inference.checkpoint is not None and settings.delivery.allow_demonstration_results is False
    assert settings.console.enabled and settings.console.host == "127.0.0.1"  # plain HTTP, behind the TLS proxy


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_runs_confined_as_its_own_user(tmp_path: Path) -> None:
    service = _unit()["Service"]
    assert service["User"] == service["Group"] == "fpe-node"
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "Restart": "on-failure", "CapabilityBoundingSet": "", "StateDirectory": "fpe-node",
    }.items():
        assert service[key] == value, key
    assert service["ReadWritePaths"] == str(load_settings(PRODUCTION, environ={}).storage.data_dir)
    assert int(service["LimitNOFILE"]) >= 4096
    grace = float(re.search(r"--grace (\d+)", service["ExecStart"]).group(1))  # type: ignore[union-attr]
    assert float(service["TimeoutStopSec"]) > grace + 60, "stop timeout must cover the grace and stores in flight"

    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is part of the test machines (Debian systemd package)"
    unit = tmp_path / "fpe-node.service"
    entry_point = Path(sys.executable).with_name("fpe-node")
    assert entry_point.is_file(), f"{entry_point}: the checkout's fpe-node entry point (pip install -e .)"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALLED_EXEC, str(entry_point)), encoding="utf-8")
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=30", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    assert re.search(r"Overall exposure level for fpe-node\.service: [0-2]\.\d", security.stdout), security.stdout[-300:]


def _pin(text: str, package: str) -> str:
    match = re.search(rf"^\s*{package}==(\S+)", text, re.MULTILINE)
    assert match, f"no {package}== pin"
    return match.group(1)


def test_containerfile_pins_cpu_torch_and_keeps_model_and_data_outside() -> None:
    recipe = CONTAINERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)", recipe, re.MULTILINE)
    assert stages and all(re.fullmatch(r"python:3\.1[12]-slim(\s+AS\s+\w+)?", image) for image in stages), stages
    install = re.search(r"pip install(.*?)\.\s*\\?\n", recipe, re.DOTALL)
    assert install and "-c deploy/container/constraints.txt" in install.group(1)
    assert "download.pytorch.org/whl/cpu" in install.group(1)

    container_pin = _pin(CONTAINER_CONSTRAINTS.read_text(encoding="utf-8"), "torch")
    version, _, local = container_pin.partition("+")
    assert local == "cpu", "the container's torch must be the CPU build"
    assert version == _pin((ROOT / "constraints.txt").read_text(encoding="utf-8"), "torch")
    assert version == _pin((ROOT / "setup.cfg").read_text(encoding="utf-8"), "torch")
    assert "-c ../../constraints.txt" in CONTAINER_CONSTRAINTS.read_text(encoding="utf-8")

    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", recipe, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
            assert not re.search(r"\.(pt|pth|ckpt|dcm)$|shared|data", path), f"COPY {path} puts model or data in the image"
    settings = load_settings(PRODUCTION, environ={})
    volumes = re.search(r"^VOLUME (\[.*\])", recipe, re.MULTILINE)
    assert volumes is not None
    for path in (settings.storage.data_dir, settings.inference.checkpoint.parent):  # type: ignore[union-attr]
        assert f'"{path}"' in volumes.group(1), f"{path} is not a volume"
    user = re.findall(r"^USER (\S+)", recipe, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    health = re.search(r"^HEALTHCHECK .*?http://127\.0\.0\.1:(\d+)/health/live", recipe, re.MULTILINE | re.DOTALL)
    assert health and int(health.group(1)) == settings.console.port, "the health check must ask the console's port"
    exposed = re.search(r"^EXPOSE (.+)$", recipe, re.MULTILINE)
    assert exposed and {str(settings.network.port), str(settings.console.port)} <= set(exposed.group(1).split())
