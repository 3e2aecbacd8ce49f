"""DICOM status codes the node returns (PS3.7 Annex C, PS3.4 Annex B.2.3 for the Storage SCP)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Status values of C-ECHO and C-STORE responses sent by the node.

    The ``0xC0xx`` codes are the node's own codes inside the Storage Service Class's
    "Error: Cannot understand" range ``C000-CFFF`` (PS3.4 B.2.3); ``0xC211`` is the code
    pynetdicom uses for an exception in a handler and is kept for unexpected failures.
    """

    SUCCESS = 0x0000
    """PS3.7 C.1.1: the instance is on disk and in the index."""
    NOT_AUTHORIZED = 0x0124
    """PS3.7 C.5 "Refused: Not Authorized": the calling peer has no ``source`` role."""
    OUT_OF_RESOURCES = 0xA700
    """PS3.4 B.2.3 "Refused: Out of Resources": the disk is above its watermark or full."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """PS3.4 B.2.3 "Error: Data Set does not match SOP Class" (SOP Class or Instance UID
    in the data set differs from the command's, an image class without Pixel Data or Image Pixel
    module attributes, or Pixel Data in a class without pixels, see dicom_node.validation)."""
    CANNOT_UNDERSTAND = 0xC000
    """PS3.4 B.2.3 "Error: Cannot understand": the data set could not be parsed to its end."""
    MISSING_OR_INVALID_UID = 0xC001
    """Node-specific (C000-CFFF range): Study, Series or SOP Instance UID missing or not a UID (PS3.5 9.1)."""
    UNKNOWN_CHARACTER_SET = 0xC002
    """Node-specific (C000-CFFF range): a Specific Character Set term no decoder knows (PS3.3 C.12.1.1.2)."""
    NESTED_TOO_DEEP = 0xC003
    """Node-specific (C000-CFFF range): sequences nested deeper than the node reads (PS3.5 7.5)."""
    PIXEL_DATA_INCONSISTENT = 0xC004
    """Node-specific (C000-CFFF range): Pixel Data shorter than the Image Pixel module implies, or
    encapsulated fragments malformed (PS3.5 8.1.1, A.4)."""
    UNEXPECTED_ERROR = 0xC211
    """An unexpected exception in the handler; it is logged and the node keeps serving."""

    @property
    def is_success(self) -> bool:
        """True for Success (0x0000)."""
        return self is Status.SUCCESS
