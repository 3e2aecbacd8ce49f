"""New DICOM UIDs for the objects the node produces (PS3.5 section 9 and annex B).

A site with its own registered root gets ``<root>.<unique digits>``; without one the node uses
UUID-derived UIDs under ``2.25`` (PS3.5 section B.2). The example roots of pydicom and
highdicom are never used: their UIDs are not ours to mint.
"""

from __future__ import annotations

import hashlib
import re
import uuid

__all__ = ["UIDFactory", "FORBIDDEN_ROOTS", "is_valid_uid"]

MAX_UID_LENGTH = 64  # PS3.5 section 9.1
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# pydicom's and highdicom's example roots, and the standard's own root.
FORBIDDEN_ROOTS = ("1.2.826.0.1.3680043.8.498", "1.2.826.0.1.3680043.9.3811", "1.2.840.10008")
_MAX_ROOT_LENGTH = 40  # leaves at least 23 digits of suffix (about 76 bits)


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (PS3.5 section 9.1)."""
    return len(value) <= MAX_UID_LENGTH and bool(_UID_RE.match(value))


class UIDFactory:
    """Make new UIDs under a site root, or UUID-derived ``2.25`` UIDs.

    Parameters
    ----------
    root:
        The site's UID root (digits and dots, at most 40 characters), or ``None`` / ``""``
        for ``2.25.<UUID as integer>`` UIDs (PS3.5 section B.2).

    Raises
    ------
    ValueError
        When ``root`` is not a UID root, is too long, or is a library's example root.
    """

    def __init__(self, root: str | None = None) -> None:
        if root:
            root = root.rstrip(".")
            if not _ROOT_RE.match(root) or len(root) > _MAX_ROOT_LENGTH:
                raise ValueError(f"UID root {root!r} is not digits and dots of at most {_MAX_ROOT_LENGTH} characters")
            if any(root == bad or root.startswith(bad + ".") for bad in FORBIDDEN_ROOTS):
                raise ValueError(f"UID root {root!r} belongs to a library or the standard, not to a site")
        self._root = root or None

    @property
    def root(self) -> str | None:
        """The site root, or ``None`` for ``2.25`` UIDs."""
        return self._root

    def new(self) -> str:
        """A new, globally unique UID."""
        return self._from_int(uuid.uuid4().int)

    def derive(self, base_uid: str, purpose: str) -> str:
        """A UID derived deterministically from ``base_uid`` and ``purpose``.

        The same inputs always give the same UID, and different purposes give different
        UIDs. Used for the re-encoded fallback SR classes, so that every re-send of the
        same fallback carries the same SOP Instance UID without storing it (see
        :func:`reports.sr.reencode_sr`). Name-based UUIDs (ITU-T X.667 version 5) are
        valid under ``2.25``.
        """
        if not is_valid_uid(base_uid):
            raise ValueError(f"{base_uid!r} is not a UID")
        name_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"{base_uid}/{purpose}")
        if self._root is None:
            return f"2.25.{name_uuid.int}"
        digest = hashlib.sha256(f"{self._root}/{base_uid}/{purpose}".encode()).digest()
        return self._from_int(int.from_bytes(digest, "big"))

    def for_name(self, name: str) -> str:
        """A stable UID for a named thing (e.g. the node's device observer UID from its AE title)."""
        name_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"fpe-node/{name}")
        if self._root is None:
            return f"2.25.{name_uuid.int}"
        digest = hashlib.sha256(f"{self._root}/name/{name}".encode()).digest()
        return self._from_int(int.from_bytes(digest, "big"))

    def _from_int(self, number: int) -> str:
        if self._root is None:
            return f"2.25.{number}"
        room = MAX_UID_LENGTH - len(self._root) - 1
        suffix = str(number)[:room].lstrip("0") or "1"
        return f"{self._root}.{suffix}"
