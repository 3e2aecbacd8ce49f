"""Reading the header facts that eligibility, selection and volumes need.

Headers are read without pixel data (``stop_before_pixels``), or, when the caller keeps the
datasets for decoding, with the pixel data left on disk until used (``defer_size``). Single-frame images give one
:class:`FrameHeader` each; enhanced multi-frame images (PS3.3 C.7.6.16, Multi-frame Functional
Groups) give one per frame, with geometry and diffusion taken from the per-frame group and falling
back to the shared group. b-values come from the public Diffusion b-value (0018,9087) (top level
or MR Diffusion Sequence (0018,9117)) and, where those are empty, from the vendors' private
elements and conventions listed (with their sources) in :mod:`inference.vendor_quirks`, which
also says how a scanner marks its own trace (isotropic) image.

The types here hold plain values only (no datasets), so they can cross process boundaries and be
built from the node's index as well as from files.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.vendor_quirks import B0_WITHOUT_B_VALUE, DERIVED_MAP_IMAGE_TYPES, diffusion_facts

log = logging.getLogger(__name__)

DEFER_SIZE = 64 * 1024  # bytes: larger values (pixel data) stay on disk until used

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class FrameHeader:
    """One image plane: a single-frame instance or one frame of a multi-frame instance."""

    sop_instance_uid: str
    frame: int | None  # 1-based frame number in a multi-frame instance, None for single-frame
    position: Vector | None  # ImagePositionPatient (0020,0032)
    orientation: tuple[float, float, float, float, float, float] | None  # (0020,0037)
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    b_value: float | None
    directionality: str | None  # NONE, ISOTROPIC, DIRECTIONAL, BMATRIX (C.8.13.5.9)
    gradient: Vector | None
    frame_type: tuple[str, ...] = ()
    is_trace: bool = False  # the scanner's trace (isotropic) image, never one direction


@dataclass(frozen=True)
class InstanceHeader:
    """The header of one SOP instance, reduced to what the pipeline needs."""

    path: Path | None
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    protocol_name: str
    study_description: str
    procedure_description: str  # Requested/Performed Procedure Step Description
    patient_id: str
    issuer_of_patient_id: str
    study_datetime: datetime | None
    acquisition_datetime: datetime | None
    frame_of_reference_uid: str
    manufacturer: str
    contrast_agent: str
    gantry_tilt: float | None
    mr_acquisition_type: str  # 2D or 3D (0018,0023)
    body_part: str  # BodyPartExamined (0018,0015), upper-case
    rows: int
    columns: int
    instance_number: int | None
    series_number: int | None
    transfer_syntax_uid: str
    has_pixels: bool
    frames: tuple[FrameHeader, ...]
    b_value_source: str | None = None  # where the b-values were found
    accession: str = ""  # AccessionNumber (0008,0050)
    manufacturer_model: str = ""  # ManufacturerModelName (0008,1090)
    problem: str | None = None  # why the header could not be reduced (UIDs only): never part of a series


@dataclass(frozen=True)
class SeriesPart:
    """Consecutive slice positions of a series sharing one SliceThickness (0018,0050).

    A GE head CT, for instance, routinely holds a thinner posterior-fossa part (4 mm) and a
    thicker part above (7 mm) in one series; :mod:`inference.volumes` resamples such a stack
    onto a uniform grid at its smallest spacing.
    """

    thickness: float | None
    n_positions: int
    start_mm: float  # along the slice normal
    end_mm: float
    spacing_min: float | None  # between consecutive positions of the part
    spacing_max: float | None

    def describe(self) -> str:
        thickness = f"{self.thickness:g} mm" if self.thickness is not None else "unknown thickness"
        return f"{self.n_positions} x {thickness} over {self.end_mm - self.start_mm:.0f} mm"


@dataclass(frozen=True)
class SeriesHeader:
    """Facts about one series aggregated over all its instances (what selection classifies).

    The summary does not depend on the order the instances are given in: instances are put in
    a canonical order (InstanceNumber, then SOP Instance UID) first, and everything spatial is
    computed from positions along the slice normal. A series mixing slice thicknesses is
    summarised by its parts (:class:`SeriesPart`): ``slice_thickness`` is the thinnest part's,
    ``slice_thickness_max`` the thickest's.
    """

    study_uid: str
    series_uid: str
    series_number: int | None
    modality: str
    sop_class_uids: tuple[str, ...]
    image_type: tuple[str, ...]  # of the first instance; values upper-case
    image_types: frozenset[str]  # every value seen in ImageType / FrameType
    series_description: str
    protocol_name: str
    study_description: str
    procedure_description: str
    patient_id: str
    issuer_of_patient_id: str
    study_datetime: datetime | None
    acquisition_datetime: datetime | None
    frame_of_reference_uid: str
    manufacturer: str
    contrast_agent: str
    gantry_tilt: float | None
    mr_acquisition_type: str
    body_part: str
    rows: int
    columns: int
    n_instances: int
    n_frames: int
    n_positions: int  # distinct plane positions along the normal
    normal: Vector | None
    slice_thickness: float | None
    slice_spacing: float | None  # median distance between distinct positions along the normal
    coverage_mm: float | None  # extent along the normal, from the first to the last plane
    pixel_spacing: tuple[float, float] | None
    b_values: tuple[float, ...]  # distinct, sorted
    b_value_source: str | None
    directionalities: frozenset[str]
    n_directions_at_max_b: int  # distinct gradient directions at the highest b-value
    images_per_position_at_max_b: float  # > 1: several directions (or repeats) at the highest b
    has_pixels: bool
    slice_thickness_max: float | None = None  # thickest part (``slice_thickness`` is the thinnest)
    parts: tuple["SeriesPart", ...] = ()  # runs of positions with one slice thickness, along the normal
    instances: tuple[InstanceHeader, ...] = field(default=(), repr=False, compare=False)

    @property
    def axial_tilt_deg(self) -> float | None:
        """Angle between the slice normal and the head-foot axis, degrees (0 = axial)."""
        if self.normal is None:
            return None
        return math.degrees(math.acos(min(1.0, abs(self.normal[2]))))

    @property
    def paths(self) -> tuple[Path, ...]:
        """Files of the instances read from disk."""
        return tuple(i.path for i in self.instances if i.path is not None)


# --------------------------------------------------------------------------- stored form

HEADER_FORMAT = 1
"""Version of :func:`header_to_json`'s layout; a stored header of another version is read again from its file."""

_FRAME_FIELDS = tuple(f.name for f in fields(FrameHeader))
_FRAME_TUPLES = frozenset({"position", "orientation", "pixel_spacing", "gradient", "frame_type"})
_INSTANCE_FIELDS = tuple(f.name for f in fields(InstanceHeader) if f.name not in ("path", "frames"))
_INSTANCE_DATETIMES = frozenset({"study_datetime", "acquisition_datetime"})


def header_to_json(header: InstanceHeader) -> dict[str, Any]:
    """The header as plain JSON values (what the node's index keeps; the file path is not part of it).

    Frames are stored as lists in :class:`FrameHeader` field order; datetimes as ISO 8601 text.
    :func:`header_from_json` gives back an equal header.
    """
    stored: dict[str, Any] = {"format": HEADER_FORMAT}
    for name in _INSTANCE_FIELDS:
        value = getattr(header, name)
        if name in _INSTANCE_DATETIMES:
            value = value.isoformat() if value is not None else None
        elif isinstance(value, tuple):
            value = list(value)
        stored[name] = value
    stored["frames"] = [
        [list(v) if isinstance(v, tuple) else v for v in (getattr(frame, name) for name in _FRAME_FIELDS)]
        for frame in header.frames
    ]
    return stored


def _frame_values(frame: Sequence[Any]) -> dict[str, Any]:
    return {name: (tuple(v) if name in _FRAME_TUPLES and v is not None else v)
            for name, v in zip(_FRAME_FIELDS, frame, strict=True)}


def header_from_json(stored: Any, path: Path | None = None) -> InstanceHeader | None:
    """The :class:`InstanceHeader` :func:`header_to_json` made, with ``path``; None when ``stored`` is
    not such a header (another format version, a record of an unreadable file, damaged)."""
    if not isinstance(stored, dict) or stored.get("format") != HEADER_FORMAT:
        return None
    try:
        values: dict[str, Any] = {}
        for name in _INSTANCE_FIELDS:
            value = stored[name]
            if name in _INSTANCE_DATETIMES:
                value = datetime.fromisoformat(value) if value is not None else None
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        frames = tuple(FrameHeader(**_frame_values(frame)) for frame in stored["frames"])
        return InstanceHeader(path=path, frames=frames, **values)
    except (KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- small readers


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]))
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def _float(value: Any) -> float | None:
    got = _floats(value, 1)
    return None if got is None else got[0]


def _datetime(date: str, time: str) -> datetime | None:
    """DA + TM (PS3.5 6.2) as a naive datetime; the date alone when the time is unusable; None without a date.

    Parsed by hand (``strptime`` costs milliseconds per call, and this runs on the C-STORE path);
    tolerant reader: ACR-NEMA colons in times, seconds of 60 (leap second) read as 59.
    """
    digits_date = date[:8]
    if len(digits_date) != 8 or not digits_date.isdigit():
        return None
    try:
        day = datetime(int(digits_date[:4]), int(digits_date[4:6]), int(digits_date[6:8]))
    except ValueError:
        return None
    digits = (time or "").split(".")[0].replace(":", "").strip()
    if len(digits) < 2 or not digits.isdigit():
        return day
    padded = (digits + "0000")[:6]
    try:
        return day.replace(hour=int(padded[:2]), minute=int(padded[2:4]), second=min(int(padded[4:6]), 59))
    except ValueError:
        return day


def _image_type(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def _diffusion(item: Dataset | None) -> tuple[float | None, str | None, Vector | None]:
    if item is None:
        return None, None, None
    b_value = _float(item.get("DiffusionBValue"))
    directionality = _text(item, "DiffusionDirectionality") or None
    gradient = None
    if "DiffusionGradientDirectionSequence" in item and len(item.DiffusionGradientDirectionSequence):
        gradient = _floats(item.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation"), 3)
    elif "DiffusionGradientOrientation" in item:
        gradient = _floats(item.DiffusionGradientOrientation, 3)
    return b_value, directionality, gradient  # type: ignore[return-value]


def _first(group: Dataset | None, keyword: str) -> Dataset | None:
    if group is None or keyword not in group or not len(group[keyword].value):
        return None
    return group[keyword].value[0]


def _group_item(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    return _first(per_frame, keyword) or _first(shared, keyword)


def _enhanced_frames(ds: Dataset, sop_uid: str) -> tuple[FrameHeader, ...]:
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frames = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    n_frames = int(ds.get("NumberOfFrames", len(per_frames) or 1))
    frames = []
    for index in range(n_frames):
        per_frame = per_frames[index] if index < len(per_frames) else None
        position = _group_item(per_frame, shared, "PlanePositionSequence")
        orientation = _group_item(per_frame, shared, "PlaneOrientationSequence")
        measures = _group_item(per_frame, shared, "PixelMeasuresSequence")
        diffusion = _group_item(per_frame, shared, "MRDiffusionSequence")
        frame_type = _group_item(per_frame, shared, "MRImageFrameTypeSequence") or _group_item(
            per_frame, shared, "CTImageFrameTypeSequence"
        )
        b_value, directionality, gradient = _diffusion(diffusion)
        frame_types = _image_type(frame_type.get("FrameType") if frame_type else None)
        facts = diffusion_facts(per_frame if per_frame is not None else Dataset(), b_value=b_value,
                                directionality=directionality, gradient=gradient, image_type=frame_types)
        frames.append(
            FrameHeader(
                sop_instance_uid=sop_uid,
                frame=index + 1,
                position=_floats(position.get("ImagePositionPatient") if position else None, 3),  # type: ignore[arg-type]
                orientation=_floats(orientation.get("ImageOrientationPatient") if orientation else None, 6),  # type: ignore[arg-type]
                pixel_spacing=_floats(measures.get("PixelSpacing") if measures else None, 2),  # type: ignore[arg-type]
                slice_thickness=_float(measures.get("SliceThickness") if measures else None),
                b_value=facts.b_value,
                directionality=facts.directionality,
                gradient=facts.gradient,
                frame_type=frame_types,
                is_trace=facts.is_trace,
            )
        )
    return tuple(frames)


def _single_frame(ds: Dataset, sop_uid: str) -> tuple[tuple[FrameHeader, ...], str | None]:
    b_value: float | None = None
    directionality: str | None = None
    gradient: Vector | None = None
    source: str | None = None
    is_trace = False
    image_type = _image_type(ds.get("ImageType"))
    if str(ds.get("Modality", "")).upper() == "MR":  # diffusion attributes belong to MR only
        b_value, directionality, gradient = _diffusion(ds)
        source = "DiffusionBValue (0018,9087)" if b_value is not None else None
        if b_value is None and "MRDiffusionSequence" in ds:
            b_value, directionality, gradient = _diffusion(_first(ds, "MRDiffusionSequence"))
            source = "MR Diffusion Sequence (0018,9117)" if b_value is not None else None
        facts = diffusion_facts(ds, b_value=b_value, directionality=directionality, gradient=gradient,
                                image_type=image_type)
        b_value, gradient, is_trace = facts.b_value, facts.gradient, facts.is_trace
        directionality = facts.directionality
        source = source or facts.b_value_source
    frame = FrameHeader(
        sop_instance_uid=sop_uid,
        frame=None,
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        slice_thickness=_float(ds.get("SliceThickness")),
        b_value=b_value,
        directionality=directionality,
        gradient=gradient,
        frame_type=image_type,
        is_trace=is_trace,
    )
    return (frame,), source


def instance_header(ds: Dataset, path: Path | None = None) -> InstanceHeader:
    """Reduce a dataset (header only is enough) to an :class:`InstanceHeader`."""
    sop_uid = _text(ds, "SOPInstanceUID")
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        frames = _enhanced_frames(ds, sop_uid)
        source = "MR Diffusion Sequence (0018,9117)" if any(f.b_value is not None for f in frames) else None
    else:
        frames, source = _single_frame(ds, sop_uid)
    procedure = _text(ds, "PerformedProcedureStepDescription") or _text(ds, "RequestedProcedureDescription")
    acquisition = _text(ds, "AcquisitionDateTime")
    acq_dt = (
        _datetime(acquisition[:8], acquisition[8:14])
        if acquisition
        else _datetime(_text(ds, "AcquisitionDate") or _text(ds, "SeriesDate"), _text(ds, "AcquisitionTime") or _text(ds, "SeriesTime"))
    )
    transfer_syntax = ""
    if getattr(ds, "file_meta", None) is not None:
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    number = ds.get("InstanceNumber")
    series_number = ds.get("SeriesNumber")
    return InstanceHeader(
        path=path,
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=sop_uid,
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        image_type=_image_type(ds.get("ImageType")),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        study_description=_text(ds, "StudyDescription"),
        procedure_description=procedure,
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        study_datetime=_datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime")),
        acquisition_datetime=acq_dt,
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        manufacturer=_text(ds, "Manufacturer"),
        contrast_agent=_text(ds, "ContrastBolusAgent"),
        gantry_tilt=_float(ds.get("GantryDetectorTilt")),
        mr_acquisition_type=_text(ds, "MRAcquisitionType").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        instance_number=int(number) if number not in (None, "") else None,
        series_number=int(series_number) if series_number not in (None, "") else None,
        transfer_syntax_uid=transfer_syntax,
        has_pixels="PixelData" in ds or int(ds.get("Rows", 0) or 0) > 0,
        frames=frames,
        b_value_source=source,
        accession=_text(ds, "AccessionNumber"),
        manufacturer_model=_text(ds, "ManufacturerModelName"),
    )


def _file_sop_uid(path: Path) -> str:
    """The SOP Instance UID a file's meta header names, or its file name when unreadable."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.get("MediaStorageSOPInstanceUID", "")) or f"file {path.name}"
    except (InvalidDicomError, RecursionError, OSError, EOFError, ValueError, TypeError, KeyError, struct.error):
        return f"file {path.name}"


def read_instance_header(
    path: Path, datasets: dict[Path, Dataset] | None = None, problems: list[str] | None = None
) -> InstanceHeader | None:
    """Read one file's header; None when it is not DICOM or cannot be read.

    Without ``datasets`` the file is read up to its pixel data (``stop_before_pixels``). With
    it, the whole file is parsed but values larger than :data:`DEFER_SIZE` (the pixel data)
    are left on disk, read only when used, and the dataset is kept in ``datasets[path]``:
    decoding then reads just the pixel bytes instead of parsing the file a second time.

    Each file is read in isolation: a file that is not DICOM is skipped (DEBUG); a DICOM file
    that cannot be parsed or reduced (a sequence nested too deep for the parser, a truncated
    header, a value that cannot be decoded) is dropped with a warning naming its SOP Instance
    UID, also appended to ``problems`` when given, so one bad file never takes its study (or
    another study of the patient) down with it.
    """
    try:
        if datasets is None:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        else:
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError as exc:
        log.debug("skipping %s: %s", path.name, exc)
        return None
    except (RecursionError, MemoryError, OSError, EOFError, ValueError, TypeError, KeyError, struct.error) as exc:
        _dropped(problems, _file_sop_uid(path), f"unreadable ({type(exc).__name__})")
        return None
    if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        log.debug("skipping %s: no SOP Instance or Series UID", path.name)
        return None
    try:
        header = instance_header(ds, path)
    except (RecursionError, ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        _dropped(problems, _file_sop_uid(path), f"inconsistent header ({type(exc).__name__})")
        return None
    problem = pixel_data_problem(ds, path) if datasets is not None else None
    if problem is not None:
        _dropped(problems, header.sop_instance_uid, problem)
        return None
    if datasets is not None:
        datasets[path] = ds
    return header


def pixel_data_problem(ds: Dataset, path: Path) -> str | None:
    """Why the (deferred) Pixel Data (7FE0,0010) of ``ds`` read from ``path`` cannot be whole, or None.

    Checked without reading the pixels: the value must end inside the file, and native
    (uncompressed) pixel data must hold Rows x Columns x Samples per Pixel x Number of Frames
    x Bits Allocated / 8 bytes (PS3.5 8.1.1; encapsulated data are checked when decoded).
    """
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    length = getattr(element, "length", None)
    offset = getattr(element, "value_tell", None)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if element is None or length is None or offset is None or length == 0xFFFFFFFF:
        return None
    if syntax is not None and syntax.is_deflated:  # offsets are in the inflated stream, not the file
        return None
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"file unreadable ({type(exc).__name__})"
    if offset + length > size:
        return f"pixel data truncated ({offset + length - size} of {length} bytes missing)"
    if syntax is None or syntax.is_compressed:
        return None
    try:
        bits = int(ds.BitsAllocated)
        values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "pixel data without a valid Rows, Columns or Bits Allocated"
    expected = (values * bits + 7) // 8
    if length < expected:
        return f"pixel data of {length} bytes where Rows x Columns x frames need {expected}"
    return None


def _dropped(problems: list[str] | None, sop_uid: str, why: str) -> None:
    message = f"instance {sop_uid} dropped: {why}"
    log.warning(message)
    if problems is not None:
        problems.append(message)


def one_copy_per_series(instances: Sequence[InstanceHeader]) -> list[InstanceHeader]:
    """One export of a series sent both as classic images and as enhanced multi-frame images.

    Canon and Siemens XA scanners can export one acquisition twice under one SeriesInstanceUID
    (classic "MFSPLIT" images and an Enhanced MR file, PS3.3 A.36.2); counting both would double
    every plane. The copy describing more planes is kept (an export still arriving is the
    smaller); on a tie the enhanced copy, whose per-frame functional groups carry geometry and
    diffusion in standard attributes (PS3.3 C.7.6.16, C.8.13.5.9).
    :func:`inference.volumes.one_copy_of_each_series` applies the same rule to decoded planes.
    """
    enhanced = [i for i in instances if any(f.frame is not None for f in i.frames)]
    classic = [i for i in instances if not any(f.frame is not None for f in i.frames)]
    if not enhanced or not classic:
        return list(instances)
    n_enhanced = sum(len(i.frames) for i in enhanced)
    n_classic = sum(len(i.frames) for i in classic)
    keep = enhanced if n_enhanced >= n_classic else classic
    log.info("series %s exported twice (classic and enhanced): %d instance(s) of one copy ignored",
             instances[0].series_uid, len(instances) - len(keep))
    return keep


# --------------------------------------------------------------------------- series summary


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal of an image plane from ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else normal


def _distinct(values: Iterable[float], tolerance: float) -> list[float]:
    out: list[float] = []
    for value in sorted(values):
        if not out or value - out[-1] > tolerance:
            out.append(value)
    return out


def _round_b(value: float) -> float:
    return float(round(value))


def _canonical_order(instance: InstanceHeader) -> tuple[bool, int, str]:
    number = instance.instance_number
    return (number is None, number if number is not None else 0, instance.sop_instance_uid)


def _parts(frames: Sequence[FrameHeader], normal: np.ndarray | None) -> tuple[SeriesPart, ...]:
    """Runs of consecutive distinct positions along ``normal`` that share one slice thickness."""
    if normal is None:
        return ()
    by_position: dict[float, float | None] = {}
    for frame in frames:
        if frame.position is None:
            continue
        along = round(float(np.dot(frame.position, normal)), 2)
        thickness = round(frame.slice_thickness, 3) if frame.slice_thickness is not None else None
        known = by_position.get(along)
        # several frames at one position (diffusion directions, repeats): the thinnest counts
        if along not in by_position or (thickness is not None and (known is None or thickness < known)):
            by_position[along] = thickness
    runs: list[list[tuple[float, float | None]]] = []
    for along in _distinct(by_position, 0.01):
        thickness = by_position[along]
        if runs and runs[-1][-1][1] == thickness:
            runs[-1].append((along, thickness))
        else:
            runs.append([(along, thickness)])
    parts = []
    for run in runs:
        gaps = np.diff([a for a, _ in run])
        parts.append(
            SeriesPart(
                thickness=run[0][1],
                n_positions=len(run),
                start_mm=run[0][0],
                end_mm=run[-1][0],
                spacing_min=float(gaps.min()) if len(gaps) else None,
                spacing_max=float(gaps.max()) if len(gaps) else None,
            )
        )
    return tuple(parts)


def summarise_series(instances: Sequence[InstanceHeader]) -> SeriesHeader:
    """Aggregate the headers of one series' instances into a :class:`SeriesHeader`.

    The result is the same whatever order ``instances`` come in (files sorted by name, the
    order a PACS sent them, shuffled): see :class:`SeriesHeader`.
    """
    if not instances:
        raise ValueError("a series needs at least one instance")
    instances = sorted(instances, key=_canonical_order)
    first = instances[0]
    frames = [frame for inst in instances for frame in inst.frames]
    orientation = next((f.orientation for f in frames if f.orientation is not None), None)
    normal = slice_normal(orientation) if orientation is not None else None
    along: list[float] = []
    if normal is not None:
        along = [float(np.dot(f.position, normal)) for f in frames if f.position is not None]
    positions = _distinct(along, 0.01)
    gaps = np.diff(positions)
    b_values = sorted({_round_b(f.b_value) for f in frames if f.b_value is not None})
    max_b = b_values[-1] if b_values else None
    directions = {
        tuple(round(v, 2) for v in f.gradient)
        for f in frames
        if f.gradient is not None and f.b_value is not None and _round_b(f.b_value) == max_b
        and any(abs(v) > 1e-3 for v in f.gradient)
    }
    at_max_b = [f for f in frames if f.b_value is not None and _round_b(f.b_value) == max_b]
    image_types = {v for inst in instances for v in inst.image_type} | {v for f in frames for v in f.frame_type}
    thicknesses = [f.slice_thickness for f in frames if f.slice_thickness is not None]
    return SeriesHeader(
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        series_number=first.series_number,
        modality=first.modality,
        sop_class_uids=tuple(sorted({i.sop_class_uid for i in instances})),
        image_type=first.image_type,
        image_types=frozenset(image_types),
        series_description=first.series_description,
        protocol_name=first.protocol_name,
        study_description=first.study_description,
        procedure_description=first.procedure_description,
        patient_id=first.patient_id,
        issuer_of_patient_id=first.issuer_of_patient_id,
        study_datetime=first.study_datetime,
        acquisition_datetime=min((i.acquisition_datetime for i in instances if i.acquisition_datetime), default=None),
        frame_of_reference_uid=first.frame_of_reference_uid,
        manufacturer=first.manufacturer,
        contrast_agent=next((i.contrast_agent for i in instances if i.contrast_agent), ""),
        gantry_tilt=first.gantry_tilt,
        mr_acquisition_type=first.mr_acquisition_type,
        body_part=first.body_part,
        rows=first.rows,
        columns=first.columns,
        n_instances=len(instances),
        n_frames=len(frames),
        n_positions=len(positions),
        normal=tuple(float(v) for v in normal) if normal is not None else None,  # type: ignore[arg-type]
        slice_thickness=min(thicknesses) if thicknesses else None,
        slice_spacing=float(np.median(gaps)) if len(gaps) else None,
        coverage_mm=float(positions[-1] - positions[0]) if len(positions) > 1 else (0.0 if positions else None),
        pixel_spacing=next((f.pixel_spacing for f in frames if f.pixel_spacing is not None), None),
        b_values=tuple(b_values),
        b_value_source=next((i.b_value_source for i in instances if i.b_value_source), None),
        directionalities=frozenset(f.directionality.upper() for f in frames if f.directionality),
        n_directions_at_max_b=len(directions),
        images_per_position_at_max_b=len(at_max_b) / max(1, len(positions)),
        has_pixels=any(i.has_pixels for i in instances),
        slice_thickness_max=max(thicknesses) if thicknesses else None,
        parts=_parts(frames, normal),
        instances=tuple(instances),
    )


def iter_files(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under ``paths`` (files given directly or folders walked), sorted."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            files.append(path)
    return files


def b0_without_b_value(instances: Sequence[InstanceHeader]) -> list[InstanceHeader]:
    """Give b = 0 to the images of a diffusion series that carry no b-value anywhere.

    Toshiba/Canon write the b-value only on images acquired with a diffusion gradient
    (:data:`inference.vendor_quirks.B0_WITHOUT_B_VALUE`): in a series whose other images carry
    b > 0, an MR image without any b-value is a b0. Derived maps (ADC, FA) are left alone.
    """
    frames = [f for i in instances for f in i.frames]
    if all(f.b_value is not None for f in frames) or not any((f.b_value or 0.0) > 0 for f in frames):
        return list(instances)
    filled = []
    for instance in instances:
        lacking = any(f.b_value is None for f in instance.frames)
        if not lacking or instance.modality != "MR" or DERIVED_MAP_IMAGE_TYPES.intersection(instance.image_type):
            filled.append(instance)
            continue
        frames_b0 = tuple(replace(f, b_value=0.0) if f.b_value is None else f for f in instance.frames)
        filled.append(replace(instance, frames=frames_b0, b_value_source=instance.b_value_source or B0_WITHOUT_B_VALUE))
    return filled


def read_series_headers(
    paths: Iterable[Path], datasets: dict[Path, Dataset] | None = None, problems: list[str] | None = None
) -> list[SeriesHeader]:
    """Read every DICOM file under ``paths`` and group them into series (non-DICOM skipped).

    ``datasets``: when given, every file's dataset is kept there (pixel data deferred, see
    :func:`read_instance_header`) so that :mod:`inference.volumes` decodes without reading the
    headers again. ``problems``: when given, a warning for every instance dropped because it
    could not be read is appended (see :func:`read_instance_header`). A series exported as
    classic and as enhanced images is summarised from one copy (:func:`one_copy_per_series`);
    diffusion images without a b-value among b > 0 images are b0 (:func:`b0_without_b_value`).
    """
    headers = (read_instance_header(path, datasets, problems) for path in iter_files(paths))
    return series_headers([header for header in headers if header is not None])


def series_headers(instances: Iterable[InstanceHeader]) -> list[SeriesHeader]:
    """Group instance headers (read from files, or kept in the node's index) into series summaries.

    The rules of :func:`read_series_headers`: one copy of a series exported twice
    (:func:`one_copy_per_series`), b0 for diffusion images without a b-value
    (:func:`b0_without_b_value`); series in the order their first instance comes.
    """
    by_series: dict[tuple[str, str], list[InstanceHeader]] = defaultdict(list)
    for header in instances:
        by_series[(header.study_uid, header.series_uid)].append(header)
    return [summarise_series(b0_without_b_value(one_copy_per_series(group))) for group in by_series.values()]
