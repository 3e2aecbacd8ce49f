"""Bundled YAML defaults (settings, eligibility and selection rules)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_SETTINGS = CONFIG_DIR / "default.yaml"
