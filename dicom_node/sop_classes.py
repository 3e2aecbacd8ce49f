"""Which SOP classes the node knows as storage, and which unknown ones it stores anyway.

A PACS routes a whole study, vendors' private objects included (e.g. Philips'
``1.3.46.670589.11.0.0.12.4``): the node accepts a storage request for a class it does not know,
stores and indexes the instance, and never analyses it (see ``docs/conformance.md``). Only
storage-like classes are taken: a private UID (outside the DICOM root ``1.2.840.10008``), or a
standard UID under the Storage branch ``1.2.840.10008.5.1.4.1.1`` (PS3.4 Annex B.5) that this
pynetdicom does not list (retired or newer). Query/retrieve and other services are never
accepted that way.
"""

from __future__ import annotations

from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicom_node.uids import is_valid_uid

DICOM_ROOT = "1.2.840.10008."
STORAGE_BRANCH = "1.2.840.10008.5.1.4.1.1."  # PS3.4 B.5: every standard storage SOP class


def is_known_storage_class(uid: str) -> bool:
    """True if ``uid`` is a storage SOP class pynetdicom (and so the node's pipelines) knows.

    Completion and selection should treat an instance whose class is not known as a non-image
    object: it is stored and indexed, no pipeline reads it.
    """
    return uid_to_service_class(uid.strip()) is StorageServiceClass


def is_unknown_storage_class(uid: str) -> bool:
    """True for a storage-like SOP class the node accepts without knowing it.

    A private class (any valid UID outside ``1.2.840.10008``), or an unlisted standard one
    under the Storage branch; False for every class pynetdicom assigns to a service (storage
    or not) and for every other standard UID (query/retrieve, worklist, print...).
    """
    uid = uid.strip()
    if not is_valid_uid(uid) or uid_to_service_class(uid) is not ServiceClass:
        return False
    if uid.startswith(DICOM_ROOT):
        return uid.startswith(STORAGE_BRANCH)
    return True
