"""Logging set-up for the entry points, with a guard that keeps patient identifiers out.

Modules log UIDs or short hashes (:func:`short_hash`), never names, IDs or birth dates. The
hashes are HMAC-SHA-256 keyed with a per-installation secret (``<data_dir>/installation.key``,
created with mode 0600 at first start, :func:`use_installation_secret`): a bare SHA-256 of a
7-digit MRN is reversed by trying all ten million in seconds, a keyed one is not, and the same
patient gets different tags at different sites. As a second line of defence, :class:`PatientIdentifierFilter` drops any record that a library formats
with a patient-identifying attribute (pynetdicom and pydicom can dump datasets at DEBUG).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import sys
from pathlib import Path

_PHI_PATTERN = re.compile(
    r"(PatientName|PatientID|PatientBirthDate|Patient's Name|Patient ID|Patient's Birth Date|"
    r"OtherPatientIDs|PatientAddress|\(0010,\s?00(10|20|30)\)|0010,00(10|20|30)|"
    # highdicom's warning about a one-component name quotes the name itself
    r"person name)",
    re.IGNORECASE,
)


SECRET_FILE = "installation.key"
"""Under ``storage.data_dir``: 32 random bytes (hex) keying every hash the node logs."""

# Until the installation's secret is loaded, a random per-process key: tags stay unlinkable.
_hash_key: bytes = os.urandom(32)


def installation_secret(data_dir: Path, *, create: bool = True) -> bytes | None:
    """The installation's secret; created (mode 0600, never overwritten) when ``create`` and missing."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        if not create:
            return None
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process of this installation made it first
        else:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(os.urandom(32).hex())
                handle.flush()
                os.fsync(handle.fileno())
    return bytes.fromhex(path.read_text().strip())


def use_installation_secret(data_dir: Path, *, create: bool = True) -> None:
    """Key :func:`short_hash` (and the selection's patient tags) with the installation's secret."""
    global _hash_key
    secret = installation_secret(data_dir, create=create)
    if secret is None:
        return
    _hash_key = secret
    from inference.selection import set_hash_key

    set_hash_key(secret)


def short_hash(value: object) -> str:
    """A short, stable (per installation), non-reversible tag for a value (for logs): keyed HMAC."""
    return hmac.new(_hash_key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:10]


class PatientIdentifierFilter(logging.Filter):
    """Drop records whose formatted text names a patient-identifying attribute."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a badly formatted record is dropped, not raised
            return False
        return _PHI_PATTERN.search(text) is None


# Libraries capped at WARNING whatever the node's level: the DICOM libraries dump data sets at
# DEBUG, Alembic logs one line per migration step, and SQLAlchemy's ``echo`` loggers print
# statement parameters and result rows (patient IDs among them) at INFO and DEBUG.
QUIET_LOGGERS = ("pynetdicom", "pydicom", "highdicom", "apscheduler", "alembic", "sqlalchemy")


def configure(level: str = "INFO") -> None:
    """Log to stderr at ``level``; the libraries of :data:`QUIET_LOGGERS` at WARNING at most verbose.

    A child logger (``sqlalchemy.engine.Engine``, ``alembic.runtime.migration``) inherits the
    cap from its parent unless something sets its own level, which the node never does.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PatientIdentifierFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.captureWarnings(True)
