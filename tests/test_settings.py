"""The settings object: defaults, YAML, environment overrides, errors that name the field."""

from pathlib import Path

import pytest

from dicom_node.settings import SettingsError, load_settings


def test_defaults_run_embedded() -> None:
    settings = load_settings(environ={})
    assert settings.network.ae_title == "FPENODE"
    assert settings.network.port == 11112
    assert settings.index_url.startswith("sqlite:///")
    assert settings.uid.root is None


def test_site_yaml_then_environment_wins(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("network:\n  ae_title: SITEAE\n  port: 104\nstorage:\n  data_dir: /srv/fpe\n")
    settings = load_settings(site, environ={"FPENODE_NETWORK__PORT": "11113"})
    assert settings.network.ae_title == "SITEAE"
    assert settings.network.port == 11113
    assert settings.storage.data_dir == Path("/srv/fpe")


@pytest.mark.parametrize(
    ("environ", "field"),
    [
        ({"FPENODE_NETWORK__AE_TITLE": "A" * 17}, "network.ae_title"),
        ({"FPENODE_NETWORK__AE_TITLE": "BAD\\AE"}, "network.ae_title"),
        ({"FPENODE_NETWORK__AE_TITLE": "    "}, "network.ae_title"),
        ({"FPENODE_NETWORK__PORT": "70000"}, "network.port"),
        ({"FPENODE_UID__ROOT": "1.2.826.0.1.3680043.8.498"}, "uid.root"),
        ({"FPENODE_UID__ROOT": "1.2.abc"}, "uid.root"),
        ({"FPENODE_COMPLETION__SERIES_QUIET_S": "-1"}, "completion.series_quiet_s"),
    ],
)
def test_bad_value_names_the_field(environ: dict[str, str], field: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(environ=environ)
    assert field in str(info.value)


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("network:\n  ae_tilte: TYPO\n")
    with pytest.raises(SettingsError) as info:
        load_settings(site, environ={})
    assert "network.ae_tilte" in str(info.value)


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(Exception):
        settings.network.port = 1  # type: ignore[misc]


def test_configuration_reference_is_in_step() -> None:
    from dicom_node.commands.config import reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert docs.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: run `fpe-node config reference > docs/configuration.md`"
    )


def test_config_check_names_the_bad_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    site = tmp_path / "site.yaml"
    site.write_text("network:\n  ae_title: 'TOO LONG AE TITLE X'\n")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(site), "config", "check"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "network.ae_title" in done.stderr
    site.write_text("network:\n  ae_title: SITEAE\n")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(site), "config", "check"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
