"""Where scanners put diffusion facts outside the standard attributes: vendor quirks as data.

The standard places a diffusion image's b-value in Diffusion b-value (0018,9087) and its kind
in Diffusion Directionality (0018,9075) (PS3.3 C.8.13.5.9: NONE, DIRECTIONAL, ISOTROPIC,
BMATRIX), at the top level of classic MR images or in the MR Diffusion Sequence (0018,9117) of
enhanced ones. Real scanners often leave those empty and write private elements instead. The
tables below name, for each vendor, the element (with its private creator, so that a block
reserved at another element number is still found, PS3.5 7.8.1), what it means, how its value
is decoded and where the convention is documented. :func:`diffusion_facts` applies them in
order; :mod:`inference.dicom_headers` calls it for each image and each enhanced frame.

Every row has a test built from a real file or a factory variant in
``tests/test_vendor_quirks.py``.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

Vector = tuple[float, float, float]

# --------------------------------------------------------------------------- value decoders


def _first_number(raw: Any) -> float | None:
    """The first value of a (possibly multi-valued, possibly UN-encoded) numeric element."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("ascii", "replace").strip("\x00 ").split("\\")[0]
    if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)):
        raw = raw[0] if len(raw) else None
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


GE_B_VALUE_OFFSET = 1_000_000_000


def ge_b_value(raw: Any) -> float | None:
    """GE (0043,1039) slop_int_6..9: the b-value is the first value; some software versions
    add 10^9 to it (dcm2niix, ``GE/README.md``: "the b-value is the first value, modulo 10^9")."""
    value = _first_number(raw)
    if value is None:
        return None
    return value % GE_B_VALUE_OFFSET if value >= GE_B_VALUE_OFFSET else value


def _text(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).decode("ascii", "replace").strip("\x00 ").upper()
    if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in raw).strip().upper()
    return str(raw).strip().upper() if raw is not None else ""


# --------------------------------------------------------------------------- Siemens CSA


def csa_elements(raw: bytes | bytearray) -> dict[str, list[str]]:
    """The elements of a Siemens CSA header (0029,1010) (``SIEMENS CSA HEADER``), name -> values.

    The CSA2 layout (starts with ``SV10``, syngo VB13 and later): each element has a 64-byte
    name, VM, VR, syngo data type, item count and a check word; each item a length (second of
    four 32-bit words) and its value padded to 4 bytes (nibabel ``nibabel/nicom/csareader.py``;
    dcm2niix ``nii_dicom.cpp``). Older CSA1 headers (no signature) are walked with the same item
    layout, which nibabel notes is not always exact for them. A length running past the end
    stops the walk: malformed headers give what was read so far, never an exception.
    """
    out: dict[str, list[str]] = {}
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 16:
        return out
    data = bytes(raw)
    offset = 8 if data[:4] == b"SV10" else 0
    try:
        n_elements = struct.unpack_from("<I", data, offset)[0]
        offset += 8
        for _ in range(min(n_elements, 512)):
            name = data[offset:offset + 64].split(b"\x00")[0].decode("ascii", "replace")
            n_items = struct.unpack_from("<i", data, offset + 76)[0]
            offset += 84
            values: list[str] = []
            for _ in range(max(0, min(n_items, 1024))):
                length = struct.unpack_from("<i", data, offset + 4)[0]
                offset += 16
                if length < 0 or offset + length > len(data):
                    return out
                if length:
                    values.append(data[offset:offset + length].split(b"\x00")[0].decode("ascii", "replace").strip())
                offset += (length + 3) // 4 * 4
            out[name] = values
    except struct.error:
        return out
    return out


def siemens_csa_b_value(raw: Any) -> float | None:
    """Siemens CSA image header (0029,1010), element ``B_value`` (first value)."""
    values = csa_elements(raw).get("B_value", []) if isinstance(raw, (bytes, bytearray)) else []
    return _first_number(values[0]) if values else None


def siemens_csa_directionality(raw: Any) -> str:
    """Siemens CSA image header (0029,1010), element ``DiffusionDirectionality``."""
    values = csa_elements(raw).get("DiffusionDirectionality", []) if isinstance(raw, (bytes, bytearray)) else []
    return values[0].upper() if values else ""


# --------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class PrivateElement:
    """One vendor private element: where it lives, what it means, how it is decoded, the source.

    The element is ``(group, xxoo)`` where ``xx`` is the block the ``creator`` reserved
    (PS3.5 7.8.1; usually ``10``) and ``oo`` is ``offset``.
    """

    vendor: str
    group: int
    creator: str
    offset: int
    meaning: str
    vr: str
    source: str

    @property
    def tag(self) -> str:
        """The element as it usually appears, block 0x10: e.g. ``(0043,1039)``."""
        return f"({self.group:04X},10{self.offset:02X})"

    @property
    def label(self) -> str:
        return f"{self.vendor} {self.tag}"

    def value(self, ds: Dataset) -> Any:
        """The element's value in ``ds`` found through its private creator, or None."""
        try:
            return ds.private_block(self.group, self.creator)[self.offset].value
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class BValueElement:
    """A private element holding the b-value (s/mm2), and its decoder."""

    element: PrivateElement
    decode: Callable[[Any], float | None]


@dataclass(frozen=True)
class TraceMarker:
    """A private element whose value marks the scanner's own trace (isotropic) image."""

    element: PrivateElement
    decode: Callable[[Any], str]
    trace_values: frozenset[str]


GE_B_VALUE = PrivateElement(
    "GE", 0x0043, "GEMS_PARM_01", 0x39, "slop_int_6..9: b-value first", "IS",
    "GE DICOM conformance statement (MR); dcm2niix GE/README.md (first value, modulo 10^9)",
)
SIEMENS_B_VALUE = PrivateElement(
    "Siemens", 0x0019, "SIEMENS MR HEADER", 0x0C, "B_value", "IS",
    "Siemens syngo MR conformance statement; NA-MIC wiki 'DICOM for DWI and DTI'",
)
SIEMENS_DIRECTIONALITY = PrivateElement(
    "Siemens", 0x0019, "SIEMENS MR HEADER", 0x0D, "DiffusionDirectionality (ISOTROPIC = trace)", "CS",
    "NA-MIC wiki 'DICOM for DWI and DTI'; mr_siemens_xa30i_classic TRACEW carries ISOTROPIC",
)
SIEMENS_CSA_IMAGE = PrivateElement(
    "Siemens", 0x0029, "SIEMENS CSA HEADER", 0x10, "CSA image header (B_value, DiffusionDirectionality)", "OB",
    "nibabel 'Siemens mosaic format / CSA header' documentation; dcm2niix nii_dicom.cpp",
)
PHILIPS_B_VALUE = PrivateElement(
    "Philips", 0x2001, "Philips Imaging DD 001", 0x03, "Diffusion B-Factor", "FL",
    "Philips MR DICOM conformance statement; dcm2niix Philips/README.md",
)
PHILIPS_DIRECTION = PrivateElement(
    "Philips", 0x2001, "Philips Imaging DD 001", 0x04, "Diffusion Direction (I = isotropic)", "CS",
    "Philips MR DICOM conformance statement; dcm2niix Philips/README.md ('isotropic image')",
)
GE_GRADIENT = (
    PrivateElement("GE", 0x0019, "GEMS_ACQU_01", 0xBB, "diffusion gradient x", "DS", "dcm2niix GE/README.md"),
    PrivateElement("GE", 0x0019, "GEMS_ACQU_01", 0xBC, "diffusion gradient y", "DS", "dcm2niix GE/README.md"),
    PrivateElement("GE", 0x0019, "GEMS_ACQU_01", 0xBD, "diffusion gradient z", "DS", "dcm2niix GE/README.md"),
)

#: Private b-value elements, tried in this order when the public attributes hold none.
B_VALUE_ELEMENTS: tuple[BValueElement, ...] = (
    BValueElement(GE_B_VALUE, ge_b_value),
    BValueElement(SIEMENS_B_VALUE, _first_number),
    BValueElement(SIEMENS_CSA_IMAGE, siemens_csa_b_value),
    BValueElement(PHILIPS_B_VALUE, _first_number),
)

#: Private elements marking the scanner's trace image ("isotropic", the mean over directions).
TRACE_MARKERS: tuple[TraceMarker, ...] = (
    TraceMarker(PHILIPS_DIRECTION, _text, frozenset({"I"})),
    TraceMarker(SIEMENS_DIRECTIONALITY, _text, frozenset({"ISOTROPIC"})),
    TraceMarker(SIEMENS_CSA_IMAGE, siemens_csa_directionality, frozenset({"ISOTROPIC"})),
)

#: ImageType / FrameType values (PS3.3 C.8.13.1.1.1, value 4 and beyond) that name a trace image.
TRACE_IMAGE_TYPES: frozenset[str] = frozenset({"TRACEW", "TRACE", "ISOTROPIC", "ISODWI", "DWI_ISO"})
#: ImageType values of derived diffusion maps, never b-value images (PS3.3 C.8.13.1.1.1 ADC; vendors).
DERIVED_MAP_IMAGE_TYPES: frozenset[str] = frozenset({"ADC", "FA", "EADC", "EXP", "CALC_BV"})

# Canon/Toshiba: "b=1500(0.445,0.000,0.895)" in Image Comments (0020,4000) on classic exports
# since Canon (dcm2niix Canon/README.md).
CANON_COMMENT = re.compile(
    r"^\s*b\s*=\s*(?P<b>[0-9.]+)\s*(?:\(\s*(?P<x>[-0-9.eE]+)\s*,\s*(?P<y>[-0-9.eE]+)\s*,\s*(?P<z>[-0-9.eE]+)\s*\))?"
)
CANON_COMMENT_SOURCE = "Canon/Toshiba Image Comments (0020,4000) 'b=...(x,y,z)'"
# Siemens: the sequence name carries the b-value, "*ep_b1000#12" or "ep_b2500t" (t: trace) (dcm2niix).
SIEMENS_SEQUENCE_NAME = re.compile(r"ep_b(?P<b>\d+)(?P<trace>t)?", re.IGNORECASE)
SIEMENS_SEQUENCE_NAME_SOURCE = "Siemens SequenceName (0018,0024) '*ep_b<b>'"

#: Toshiba/Canon write Diffusion b-value (0018,9087) only on images acquired with a diffusion
#: gradient (dcm2niix ``Canon/README.md``): among b > 0 images of a series, an image without
#: any b-value is a b0 (applied per series: ``dicom_headers.b0_without_b_value``,
#: ``volumes._b_values_filled``).
B0_WITHOUT_B_VALUE = "no b-value among b > 0 images: b0 (Toshiba/Canon write b only where b > 0)"

#: Where :func:`diffusion_facts` can find a b-value, for documentation and the closing list.
B_VALUE_SOURCES: tuple[str, ...] = (
    "Diffusion b-value (0018,9087)",
    "MR Diffusion Sequence (0018,9117)",
    *(entry.element.label for entry in B_VALUE_ELEMENTS),
    CANON_COMMENT_SOURCE,
    SIEMENS_SEQUENCE_NAME_SOURCE,
    "Diffusion Directionality (0018,9075) NONE (b = 0)",
)


# --------------------------------------------------------------------------- applying them


@dataclass(frozen=True)
class DiffusionFacts:
    """What the vendor-specific places add to one image's diffusion description."""

    b_value: float | None
    b_value_source: str | None
    gradient: Vector | None
    is_trace: bool
    trace_source: str | None
    directionality: str | None  # the public value, or ISOTROPIC for a vendor-marked trace


def _vector(values: Any) -> Vector | None:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
        return None
    return floats  # type: ignore[return-value]


def _canon_comment(ds: Dataset) -> tuple[float | None, Vector | None]:
    comments = ds.get("ImageComments")
    match = CANON_COMMENT.match(str(comments)) if comments else None
    if match is None:
        return None, None
    gradient = _vector(match.group("x", "y", "z")) if match.group("x") is not None else None
    return _first_number(match.group("b")), gradient


def private_b_value(ds: Dataset) -> tuple[float, str] | None:
    """The b-value from a vendor private element or convention, with its source, or None."""
    for entry in B_VALUE_ELEMENTS:
        value = entry.decode(entry.element.value(ds))
        if value is not None and value >= 0:
            return value, entry.element.label
    canon, _ = _canon_comment(ds)
    if canon is not None:
        return canon, CANON_COMMENT_SOURCE
    match = SIEMENS_SEQUENCE_NAME.search(str(ds.get("SequenceName", "")))
    if match is not None:
        return float(match.group("b")), SIEMENS_SEQUENCE_NAME_SOURCE
    return None


def trace_marker(ds: Dataset, image_type: tuple[str, ...]) -> str | None:
    """Which vendor mark says ``ds`` is the scanner's trace image, or None."""
    for marker in TRACE_MARKERS:
        raw = marker.element.value(ds)
        if raw is not None and marker.decode(raw) in marker.trace_values:
            return marker.element.label
    found = TRACE_IMAGE_TYPES.intersection(image_type[2:])
    if found:
        return f"ImageType {sorted(found)[0]}"
    match = SIEMENS_SEQUENCE_NAME.search(str(ds.get("SequenceName", "")))
    if match is not None and match.group("trace"):
        return SIEMENS_SEQUENCE_NAME_SOURCE + " (t: trace)"
    return None


def vendor_gradient(ds: Dataset) -> Vector | None:
    """The gradient direction from GE (0019,10BB-BD) or Canon Image Comments, or None."""
    ge = [element.value(ds) for element in GE_GRADIENT]
    if all(v is not None for v in ge):
        vector = _vector(_first_number(v) for v in ge)
        if vector is not None:
            return vector
    return _canon_comment(ds)[1]


def is_zero_vector(gradient: Vector | None) -> bool:
    """A gradient of (0, 0, 0): on a b > 0 image, the isotropic (combined) image.

    dcm2niix (``nii_dicom_batch.cpp``) takes b > 0 volumes with a zero vector for "ADC or trace
    images" and leaves them out of the directions; the Philips isotropic image
    (mr_philips_achieva_dti_tilted) carries (0,0,0) in DiffusionGradientOrientation as well.
    """
    return gradient is not None and all(abs(v) <= 1e-3 for v in gradient)


def diffusion_facts(
    ds: Dataset,
    *,
    b_value: float | None,
    directionality: str | None,
    gradient: Vector | None,
    image_type: tuple[str, ...],
) -> DiffusionFacts:
    """Complete the public diffusion attributes of one image with the vendor tables.

    ``b_value``, ``directionality``, ``gradient``: what the public attributes gave (None when
    absent). The b-value falls back on :data:`B_VALUE_ELEMENTS`, Canon's Image Comments and
    Siemens' sequence name; Diffusion Directionality NONE means no diffusion gradient, b = 0
    (PS3.3 C.8.13.5.9). The image is the scanner's trace when Diffusion Directionality is
    ISOTROPIC, a :data:`TRACE_MARKERS` element says so, ImageType names it
    (:data:`TRACE_IMAGE_TYPES`), or its gradient is (0, 0, 0) at b > 0 (GE, Canon, Philips).
    Derived maps (ADC, FA; :data:`DERIVED_MAP_IMAGE_TYPES`) never get a b-value from a private
    element: their private b-value is the acquisition's, not theirs. A vendor-marked trace
    without Diffusion Directionality is given ISOTROPIC, the standard's word for it.
    """
    source: str | None = None
    if b_value is None and not DERIVED_MAP_IMAGE_TYPES.intersection(image_type):
        private = private_b_value(ds)
        if private is not None:
            b_value, source = private
        elif (directionality or "").upper() == "NONE":
            b_value, source = 0.0, "Diffusion Directionality (0018,9075) NONE"
    if gradient is None:
        gradient = vendor_gradient(ds)
    trace: str | None = None
    if b_value is not None and b_value > 0:
        if (directionality or "").upper() == "ISOTROPIC":
            trace = "Diffusion Directionality (0018,9075) ISOTROPIC"
        else:
            trace = trace_marker(ds, image_type)
            if trace is None and is_zero_vector(gradient):
                trace = "gradient (0,0,0) at b > 0"
    if trace is not None and not directionality:
        directionality = "ISOTROPIC"  # what the standard calls the trace (PS3.3 C.8.13.5.9)
    return DiffusionFacts(b_value, source, gradient, trace is not None, trace, directionality)
