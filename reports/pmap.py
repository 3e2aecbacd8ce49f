"""The attention as a DICOM Parametric Map over the primary series (PS3.3 A.75).

A viewer that reads Parametric Map Storage (OHIF does) draws it over the source series itself,
with its own colour scale and opacity, on every slice, in any plane it reformats to, instead of
showing the burned-in secondary captures. The map is :attr:`inference.result.Prediction.source_attention`:
one frame per acquired plane of the primary series, each with that plane's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing (Plane Position / Plane Orientation / Pixel Measures
functional groups, PS3.3 C.7.6.16.2) in the source's Frame of Reference, so a gantry-tilted CT's
frames keep their tilted planes. highdicom matches each frame to its source image (Derivation
Image Sequence per frame, PS3.3 C.7.6.16.2.6).

Values: **relative attention within the case**, 0 outside the brain, 1 at the case's maximum
(:mod:`inference.attention`, "On the source grid"), as 32-bit floats (Float Pixel Data) with an
identity Real World Value Mapping (PS3.3 C.7.6.16.2.11) labelled ``ATTENTION``, unit UCUM ``1``
(no units), range 0.0..1.0; the Content Description says what low and high mean.

Relative attention below :data:`DISPLAY_FLOOR` (0.2, the level below which the secondary
captures leave the image uncovered, :data:`reports.sc.HEAT_FLOOR`) is written as 0: viewers draw
0 transparent (OHIF does), so low attention shows the image, not a wash of the lowest colour.

No palette in the object: a Palette Color Lookup Table (PS3.3 C.7.9, Pixel Presentation
COLOR_RANGE) applies to integer stored values only, and OHIF 3.13 draws Parametric Maps of
32-bit float data only ("Only works with 32 bit data, not 16" for 16-bit frames), so the viewer's
own colour map is used. Size: 4 bytes a pixel (a 512 x 512 CT slice is 1 MiB a frame); the
Segmentation (:mod:`reports.seg`) is the compact alternative.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.result import Prediction, SourcePlane
from reports.codes import coding_scheme_identification
from reports.header import TolerantPatientCopy, source_header
from reports.sr import MANUFACTURER, ReportContext, contributing_equipment, declare_character_set
from reports.uids import UIDFactory

__all__ = [
    "PARAMETRIC_MAP_STORAGE",
    "DISPLAY_FLOOR",
    "DEFAULT_PM_SERIES_NUMBER",
    "OverlayGeometry",
    "overlay_geometry",
    "build_parametric_map",
]

logger = logging.getLogger(__name__)

PARAMETRIC_MAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.30")
DEFAULT_PM_SERIES_NUMBER = 9904
UNITLESS = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
CONTENT_DESCRIPTION = "Relative attention, 1 = case max; 0: below 0.2 or outside brain"
DISPLAY_FLOOR = 0.2


@dataclass(frozen=True)
class OverlayGeometry:
    """What an overlay object on the source planes needs from highdicom.

    ``source_images`` / ``further_source_images`` are the headers of the planes' instances
    (normalised by :func:`reports.header.source_header`): all single-frame images in plane order,
    or one multi-frame image first and any other multi-frame images after it.
    """

    source_images: list[Dataset]
    further_source_images: list[Dataset]
    plane_positions: list[hd.PlanePositionSequence]
    plane_orientation: hd.PlaneOrientationSequence
    pixel_measures: hd.PixelMeasuresSequence


def _slice_thickness(header: Dataset, planes: Sequence[SourcePlane]) -> float:
    """SliceThickness of the source, else the spacing of its planes along the normal."""
    value = header.get("SliceThickness")
    if value not in (None, "") and float(value) > 0:
        return float(value)
    if len(planes) > 1:
        row = np.asarray(planes[0].orientation_patient[:3])
        column = np.asarray(planes[0].orientation_patient[3:])
        normal = np.cross(row, column)
        along = [float(np.dot(p.position_patient, normal)) for p in planes]
        return float(max(np.median(np.abs(np.diff(along))), 1e-3))
    return 1.0


_FRAME_GEOMETRY = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def _with_shared_geometry(header: Dataset) -> Dataset:
    """A multi-frame header whose shared functional groups hold pixel measures and orientation.

    Scanners may put them in the per-frame groups only (Siemens XA enhanced MR does); highdicom
    reads them from the shared groups. The series is one orientation and spacing (checked when
    its volume was built), so the first frame's values hold for all (PS3.3 C.7.6.16).
    """
    shared = header.get("SharedFunctionalGroupsSequence")
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not shared or not per_frame or all(k in shared[0] for k in _FRAME_GEOMETRY):
        return header
    copied = copy.copy(header)
    item = copy.deepcopy(shared[0])
    for keyword in _FRAME_GEOMETRY:
        if keyword not in item and keyword in per_frame[0]:
            setattr(item, keyword, copy.deepcopy(per_frame[0][keyword].value))
    copied.SharedFunctionalGroupsSequence = [item]
    return copied


def overlay_geometry(prediction: Prediction, sources: Sequence[Dataset]) -> OverlayGeometry:
    """The source headers and frame geometry of an overlay on ``prediction.source_planes``.

    Raises
    ------
    ValueError
        When the prediction has no source-grid attention, the planes disagree on orientation
        or pixel spacing, or a plane's source header is not among ``sources``.
    """
    planes = prediction.source_planes
    if prediction.source_attention is None or not planes:
        raise ValueError("the prediction has no attention on the source grid (NIfTI input?)")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [p.source.sop_instance_uid for p in planes if p.source.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source header(s) of the primary series missing, first {missing[0]}")
    orientations = {tuple(round(v, 4) for v in p.orientation_patient) for p in planes}
    spacings = {tuple(round(v, 5) for v in p.pixel_spacing) for p in planes}
    if len(orientations) != 1 or len(spacings) != 1:
        raise ValueError("source planes of more than one orientation or pixel spacing")
    instances = list(dict.fromkeys(p.source.sop_instance_uid for p in planes))
    headers = [_with_shared_geometry(source_header(by_uid[uid])) for uid in instances]
    multiframe = [h for h in headers if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe:
        source_images, further = multiframe[:1], [h for h in headers if h is not multiframe[0]]
    else:
        source_images, further = headers, []
    first = planes[0]
    return OverlayGeometry(
        source_images=source_images,
        further_source_images=further,
        plane_positions=[hd.PlanePositionSequence("PATIENT", list(p.position_patient)) for p in planes],
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", list(first.orientation_patient)),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=list(first.pixel_spacing), slice_thickness=_slice_thickness(headers[0], planes)
        ),
    )


def displayed_values(attention: np.ndarray) -> np.ndarray:
    """The frames: relative attention, 0 where it is below :data:`DISPLAY_FLOOR` (float32)."""
    values = np.asarray(attention, dtype=np.float32)
    return np.ascontiguousarray(np.where(values >= DISPLAY_FLOOR, values, np.float32(0.0)), dtype=np.float32)


class _ParametricMap(TolerantPatientCopy, hd.pm.ParametricMap):
    """highdicom's Parametric Map with the tolerant patient and study copy."""


def frame_anatomy() -> Dataset:
    """Frame Anatomy (PS3.3 C.7.6.16.2.8): the brain, an unpaired structure (Frame Laterality U).

    Stating it satisfies the General Series Laterality condition (C.7.3.1) as Image Laterality
    does in the secondary captures.
    """
    from reports.codes import Std

    region = Dataset()
    region.CodeValue = Std.BRAIN.value
    region.CodingSchemeDesignator = Std.BRAIN.scheme_designator
    region.CodeMeaning = Std.BRAIN.meaning
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = "U"
    return item


def finish(ds: Dataset, prediction: Prediction, context: ReportContext, description: str) -> None:
    """What every overlay object says about itself: series, research use, the result."""
    demo = " DEMO" if prediction.model.demonstration else ""
    ds.SeriesDescription = f"{description}{demo} (research use, not for diagnosis)"[:64]
    if context.institution_name:
        ds.InstitutionName = context.institution_name
    ds.CodingSchemeIdentificationSequence = coding_scheme_identification()
    declare_character_set(ds)


def build_parametric_map(
    prediction: Prediction,
    sources: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    series_number: int = DEFAULT_PM_SERIES_NUMBER,
) -> Dataset:
    """The Parametric Map of a prediction's attention on its primary series.

    Parameters
    ----------
    prediction:
        With :attr:`~inference.result.Prediction.source_attention`.
    sources:
        Headers (no pixels needed) of every source plane's instance; others are ignored.
    uids, context:
        New UIDs; the node's identity.

    Raises
    ------
    ValueError
        As :func:`overlay_geometry`.
    """
    geometry = overlay_geometry(prediction, sources)
    assert prediction.source_attention is not None
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ATTENTION",
        lut_explanation="Relative attention, 1 = case maximum",
        unit=UNITLESS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = _ParametricMap(
        source_images=geometry.source_images,
        further_source_images=geometry.further_source_images or None,
        pixel_array=displayed_values(prediction.source_attention),
        series_instance_uid=uids.new(),
        series_number=series_number,
        sop_instance_uid=uids.new(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=prediction.model.name,
        software_versions=context.software_version,
        device_serial_number=context.device_uid[-64:],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=CONTENT_DESCRIPTION,
        content_label="ATTENTION",
        pixel_measures=geometry.pixel_measures,
        plane_orientation=geometry.plane_orientation,
        plane_positions=geometry.plane_positions,
        contributing_equipment=[contributing_equipment(
            context, prediction.model, "Attention parametric map of a first-pass-effect prediction (research use)")],
    )
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [frame_anatomy()]
    finish(pm, prediction, context, "FPE attention overlay")
    logger.info("built parametric map %s (%d frames) for study %s", pm.SOPInstanceUID, len(prediction.source_planes),
                pm.StudyInstanceUID)
    return pm
