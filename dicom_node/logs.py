"""Logging set-up for the entry points, with a guard that keeps patient identifiers out.

Modules log UIDs or short hashes (:func:`short_hash`), never names, IDs or birth dates. As a
second line of defence, :class:`PatientIdentifierFilter` drops any record that a library formats
with a patient-identifying attribute (pynetdicom and pydicom can dump datasets at DEBUG).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys

_PHI_PATTERN = re.compile(
    r"(PatientName|PatientID|PatientBirthDate|Patient's Name|Patient ID|Patient's Birth Date|"
    r"OtherPatientIDs|PatientAddress|\(0010,\s?00(10|20|30)\)|0010,00(10|20|30))",
    re.IGNORECASE,
)


def short_hash(value: object) -> str:
    """A short, stable, non-reversible tag for a value (for logs)."""
    return hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:10]


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
