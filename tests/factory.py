"""The one synthetic-study factory of the test suite.

Builds realistic, deterministic (seeded) DICOM series of a phantom head and writes them to a
folder, one file per instance, ``<dir>/<series key>/<nnnn>.dcm``. Every engineer's tests use it.

Phantom
-------
A head defined in patient coordinates (LPS, mm; PS3.3 C.7.6.2.1.1), centre near the origin:
skull shell (HU ~1000), brain (HU ~35), two lateral ventricles (CSF), an optional ischaemic
lesion in the left MCA territory, an optional clot in the left M1 segment, and vessels (ICAs,
basilar, both M1 segments) that light up in CTA. Each series samples this one phantom through its
own geometry, so series of one study agree in patient space. A series may also carry a rigid
``world_from_patient`` transform (rotation + shift) with its own FrameOfReferenceUID: the phantom
is then seen through a moved frame, and registration must really run to bring it back.

API (all keyword-only after the folder; all return value objects listed below)
------------------------------------------------------------------------------
``Patient(name, patient_id, issuer, birth_date, sex)`` and ``default_patient(seed)``.

``write_ct_stroke_study(dir, *, patient=None, rows=64, thin_slices=60, thin_spacing=2.0,
thick_spacing=5.0, with_thick=True, with_cta=True, with_localizer=True, with_dose_report=True,
with_reformats=True, with_mips=True, lesion=True, clot=True, transfer_syntax=EXPLICIT,
study_date="20260101", study_time="093000", seed=0) -> Study``
    Full CT code-stroke protocol. Series keys: ``localizer``, ``ncct_thin``, ``ncct_thick``,
    ``cta`` (different grid, rotated and shifted frame of reference), ``cta_mip``,
    ``ncct_coronal``, ``ncct_sagittal``, ``dose_report``.

``write_split_ct_studies(dir, *, patient=None, hours_apart=0.5, ...) -> tuple[Study, Study]``
    NCCT in one study and CTA in another study of the same patient (same PatientID + issuer).

``write_mr_stroke_study(dir, *, patient=None, rows=64, n_slices=24, dwi="public",
with_adc=True, with_flair=True, flair_other_frame=True, flair_3d_sagittal=False, enhanced=False,
seed=0, ...) -> Study``
    ``dwi`` is one of ``"public"`` (b0 + b1000 in one series, DiffusionBValue), ``"ge"``,
    ``"siemens"``, ``"philips"`` (b-values only in the vendor private tag: GE (0043,1039),
    Siemens (0019,100C), Philips (2001,1003)), ``"directional"`` (b0 + three directions at b1000,
    no trace) or ``"trace"`` (a TRACEW series at b1000 only). Series keys: ``dwi``, ``adc``,
    ``flair``. With ``enhanced=True`` DWI and ADC are Enhanced MR Image Storage multi-frame files.

``write_ct_series(dir, *, kind="ncct"|"cta", key=..., tilt_deg=0.0, spacings=None,
n_slices=..., slice_spacing=..., drop=(), duplicate=(), ...) -> Series``
    One CT series with free geometry; the named special cases wrap it:
    ``write_tilted_ct`` (gantry tilt via ImageOrientationPatient + GantryDetectorTilt),
    ``write_ct_two_spacings`` (two slice spacings in one series), ``write_ct_mixed_thickness``
    (GE-style 4 mm + 7 mm parts, tilted), ``write_ct_missing_slice``,
    ``write_ct_duplicated_slice``, ``write_ct_truncated`` (too little head coverage).

Lower level: ``ct_datasets(...)``, ``mr_datasets(...)``, ``enhanced_mr_dataset(...)``,
``dose_report_dataset(...)``, ``write_datasets(datasets, folder, transfer_syntax)``,
``phantom_labels(points)``, ``write_perfusion_ct(dir, ...)`` and ``write_ai_result_sc(dir, study)``
(never-chosen series). ``TRANSFER_SYNTAXES`` lists the encodings ``write_datasets`` can write:
Explicit VR LE, Implicit VR LE, Deflated Explicit VR LE, RLE Lossless (pydicom's encoder),
JPEG-LS Lossless (pyjpegls) and JPEG 2000 Lossless (pylibjpeg-openjpeg).

Value objects
-------------
``Series``: key, series_uid, study_uid, frame_of_reference_uid, modality, description,
expected_role (``"ncct"``, ``"cta"``, ``"dwi"``, ``"adc"``, ``"flair"`` or ``None``), paths,
sop_instance_uids (in file order), world_from_patient (4x4), positions (IPP per slice, file
order), normal, slice_spacing.
``Study``: study_uid, patient, directory, series (dict key -> Series); ``paths()``,
``role(role)``.

Names, IDs and dates are fake.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
XRAY_DOSE_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.67")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
# Philips' private series data object, sent by its scanners and PACS along with a study (issue 9).
PHILIPS_PRIVATE_SOP_CLASS = UID("1.3.46.670589.11.0.0.12.4")

TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
)
_COMPRESSED = {RLELossless, JPEGLSLossless, JPEG2000Lossless}

AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL_IOP = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

# Phantom tissue labels
AIR, SKULL, BRAIN, CSF, LESION, VESSEL, CLOT = range(7)

# Head extent (mm, patient LPS): brain centre and skull ellipsoid semi-axes.
HEAD_CENTRE = np.array([0.0, 0.0, 20.0])
SKULL_AXES = np.array([72.0, 92.0, 95.0])
SKULL_THICKNESS = 7.0


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Patient:
    """A fake patient."""

    name: str = "STROKE^TEST"
    patient_id: str = "FPE0001"
    issuer: str = "FAKE-HOSPITAL"
    birth_date: str = "19500101"
    sex: str = "F"


def default_patient(seed: int = 0) -> Patient:
    """A fake patient whose ID depends on ``seed``."""
    return Patient(name=f"STROKE^TEST{seed}", patient_id=f"FPE{seed:04d}")


@dataclass
class Series:
    """One written series."""

    key: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    description: str
    expected_role: str | None
    paths: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    world_from_patient: np.ndarray = field(default_factory=lambda: np.eye(4))
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    normal: tuple[float, float, float] = (0.0, 0.0, 1.0)
    slice_spacing: float | None = None


@dataclass
class Study:
    """One written study."""

    study_uid: str
    patient: Patient
    directory: Path
    series: dict[str, Series] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Every file of the study."""
        return [p for s in self.series.values() for p in s.paths]

    def role(self, role: str) -> Series:
        """The series the factory meant for ``role`` (the first one, thin NCCT before thick)."""
        for series in self.series.values():
            if series.expected_role == role:
                return series
        raise KeyError(role)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """Image plane geometry of a stack of slices (PS3.3 C.7.6.2)."""

    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing = between rows, column spacing)
    orientation: tuple[float, float, float, float, float, float]
    positions: tuple[tuple[float, float, float], ...]

    @property
    def row_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[:3], dtype=float)

    @property
    def col_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[3:], dtype=float)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def plane_points(self, index: int) -> np.ndarray:
        """Patient coordinates of every pixel centre of slice ``index``, shape (rows, cols, 3)."""
        origin = np.asarray(self.positions[index], dtype=float)
        r = np.arange(self.rows, dtype=float)[:, None, None] * self.pixel_spacing[0]
        c = np.arange(self.cols, dtype=float)[None, :, None] * self.pixel_spacing[1]
        return origin + c * self.row_dir + r * self.col_dir


def stack_grid(
    *,
    rows: int,
    cols: int,
    fov_mm: float,
    offsets: Sequence[float],
    orientation: Sequence[float] = AXIAL_IOP,
    centre: Sequence[float] = (0.0, 0.0, 0.0),
    stack_direction: Sequence[float] | None = None,
) -> Grid:
    """A stack of planes centred in-plane on ``centre``, slice k at ``offsets[k]`` mm along
    ``stack_direction`` (default: the plane normal; a gantry-tilted stack moves along z)."""
    iop = tuple(float(v) for v in orientation)
    row_dir = np.asarray(iop[:3])
    col_dir = np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    direction = normal if stack_direction is None else np.asarray(stack_direction, dtype=float)
    spacing = (fov_mm / rows, fov_mm / cols)
    corner = (
        np.asarray(centre, dtype=float)
        - row_dir * spacing[1] * (cols - 1) / 2.0
        - col_dir * spacing[0] * (rows - 1) / 2.0
    )
    positions = tuple(tuple(float(round(v, 4)) for v in corner + direction * off) for off in offsets)
    return Grid(rows, cols, spacing, iop, positions)  # type: ignore[arg-type]


def rigid(rotation_deg: Sequence[float], shift_mm: Sequence[float]) -> np.ndarray:
    """4x4 rigid transform: rotations about x, y, z (degrees, applied in that order) then shift."""
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = shift_mm
    return out


# --------------------------------------------------------------------------- phantom


def _in_ellipsoid(points: np.ndarray, centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    d = (points - np.asarray(centre)) / np.asarray(axes)
    return np.einsum("...i,...i->...", d, d) <= 1.0


def _near_segment(points: np.ndarray, a: Sequence[float], b: Sequence[float], radius: float) -> np.ndarray:
    a_ = np.asarray(a, dtype=float)
    ab = np.asarray(b, dtype=float) - a_
    t = np.clip(np.einsum("...i,i->...", points - a_, ab) / float(ab @ ab), 0.0, 1.0)
    closest = a_ + t[..., None] * ab
    return np.linalg.norm(points - closest, axis=-1) <= radius


VESSELS: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((-18.0, 5.0, -70.0), (-18.0, 5.0, 0.0), 2.5),  # right ICA (patient right is -x)
    ((18.0, 5.0, -70.0), (18.0, 5.0, 0.0), 2.5),  # left ICA
    ((0.0, 30.0, -70.0), (0.0, 25.0, 0.0), 2.0),  # basilar
    ((-18.0, 5.0, 0.0), (-55.0, 8.0, 5.0), 2.0),  # right M1
    ((18.0, 5.0, 0.0), (55.0, 8.0, 5.0), 2.0),  # left M1
)
CLOT_SEGMENT = ((28.0, 5.0, 1.5), (40.0, 6.0, 3.0), 2.6)
LESION_CENTRE = (42.0, 5.0, 25.0)
LESION_AXES = (14.0, 22.0, 18.0)


def phantom_labels(points: np.ndarray, *, lesion: bool = True, clot: bool = True) -> np.ndarray:
    """Tissue label at each point (..., 3) in phantom (world) coordinates, LPS mm."""
    labels = np.full(points.shape[:-1], AIR, dtype=np.uint8)
    outer = _in_ellipsoid(points, HEAD_CENTRE, SKULL_AXES)
    inner = _in_ellipsoid(points, HEAD_CENTRE, SKULL_AXES - SKULL_THICKNESS)
    labels[outer] = SKULL
    labels[inner] = BRAIN
    for side in (-1.0, 1.0):
        labels[inner & _in_ellipsoid(points, (side * 10.0, 0.0, 30.0), (6.0, 22.0, 12.0))] = CSF
    if lesion:
        labels[inner & _in_ellipsoid(points, LESION_CENTRE, LESION_AXES) & (labels == BRAIN)] = LESION
    for a, b, radius in VESSELS:
        labels[_near_segment(points, a, b, radius) & (labels != SKULL)] = VESSEL
    if clot:
        a, b, radius = CLOT_SEGMENT
        labels[_near_segment(points, a, b, radius) & (labels != SKULL)] = CLOT
    return labels


# HU per label: air, skull, brain, csf, lesion, vessel, clot
_CT_HU = {"ncct": (-1000, 1000, 35, 5, 22, 45, 70), "cta": (-1000, 1000, 40, 6, 26, 320, 70)}
# MR signal per label
_MR_SIGNAL = {
    "b0": (0, 60, 500, 1400, 620, 300, 450),
    "flair": (0, 50, 420, 60, 760, 80, 300),
    "adc": (0, 0, 800, 3000, 450, 1500, 700),  # 1e-6 mm2/s
    "t1": (0, 200, 600, 250, 520, 400, 500),
}


def _hu_field(points: np.ndarray, kind: str, rng: np.random.Generator, lesion: bool, clot: bool) -> np.ndarray:
    labels = phantom_labels(points, lesion=lesion, clot=clot)
    table = np.asarray(_CT_HU[kind], dtype=float)
    hu = table[labels]
    if kind == "cta" and clot:
        # distal to the occlusion the vessel stays dark
        a, b, radius = ((40.0, 6.0, 3.0), (55.0, 8.0, 5.0), 2.0)
        hu[_near_segment(points, a, b, radius) & (labels == VESSEL)] = 45.0
    noise = rng.normal(0.0, 3.0, size=hu.shape)
    return hu + np.where(labels == AIR, 0.0, noise)


def _mr_field(
    points: np.ndarray, contrast: str, rng: np.random.Generator, lesion: bool, b_value: float = 0.0,
    direction: int | None = None,
) -> np.ndarray:
    labels = phantom_labels(points, lesion=lesion, clot=False)
    s0 = np.asarray(_MR_SIGNAL["b0" if contrast == "dwi" else contrast], dtype=float)[labels]
    if contrast == "dwi" and b_value > 0:
        adc = np.asarray(_MR_SIGNAL["adc"], dtype=float)[labels] * 1e-6
        if direction is not None:  # mild anisotropy, geometric mean over 3 directions = isotropic
            factor = (0.8, 1.0, 1.25)[direction]
            adc = adc * factor
        s0 = s0 * np.exp(-b_value * adc)
    noise = rng.normal(0.0, 4.0, size=s0.shape)
    return np.clip(s0 + np.where(labels == AIR, 0.0, noise), 0, None)


# --------------------------------------------------------------------------- dataset builders


def _uid(*parts: object) -> UID:
    """A deterministic UUID-derived UID (PS3.5 B.2) from ``parts``."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()[:16]
    return UID(f"2.25.{int.from_bytes(digest, 'big')}")


def _fmt(values: Iterable[float]) -> list[str]:
    return [f"{v:.6g}" for v in values]


def _base_dataset(
    *,
    sop_class: UID,
    sop_uid: UID,
    patient: Patient,
    study: dict[str, str],
    series: dict[str, str],
    modality: str,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = _uid("fpe-node-test-factory")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study["date"]
    ds.SeriesDate = study["date"]
    ds.ContentDate = study["date"]
    ds.AcquisitionDate = study["date"]
    ds.StudyTime = study["time"]
    ds.SeriesTime = study["time"]
    ds.ContentTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.Modality = modality
    ds.Manufacturer = series["manufacturer"]
    ds.ManufacturerModelName = series["model"]
    ds.SoftwareVersions = series["software"]
    ds.DeviceSerialNumber = "12345"
    ds.InstitutionName = "Fake General Hospital"
    ds.StationName = series["station"]
    ds.ReferringPhysicianName = "REFERRER^FAKE"
    ds.StudyDescription = study["description"]
    ds.SeriesDescription = series["description"]
    ds.ProtocolName = series.get("protocol", study["description"])
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = "075Y"
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series["uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = int(series["number"])
    ds.BodyPartExamined = "HEAD"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _set_plane(
    ds: Dataset, grid: Grid, index: int, frame_uid: str, image_type: Sequence[str], *, instance_number: int
) -> None:
    """Image type, Frame of Reference (PS3.3 C.7.4.1) and Image Plane (C.7.6.2) attributes of
    slice ``index`` of ``grid``, shared by the single-frame CT and MR images."""
    ds.ImageType = list(image_type)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = _fmt(grid.positions[index])
    ds.ImageOrientationPatient = _fmt(grid.orientation)
    ds.PixelSpacing = _fmt(grid.pixel_spacing)
    ds.SliceLocation = f"{float(np.dot(grid.positions[index], grid.normal)):.6g}"


_VENDORS = {
    "ct": {"manufacturer": "Philips", "model": "Ingenuity CT", "software": "4.1.5", "station": "CT1"},
    "GE": {"manufacturer": "GE MEDICAL SYSTEMS", "model": "DISCOVERY MR750", "software": "27", "station": "MR1"},
    "Siemens": {"manufacturer": "SIEMENS", "model": "Prisma", "software": "syngo MR XA30", "station": "MR2"},
    "Philips": {"manufacturer": "Philips Medical Systems", "model": "Ingenia", "software": "5.6.1", "station": "MR3"},
}


def _study_info(
    study_uid: str, description: str, date: str, time: str, accession: str
) -> dict[str, str]:
    return {"uid": study_uid, "description": description, "date": date, "time": time, "accession": accession}


def ct_datasets(
    *,
    grid: Grid,
    kind: str,
    patient: Patient,
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    description: str,
    frame_uid: str,
    world_from_patient: np.ndarray | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness: float | None = None,
    gantry_tilt: float = 0.0,
    rescale: tuple[float, float] = (1.0, -1024.0),
    lesion: bool = True,
    clot: bool = True,
    seed: int = 0,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``grid`` (PS3.3 A.3), phantom sampled in HU."""
    rng = np.random.default_rng(seed)
    transform = np.eye(4) if world_from_patient is None else world_from_patient
    vendor = dict(_VENDORS["ct"], uid=series_uid, number=str(series_number), description=description)
    vendor["protocol"] = study["description"]
    spacing = _grid_spacing(grid)
    out = []
    for index in range(len(grid.positions)):
        points = grid.plane_points(index) @ transform[:3, :3].T + transform[:3, 3]
        hu = _hu_field(points, kind, rng, lesion, clot)
        slope, intercept = rescale
        stored = np.clip(np.rint((hu - intercept) / slope), 0, 65535).astype(np.uint16)
        sop_uid = _uid(series_uid, index)
        ds = _base_dataset(
            sop_class=CT_IMAGE_STORAGE, sop_uid=sop_uid, patient=patient, study=study, series=vendor, modality="CT"
        )
        _set_plane(ds, grid, index, frame_uid, image_type, instance_number=index + 1)
        ds.SliceThickness = f"{slice_thickness if slice_thickness is not None else (spacing or 5.0):.6g}"
        if spacing:
            ds.SpacingBetweenSlices = f"{spacing:.6g}"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 300
        ds.ConvolutionKernel = "UB"
        ds.GantryDetectorTilt = f"{gantry_tilt:.6g}"
        ds.PatientPosition = "HFS"
        ds.RescaleSlope = f"{slope:.6g}"
        ds.RescaleIntercept = f"{intercept:.6g}"
        if "LOCALIZER" not in image_type:
            ds.RescaleType = "HU"
        ds.WindowCenter = "40" if kind == "ncct" else "200"
        ds.WindowWidth = "80" if kind == "ncct" else "700"
        if kind == "cta":
            ds.ContrastBolusAgent = "IOPAMIDOL 370"
            ds.ContrastBolusRoute = "IV"
            ds.ContrastBolusVolume = "60"
        _set_pixels(ds, stored)
        out.append(ds)
    return out


def _grid_spacing(grid: Grid) -> float | None:
    if len(grid.positions) < 2:
        return None
    along = sorted(float(np.dot(p, grid.normal)) for p in grid.positions)
    gaps = np.diff(along)
    return float(np.median(gaps)) if len(gaps) else None


def dose_report_dataset(*, patient: Patient, study: dict[str, str], series_uid: str, series_number: int) -> Dataset:
    """A minimal X-Ray Radiation Dose SR (PS3.3 A.35.8, TID 10011 root container)."""
    vendor = dict(_VENDORS["ct"], uid=series_uid, number=str(series_number), description="Dose Report")
    ds = _base_dataset(
        sop_class=XRAY_DOSE_SR_STORAGE,
        sop_uid=_uid(series_uid, "sr"),
        patient=patient,
        study=study,
        series=vendor,
        modality="SR",
    )
    del ds.AcquisitionDate, ds.BodyPartExamined
    ds.InstanceNumber = 1
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = DicomSequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "10011"
    ds.ContentTemplateSequence = DicomSequence([template])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "NUM"
    item.ConceptNameCodeSequence = DicomSequence([_code("113813", "DCM", "CT Dose Length Product Total")])
    measured = Dataset()
    measured.NumericValue = "812.5"
    measured.MeasurementUnitsCodeSequence = DicomSequence([_code("mGy.cm", "UCUM", "mGy.cm")])
    item.MeasuredValueSequence = DicomSequence([measured])
    ds.ContentSequence = DicomSequence([item])
    return ds


def private_object_dataset(
    *, patient: Patient, study: dict[str, str], series_uid: str, series_number: int, sop_class: UID = PHILIPS_PRIVATE_SOP_CLASS
) -> Dataset:
    """A vendor's private (non-image) object in a study, as Philips MR scanners send them:
    a private SOP class, Modality MR, a private block and no pixel data."""
    vendor = dict(_VENDORS["Philips"], uid=series_uid, number=str(series_number), description="PHILIPS PRIVATE DATA")
    ds = _base_dataset(
        sop_class=sop_class, sop_uid=_uid(series_uid, "private"), patient=patient, study=study, series=vendor, modality="MR"
    )
    ds.InstanceNumber = 1
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x34, "LT", "private series data")
    return ds


# --------------------------------------------------------------------------- writing


def write_datasets(datasets: Sequence[Dataset], folder: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> list[Path]:
    """Write each dataset as ``folder/NNNN.dcm`` in ``transfer_syntax``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{index + 1:04d}.dcm"
        _encode(ds, transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _encode(ds: Dataset, transfer_syntax: UID) -> None:
    if transfer_syntax in _COMPRESSED and "PixelData" in ds:
        ds.compress(transfer_syntax, encoding_plugin="pydicom" if transfer_syntax == RLELossless else "")
        return
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def _record(
    key: str, datasets: Sequence[Dataset], paths: list[Path], expected_role: str | None, transform: np.ndarray | None,
    grid: Grid | None,
) -> Series:
    first = datasets[0]
    series = Series(
        key=key,
        series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.Modality),
        description=str(first.SeriesDescription),
        expected_role=expected_role,
        paths=paths,
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        world_from_patient=np.eye(4) if transform is None else transform,
    )
    if grid is not None:
        series.positions = list(grid.positions)
        series.normal = tuple(float(v) for v in grid.normal)  # type: ignore[assignment]
        series.slice_spacing = _grid_spacing(grid)
    return series


# --------------------------------------------------------------------------- CT studies


CTA_TRANSFORM = rigid((4.0, -3.0, 7.0), (6.0, -5.0, 9.0))


def _axial_offsets(n_slices: int, spacing: float, bottom: float = -50.0) -> list[float]:
    return [bottom + k * spacing for k in range(n_slices)]


def write_ct_series(
    directory: Path,
    *,
    kind: str = "ncct",
    key: str | None = None,
    patient: Patient | None = None,
    study_uid: str | None = None,
    study_description: str = "CT HEAD CODE STROKE",
    study_date: str = "20260101",
    study_time: str = "093000",
    accession: str = "ACC0001",
    series_number: int = 2,
    description: str | None = None,
    rows: int = 64,
    fov_mm: float = 240.0,
    n_slices: int | None = None,
    slice_spacing: float = 5.0,
    bottom_mm: float = -50.0,
    offsets: Sequence[float] | None = None,
    tilt_deg: float = 0.0,
    drop: Sequence[int] = (),
    duplicate: Sequence[int] = (),
    world_from_patient: np.ndarray | None = None,
    frame_uid: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    rescale: tuple[float, float] = (1.0, -1024.0),
    shuffle: bool = True,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    lesion: bool = True,
    clot: bool = True,
    seed: int = 0,
) -> Series:
    """Write one axial CT series (NCCT or CTA) with free geometry; see the module docstring."""
    patient = patient or default_patient(seed)
    study_uid = study_uid or str(_uid("study", patient.patient_id, study_date, study_time, seed))
    key = key or kind
    if offsets is None:
        count = n_slices if n_slices is not None else max(2, int(round(150.0 / slice_spacing)))
        offsets = _axial_offsets(count, slice_spacing, bottom_mm)
    offsets = [o for i, o in enumerate(offsets) if i not in set(drop)]
    offsets = offsets + [offsets[i] for i in duplicate]
    tilt = math.radians(tilt_deg)
    # Gantry tilt: the image plane rotates about the patient's x axis; the table still moves in z.
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt)) if tilt_deg else AXIAL_IOP
    # A tilted stack still moves along z, so the slice positions shear (offset per plane normal).
    grid = stack_grid(
        rows=rows,
        cols=rows,
        fov_mm=fov_mm,
        offsets=offsets,
        orientation=orientation,
        centre=(0.0, 0.0, 0.0),
        stack_direction=(0.0, 0.0, 1.0) if tilt_deg else None,
    )
    study = _study_info(study_uid, study_description, study_date, study_time, accession)
    series_uid = str(_uid("series", study_uid, key, seed))
    frame = frame_uid or str(_uid("for", study_uid, "ct" if world_from_patient is None else key))
    thickness = slice_spacing if not tilt_deg else slice_spacing * math.cos(tilt)
    datasets = ct_datasets(
        grid=grid,
        kind=kind,
        patient=patient,
        study=study,
        series_uid=series_uid,
        series_number=series_number,
        description=description or ("HEAD NCCT 5mm" if kind == "ncct" else "CTA HEAD NECK 1mm"),
        frame_uid=frame,
        world_from_patient=world_from_patient,
        image_type=image_type,
        slice_thickness=thickness,
        gantry_tilt=tilt_deg,
        rescale=rescale,
        lesion=lesion,
        clot=clot,
        seed=seed + series_number,
    )
    if duplicate:
        for extra, index in enumerate(duplicate):
            ds = datasets[len(datasets) - len(duplicate) + extra]
            ds.InstanceNumber = len(datasets) - len(duplicate) + extra + 1
    order = list(range(len(datasets)))
    if shuffle:  # files on disk are not in slice order; InstanceNumber is not either
        np.random.default_rng(seed + 7).shuffle(order)
        for ds, number in zip(datasets, np.random.default_rng(seed + 8).permutation(len(datasets)) + 1):
            ds.InstanceNumber = int(number)
    written = [datasets[i] for i in order]
    paths = write_datasets(written, Path(directory) / key, transfer_syntax)
    role = kind if ("LOCALIZER" not in image_type and "DERIVED" not in image_type) else None
    series = _record(key, written, paths, role, world_from_patient, grid)
    series.positions = [tuple(float(v) for v in ds.ImagePositionPatient) for ds in written]  # type: ignore[misc]
    return series


def write_ct_stroke_study(
    directory: Path,
    *,
    patient: Patient | None = None,
    rows: int = 64,
    thin_slices: int = 60,
    thin_spacing: float = 2.5,
    thick_spacing: float = 5.0,
    with_thick: bool = True,
    with_cta: bool = True,
    with_localizer: bool = True,
    with_dose_report: bool = True,
    with_reformats: bool = True,
    with_mips: bool = True,
    cta_rows: int | None = None,
    cta_slices: int = 80,
    cta_spacing: float = 2.0,
    lesion: bool = True,
    clot: bool = True,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    study_description: str = "CT HEAD CODE STROKE",
    study_date: str = "20260101",
    study_time: str = "093000",
    accession: str = "ACC0001",
    seed: int = 0,
    tilt_deg: float = 0.0,
) -> Study:
    """Write a full CT code-stroke study; see the module docstring for the series keys.

    ``tilt_deg``: the thin NCCT acquired with that gantry tilt (as :func:`write_tilted_ct`).
    """
    directory = Path(directory)
    patient = patient or default_patient(seed)
    study_uid = study_uid or str(_uid("study", patient.patient_id, study_date, study_time, seed))
    common = dict(
        patient=patient,
        study_uid=study_uid,
        study_description=study_description,
        study_date=study_date,
        study_time=study_time,
        accession=accession,
        transfer_syntax=transfer_syntax,
        lesion=lesion,
        clot=clot,
        seed=seed,
    )
    study = Study(study_uid=study_uid, patient=patient, directory=directory)
    info = _study_info(study_uid, study_description, study_date, study_time, accession)
    ct_frame = str(_uid("for", study_uid, "ct"))
    if with_localizer:
        study.series["localizer"] = _write_localizer(directory, patient, info, ct_frame, rows, seed)
    thin = write_ct_series(
        directory, kind="ncct", key="ncct_thin", series_number=2, description="HEAD NCCT 2.5mm STD",
        rows=rows, n_slices=thin_slices, slice_spacing=thin_spacing, frame_uid=ct_frame, tilt_deg=tilt_deg,
        **common,  # type: ignore[arg-type]
    )
    study.series["ncct_thin"] = thin
    if with_thick:
        n_thick = max(2, int(round(thin_slices * thin_spacing / thick_spacing)))
        study.series["ncct_thick"] = write_ct_series(
            directory, kind="ncct", key="ncct_thick", series_number=3, description="HEAD NCCT 5mm",
            rows=rows, n_slices=n_thick, slice_spacing=thick_spacing, frame_uid=ct_frame, **common,  # type: ignore[arg-type]
        )
    if with_cta:
        study.series["cta"] = write_ct_series(
            directory, kind="cta", key="cta", series_number=5, description="CTA HEAD NECK 2mm",
            rows=cta_rows or rows + 16, fov_mm=220.0, n_slices=cta_slices, slice_spacing=cta_spacing,
            bottom_mm=-90.0, world_from_patient=CTA_TRANSFORM, **common,  # type: ignore[arg-type]
        )
        if with_mips:
            study.series["cta_mip"] = write_ct_series(
                directory, kind="cta", key="cta_mip", series_number=6, description="CTA MIP AX 10mm",
                rows=rows, fov_mm=220.0, n_slices=15, slice_spacing=10.0, bottom_mm=-90.0,
                world_from_patient=CTA_TRANSFORM, image_type=("DERIVED", "SECONDARY", "AXIAL", "MIP"),
                **common,  # type: ignore[arg-type]
            )
    if with_reformats:
        for key, iop, number in (("ncct_coronal", CORONAL_IOP, 7), ("ncct_sagittal", SAGITTAL_IOP, 8)):
            study.series[key] = _write_reformat(directory, key, iop, number, patient, info, ct_frame, rows, seed)
    if with_dose_report:
        series_uid = str(_uid("series", study_uid, "dose"))
        ds = dose_report_dataset(patient=patient, study=info, series_uid=series_uid, series_number=999)
        paths = write_datasets([ds], directory / "dose_report")
        study.series["dose_report"] = _record("dose_report", [ds], paths, None, None, None)
    return study


def _write_localizer(
    directory: Path, patient: Patient, info: dict[str, str], frame: str, rows: int, seed: int
) -> Series:
    grid = stack_grid(rows=rows, cols=rows, fov_mm=300.0, offsets=[0.0], orientation=CORONAL_IOP, centre=(0, 0, 0))
    series_uid = str(_uid("series", info["uid"], "localizer"))
    datasets = ct_datasets(
        grid=grid, kind="ncct", patient=patient, study=info, series_uid=series_uid, series_number=1,
        description="Surview", frame_uid=frame, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        slice_thickness=300.0, seed=seed,
    )
    paths = write_datasets(datasets, directory / "localizer")
    return _record("localizer", datasets, paths, None, None, grid)


def _write_reformat(
    directory: Path, key: str, iop: Sequence[float], number: int, patient: Patient, info: dict[str, str],
    frame: str, rows: int, seed: int,
) -> Series:
    offsets = [-60.0 + 5.0 * k for k in range(25)]
    grid = stack_grid(rows=rows, cols=rows, fov_mm=240.0, offsets=offsets, orientation=iop, centre=(0, 0, 20.0))
    series_uid = str(_uid("series", info["uid"], key))
    plane = "CORONAL" if "coronal" in key else "SAGITTAL"
    datasets = ct_datasets(
        grid=grid, kind="ncct", patient=patient, study=info, series_uid=series_uid, series_number=number,
        description=f"HEAD {plane} MPR 5mm", frame_uid=frame,
        image_type=("DERIVED", "SECONDARY", "REFORMATTED"), slice_thickness=5.0, seed=seed,
    )
    paths = write_datasets(datasets, directory / key)
    return _record(key, datasets, paths, None, None, grid)


def write_split_ct_studies(
    directory: Path,
    *,
    patient: Patient | None = None,
    hours_apart: float = 0.5,
    rows: int = 64,
    seed: int = 0,
    **kwargs: object,
) -> tuple[Study, Study]:
    """NCCT in one study and CTA in another study of the same patient (same ID + issuer)."""
    directory = Path(directory)
    patient = patient or default_patient(seed)
    first = write_ct_stroke_study(
        directory / "study_ncct", patient=patient, rows=rows, with_cta=False, accession="ACC0001",
        study_description="CT HEAD WO CONTRAST", study_time="093000", seed=seed, **kwargs,  # type: ignore[arg-type]
    )
    minutes = int(round(hours_apart * 60))
    time = f"{9 + (30 + minutes) // 60:02d}{(30 + minutes) % 60:02d}00"
    cta_study_uid = str(_uid("study", patient.patient_id, "cta", seed))
    second = Study(study_uid=cta_study_uid, patient=patient, directory=directory / "study_cta")
    second.series["cta"] = write_ct_series(
        directory / "study_cta", kind="cta", key="cta", patient=patient, study_uid=cta_study_uid,
        study_description="CTA HEAD AND NECK", study_time=time, accession="ACC0002", series_number=4,
        description="CTA HEAD NECK 2mm", rows=rows + 16, fov_mm=220.0, n_slices=80, slice_spacing=2.0,
        bottom_mm=-90.0, world_from_patient=CTA_TRANSFORM, seed=seed,
    )
    return first, second


def write_tilted_ct(directory: Path, *, tilt_deg: float = 20.0, **kwargs: object) -> Series:
    """An NCCT acquired with gantry tilt (IOP tilted about x, GantryDetectorTilt set)."""
    kwargs.setdefault("key", "ncct_tilted")
    kwargs.setdefault("description", "HEAD NCCT TILT 5mm")
    return write_ct_series(directory, tilt_deg=tilt_deg, **kwargs)  # type: ignore[arg-type]


def write_ct_two_spacings(
    directory: Path, *, first: tuple[int, float] = (12, 2.5), second: tuple[int, float] = (18, 5.0), **kwargs: object
) -> Series:
    """An NCCT whose slice spacing changes half-way (e.g. 2.5 mm skull base, 5 mm above)."""
    offsets = [-50.0 + k * first[1] for k in range(first[0])]
    start = offsets[-1]
    offsets += [start + (k + 1) * second[1] for k in range(second[0])]
    kwargs.setdefault("key", "ncct_two_spacings")
    return write_ct_series(directory, offsets=offsets, **kwargs)  # type: ignore[arg-type]


def write_ct_mixed_thickness(
    directory: Path,
    *,
    parts: Sequence[tuple[int, float]] = ((10, 4.0), (14, 7.0)),
    tilt_deg: float = 15.0,
    **kwargs: object,
) -> Series:
    """A GE-style head NCCT: slice thickness and spacing change inside one series.

    ``parts`` (slices, mm) from the skull base up (default: 4 mm posterior fossa, 7 mm above),
    each slice's SliceThickness that of its part (times cos(tilt), as with gantry tilt).
    """
    offsets: list[float] = []
    thickness_by_rank: list[float] = []
    position = float(kwargs.pop("bottom_mm", -50.0))  # type: ignore[arg-type]
    for count, spacing in parts:
        for _ in range(count):
            if offsets:
                position += spacing
            offsets.append(position)
            thickness_by_rank.append(spacing * math.cos(math.radians(tilt_deg)))
    kwargs.setdefault("key", "ncct_mixed")
    kwargs.setdefault("description", "HEAD NCCT 4/7mm")
    series = write_ct_series(directory, offsets=offsets, tilt_deg=tilt_deg, **kwargs)  # type: ignore[arg-type]
    rank = {index: r for r, index in enumerate(sorted(range(len(series.positions)), key=lambda i: series.positions[i][2]))}
    for index, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = f"{thickness_by_rank[rank[index]]:.6g}"
        ds.save_as(path, enforce_file_format=True)
    return series


def write_ct_missing_slice(directory: Path, *, missing: int = 12, **kwargs: object) -> Series:
    """An NCCT with one slice missing in the middle."""
    kwargs.setdefault("key", "ncct_missing")
    return write_ct_series(directory, drop=(missing,), **kwargs)  # type: ignore[arg-type]


def write_ct_duplicated_slice(directory: Path, *, duplicated: int = 10, **kwargs: object) -> Series:
    """An NCCT in which one position was sent twice (two SOP instances, same plane)."""
    kwargs.setdefault("key", "ncct_duplicated")
    return write_ct_series(directory, duplicate=(duplicated,), **kwargs)  # type: ignore[arg-type]


def write_ct_truncated(directory: Path, *, n_slices: int = 8, **kwargs: object) -> Series:
    """An NCCT covering too little of the head (default 8 x 5 mm = 35 mm)."""
    kwargs.setdefault("key", "ncct_truncated")
    return write_ct_series(directory, n_slices=n_slices, bottom_mm=0.0, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- MR studies

# Private creators and elements carrying b-values (vendor conformance statements).
_PRIVATE_B_VALUE = {
    "ge": (0x0043, "GEMS_PARM_01", 0x39, "IS"),  # (0043,1039) slop_int_6: b-value first
    "siemens": (0x0019, "SIEMENS MR HEADER", 0x0C, "IS"),  # (0019,100C) B_value
    "philips": (0x2001, "Philips Imaging DD 001", 0x03, "FL"),  # (2001,1003) Diffusion B-Factor
}
_MR_VENDOR_OF = {"public": "Siemens", "ge": "GE", "siemens": "Siemens", "philips": "Philips",
                 "directional": "Siemens", "trace": "Siemens"}


def _set_b_value(ds: Dataset, b_value: float, style: str) -> None:
    if style in _PRIVATE_B_VALUE:
        group, creator, element, vr = _PRIVATE_B_VALUE[style]
        block = ds.private_block(group, creator, create=True)
        if style == "ge":
            block.add_new(element, vr, [int(b_value) + 1_000_000_000, 8, 0, 0])
        elif vr == "IS":
            block.add_new(element, vr, int(b_value))
        else:
            block.add_new(element, vr, float(b_value))
    else:
        ds.DiffusionBValue = float(b_value)


def mr_datasets(
    *,
    grid: Grid,
    contrast: str,
    patient: Patient,
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    description: str,
    frame_uid: str,
    vendor: str = "Siemens",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    frames: Sequence[tuple[float, int | None]] = ((0.0, None),),
    b_style: str = "public",
    world_from_patient: np.ndarray | None = None,
    acquisition_type: str = "2D",
    lesion: bool = True,
    seed: int = 0,
) -> list[Dataset]:
    """MR Image Storage datasets (PS3.3 A.4): for each (b-value, direction) in ``frames`` one
    image per slice. ``contrast`` is ``"dwi"``, ``"adc"``, ``"flair"`` or ``"t1"``."""
    rng = np.random.default_rng(seed)
    transform = np.eye(4) if world_from_patient is None else world_from_patient
    info = dict(_VENDORS[vendor], uid=series_uid, number=str(series_number), description=description)
    info["protocol"] = "MR STROKE"
    spacing = _grid_spacing(grid) or 5.0
    out = []
    number = 0
    directions = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    for b_value, direction in frames:
        for index in range(len(grid.positions)):
            points = grid.plane_points(index) @ transform[:3, :3].T + transform[:3, 3]
            signal = _mr_field(points, contrast, rng, lesion, b_value, direction)
            number += 1
            ds = _base_dataset(
                sop_class=MR_IMAGE_STORAGE, sop_uid=_uid(series_uid, number), patient=patient, study=study,
                series=info, modality="MR",
            )
            _set_plane(ds, grid, index, frame_uid, image_type, instance_number=number)
            ds.SliceThickness = f"{spacing:.6g}"
            ds.SpacingBetweenSlices = f"{spacing:.6g}"
            ds.ScanningSequence = "EP" if contrast in ("dwi", "adc") else "SE\\IR" if contrast == "flair" else "SE"
            ds.SequenceVariant = "SK\\SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = acquisition_type
            ds.RepetitionTime = "9000" if contrast == "flair" else "5000"
            ds.EchoTime = "90"
            ds.MagneticFieldStrength = "3"
            ds.EchoTrainLength = 1
            ds.PatientPosition = "HFS"
            if contrast == "flair":
                ds.InversionTime = "2500"
            if contrast == "dwi":
                _set_b_value(ds, b_value, b_style)
                if b_value > 0:
                    ds.DiffusionDirectionality = "DIRECTIONAL" if direction is not None else "ISOTROPIC"
                    if direction is not None:
                        ds.DiffusionGradientOrientation = list(directions[direction])
                else:
                    ds.DiffusionDirectionality = "NONE"
            _set_pixels(ds, np.clip(np.rint(signal), 0, 65535).astype(np.uint16))
            ds.WindowCenter = f"{int(np.percentile(signal, 90) / 2)}"
            ds.WindowWidth = f"{max(1, int(np.percentile(signal, 90)))}"
            out.append(ds)
    return out


def enhanced_mr_dataset(
    *,
    grid: Grid,
    contrast: str,
    patient: Patient,
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    description: str,
    frame_uid: str,
    image_type: Sequence[str],
    frames: Sequence[tuple[float, int | None]] = ((0.0, None),),
    lesion: bool = True,
    seed: int = 0,
) -> Dataset:
    """One Enhanced MR Image Storage multi-frame dataset (PS3.3 A.36.2) holding every slice of
    every b-value, geometry and b-values in the per-frame functional groups (C.7.6.16, C.8.13.5.9)."""
    singles = mr_datasets(
        grid=grid, contrast=contrast, patient=patient, study=study, series_uid=series_uid,
        series_number=series_number, description=description, frame_uid=frame_uid, image_type=image_type,
        frames=frames, lesion=lesion, seed=seed,
    )
    first = singles[0]
    ds = _base_dataset(
        sop_class=ENHANCED_MR_IMAGE_STORAGE, sop_uid=_uid(series_uid, "enhanced"), patient=patient, study=study,
        series=dict(_VENDORS["Siemens"], uid=series_uid, number=str(series_number), description=description,
                    protocol="MR STROKE"),
        modality="MR",
    )
    ds.ImageType = list(image_type[:2]) + list(image_type[2:4] or ["DIFFUSION", "NONE"])
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.NumberOfFrames = len(singles)
    ds.AcquisitionDateTime = study["date"] + study["time"]
    shared = _enhanced_mr_modules(ds, contrast, ds.ImageType)
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    measures.SpacingBetweenSlices = first.SpacingBetweenSlices
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for index, single in enumerate(singles):
        group = Dataset()
        content = Dataset()
        content.FrameAcquisitionNumber = index // len(grid.positions) + 1
        content.InStackPositionNumber = index % len(grid.positions) + 1
        content.StackID = "1"
        content.FrameAcquisitionDateTime = study["date"] + study["time"]
        content.FrameReferenceDateTime = study["date"] + study["time"]
        content.FrameAcquisitionDuration = 60.0
        content.DimensionIndexValues = [content.FrameAcquisitionNumber, 1, content.InStackPositionNumber]
        group.FrameContentSequence = DicomSequence([content])
        position = Dataset()
        position.ImagePositionPatient = single.ImagePositionPatient
        group.PlanePositionSequence = DicomSequence([position])
        diffusion = Dataset()
        diffusion.DiffusionBValue = single.get("DiffusionBValue", 0.0)
        diffusion.DiffusionDirectionality = single.get("DiffusionDirectionality", "ISOTROPIC" if contrast == "adc" else "NONE")
        if "DiffusionGradientOrientation" in single:
            diffusion.DiffusionGradientDirectionSequence = DicomSequence(
                [_item(DiffusionGradientOrientation=single.DiffusionGradientOrientation)]
            )
        group.MRDiffusionSequence = DicomSequence([diffusion])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    pixels = np.stack([np.frombuffer(s.PixelData, dtype=np.uint16).reshape(grid.rows, grid.cols) for s in singles])
    _set_pixels(ds, pixels)
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced_mr_modules(ds: Dataset, contrast: str, image_type: Sequence[str]) -> Dataset:
    """Image-level attributes of the Enhanced MR Image IOD (PS3.3 A.36.2) and the shared
    functional groups a diffusion or structural EPI acquisition carries. Returns the shared item."""
    description = dict(
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast="DIFFUSION" if contrast in ("dwi", "adc") else "FLUID_ATTENUATED",
    )
    for keyword, value in description.items():
        setattr(ds, keyword, value)
    del ds.AcquisitionDate
    ds.PatientPosition = "HFS"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionDuration = 60.0
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "3"
    ds.ResonantNucleus = "1H"
    original = image_type[0] == "ORIGINAL"  # pulse sequence and FOV macros: ORIGINAL frames only
    pulse = dict(
        PulseSequenceName="ep2d_diff", MRAcquisitionType="2D", EchoPulseSequence="SPIN", MultipleSpinEcho="NO",
        PhaseContrast="NO", TimeOfFlightContrast="NO", SteadyStatePulseSequence="NONE",
        EchoPlanarPulseSequence="YES", SaturationRecovery="NO", SpectrallySelectedSuppression="NONE",
        OversamplingPhase="NONE", GeometryOfKSpaceTraversal="RECTILINEAR", SegmentedKSpaceTraversal="SINGLE",
        NumberOfKSpaceTrajectories=1, MultiPlanarExcitation="NO", RectilinearPhaseEncodeReordering="LINEAR",
    )
    for keyword, value in pulse.items() if original else ():
        setattr(ds, keyword, value)
    organization_uid = _uid(ds.SeriesInstanceUID, "dimensions")
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=organization_uid)])
    pointers = (
        (0x00189087, 0x00189117, "b-value"),  # Diffusion b-value in MR Diffusion Sequence
        (0x00209056, 0x00209111, "stack"),  # Stack ID in Frame Content Sequence
        (0x00209057, 0x00209111, "position"),  # In-Stack Position Number
    )
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(DimensionOrganizationUID=organization_uid, DimensionIndexPointer=pointer,
                  FunctionalGroupPointer=group, DimensionDescriptionLabel=label)
            for pointer, group, label in pointers
        ]
    )
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([_item(
        RepetitionTime=5000.0, FlipAngle=90.0, EchoTrainLength=1, RFEchoTrainLength=1, GradientEchoTrainLength=1,
        SpecificAbsorptionRateSequence=DicomSequence([_item(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.5,
        )]),
        OperatingModeSequence=DicomSequence([_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]),
        GradientOutputType="DB_DT",
        GradientOutput=20.0,
    )])
    if original:
        shared.MRFOVGeometrySequence = DicomSequence([_item(
            InPlanePhaseEncodingDirection="COLUMN", MRAcquisitionFrequencyEncodingSteps=64,
            MRAcquisitionPhaseEncodingStepsInPlane=64, PercentSampling=100.0, PercentPhaseFieldOfView=100.0,
        )])
    shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=90.0)])
    shared.MRModifierSequence = DicomSequence([_item(
        InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO", SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE", PartialFourier="NO", ParallelAcquisition="NO",
    )])
    shared.MRImagingModifierSequence = DicomSequence([_item(
        MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE", TransmitterFrequency=123.2,
        PixelBandwidth=1500.0,
    )])
    shared.MRReceiveCoilSequence = DicomSequence([_item(
        ReceiveCoilName="HeadNeck_20", ReceiveCoilManufacturerName="", ReceiveCoilType="VOLUME", QuadratureReceiveCoil="NO",
    )])
    shared.MRTransmitCoilSequence = DicomSequence([_item(TransmitCoilName="Body", TransmitCoilManufacturerName="", TransmitCoilType="BODY")])
    shared.MRAveragesSequence = DicomSequence([_item(NumberOfAverages=1.0)])
    shared.FrameAnatomySequence = DicomSequence([_item(
        FrameLaterality="U", AnatomicRegionSequence=DicomSequence([_code("12738006", "SCT", "Brain")]),
    )])
    shared.PixelValueTransformationSequence = DicomSequence([_item(
        RescaleIntercept="0", RescaleSlope="1", RescaleType="US",
    )])
    shared.MRImageFrameTypeSequence = DicomSequence([_item(FrameType=list(image_type), **description)])
    return shared


def _dwi_frames(dwi: str) -> tuple[tuple[float, int | None], ...]:
    if dwi == "directional":
        return ((0.0, None), (1000.0, 0), (1000.0, 1), (1000.0, 2))
    if dwi == "trace":
        return ((1000.0, None),)
    return ((0.0, None), (1000.0, None))


def write_mr_stroke_study(
    directory: Path,
    *,
    patient: Patient | None = None,
    rows: int = 64,
    n_slices: int = 24,
    slice_spacing: float = 6.0,
    dwi: str = "public",
    with_adc: bool = True,
    with_flair: bool = True,
    flair_other_frame: bool = True,
    flair_3d_sagittal: bool = False,
    enhanced: bool = False,
    lesion: bool = True,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    study_description: str = "MR STROKE",
    study_date: str = "20260101",
    study_time: str = "100000",
    accession: str = "ACC0100",
    seed: int = 0,
) -> Study:
    """Write an MR stroke study (DWI, ADC, FLAIR); see the module docstring."""
    directory = Path(directory)
    patient = patient or default_patient(seed)
    study_uid = study_uid or str(_uid("mrstudy", patient.patient_id, study_date, study_time, seed))
    info = _study_info(study_uid, study_description, study_date, study_time, accession)
    study = Study(study_uid=study_uid, patient=patient, directory=directory)
    frame = str(_uid("for", study_uid, "mr"))
    offsets = _axial_offsets(n_slices, slice_spacing, -55.0)
    grid = stack_grid(rows=rows, cols=rows, fov_mm=230.0, offsets=offsets)
    vendor = _MR_VENDOR_OF[dwi]
    b_style = dwi if dwi in _PRIVATE_B_VALUE else "public"
    dwi_type = ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW") if dwi == "trace" else (
        ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"))
    specs = [("dwi", "dwi", 10, "ep2d_diff_3scan_trace_p2" if dwi != "directional" else "ep2d_diff_3dir",
              dwi_type, _dwi_frames(dwi), "dwi")]
    if with_adc:
        specs.append(("adc", "adc", 11, "ep2d_diff_3scan_trace_p2_ADC",
                      ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), ((0.0, None),), "adc"))
    for key, contrast, number, description, image_type, frames, role in specs:
        series_uid = str(_uid("series", study_uid, key, seed))
        if enhanced:
            datasets = [enhanced_mr_dataset(
                grid=grid, contrast=contrast, patient=patient, study=info, series_uid=series_uid,
                series_number=number, description=description, frame_uid=frame, image_type=image_type,
                frames=frames, lesion=lesion, seed=seed + number,
            )]
        else:
            datasets = mr_datasets(
                grid=grid, contrast=contrast, patient=patient, study=info, series_uid=series_uid,
                series_number=number, description=description, frame_uid=frame, vendor=vendor,
                image_type=image_type, frames=frames, b_style=b_style, lesion=lesion, seed=seed + number,
            )
        paths = write_datasets(datasets, directory / key, transfer_syntax)
        study.series[key] = _record(key, datasets, paths, role, None, grid)
    if with_flair:
        transform = rigid((-3.0, 2.0, -5.0), (-4.0, 6.0, -8.0)) if flair_other_frame else None
        flair_frame = str(_uid("for", study_uid, "flair")) if flair_other_frame else frame
        if flair_3d_sagittal:  # 3D acquisition, sagittal partitions from right to left
            flair_grid = stack_grid(rows=rows + 8, cols=rows + 8, fov_mm=240.0, orientation=SAGITTAL_IOP,
                                    offsets=[-80.0 + 4.0 * k for k in range(41)], centre=(0.0, 0.0, 20.0))
            description = "3D FLAIR SAG 1mm"
        else:
            flair_grid = stack_grid(rows=rows + 8, cols=rows + 8, fov_mm=240.0, offsets=_axial_offsets(30, 5.0, -60.0))
            description = "t2_tirm_tra_dark-fluid FLAIR"
        series_uid = str(_uid("series", study_uid, "flair", seed))
        datasets = mr_datasets(
            grid=flair_grid, contrast="flair", patient=patient, study=info, series_uid=series_uid,
            series_number=12, description=description, frame_uid=flair_frame, vendor=vendor,
            world_from_patient=transform, acquisition_type="3D" if flair_3d_sagittal else "2D",
            lesion=lesion, seed=seed + 12,
        )
        paths = write_datasets(datasets, directory / "flair", transfer_syntax)
        study.series["flair"] = _record("flair", datasets, paths, "flair", transform, flair_grid)
    return study


# --------------------------------------------------------------------------- vendor DWI layouts

#: Vendors :func:`write_vendor_dwi` can imitate, and the Manufacturer (0008,0070) each writes.
VENDOR_DWI = {"ge": "GE MEDICAL SYSTEMS", "siemens": "SIEMENS", "siemens_csa": "SIEMENS",
              "philips": "Philips Medical Systems", "canon": "CANON_MEC"}
_PHILIPS_DIRECTION_LETTERS = ("M", "P", "S")  # Philips (2001,1004): measurement, phase, slice axis


def siemens_csa_header(elements: dict[str, Sequence[str]]) -> bytes:
    """A Siemens CSA2 header (``SV10``, as in (0029,1010)) holding ``elements`` (name -> values)."""
    out = bytearray(b"SV10\x04\x03\x02\x01" + struct.pack("<II", len(elements), 77))
    for name, values in elements.items():
        out += name.encode("ascii").ljust(64, b"\x00")
        out += struct.pack("<i4sii", len(values), b"DS\x00\x00" if name == "B_value" else b"CS\x00\x00", 3, len(values))
        out += struct.pack("<I", 77)
        for value in values:
            encoded = value.encode("ascii") + b"\x00"
            out += struct.pack("<4i", len(encoded), len(encoded), 77, len(encoded))
            out += encoded.ljust((len(encoded) + 3) // 4 * 4, b"\x00")
    return bytes(out)


def _vendor_diffusion(ds: Dataset, vendor: str, b_value: float, direction: int | None, *,
                      public_b: bool, b0_tag: bool, trace_mark: bool, other_creator_first: bool) -> None:
    """Rewrite one DWI image's diffusion attributes the way ``vendor`` stores them."""
    gradient = [0.0, 0.0, 0.0] if direction is None else [1.0 if k == direction else 0.0 for k in range(3)]
    for keyword in ("DiffusionBValue", "DiffusionDirectionality", "DiffusionGradientOrientation"):
        if keyword in ds:
            delattr(ds, keyword)
    if b_value == 0 and not b0_tag:
        return  # Toshiba/Canon: b-values only where a gradient was applied
    if public_b:
        ds.DiffusionBValue = float(b_value)
    isotropic = direction is None and b_value > 0

    def block(group: int, creator: str) -> Any:
        if other_creator_first:  # the vendor's block is then 0x11, not 0x10 (PS3.5 7.8.1)
            ds.private_block(group, "ANOTHER VENDOR 01", create=True).add_new(0x01, "LO", "not this one")
        return ds.private_block(group, creator, create=True)

    if vendor == "ge":
        if not public_b:
            block(0x0043, "GEMS_PARM_01").add_new(0x39, "IS", [int(b_value) + 1_000_000_000, 8, 0, 0])
        acquisition = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        for offset, value in zip((0xBB, 0xBC, 0xBD), gradient):
            acquisition.add_new(offset, "DS", f"{value:g}")
    elif vendor == "siemens":
        header = block(0x0019, "SIEMENS MR HEADER")
        if not public_b:
            header.add_new(0x0C, "IS", int(b_value))
        if trace_mark:
            header.add_new(0x0D, "CS", "ISOTROPIC" if isotropic else "DIRECTIONAL" if b_value > 0 else "NONE")
        if not isotropic and b_value > 0:
            ds.DiffusionGradientOrientation = gradient
    elif vendor == "siemens_csa":
        elements: dict[str, Sequence[str]] = {"B_value": [f"{b_value:g}"]}
        if trace_mark:
            elements["DiffusionDirectionality"] = ["ISOTROPIC" if isotropic else "DIRECTIONAL" if b_value else "NONE"]
        block(0x0029, "SIEMENS CSA HEADER").add_new(0x10, "OB", siemens_csa_header(elements))
        if not isotropic and b_value > 0:
            ds.DiffusionGradientOrientation = gradient
    elif vendor == "philips":
        dd = block(0x2001, "Philips Imaging DD 001")
        if not public_b:
            dd.add_new(0x03, "FL", float(b_value))
        if trace_mark:
            dd.add_new(0x04, "CS", "I" if direction is None else _PHILIPS_DIRECTION_LETTERS[direction])
        ds.DiffusionGradientOrientation = gradient
    elif vendor == "canon":
        ds.ImageComments = f"b={b_value:g}({gradient[0]:.3f},{gradient[1]:.3f},{gradient[2]:.3f})"
    else:
        raise ValueError(f"unknown DWI vendor layout {vendor!r}")


def write_vendor_dwi(
    directory: Path,
    *,
    vendor: str,
    public_b: bool = False,
    b0_tag: bool = True,
    with_trace: bool = True,
    trace_mark: bool = True,
    other_creator_first: bool = False,
    rows: int = 24,
    n_slices: int = 14,
    seed: int = 0,
) -> Study:
    """A DWI series (b0, three directions at b1000 and, ``with_trace``, the scanner's isotropic
    image at b1000) stored the way ``vendor`` (a key of :data:`VENDOR_DWI`) stores it.

    ``public_b=False``: the b-value only in the vendor's place (GE (0043,1039) with the 10^9
    offset, Siemens (0019,100C) or the CSA header ``B_value``, Philips (2001,1003), Canon Image
    Comments ``b=...``). ``b0_tag=False``: the b0 images carry no b-value at all.
    ``trace_mark``: the isotropic image flagged the vendor's way (Philips (2001,1004) 'I',
    Siemens (0019,100D) / CSA ``DiffusionDirectionality`` ISOTROPIC; GE and Canon: a (0,0,0)
    gradient at b > 0). ``other_creator_first``: another private creator takes block 0x10 first,
    so the vendor's elements sit at 0x11xx. The isotropic image's pixels are twice the
    directional mean, so using it as a direction (or averaging it in) shows in the trace. Series key ``dwi``.
    """
    directory = Path(directory)
    patient = default_patient(seed)
    study_uid = str(_uid("vendordwi", vendor, seed))
    info = _study_info(study_uid, "MR STROKE", "20260101", "100000", "ACC0200")
    study = Study(study_uid=study_uid, patient=patient, directory=directory)
    grid = stack_grid(rows=rows, cols=rows, fov_mm=230.0, offsets=_axial_offsets(n_slices, 6.0, -45.0))
    frames: list[tuple[float, int | None]] = [(0.0, None), (1000.0, 0), (1000.0, 1), (1000.0, 2)]
    if with_trace:
        frames.append((1000.0, None))
    series_uid = str(_uid("series", study_uid, "dwi", vendor))
    datasets = mr_datasets(
        grid=grid, contrast="dwi", patient=patient, study=info, series_uid=series_uid, series_number=10,
        description="DWI", frame_uid=str(_uid("for", study_uid)), frames=frames, lesion=False, seed=seed,
    )
    per_frame = len(grid.positions)
    for index, ds in enumerate(datasets):
        b_value, direction = frames[index // per_frame]
        ds.Manufacturer = VENDOR_DWI[vendor]
        if b_value > 0 and direction is None:
            stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
            _set_pixels(ds, np.clip(stored.astype(np.int64) * 2, 0, 65535).astype(np.uint16))
        _vendor_diffusion(ds, vendor, b_value, direction, public_b=public_b, b0_tag=b0_tag,
                          trace_mark=trace_mark, other_creator_first=other_creator_first)
    paths = write_datasets(datasets, directory / "dwi")
    study.series["dwi"] = _record("dwi", datasets, paths, "dwi", None, grid)
    return study


# --------------------------------------------------------------------------- broken copies of good files

_PLACEHOLDER = "NESTING-PLACEHOLDER"


def write_deeply_nested_copy(source: Path, target: Path, *, depth: int = 1000, sop_uid: str | None = None) -> str:
    """Copy ``source`` (Explicit VR Little Endian) to ``target`` under a new SOP Instance UID with
    a Request Attributes Sequence (0040,0275) nested ``depth`` deep, every sequence and item of
    undefined length (PS3.5 7.5.1), written byte by byte. Returns the new SOP Instance UID."""
    import pydicom

    ds = pydicom.dcmread(source)
    uid = sop_uid or str(_uid("nested", source.name, depth))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.add_new(0x00400275, "LO", _PLACEHOLDER)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    encoded = _PLACEHOLDER.encode("ascii") + (b" " if len(_PLACEHOLDER) % 2 else b"")
    element = struct.pack("<HH", 0x0040, 0x0275) + b"LO" + struct.pack("<H", len(encoded)) + encoded
    opening = struct.pack("<HH", 0x0040, 0x0275) + b"SQ\x00\x00" + b"\xff" * 4 + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    raw = target.read_bytes()
    assert raw.count(element) == 1
    target.write_bytes(raw.replace(element, opening * depth + closing * depth))
    return uid


def write_truncated_copy(source: Path, target: Path, *, missing_bytes: int = 100, sop_uid: str | None = None) -> str:
    """Copy ``source`` to ``target`` under a new SOP Instance UID with the file cut
    ``missing_bytes`` short, inside its pixel data (a transfer that stopped). Returns the UID."""
    import pydicom

    ds = pydicom.dcmread(source)
    uid = sop_uid or str(_uid("truncated", source.name, missing_bytes))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    raw = target.read_bytes()
    target.write_bytes(raw[:-missing_bytes])
    return uid


# --------------------------------------------------------------------------- never-chosen extras


def write_perfusion_ct(directory: Path, *, n_phases: int = 3, n_slices: int = 8, **kwargs: object) -> Series:
    """A CT perfusion series: the same few slices repeated over time (never chosen)."""
    offsets = [10.0 + 5.0 * k for k in range(n_slices)] * n_phases
    kwargs.setdefault("key", "perfusion")
    kwargs.setdefault("description", "CTP HEAD PERFUSION 5mm")
    kwargs.setdefault("series_number", 20)
    return write_ct_series(directory, offsets=offsets, **kwargs)  # type: ignore[arg-type]


def write_ai_result_sc(
    directory: Path, study: Study, *, description: str = "RAPID ASPECTS SUMMARY", manufacturer: str = "iSchemaView"
) -> Series:
    """A Secondary Capture image (PS3.3 A.8.1) another vendor's AI put into ``study`` (never chosen)."""
    first = next(iter(s for s in study.series.values() if s.modality in ("CT", "MR")))
    source = _load_first(first.paths[0])
    series_uid = str(_uid("series", study.study_uid, "ai", description))
    ds = _base_dataset(
        sop_class=SECONDARY_CAPTURE_STORAGE,
        sop_uid=_uid(series_uid, 1),
        patient=study.patient,
        study=_study_info(study.study_uid, str(source.StudyDescription), str(source.StudyDate),
                          str(source.StudyTime), str(source.AccessionNumber)),
        series=dict(manufacturer=manufacturer, model="RAPID", software="5.2", station="AI1",
                    uid=series_uid, number="901", description=description),
        modality="OT",
    )
    del ds.AcquisitionDate, ds.BodyPartExamined
    ds.ConversionType = "WSD"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256)
    _set_pixels(ds, pixels)
    paths = write_datasets([ds], Path(directory) / "ai_result")
    series = _record("ai_result", [ds], paths, None, None, None)
    study.series["ai_result"] = series
    return series


def _load_first(path: Path) -> Dataset:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


# --------------------------------------------------------------------------- real series as templates
#
# The corpus tests (tests/test_corpus.py) assemble studies from real series of ../shared/data and
# series the factory builds on their geometry; the property tests (tests/test_properties.py)
# damage factory studies the way real PACS traffic does. Both use the helpers below; none of them
# writes into its input folders.

PHILIPS_PRIVATE_EXAMCARD = UID("1.3.46.670589.11.0.0.12.4")  # Philips Private MR Examcard Storage

#: Type 2 and type 3 attributes a PACS or a modality may leave out (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1).
OPTIONAL_ATTRIBUTES: tuple[str, ...] = (
    "PatientBirthDate", "PatientSex", "PatientAge", "IssuerOfPatientID", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription", "SeriesDate", "SeriesTime", "AcquisitionDate", "ContentDate",
    "ContentTime", "SeriesDescription", "ProtocolName", "InstitutionName", "StationName", "BodyPartExamined",
    "SliceLocation", "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "WindowCenter", "WindowWidth",
)


@dataclass(frozen=True)
class StudyIdentity:
    """Who and when a copied series is made to belong to (fake patient, fresh study)."""

    study_uid: str
    patient: Patient
    study_date: str
    study_time: str
    accession: str = "ACC-CORPUS"
    description: str = "CORPUS STUDY"
    character_set: str = "ISO_IR 100"


def copy_into_study(
    paths: Sequence[Path], folder: Path, identity: StudyIdentity, *, new_sop_uids: bool = False
) -> list[Path]:
    """Copy DICOM files into ``folder`` as part of the study ``identity`` names.

    Patient (name, ID, issuer, birth date, sex), Study Instance UID, study/series/acquisition/
    content dates and times, accession and study description are replaced; series, frame of
    reference, pixels and everything else stay as the scanner wrote them. ``new_sop_uids`` gives
    every copy a SOP Instance UID of its own (derived from the old one and the study). Returns the
    written paths in input order; the inputs are never modified.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        _set_identity(ds, identity)
        if new_sop_uids:
            ds.SOPInstanceUID = _uid(identity.study_uid, ds.SOPInstanceUID)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = folder / f"{index + 1:04d}.dcm"
        ds.save_as(target, enforce_file_format=False)
        out.append(target)
    return out


def _set_identity(ds: Dataset, identity: StudyIdentity) -> None:
    patient = identity.patient
    ds.SpecificCharacterSet = identity.character_set
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    for keyword in ("OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyInstanceUID = identity.study_uid
    ds.AccessionNumber = identity.accession
    ds.StudyDescription = identity.description
    ds.StudyID = "1"
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        if prefix == "Study" or f"{prefix}Date" in ds:
            setattr(ds, f"{prefix}Date", identity.study_date)
        if prefix == "Study" or f"{prefix}Time" in ds:
            setattr(ds, f"{prefix}Time", identity.study_time)
    if "AcquisitionDateTime" in ds:
        ds.AcquisitionDateTime = identity.study_date + identity.study_time


def identity_of(header: Dataset) -> tuple[Patient, dict[str, str]]:
    """The factory's patient and study info of a (copied) header, to build series into its study."""
    patient = Patient(
        name=str(header.get("PatientName", "")), patient_id=str(header.get("PatientID", "")),
        issuer=str(header.get("IssuerOfPatientID", "")), birth_date=str(header.get("PatientBirthDate", "")),
        sex=str(header.get("PatientSex", "")),
    )
    info = _study_info(str(header.StudyInstanceUID), str(header.get("StudyDescription", "")),
                       str(header.get("StudyDate", "")), str(header.get("StudyTime", "")),
                       str(header.get("AccessionNumber", "")))
    return patient, info


@dataclass(frozen=True)
class SeriesGeometry:
    """Where the frames of a real series lie (PS3.3 C.7.6.2; enhanced: C.7.6.16.2)."""

    orientation: tuple[float, float, float, float, float, float]
    positions: tuple[tuple[float, float, float], ...]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    frame_of_reference_uid: str

    @property
    def normal(self) -> np.ndarray:
        iop = np.asarray(self.orientation, dtype=float)
        return np.cross(iop[:3], iop[3:])

    def centre(self) -> np.ndarray:
        """The centre of the volume the frames span (mean of the frame centres)."""
        iop = np.asarray(self.orientation, dtype=float)
        half = iop[:3] * self.pixel_spacing[1] * (self.cols - 1) / 2 + iop[3:] * self.pixel_spacing[0] * (self.rows - 1) / 2
        return np.mean(np.asarray(self.positions, dtype=float), axis=0) + half

    def extent_mm(self) -> float:
        along = [float(np.dot(p, self.normal)) for p in self.positions]
        return max(along) - min(along)

    def fov_mm(self) -> float:
        return max(self.rows * self.pixel_spacing[0], self.cols * self.pixel_spacing[1])


def series_geometry(paths: Sequence[Path]) -> SeriesGeometry:
    """The geometry of the image frames in ``paths`` (classic or enhanced, one orientation)."""
    import pydicom

    orientation: tuple[float, ...] | None = None
    spacing: tuple[float, ...] | None = None
    positions: list[tuple[float, float, float]] = []
    rows = cols = 0
    frame_uid = ""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "Rows" not in ds:
            continue
        rows, cols, frame_uid = int(ds.Rows), int(ds.Columns), str(ds.get("FrameOfReferenceUID", frame_uid))
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
        frames = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else [ds]
        for frame in frames:
            def find(sequence: str, keyword: str) -> object:
                for source in (frame, shared):
                    if sequence in source and keyword in source[sequence].value[0]:
                        return source[sequence].value[0][keyword].value
                return ds.get(keyword)

            iop = find("PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = find("PlanePositionSequence", "ImagePositionPatient")
            pixel = find("PixelMeasuresSequence", "PixelSpacing")
            if iop is None or ipp is None or pixel is None:
                continue
            orientation = orientation or tuple(float(v) for v in iop)  # type: ignore[union-attr]
            spacing = spacing or tuple(float(v) for v in pixel)  # type: ignore[union-attr]
            positions.append(tuple(float(v) for v in ipp))  # type: ignore[union-attr,arg-type]
    if orientation is None or spacing is None:
        raise ValueError("no image frame with a position and an orientation")
    unique = tuple(dict.fromkeys(positions))
    return SeriesGeometry(orientation, unique, spacing, rows, cols, frame_uid)  # type: ignore[arg-type]


def write_flair_for(
    directory: Path,
    like: Sequence[Path],
    *,
    key: str = "flair",
    rows: int = 64,
    slice_spacing: float = 5.0,
    series_number: int = 90,
    seed: int = 0,
) -> Series:
    """A 2-D axial-ish FLAIR of the phantom in the study and frame of reference of the series
    ``like`` (a copied real DWI), covering the same volume with its orientation; patient and study
    attributes are copied from the first file of ``like``."""
    header = _load_first(Path(like[0]))
    patient, info = identity_of(header)
    geometry = series_geometry(like)
    extent = geometry.extent_mm()
    n_slices = max(2, int(round(extent / slice_spacing)) + 1)
    offsets = [-(n_slices - 1) * slice_spacing / 2 + k * slice_spacing for k in range(n_slices)]
    grid = stack_grid(rows=rows, cols=rows, fov_mm=geometry.fov_mm(), offsets=offsets,
                      orientation=geometry.orientation, centre=tuple(geometry.centre()))
    vendor = next((name for name in ("GE", "Siemens", "Philips")
                   if name.lower() in str(header.get("Manufacturer", "")).lower()), "Siemens")
    series_uid = str(_uid("series", info["uid"], key, seed))
    # The phantom's head centre sits near the origin; the real head wherever the scanner put it.
    shift = rigid((0.0, 0.0, 0.0), tuple(HEAD_CENTRE - geometry.centre()))
    datasets = mr_datasets(
        grid=grid, contrast="flair", patient=patient, study=info, series_uid=series_uid, series_number=series_number,
        description="t2_tirm_tra_dark-fluid FLAIR", frame_uid=geometry.frame_of_reference_uid, vendor=vendor,
        world_from_patient=shift, seed=seed + series_number,
    )
    for ds in datasets:
        ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 100")
    paths = write_datasets(datasets, Path(directory) / key)
    return _record(key, datasets, paths, "flair", shift, grid)


def write_cta_for(
    directory: Path,
    like: Sequence[Path],
    *,
    key: str = "cta",
    rows: int = 96,
    fov_mm: float = 240.0,
    slice_spacing: float = 2.5,
    transform: np.ndarray | None = None,
    series_number: int = 91,
    seed: int = 0,
) -> Series:
    """A CTA made from a real NCCT (``like``): its volume resampled onto another grid (own frame of
    reference, rotated and shifted by ``transform``, default :data:`CTA_TRANSFORM`), the phantom's
    arteries enhanced by 300 HU where they pass through soft tissue, Contrast/Bolus attributes set.
    Patient and study come from the first file of ``like``."""
    import pydicom
    from scipy.ndimage import map_coordinates

    transform = CTA_TRANSFORM if transform is None else transform
    headers = [pydicom.dcmread(p) for p in like]
    headers = [h for h in headers if "PixelData" in h]
    geometry = series_geometry(like)
    normal = geometry.normal
    headers.sort(key=lambda h: float(np.dot([float(v) for v in h.ImagePositionPatient], normal)))
    volume = np.stack([h.pixel_array.astype(np.float32) * float(h.get("RescaleSlope", 1))
                       + float(h.get("RescaleIntercept", 0)) for h in headers])
    origin = np.asarray([float(v) for v in headers[0].ImagePositionPatient])
    iop = np.asarray(geometry.orientation, dtype=float)
    step = (float(np.dot(np.asarray([float(v) for v in headers[-1].ImagePositionPatient]) - origin, normal))
            / max(1, len(headers) - 1))
    # patient point = origin + i*rs*row_dir... ; index (slice, row, col) of a point
    axes = np.stack([normal * step, iop[3:] * geometry.pixel_spacing[0], iop[:3] * geometry.pixel_spacing[1]], axis=1)
    centre = geometry.centre()
    n_slices = max(2, int(round(geometry.extent_mm() / slice_spacing)))
    offsets = [-(n_slices - 1) * slice_spacing / 2 + k * slice_spacing for k in range(n_slices)]
    grid = stack_grid(rows=rows, cols=rows, fov_mm=fov_mm, offsets=offsets, centre=(0.0, 0.0, 0.0))
    header = headers[0]
    patient, info = identity_of(header)
    series_uid = str(_uid("series", info["uid"], key, seed))
    frame_uid = str(_uid("for", info["uid"], key, seed))
    datasets = ct_datasets(
        grid=grid, kind="cta", patient=patient, study=info, series_uid=series_uid, series_number=series_number,
        description="CTA HEAD 2.5mm", frame_uid=frame_uid, lesion=False, clot=False, seed=seed,
    )
    rng = np.random.default_rng(seed)
    for index, ds in enumerate(datasets):
        local = grid.plane_points(index)  # in the CTA's own frame, centred on its origin
        points = local @ transform[:3, :3].T + transform[:3, 3] + centre  # the NCCT's frame
        ijk = np.linalg.solve(axes, (points - origin).reshape(-1, 3).T)
        hu = map_coordinates(volume, ijk, order=1, mode="constant", cval=-1000.0).reshape(grid.rows, grid.cols)
        phantom = points - centre + HEAD_CENTRE
        vessels = np.zeros(hu.shape, dtype=bool)
        for a, b, radius in VESSELS:
            vessels |= _near_segment(phantom, a, b, radius + 1.0)
        hu = np.where(vessels & (hu > -200) & (hu < 200), hu + 300.0, hu) + rng.normal(0.0, 3.0, hu.shape)
        stored = np.clip(np.rint(hu + 1024.0), 0, 65535).astype(np.uint16)
        _set_pixels(ds, stored)
        ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 100")
        ds.Manufacturer = str(header.get("Manufacturer", ds.Manufacturer))
    paths = write_datasets(datasets, Path(directory) / key)
    return _record(key, datasets, paths, "cta", transform, grid)


def write_private_object(
    directory: Path, like: Path, *, sop_class: str = PHILIPS_PRIVATE_EXAMCARD, key: str = "private",
    size: int = 4096,
) -> Series:
    """An instance of a vendor's private SOP class (default the Philips examcard a PACS routes with
    an MR study) in the study of ``like``: patient, study and equipment modules, and an opaque
    private block, as such objects carry (they hold no image a node can use)."""
    header = _load_first(Path(like))
    patient, info = identity_of(header)
    series_uid = str(_uid("series", info["uid"], key))
    ds = _base_dataset(
        sop_class=UID(sop_class), sop_uid=_uid(series_uid, 1), patient=patient, study=info,
        series=dict(_VENDORS["Philips"], uid=series_uid, number="9999", description="ExamCard"),
        modality=str(header.get("Modality", "MR")),
    )
    del ds.AcquisitionDate, ds.BodyPartExamined
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 100")
    ds.InstanceNumber = 1
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x10, "OB", bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)))
    paths = write_datasets([ds], Path(directory) / key)
    return _record(key, [ds], paths, None, None, None)


def write_tilted_mixed_thickness_ct(
    directory: Path, *, tilt_deg: float = 15.0, first: tuple[int, float] = (12, 2.5),
    second: tuple[int, float] = (16, 5.0), **kwargs: object,
) -> Series:
    """A gantry-tilted NCCT reconstructed with two slice spacings and thicknesses in one series
    (thin through the posterior fossa, thick above), as some head protocols are."""
    offsets = [-50.0 + k * first[1] for k in range(first[0])]
    offsets += [offsets[-1] + (k + 1) * second[1] for k in range(second[0])]
    kwargs.setdefault("key", "ncct_tilted_mixed")
    kwargs.setdefault("description", "HEAD NCCT TILT 2.5/5mm")
    series = write_ct_series(directory, offsets=offsets, tilt_deg=tilt_deg, **kwargs)  # type: ignore[arg-type]
    import pydicom

    cos = math.cos(math.radians(tilt_deg))
    heights = sorted(position[2] for position in series.positions)
    boundary = heights[first[0] - 1]
    for path, position in zip(series.paths, series.positions):
        ds = pydicom.dcmread(path)
        thickness = first[1] if position[2] <= boundary + 1e-3 else second[1]
        ds.SliceThickness = f"{thickness * cos:.6g}"
        del ds.SpacingBetweenSlices  # not constant in this series
        ds.save_as(path, enforce_file_format=True)
    return series


def rewrite_files(
    paths: Sequence[Path], *, remove: Sequence[str] = (), patient_name: str | None = None,
    character_set: str | None = None,
) -> None:
    """Damage written files in place the way real traffic does: drop the ``remove`` attributes
    (keywords; absent ones are ignored) and/or set the patient name under ``character_set``."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in remove:
            if keyword in ds:
                delattr(ds, keyword)
        if character_set is not None:
            ds.SpecificCharacterSet = character_set
        if patient_name is not None:
            ds.PatientName = patient_name
        ds.save_as(path, enforce_file_format=False)
