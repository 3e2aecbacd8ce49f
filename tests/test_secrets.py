"""Secrets: log hashes keyed per installation (HMAC), the database password never printed."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from dicom_node import logs
from dicom_node.cli import main
from dicom_node.settings import SettingsError, load_settings
from inference import selection

PASSWORD = "s3cr3t-Pw"
URL = f"postgresql+psycopg://fpenode:{PASSWORD}@127.0.0.1:5432/fpenode_test"


@pytest.fixture(autouse=True)
def _restore_keys() -> object:
    saved = (logs._hash_key, selection._hash_key)
    yield
    logs._hash_key, selection._hash_key = saved


def test_patient_hash_is_keyed_per_installation(tmp_path: Path) -> None:
    patient = "1234567|HOSPITAL"
    tags = []
    for site in ("a", "b"):
        logs.use_installation_secret(tmp_path / site)
        secret = tmp_path / site / logs.SECRET_FILE
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        tags.append((logs.short_hash(patient), selection.short_hash(patient)))
    assert tags[0][0] != tags[1][0] and tags[0][1] != tags[1][1]
    assert hashlib.sha256(patient.encode()).hexdigest()[:10] not in {tag for pair in tags for tag in pair}
    before = (tmp_path / "a" / logs.SECRET_FILE).read_text()
    logs.use_installation_secret(tmp_path / "a")  # a restart keeps the secret, so tags stay stable
    assert (tmp_path / "a" / logs.SECRET_FILE).read_text() == before
    assert (logs.short_hash(patient), selection.short_hash(patient)) == tags[0]


def test_config_show_and_errors_never_print_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FPENODE_INDEX__URL", URL)
    monkeypatch.setenv("FPENODE_STORAGE__DATA_DIR", str(tmp_path / "data"))
    assert main(["config", "show"]) == 0
    shown = capsys.readouterr().out
    assert "postgresql+psycopg://fpenode:***@127.0.0.1:5432/fpenode_test" in shown
    assert PASSWORD not in shown
    settings = load_settings()
    assert settings.index_url == URL  # the engine still gets the real URL
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.index)
    monkeypatch.setenv("FPENODE_INDEX__ECHO", URL)  # a mistake that puts the URL in an error message
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert PASSWORD not in str(error.value)
