"""New DICOM UIDs for objects the node creates (PS3.5 section 9).

With a site root configured (``uid.root``) UIDs are ``<root>.<decimal suffix>`` from 128 random
bits, cut to the 64-character limit; without one they are UUID-derived ``2.25.<uuid as
integer>`` UIDs (PS3.5 section B.2). A library's example root is never used: the settings
refuse them (``dicom_node.settings.FORBIDDEN_UID_ROOTS``).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid

from dicom_node import __version__
from dicom_node.settings import UIDSettings

MAX_UID_LENGTH = 64
# Implementation Class UID / Version Name written in File Meta Information and A-ASSOCIATE
# (PS3.7 D.3.3.2): the same for every fpe-node, derived from a fixed name (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:fpe-node:implementation').int}"
IMPLEMENTATION_VERSION_NAME = f"FPENODE_{__version__}"[:16]
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Tolerant form accepted on input: some scanners write components with leading zeros.
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object, *, strict: bool = False) -> bool:
    """True if ``value`` is a UID (PS3.5 9.1): digits and dots, at most 64 characters.

    ``strict`` also refuses components with leading zeros (what the node writes); received
    UIDs are checked leniently (tolerant reader), which still keeps them safe as file names.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_UID_LENGTH:
        return False
    return (_UID_RE if strict else _LENIENT_UID_RE).match(value) is not None


def uuid_uid() -> str:
    """A ``2.25.`` UID derived from a random UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def new_uid(settings: UIDSettings) -> str:
    """A new, globally unique UID under the site root, or a ``2.25.`` UID without one."""
    if settings.root is None:
        return uuid_uid()
    room = MAX_UID_LENGTH - len(settings.root) - 1
    if room < 10:
        raise ValueError(f"UID root {settings.root!r} leaves too little room for a unique suffix")
    # Time first (sortable, unique across restarts), then random bits; no leading zero.
    suffix = f"{time.time_ns()}{secrets.randbits(96)}"[:room].lstrip("0") or "1"
    return f"{settings.root}.{suffix}"


def is_own_uid(uid: str, settings: UIDSettings) -> bool:
    """True if ``uid`` was made under the site's root (helps recognise the node's own results)."""
    return settings.root is not None and uid.startswith(settings.root + ".")
