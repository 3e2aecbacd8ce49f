"""3-D volumes from DICOM series, checked for soundness.

:func:`load_volume` turns the files of one series (single-frame images or enhanced multi-frame
images, PS3.3 C.7.6.16) into a :class:`Volume`:

1. every frame is decoded (all transfer syntaxes pydicom's pixel plugins handle: RLE, JPEG
   baseline/lossless, JPEG-LS, JPEG 2000 through pylibjpeg and pyjpegls, deflate, big endian)
   and rescaled to modality units (Rescale Slope/Intercept, PS3.3 C.11.1.1.2; for enhanced
   images the Pixel Value Transformation functional group);
2. frames are sorted by their position along the slice normal (the cross product of the
   ImageOrientationPatient cosines, PS3.3 C.7.6.2.1.1), never by InstanceNumber;
3. the stack is checked: one orientation, one matrix and pixel spacing, no duplicated positions
   (identical re-sent images are dropped with a note; different images at one position are
   refused), no missing slice (a gap more than 1.5 times both neighbouring gaps), enough head
   coverage along the normal;
4. a gantry-tilted stack (slice positions stepping along an axis other than the normal, as
   GantryDetectorTilt (0018,1120) produces) is resampled onto an orthogonal grid; a stack whose
   spacing varies (e.g. 2.5 mm then 5 mm) is resampled onto a uniform grid at its smallest
   spacing. Both are noted in :attr:`Volume.notes`.

Each slice of a volume keeps the source instance (and frame) it came from, or for a resampled
volume the nearest source plane, so attention can be mapped back onto source images.

Diffusion helpers: :func:`load_diffusion` splits a series by b-value (and gradient direction),
:func:`trace_from_directions` builds the trace-weighted image (geometric mean over directions),
:func:`adc_from_b0_and_trace` computes ADC = ln(S0 / Sb) / b in 10^-6 mm2/s (the scale scanners
store ADC maps in).

A series that cannot make a sound volume raises :class:`VolumeError` (or a subclass) whose
``reason`` a radiologist can read.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from inference.decode import PixelDecodeError, decode_all, decode_one
from inference.dicom_headers import FrameHeader, instance_header, iter_files, slice_normal
from inference.result import SourceInstance, SourcePlane
from inference.vendor_quirks import B0_WITHOUT_B_VALUE

log = logging.getLogger(__name__)

POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3
TILT_TOLERANCE_DEG = 0.5
SPACING_TOLERANCE = 0.05  # relative variation of slice spacing still called uniform
MISSING_GAP_FACTOR = 1.5
DEFAULT_MIN_COVERAGE_MM = 80.0

_PARALLEL_MIN_PLANES = 64  # below this, one thread: the pool costs more than it saves


class VolumeError(ValueError):
    """A series cannot make a sound volume; ``reason`` says why."""

    def __init__(self, reason: str, series_uid: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.series_uid = series_uid


class DecodeError(VolumeError):
    """Pixel data could not be decoded (unsupported transfer syntax, corrupt data).

    ``sop_instance_uid`` names the instance (``""`` when the failure is not one instance's).
    """

    def __init__(self, reason: str, series_uid: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(reason, series_uid)
        self.sop_instance_uid = sop_instance_uid


class GeometryError(VolumeError):
    """Missing or inconsistent geometry (orientation, matrix, spacing)."""


class MissingSliceError(VolumeError):
    """A gap in the stack where a slice should be."""


class DuplicateSliceError(VolumeError):
    """Different images at the same position."""


class CoverageError(VolumeError):
    """The series covers too little of the head."""


@dataclass(frozen=True)
class Plane:
    """One decoded image plane: stored values and the rescale to modality units."""

    stored: np.ndarray  # (rows, columns) as decoded
    slope: float
    intercept: float
    header: FrameHeader
    source: SourceInstance

    @property
    def pixels(self) -> np.ndarray:
        """The plane in modality units (float32)."""
        out = np.empty(self.stored.shape, dtype=np.float32)
        self.write_into(out)
        return out

    def write_into(self, out: np.ndarray) -> None:
        """Write the plane in modality units into ``out`` (float32, same shape)."""
        if self.slope == 1.0:  # one pass: convert and add
            np.add(self.stored, np.float32(self.intercept), out=out, dtype=np.float32, casting="unsafe")
            return
        np.multiply(self.stored, np.float32(self.slope), out=out, dtype=np.float32, casting="unsafe")
        if self.intercept != 0.0:
            out += np.float32(self.intercept)


@dataclass(frozen=True)
class Volume:
    """A 3-D volume in patient space (LPS, mm).

    ``array[k, j, i]``: slice k, row j, column i. Voxel (i, j, k) lies at
    ``origin + i * spacing[0] * direction[:, 0] + j * spacing[1] * direction[:, 1]
    + k * spacing[2] * direction[:, 2]`` (the SimpleITK convention).
    """

    array: np.ndarray  # float32 (slices, rows, columns), modality units
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # (column spacing, row spacing, slice spacing) mm
    direction: np.ndarray  # 3x3, columns: row direction, column direction, slice normal
    sources: tuple[SourceInstance, ...]  # one per slice (nearest source plane when resampled)
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    modality: str
    notes: tuple[str, ...] = ()
    b_value: float | None = None
    # The acquired planes the volume was built from, ordered along the normal: the same as the
    # slices for a plain stack, not for a resampled (tilted, unevenly spaced) one.
    source_planes: tuple[SourcePlane, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image with the same geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array, dtype=np.float32))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image

    def slice_positions(self) -> np.ndarray:
        """Patient position of the first voxel of every slice, (slices, 3)."""
        k = np.arange(self.array.shape[0], dtype=float)[:, None]
        return np.asarray(self.origin) + k * self.spacing[2] * self.direction[:, 2]

    @property
    def coverage_mm(self) -> float:
        return float((self.array.shape[0] - 1) * self.spacing[2])


# --------------------------------------------------------------------------- decoding


def _rescale_for_frame(ds: Dataset, index: int) -> tuple[float, float]:
    def from_group(group: Dataset | None) -> tuple[float, float] | None:
        if group is None or "PixelValueTransformationSequence" not in group:
            return None
        item = group.PixelValueTransformationSequence[0]
        return float(item.get("RescaleSlope", 1.0) or 1.0), float(item.get("RescaleIntercept", 0.0) or 0.0)

    if "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence[index] if index < len(ds.PerFrameFunctionalGroupsSequence) else None
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        found = from_group(per_frame) or from_group(shared)
        if found:
            return found
    slope = ds.get("RescaleSlope", 1.0)
    intercept = ds.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), float(intercept if intercept not in (None, "") else 0.0)


def decode_dataset(ds: Dataset) -> np.ndarray:
    """All frames of a dataset as (frames, rows, columns), stored values.

    Decoded here, with the plugins :mod:`inference.decode` prefers.

    Raises
    ------
    DecodeError
        When no installed decoder handles the transfer syntax or the data are corrupt; the
        reason names the SOP Instance UID.
    """
    _check_grey(ds)
    try:
        pixels = decode_one(ds)
    except PixelDecodeError as exc:
        raise DecodeError(str(exc), str(ds.get("SeriesInstanceUID", "")), exc.sop_instance_uid) from exc
    return _as_frames(pixels)


def _check_grey(ds: Dataset) -> None:
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DecodeError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')}: colour image (SamplesPerPixel {ds.SamplesPerPixel}) "
            "is not a grey-scale slice",
            str(ds.get("SeriesInstanceUID", "")),
            str(ds.get("SOPInstanceUID", "")),
        )


def _as_frames(pixels: np.ndarray) -> np.ndarray:
    return pixels[None] if pixels.ndim == 2 else pixels


def planes_from_dataset(ds: Dataset) -> list[Plane]:
    """Decode and rescale every frame of ``ds`` into :class:`Plane` objects."""
    return _planes(ds, decode_dataset(ds))


def _planes(ds: Dataset, stored: np.ndarray) -> list[Plane]:
    """The decoded frames ``stored`` of ``ds`` as planes with their rescale and source."""
    header = instance_header(ds)
    if stored.shape[0] != len(header.frames):
        raise DecodeError(
            f"SOP Instance {header.sop_instance_uid}: {stored.shape[0]} frames decoded but the header describes "
            f"{len(header.frames)}",
            header.series_uid,
            header.sop_instance_uid,
        )
    planes = []
    for index, frame in enumerate(header.frames):
        slope, intercept = _rescale_for_frame(ds, index)
        source = SourceInstance(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            frame=frame.frame,
        )
        planes.append(Plane(stored=stored[index], slope=slope, intercept=intercept, header=frame, source=source))
    return planes


class InstanceError(VolumeError):
    """One instance cannot be read or decoded; ``sop_instance_uid`` names it."""

    def __init__(self, reason: str, sop_instance_uid: str, cause: type[BaseException]) -> None:
        super().__init__(reason)
        self.sop_instance_uid = sop_instance_uid
        self.cause = cause


# What reading or decoding one file can raise besides VolumeError: a header nested too deep for
# the parser (RecursionError), a truncated file or pixel data (EOFError, OSError), a pixel data
# length that does not match Rows x Columns x frames or a value that cannot be decoded (ValueError, ...).
_INSTANCE_FAILURES: tuple[type[Exception], ...] = (
    RecursionError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
    NotImplementedError, RuntimeError, MemoryError,
)
_READ_FAILURES: tuple[type[Exception], ...] = (*_INSTANCE_FAILURES, pydicom.errors.InvalidDicomError)
_BATCH_FAILURES: tuple[type[Exception], ...] = (PixelDecodeError, *_INSTANCE_FAILURES)


def _instance_uid(item: Path | Dataset) -> str:
    if isinstance(item, Dataset):
        return str(item.get("SOPInstanceUID", "")) or "(no SOP Instance UID)"
    try:
        meta = pydicom.filereader.read_file_meta_info(item)
        return str(meta.get("MediaStorageSOPInstanceUID", "")) or f"file {item.name}"
    except _READ_FAILURES:
        return f"file {item.name}"


def read_instance(item: Path | Dataset) -> Dataset:
    """The dataset of one file (or ``item`` itself), read in isolation.

    Raises
    ------
    InstanceError
        Naming the instance when the file cannot be parsed.
    """
    if isinstance(item, Dataset):
        return item
    try:
        return pydicom.dcmread(item)
    except _READ_FAILURES as exc:
        raise InstanceError(f"unreadable ({type(exc).__name__})", _instance_uid(item), type(exc)) from exc


def instance_planes(ds: Dataset) -> list[Plane]:
    """:func:`planes_from_dataset` for one instance, any failure reported as :class:`InstanceError`."""
    try:
        return planes_from_dataset(ds)
    except DecodeError as exc:
        raise InstanceError(exc.reason, _instance_uid(ds), DecodeError) from exc
    except _INSTANCE_FAILURES as exc:
        raise InstanceError(f"pixel data unreadable ({type(exc).__name__})", _instance_uid(ds), type(exc)) from exc


def _drop(dropped: list[str] | None, exc: InstanceError, first: list[InstanceError]) -> None:
    message = f"instance {exc.sop_instance_uid} dropped: {exc.reason}"
    log.warning(message)
    first.append(exc)
    if dropped is not None:
        dropped.append(message)


def _decoded_planes(datasets: Sequence[Dataset], dropped: list[str] | None, failures: list[InstanceError]) -> list[Plane]:
    """The planes of ``datasets``, decoded together (compressed series on several cores).

    When one instance cannot be decoded the series is decoded again one instance at a time, so
    that only the failing instances are dropped (:func:`_drop`), never the series.
    """
    try:
        decoded = decode_all(datasets)  # inference.decode: the fastest plugin, several cores
    except _BATCH_FAILURES:
        decoded = None
    planes: list[Plane] = []
    for index, ds in enumerate(datasets):
        try:
            if decoded is None:
                planes.extend(instance_planes(ds))
            else:
                try:
                    planes.extend(_planes(ds, _as_frames(decoded[index])))
                except DecodeError as exc:
                    raise InstanceError(exc.reason, _instance_uid(ds), DecodeError) from exc
        except InstanceError as exc:
            _drop(dropped, exc, failures)
    return planes


def read_planes(
    paths: Iterable[Path | Dataset], dropped: list[str] | None = None
) -> tuple[list[Plane], dict[str, str]]:
    """Decode every plane of the given files (folders are walked) or datasets.

    Returns the planes and the series facts (study/series/frame-of-reference UID, modality).
    Each file is read and decoded in isolation: one that cannot be (:class:`InstanceError`) is
    left out with a warning naming its SOP Instance UID, also appended to ``dropped`` when
    given; the volume checks then judge what remains.

    Raises
    ------
    VolumeError
        When no image remains (of the type of the first instance's failure, when one failed).
    """
    failures: list[InstanceError] = []
    planes: list[Plane] = []
    facts: dict[str, str] = {}
    items: list[Path | Dataset] = []
    for item in paths:
        if isinstance(item, Dataset):
            items.append(item)
        else:
            items.extend(iter_files([Path(item)]))
    datasets: list[Dataset] = []
    for item in items:
        try:
            ds = read_instance(item)
        except InstanceError as exc:
            _drop(dropped, exc, failures)
            continue
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            continue
        if not facts:
            facts = {
                "study_uid": str(ds.get("StudyInstanceUID", "")),
                "series_uid": str(ds.get("SeriesInstanceUID", "")),
                "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
                "modality": str(ds.get("Modality", "")),
            }
        elif str(ds.get("SeriesInstanceUID", "")) != facts["series_uid"]:
            raise GeometryError("files of more than one series given", facts["series_uid"])
        try:
            _check_grey(ds)
        except DecodeError as exc:
            _drop(dropped, InstanceError(exc.reason, _instance_uid(ds), DecodeError), failures)
            continue
        datasets.append(ds)
    planes.extend(_decoded_planes(datasets, dropped, failures))
    if not planes:
        if failures:
            reason = f"no readable image: {len(failures)} instance(s) dropped, first: {failures[0].reason}"
            if failures[0].cause is DecodeError:
                raise DecodeError(reason, facts.get("series_uid", ""), failures[0].sop_instance_uid)
            raise VolumeError(reason, facts.get("series_uid", ""))
        raise VolumeError("no image with pixel data in the series")
    return planes, facts


# --------------------------------------------------------------------------- stacking


@dataclass
class _Stack:
    planes: list[Plane]
    along: np.ndarray  # position of each plane along the normal
    orientation: np.ndarray  # (6,)
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    notes: list[str] = field(default_factory=list)


def _check_geometry(planes: Sequence[Plane], series_uid: str) -> _Stack:
    missing = [p for p in planes if p.header.position is None or p.header.orientation is None]
    if missing:
        raise GeometryError(f"{len(missing)} image(s) without ImagePositionPatient/ImageOrientationPatient", series_uid)
    orientation = np.asarray(planes[0].header.orientation, dtype=float)
    for plane in planes:
        if np.max(np.abs(np.asarray(plane.header.orientation) - orientation)) > ORIENTATION_TOLERANCE:
            raise GeometryError("images of more than one orientation in the series", series_uid)
    shapes = {p.stored.shape for p in planes}
    if len(shapes) > 1:
        raise GeometryError(f"images of different matrix sizes {sorted(shapes)}", series_uid)
    spacings = {p.header.pixel_spacing for p in planes}
    if None in spacings:
        raise GeometryError("PixelSpacing missing", series_uid)
    if len(spacings) > 1:
        raise GeometryError("images of different pixel spacing", series_uid)
    normal = slice_normal(orientation)
    along = np.asarray([float(np.dot(p.header.position, normal)) for p in planes])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    return _Stack(
        planes=[planes[i] for i in order],
        along=along[order],
        orientation=orientation,
        normal=normal,
        pixel_spacing=next(iter(spacings)),  # type: ignore[arg-type]
    )


def _drop_duplicates(stack: _Stack, series_uid: str) -> None:
    keep = [0]
    dropped = 0
    conflicts: list[float] = []
    for index in range(1, len(stack.planes)):
        previous = keep[-1]
        if stack.along[index] - stack.along[previous] > POSITION_TOLERANCE_MM:
            keep.append(index)
            continue
        same, before = stack.planes[index], stack.planes[previous]
        if (same.slope, same.intercept) == (before.slope, before.intercept) and np.array_equal(same.stored, before.stored):
            dropped += 1
        else:
            conflicts.append(float(stack.along[index]))
    if conflicts:
        where = ", ".join(f"{v:.1f}" for v in conflicts[:5])
        raise DuplicateSliceError(
            f"{len(conflicts)} duplicated slice position(s) with different images (at {where} mm along the normal)",
            series_uid,
        )
    if dropped:
        stack.notes.append(f"{dropped} identical duplicate image(s) ignored")
        stack.planes = [stack.planes[i] for i in keep]
        stack.along = stack.along[keep]


def _check_gaps(stack: _Stack, series_uid: str) -> np.ndarray:
    gaps = np.diff(stack.along)
    for index, gap in enumerate(gaps):
        neighbours = [gaps[j] for j in (index - 1, index + 1) if 0 <= j < len(gaps)]
        if neighbours and gap > MISSING_GAP_FACTOR * max(neighbours):
            raise MissingSliceError(
                f"missing slice: gap of {gap:.1f} mm between slices {index + 1} and {index + 2} "
                f"where neighbours are {max(neighbours):.1f} mm apart",
                series_uid,
            )
    return gaps


def _check_coverage(stack: _Stack, min_coverage_mm: float, series_uid: str) -> None:
    coverage = float(stack.along[-1] - stack.along[0]) if len(stack.along) > 1 else 0.0
    if coverage < min_coverage_mm:
        raise CoverageError(
            f"series covers {coverage:.0f} mm of the head ({len(stack.planes)} slices); at least {min_coverage_mm:.0f} mm needed",
            series_uid,
        )


def _stack_direction(stack: _Stack) -> np.ndarray:
    first = np.asarray(stack.planes[0].header.position, dtype=float)
    last = np.asarray(stack.planes[-1].header.position, dtype=float)
    step = last - first
    return step / float(np.linalg.norm(step))


def _tilt_deg(stack: _Stack) -> float:
    direction = _stack_direction(stack)
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(direction, stack.normal))))))


def load_volume(
    paths: Iterable[Path | Dataset],
    *,
    min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM,
    b_value: float | None = None,
) -> Volume:
    """Build a sound :class:`Volume` from the files (or datasets) of one series.

    Parameters
    ----------
    paths:
        Files, folders or datasets of one series.
    min_coverage_mm:
        Least extent along the slice normal (head coverage).
    b_value:
        For diffusion series: only frames at this b-value (within 1 s/mm2). A series with
        several b-values or directions must be split (:func:`load_diffusion`).

    Raises
    ------
    VolumeError
        (or a subclass) with the reason the series cannot make a sound volume.
    """
    dropped: list[str] = []
    planes, facts = read_planes(paths, dropped)
    if b_value is not None:
        planes = [p for p in planes if p.header.b_value is not None and abs(p.header.b_value - b_value) <= 1.0]
        if not planes:
            raise VolumeError(f"no image at b = {b_value:g}", facts["series_uid"])
    volume = volume_after_drops(planes, facts, dropped, min_coverage_mm=min_coverage_mm)
    return replace(volume, b_value=b_value, notes=(*dropped, *volume.notes))


def volume_after_drops(
    planes: Sequence[Plane], facts: dict[str, str], dropped: Sequence[str], *, min_coverage_mm: float
) -> Volume:
    """:func:`volume_from_planes` for what remains after instances were dropped by :func:`read_planes`.

    When the remaining planes cannot make a sound volume the reason also names the instances
    dropped (a missing slice is then explained by the file that could not be read).
    """
    try:
        return volume_from_planes(planes, facts, min_coverage_mm=min_coverage_mm)
    except VolumeError as exc:
        if not dropped or isinstance(exc, InstanceError):
            raise
        raise type(exc)(f"{exc.reason} (after {'; '.join(dropped)})", exc.series_uid) from exc


def volume_from_planes(planes: Sequence[Plane], facts: dict[str, str], *, min_coverage_mm: float) -> Volume:
    """Sort, check and (when needed) resample decoded planes into a :class:`Volume`."""
    series_uid = facts.get("series_uid", "")
    stack = _check_geometry(planes, series_uid)
    _drop_duplicates(stack, series_uid)
    _check_coverage(stack, min_coverage_mm, series_uid)
    gaps = _check_gaps(stack, series_uid)
    tilt = _tilt_deg(stack) if len(stack.planes) > 1 else 0.0
    uneven = bool(len(gaps)) and (gaps.max() - gaps.min()) > SPACING_TOLERANCE * gaps.min()
    if tilt > TILT_TOLERANCE_DEG:
        volume = _resample_tilted(stack, facts, float(gaps.min()) if uneven else None)
        notes = [f"gantry tilt of {tilt:.1f} deg corrected onto an orthogonal grid"]
        if uneven:
            notes.insert(0, f"slice spacing varies {gaps.min():.2f}-{gaps.max():.2f} mm; resampled to {gaps.min():.2f} mm")
        return replace(volume, notes=(*stack.notes, *notes))
    if uneven:
        volume = _resample_uniform(stack, facts, float(gaps.min()))
        return replace(
            volume,
            notes=(*stack.notes, f"slice spacing varies {gaps.min():.2f}-{gaps.max():.2f} mm; resampled to {gaps.min():.2f} mm"),
        )
    return _stacked(stack, facts, float(np.mean(gaps)) if len(gaps) else 1.0)


def source_plane(plane: Plane) -> SourcePlane:
    """The acquired geometry of a decoded plane (checked present by :func:`_check_geometry`)."""
    header = plane.header
    assert header.position is not None and header.orientation is not None and header.pixel_spacing is not None
    rows, columns = plane.stored.shape
    return SourcePlane(
        source=plane.source,
        position_patient=tuple(float(v) for v in header.position),  # type: ignore[arg-type]
        orientation_patient=tuple(float(v) for v in header.orientation),  # type: ignore[arg-type]
        pixel_spacing=(float(header.pixel_spacing[0]), float(header.pixel_spacing[1])),
        rows=int(rows),
        columns=int(columns),
    )


def _direction(stack: _Stack) -> np.ndarray:
    return np.column_stack([stack.orientation[:3], stack.orientation[3:], stack.normal])


def _modality_array(planes: Sequence[Plane]) -> np.ndarray:
    """The planes in modality units, stacked; two threads each write half the planes.

    numpy releases the GIL in the conversion, so on two cores the halves run side by side;
    each voxel is computed the same way whichever thread writes it (same output bit for bit).
    """
    rows, cols = planes[0].stored.shape
    array = np.empty((len(planes), rows, cols), dtype=np.float32)

    def write(indices: range) -> None:
        for index in indices:
            planes[index].write_into(array[index])

    if len(planes) < _PARALLEL_MIN_PLANES:
        write(range(len(planes)))
        return array
    half = len(planes) // 2
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rescale") as pool:
        other = pool.submit(write, range(half, len(planes)))
        write(range(half))
        other.result()
    return array


def _stacked(stack: _Stack, facts: dict[str, str], spacing: float, array: np.ndarray | None = None) -> Volume:
    if array is None:
        array = _modality_array(stack.planes)
    return Volume(
        array=array,
        origin=tuple(float(v) for v in stack.planes[0].header.position),  # type: ignore[arg-type,union-attr]
        spacing=(float(stack.pixel_spacing[1]), float(stack.pixel_spacing[0]), spacing),
        direction=_direction(stack),
        sources=tuple(p.source for p in stack.planes),
        study_uid=facts.get("study_uid", ""),
        series_uid=facts.get("series_uid", ""),
        frame_of_reference_uid=facts.get("frame_of_reference_uid", ""),
        modality=facts.get("modality", ""),
        notes=tuple(stack.notes),
        source_planes=tuple(source_plane(p) for p in stack.planes),
    )


def _interpolate_along(stack: _Stack, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """The stack linearly interpolated onto positions ``along[0] + k * spacing`` along the normal.

    Returns the array and, for each output plane, the index of the nearest source plane.
    """
    count = int(math.floor((stack.along[-1] - stack.along[0]) / spacing + 1e-6)) + 1
    targets = stack.along[0] + spacing * np.arange(count)
    upper = np.clip(np.searchsorted(stack.along, targets, side="right"), 1, len(stack.along) - 1)
    lower = upper - 1
    width = stack.along[upper] - stack.along[lower]
    weight = np.clip((targets - stack.along[lower]) / width, 0.0, 1.0).astype(np.float32)
    source = _modality_array(stack.planes)
    array = source[lower] * (1 - weight)[:, None, None] + source[upper] * weight[:, None, None]
    return array, np.where(weight < 0.5, lower, upper)


def _resample_uniform(stack: _Stack, facts: dict[str, str], spacing: float) -> Volume:
    """Linear interpolation along the normal onto positions ``along[0] + k * spacing``."""
    array, nearest = _interpolate_along(stack, spacing)
    volume = _stacked(stack, facts, spacing, array)
    return replace(volume, sources=tuple(stack.planes[i].source for i in nearest))


def _resample_tilted(stack: _Stack, facts: dict[str, str], uniform_spacing: float | None = None) -> Volume:
    """Resample a sheared (gantry-tilted) stack onto an orthogonal grid stepping along the table.

    The source voxel (i, j, k) lies at ``P0 + i*dc*r + j*dr*c + k*s`` with ``s`` the step between
    consecutive slice positions, an affine map that SimpleITK inverts and resamples linearly.
    That map needs one step: when the spacing varies inside the series (GE's thinner posterior
    fossa slices below thicker ones), the planes are first interpolated along the tilted slice
    line onto ``uniform_spacing`` (along the normal), so each keeps the place it was acquired at.
    """
    row_dir, col_dir = stack.orientation[:3], stack.orientation[3:]
    first = np.asarray(stack.planes[0].header.position, dtype=float)
    last = np.asarray(stack.planes[-1].header.position, dtype=float)
    if uniform_spacing is None:
        source_array = _modality_array(stack.planes)
        plane_index = np.arange(len(stack.planes))
        step = (last - first) / (len(stack.planes) - 1)
    else:
        source_array, plane_index = _interpolate_along(stack, uniform_spacing)
        step = (last - first) * (uniform_spacing / float(stack.along[-1] - stack.along[0]))
    n = len(source_array)
    d_row, d_col = float(stack.pixel_spacing[0]), float(stack.pixel_spacing[1])
    index_to_patient = np.column_stack([row_dir * d_col, col_dir * d_row, step])
    axis = step / float(np.linalg.norm(step))
    new_col = np.cross(axis, row_dir)
    new_col /= float(np.linalg.norm(new_col))
    new_row = np.cross(new_col, axis)
    direction = np.column_stack([new_row, new_col, axis])
    rows, cols = stack.planes[0].stored.shape
    corners = np.array(
        [first + index_to_patient @ np.array([i, j, k]) for i in (0, cols - 1) for j in (0, rows - 1) for k in (0, n - 1)]
    )
    local = (corners - first) @ direction  # coordinates in the new frame
    low, high = local.min(axis=0), local.max(axis=0)
    spacing = np.array([d_col, d_row, float(np.linalg.norm(step))])
    size = [int(math.floor((high[a] - low[a]) / spacing[a] + 1e-6)) + 1 for a in range(3)]
    origin = first + direction @ low
    source = sitk.GetImageFromArray(source_array)
    inverse = np.linalg.inv(index_to_patient)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in inverse.flatten()))
    transform.SetTranslation(tuple(float(v) for v in -inverse @ first))
    background = float(source_array.min())
    resampled = sitk.Resample(
        source, size, transform, sitk.sitkLinear, tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.flatten()), background, sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled)
    # nearest source plane of each output slice: by the position of its centre along the step
    centres = origin + direction @ np.array([(size[0] - 1) * spacing[0] / 2, (size[1] - 1) * spacing[1] / 2, 0.0])
    ks = [(centres + k * spacing[2] * axis - first) for k in range(size[2])]
    nearest = [int(np.clip(round(float((inverse @ p)[2])), 0, n - 1)) for p in ks]
    return Volume(
        array=array,
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        direction=direction,
        sources=tuple(stack.planes[int(plane_index[i])].source for i in nearest),
        study_uid=facts.get("study_uid", ""),
        series_uid=facts.get("series_uid", ""),
        frame_of_reference_uid=facts.get("frame_of_reference_uid", ""),
        modality=facts.get("modality", ""),
        notes=tuple(stack.notes),
        source_planes=tuple(source_plane(p) for p in stack.planes),
    )


# --------------------------------------------------------------------------- diffusion


@dataclass(frozen=True)
class DiffusionSeries:
    """A diffusion series split by b-value.

    ``by_b_value``: per b, one volume per gradient direction, or one volume when the images at
    that b carry no direction. ``traces``: per b, the scanner's own trace (isotropic) image
    when the series stores one (:func:`inference.vendor_quirks.diffusion_facts` says how each
    vendor marks it); it is used as the trace and never averaged as one more direction.
    """

    by_b_value: dict[float, tuple[Volume, ...]]
    traces: dict[float, Volume] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def b_values(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.by_b_value) | set(self.traces)))

    def trace(self, b_value: float | None = None) -> Volume:
        """The trace-weighted volume at ``b_value`` (default: the highest): the scanner's
        trace when stored, else the one volume at that b, else the geometric mean over directions."""
        b = self.b_values[-1] if b_value is None else b_value
        if b in self.traces:
            return self.traces[b]
        volumes = self.by_b_value[b]
        return volumes[0] if len(volumes) == 1 else trace_from_directions(volumes)

    def b0(self) -> Volume | None:
        """The b0 volume (lowest b <= 50 s/mm2), None when absent."""
        low = self.b_values[0]
        if low > 50.0 or len(self.b_values) < 2:
            return None
        return self.trace(low)


def _direction_key(plane: Plane, occurrence: int) -> tuple[float, ...]:
    gradient = plane.header.gradient
    directionality = (plane.header.directionality or "").upper()
    if gradient is not None and any(abs(v) > 1e-3 for v in gradient) and directionality != "ISOTROPIC":
        return tuple(round(v, 2) for v in gradient)
    return (float(occurrence),)


def one_copy_of_each_series(planes: Sequence[Plane]) -> tuple[list[Plane], str | None]:
    """Keep one export of a series sent both as classic and as enhanced images.

    Some scanners (Canon, Siemens XA) export one acquisition twice under one SeriesInstanceUID:
    one classic image per plane and one Enhanced MR multi-frame file (PS3.3 A.36.2). Stacking
    both would double every plane. The copy with more planes is kept (an export still arriving
    is the smaller one); on a tie the enhanced copy, whose per-frame MR Diffusion Sequence
    (PS3.3 C.8.13.5.9, type 1 there) holds the diffusion facts in standard attributes.
    Returns the planes kept and a note (None when nothing was dropped).
    """
    enhanced = [p for p in planes if p.source.frame is not None]
    classic = [p for p in planes if p.source.frame is None]
    if not enhanced or not classic:
        return list(planes), None
    keep, drop, kind = (enhanced, classic, "enhanced") if len(enhanced) >= len(classic) else (classic, enhanced, "classic")
    other = "classic" if kind == "enhanced" else "enhanced"
    return keep, f"series exported twice (classic and enhanced): the {kind} copy used, {len(drop)} {other} image(s) ignored"


def _b_values_filled(planes: Sequence[Plane], series_uid: str) -> tuple[list[Plane], str | None]:
    """Planes with a b-value each: images without any b-value among b > 0 images are b0.

    Toshiba/Canon write Diffusion b-value (0018,9087) only on images acquired with a diffusion
    gradient (dcm2niix, ``Canon/README.md``), so in a series whose other images carry b > 0 an
    image without any b-value is a b0. A series where no image has a b-value is refused.
    """
    missing = [p for p in planes if p.header.b_value is None]
    if not missing:
        return list(planes), None
    if len(missing) == len(planes) or not any((p.header.b_value or 0.0) > 0 for p in planes):
        raise VolumeError("diffusion series without a b-value on every image", series_uid)
    filled = [p if p.header.b_value is not None else replace(p, header=replace(p.header, b_value=0.0)) for p in planes]
    return filled, f"{len(missing)} image(s) without a b-value taken as b0 ({B0_WITHOUT_B_VALUE})"


def _position_key(plane: Plane) -> tuple[float, ...]:
    return tuple(round(v, 2) for v in plane.header.position or ())


def _single_trace_b_values(planes: Sequence[Plane]) -> set[float]:
    """The b-values whose trace-flagged planes hold one image per position (a scanner's trace).

    Several flagged images at one position (e.g. directions whose gradient was written as
    (0,0,0)) are no single trace: they stay with the directions, told apart by order.
    """
    positions: dict[float, list[tuple[float, ...]]] = defaultdict(list)
    for plane in planes:
        if plane.header.is_trace:
            positions[float(round(plane.header.b_value))].append(_position_key(plane))  # type: ignore[arg-type]
    return {b for b, keys in positions.items() if len(set(keys)) == len(keys)}


def load_diffusion(paths: Iterable[Path | Dataset], *, min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM) -> DiffusionSeries:
    """Split a diffusion series by b-value and gradient direction into volumes.

    Planes without gradient information that repeat a position at one b-value (b-values only in
    a vendor private tag) are told apart by their order of appearance. Planes flagged as the
    scanner's trace (:attr:`FrameHeader.is_trace`) make the trace at their b-value, apart from
    the directions. A series exported twice (classic and enhanced) is used once
    (:func:`one_copy_of_each_series`).

    Raises
    ------
    VolumeError
        When no plane has a b-value or a group cannot make a sound volume.
    """
    dropped: list[str] = []
    planes, facts = read_planes(paths, dropped)
    series_uid = facts.get("series_uid", "")
    planes, copy_note = one_copy_of_each_series(planes)
    planes, b0_note = _b_values_filled(planes, series_uid)
    groups: dict[float, dict[tuple[float, ...], list[Plane]]] = defaultdict(lambda: defaultdict(list))
    trace_planes: dict[float, list[Plane]] = defaultdict(list)
    seen: dict[tuple[float, tuple[float, ...]], int] = defaultdict(int)
    trace_b = _single_trace_b_values(planes)
    for plane in planes:
        b = float(round(plane.header.b_value))  # type: ignore[arg-type]
        if plane.header.is_trace and b in trace_b:
            trace_planes[b].append(plane)
            continue
        position = _position_key(plane)
        occurrence = seen[(b, position)]
        seen[(b, position)] += 1
        groups[b][_direction_key(plane, occurrence)].append(plane)
    notes = (*dropped, *(note for note in (copy_note, b0_note) if note))
    by_b: dict[float, tuple[Volume, ...]] = {}
    for b, directions in sorted(groups.items()):
        volumes = []
        for key in sorted(directions):
            volume = volume_after_drops(directions[key], facts, dropped, min_coverage_mm=min_coverage_mm)
            volumes.append(replace(volume, b_value=b, notes=(*notes, *volume.notes)))
        by_b[b] = tuple(volumes)
    traces: dict[float, Volume] = {}
    for b, stored in sorted(trace_planes.items()):
        volume = volume_after_drops(stored, facts, dropped, min_coverage_mm=min_coverage_mm)
        note = f"the scanner's trace image at b={b:g} used"
        traces[b] = replace(volume, b_value=b, notes=(*notes, *volume.notes, note))
    return DiffusionSeries(by_b, traces, notes)


def _same_grid(volumes: Sequence[Volume]) -> None:
    first = volumes[0]
    for other in volumes[1:]:
        if other.shape != first.shape or not np.allclose(other.origin, first.origin, atol=1e-3):
            raise GeometryError("diffusion volumes on different grids", first.series_uid)


def trace_from_directions(volumes: Sequence[Volume]) -> Volume:
    """Trace-weighted image: geometric mean of the directional images at one b-value."""
    if len(volumes) < 3:
        raise VolumeError(f"a trace needs at least 3 gradient directions, got {len(volumes)}", volumes[0].series_uid)
    _same_grid(volumes)
    logs = np.stack([np.log(np.maximum(v.array, 1e-3)) for v in volumes])
    trace = np.exp(logs.mean(axis=0)).astype(np.float32)
    first = volumes[0]
    note = f"trace built as geometric mean of {len(volumes)} directions at b={first.b_value or 0:g}"
    return replace(first, array=trace, notes=(*first.notes, note))


def adc_from_b0_and_trace(b0: Volume, trace: Volume, b_value: float | None = None) -> Volume:
    """ADC = ln(S0 / Sb) / b, in 10^-6 mm2/s, 0 where the signal is absent."""
    b = b_value if b_value is not None else trace.b_value
    if not b or b <= 0:
        raise VolumeError("ADC needs a positive b-value", trace.series_uid)
    _same_grid([b0, trace])
    s0 = b0.array.astype(np.float64)
    sb = trace.array.astype(np.float64)
    valid = (s0 > 1.0) & (sb > 0.0)
    adc = np.zeros_like(s0)
    adc[valid] = np.log(s0[valid] / sb[valid]) / b * 1e6
    adc = np.clip(adc, 0.0, 5000.0).astype(np.float32)
    note = f"ADC computed from b0 and trace (b={b:g})"
    return replace(trace, array=adc, b_value=None, notes=(*trace.notes, note))


# --------------------------------------------------------------------------- a case's volumes


@dataclass(frozen=True)
class CaseVolumes:
    """The volume of every role of a selected pipeline, with what was derived said in warnings."""

    volumes: dict[str, Volume]
    warnings: tuple[str, ...] = ()


def load_case_volumes(
    roles: dict[str, tuple[Sequence[Path | Dataset], str, float | None]],
    *,
    min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM,
) -> CaseVolumes:
    """Load the volumes of a selected case.

    Parameters
    ----------
    roles:
        role -> (files of the series, or their datasets already read, derivation, b-value). ``derivation`` is the
        :class:`inference.selection.RoleChoice` text: empty (read as is), a DWI plan (split by
        b-value, build the trace from directions) or "ADC computed from b0 and trace" (the files
        are then the DWI series'). ``b-value`` is the DWI b-value chosen.
        :func:`inference.selection.case_files` builds this mapping from a plan.

    Raises
    ------
    VolumeError
        Naming the role whose series cannot make a sound volume.
    """
    volumes: dict[str, Volume] = {}
    warnings: list[str] = []
    diffusion: dict[tuple[str, ...], DiffusionSeries] = {}
    for role, (paths, derivation, b_value) in roles.items():
        key = tuple(str(p.filename) if isinstance(p, Dataset) else str(p) for p in paths)
        try:
            if role == "dwi" or derivation.startswith("ADC computed"):
                if key not in diffusion:
                    diffusion[key] = load_diffusion(paths, min_coverage_mm=min_coverage_mm)
                series = diffusion[key]
                volumes[role] = _diffusion_role(role, series, b_value)
            else:
                volumes[role] = load_volume(paths, min_coverage_mm=min_coverage_mm)
        except VolumeError as exc:
            raise type(exc)(f"{role}: {exc.reason}", exc.series_uid) from exc
        warnings.extend(volumes[role].notes)
    return CaseVolumes(volumes, tuple(dict.fromkeys(warnings)))


def _diffusion_role(role: str, series: DiffusionSeries, b_value: float | None) -> Volume:
    trace = series.trace(b_value if b_value in series.b_values else None)
    if role == "dwi":
        return trace
    b0 = series.b0()
    if b0 is None:
        raise VolumeError("ADC cannot be computed: the DWI series holds no b0 images", trace.series_uid)
    return adc_from_b0_and_trace(b0, trace)
