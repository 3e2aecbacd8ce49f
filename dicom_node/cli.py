"""The ``fpe-node`` command line.

Each sub-command lives in its own module under :mod:`dicom_node.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (``func(args, settings) -> int``)
or ``func_raw`` (``func_raw(args) -> int`` for commands that must not load settings).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from dicom_node import __version__, commands
from dicom_node.settings import SettingsError, load_settings

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command found in :mod:`dicom_node.commands`."""
    parser = argparse.ArgumentParser(
        prog="fpe-node",
        description="DICOM node predicting the first-pass effect of thrombectomy. Research use only, not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"fpe-node {__version__}")
    parser.add_argument("-c", "--config", help="site YAML merged over the bundled defaults (or FPENODE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def configure_logging(level: str) -> None:
    """Console logging for the entry point; patient identifiers never reach it (see dicom_node.logs)."""
    from dicom_node.logs import configure

    configure(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fpe-node`` and ``python -m dicom_node``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func_raw", None) is not None:
        configure_logging("DEBUG" if args.verbose else "INFO")
        return int(args.func_raw(args))
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"fpe-node: {exc}", file=sys.stderr)
        return 2
    configure_logging("DEBUG" if args.verbose else settings.logging.level)
    from dicom_node.logs import use_installation_secret

    use_installation_secret(settings.storage.data_dir, create=False)  # made by the first start
    return int(args.func(args, settings))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
