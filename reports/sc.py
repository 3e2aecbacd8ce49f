"""Attention-map secondary captures: what the model looked at, in any viewer.

One capture per model slice position (25 by default) and, optionally, one **summary capture**
(the key slices in a row under the score, the decision and the research-use warning: one image
for a PACS thumbnail or a phone). The pixels come from :mod:`reports.capture`: the primary
series resampled from its source pixels to a viewing size (the brain at least 512 pixels
across, square pixels) in the source's display window, the relative attention over it (colour
only inside the brain, transparent below a floor), a labelled colour scale and a text band
below the image with the result, the decision, the slice and its weight, the model,
"NOT FOR DIAGNOSTIC USE" and, for demonstration weights, a warning that the result is random.
The text is burned in, so every image says Burned In Annotation YES (General Image module,
PS3.3 C.7.6.1).

The captures are a new series in the primary's study, the summary another one (so that a PACS
shows it as its own thumbnail); patient and study are copied from the source image (highdicom
``SCImage.from_ref_dataset``), and each image names the source image(s) it shows in the Source
Image Sequence (PS3.3 C.7.6.1.1.4). Single-frame Secondary Capture Image Storage (what every
viewer shows) is the default; one Multi-frame True Color Secondary Capture (PS3.3 A.8.5) is the
option for the per-slice captures.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.result import AttentionSlice, Prediction, SourceInstance
from reports.capture import (
    DEMO_WARNING,
    DISCLAIMER,
    SUMMARY_SLICES,
    CapturePlane,
    CaptureSet,
    colour_map,
    display_window,
    key_slices,
)
from reports.codes import Fpe, Std, coding_scheme_identification
from reports.header import required_uid, source_header
from reports.sr import MANUFACTURER, ReportContext, contributing_equipment, declare_character_set, result_text
from reports.uids import UIDFactory

__all__ = [
    "SC_STORAGE",
    "MULTIFRAME_TRUE_COLOR_SC_STORAGE",
    "DISCLAIMER",
    "DEMO_WARNING",
    "colour_map",
    "capture_planes",
    "capture_set",
    "build_secondary_captures",
    "build_summary_capture",
]

logger = logging.getLogger(__name__)

SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.4")
DEFAULT_SC_SERIES_NUMBER = 9902
DEFAULT_SUMMARY_SERIES_NUMBER = 9906  # 9903 PDF, 9904 Parametric Map, 9905 Segmentation


def _relative(heat: Sequence[np.ndarray]) -> list[np.ndarray]:
    top = max((float(np.max(h)) for h in heat), default=0.0)
    if top <= 0:
        return [np.zeros(np.shape(h), dtype=np.float32) for h in heat]
    return [np.clip(np.asarray(h, dtype=np.float32) / np.float32(top), 0.0, 1.0) for h in heat]


def capture_planes(prediction: Prediction) -> list[CapturePlane]:
    """The plane each capture shows: source pixels, relative attention and brain mask.

    The predictor gives every attention slice its brain mask and its own relative attention
    (:func:`inference.predictor.capture_views`: masked, smoothed, 1 = the case's maximum, not
    scaled by the slice weight). A prediction without them (built elsewhere, or a volume the
    preprocessing mask did not cover) is drawn from its ``heat`` divided by the case's maximum,
    the whole plane taken as brain: the captures then frame the whole field of view.
    """
    if all(s.relative_attention is not None and s.brain is not None for s in prediction.attention):
        pairs = [(np.asarray(s.relative_attention, dtype=np.float32), np.asarray(s.brain, dtype=np.float32))
                 for s in prediction.attention]
    else:
        pairs = [(values, np.ones(np.shape(s.image), dtype=np.float32))
                 for s, values in zip(prediction.attention, _relative([s.heat for s in prediction.attention]))]
    return [
        CapturePlane(
            attention_slice=attention,
            image=np.asarray(attention.image, dtype=np.float32),
            attention=values,
            brain=brain,
            pixel_spacing=attention.pixel_spacing,
        )
        for attention, (values, brain) in zip(prediction.attention, pairs)
    ]


def capture_set(prediction: Prediction, source_datasets: Sequence[Dataset]) -> CaptureSet:
    """The planes, shared frame and window of a prediction's captures (:class:`reports.capture.CaptureSet`)."""
    if not prediction.attention:
        raise ValueError("prediction has no attention slices: no secondary capture to build")
    planes = capture_planes(prediction)
    headers = {str(ds.get("SOPInstanceUID", "")): ds for ds in source_datasets}
    window = display_window(prediction, headers, [p.inside() for p in planes])
    return CaptureSet(prediction, planes, window)


def _patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of the row and column directions (PS3.3 C.7.6.1.1.1)."""

    def letters(vector: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
        chosen = [names[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 0.25]
        return "".join(chosen) or "L"

    return letters(orientation[:3]), letters(orientation[3:6])


def _source_image_item(source: SourceInstance) -> Dataset:
    """Source Image Sequence item (PS3.3 C.7.6.1.1.4): a source image the capture shows."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.sop_instance_uid
    if source.frame is not None:
        item.ReferencedFrameNumber = source.frame
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def _series_description(prediction: Prediction, what: str = "attention map") -> str:
    demo = " DEMO" if prediction.model.demonstration else ""
    return f"FPE {what}{demo} (research use, not for diagnosis)"[:64]


def _finish(ds: Dataset, prediction: Prediction, context: ReportContext, what: str) -> None:
    """Attributes the result objects share: burned-in text, derivation, research labels."""
    ds.BurnedInAnnotation = "YES"
    # The head is an unpaired body part (Image Laterality, General Image module PS3.3 C.7.6.1: U);
    # stating it satisfies the General Series Laterality condition (C.7.3.1).
    ds.ImageLaterality = "U"
    ds.RecognizableVisualFeatures = "NO"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = _series_description(prediction, what)
    ds.DerivationDescription = (
        f"Relative attention of {prediction.model.name} {prediction.model.version} (1 = maximum in this case) "
        "blended over the primary series, resampled to a viewing size; research use, not for diagnosis"
    )[:1024]
    ds.ImageComments = result_text(prediction)
    ds.SoftwareVersions = context.software_version
    ds.ManufacturerModelName = prediction.model.name
    if context.institution_name:
        ds.InstitutionName = context.institution_name
    ds.CodingSchemeIdentificationSequence = coding_scheme_identification()
    concept = Dataset()
    concept.CodeValue = Fpe.ATTENTION_MAP.value
    concept.CodingSchemeDesignator = Fpe.ATTENTION_MAP.scheme_designator
    concept.CodeMeaning = Fpe.ATTENTION_MAP.meaning
    ds.DerivationCodeSequence = DicomSequence([concept])


def _single_frame(
    prediction: Prediction,
    shown: AttentionSlice,
    pixels: np.ndarray,
    reference: Dataset,
    uids: UIDFactory,
    context: ReportContext,
    *,
    series_uid: str,
    series_number: int,
    instance_number: int,
    sources: Sequence[SourceInstance],
    what: str,
) -> Dataset:
    """One single-frame SC (PS3.3 A.8.1) of ``pixels``; ``shown`` gives its orientation."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=uids.new(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(shown.orientation_patient),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(
            context, prediction.model, "Attention map of a first-pass-effect prediction (research use)")],
    )
    _finish(sc, prediction, context, what)
    sc.SourceImageSequence = DicomSequence([_source_image_item(source) for source in sources])
    declare_character_set(sc)
    return sc


def _clone(template: Dataset, attention: AttentionSlice, pixels: np.ndarray, uids: UIDFactory) -> Dataset:
    """Another capture of the same series: the template's header with this slice's pixels.

    Patient, study, series and equipment are the same for every capture of a prediction, so
    they are built once (highdicom) and copied; only per-image attributes change.
    """
    capture = Dataset()
    for element in template:  # independent elements; pixel data is replaced, never copied
        if element.keyword != "PixelData":
            capture.add(copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element))
    sop_uid = UID(uids.new())
    meta = FileMetaDataset(copy.deepcopy(template.file_meta))
    meta.MediaStorageSOPInstanceUID = sop_uid
    capture.file_meta = meta
    rows, columns = pixels.shape[0], pixels.shape[1]
    replacements: list[tuple[str, object]] = [
        ("SOPInstanceUID", sop_uid),
        ("InstanceNumber", attention.model_slice + 1),
        ("PatientOrientation", list(_patient_orientation(attention.orientation_patient))),
        ("Rows", rows),
        ("Columns", columns),
        ("PixelData", np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()),
        ("SourceImageSequence", DicomSequence([_source_image_item(attention.source)])),
    ]
    for keyword, value in replacements:
        element = template[keyword]
        capture.add_new(element.tag, element.VR, value)
    return capture


def _multiframe(
    prediction: Prediction,
    frames: Sequence[np.ndarray],
    first: Dataset,
    uids: UIDFactory,
) -> Dataset:
    """One Multi-frame True Color SC (PS3.3 A.8.5) holding every capture as a frame.

    Built from the first single-frame capture's header (same patient, study, series and
    equipment), with the Multi-frame module (C.7.6.6) stepping frames by Frame Label
    Vector (0018,2002) and every slice's source image in the Source Image Sequence.
    """
    height = max(frame.shape[0] for frame in frames)
    width = max(frame.shape[1] for frame in frames)
    stack = np.zeros((len(frames), height, width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        stack[index, : frame.shape[0], : frame.shape[1]] = frame
    ds = Dataset()
    ds.update(first)
    ds.file_meta = FileMetaDataset(first.file_meta)
    sop_uid = UID(uids.new())
    ds.SOPClassUID = MULTIFRAME_TRUE_COLOR_SC_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_TRUE_COLOR_SC_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    for keyword in ("PixelSpacing", "PixelAspectRatio"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.Rows, ds.Columns = height, width
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00182002
    ds.FrameLabelVector = [f"slice {a.model_slice + 1} of {len(prediction.attention)}"[:16] for a in prediction.attention]
    ds.SourceImageSequence = DicomSequence([_source_image_item(a.source) for a in prediction.attention])
    ds.PixelData = stack.tobytes()
    return ds


def _checked_headers(prediction: Prediction, source_datasets: Sequence[Dataset], caller: str) -> dict[str, Dataset]:
    if not prediction.attention:
        raise ValueError("prediction has no attention slices: no secondary capture to build")
    if not source_datasets:
        raise ValueError(f"{caller} needs the headers of the primary series")
    return {required_uid(ds, "SOPInstanceUID"): ds for ds in source_datasets}


def _reference(source: SourceInstance, headers: dict[str, Dataset], fallback: Dataset) -> Dataset:
    """The header patient and study are copied from: the shown source image's, else the first."""
    return source_header(headers.get(source.sop_instance_uid, fallback))


def build_secondary_captures(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    multiframe: bool = False,
    series_uid: str | None = None,
    series_number: int = DEFAULT_SC_SERIES_NUMBER,
    captures: CaptureSet | None = None,
) -> list[Dataset]:
    """The attention-map captures of one prediction, a new series in the primary's study.

    Parameters
    ----------
    prediction:
        Must carry ``attention`` slices (one capture per model slice position).
    source_datasets:
        Headers of the primary series' images; the captures copy patient and study from the
        header of the first capture's source image (the first header when not found), type 2
        attributes it lacks written empty (:func:`reports.header.source_header`). The MR
        display window is the source's own (:func:`reports.capture.display_window`).
    uids, context:
        UID factory and the node's identity (see :mod:`reports.sr`).
    multiframe:
        One Multi-frame True Color SC instead of one single-frame SC per slice.
    captures:
        The prediction's :class:`reports.capture.CaptureSet` when the caller already has it
        (:func:`capture_set`), e.g. to build the summary capture from the same frame.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        Ready for ``save_as``; single-frame captures numbered by model slice (1-based).

    Raises
    ------
    ValueError
        When the prediction has no attention slices or no source header is given.
    """
    headers = _checked_headers(prediction, source_datasets, "build_secondary_captures")
    captures = captures or capture_set(prediction, source_datasets)
    series_uid = series_uid or uids.new()
    pixels = [captures.capture(attention) for attention in prediction.attention]
    first = prediction.attention[0]
    template = _single_frame(
        prediction, first, pixels[0], _reference(first.source, headers, source_datasets[0]), uids, context,
        series_uid=series_uid, series_number=series_number, instance_number=first.model_slice + 1,
        sources=[first.source], what="attention map",
    )
    built = [template]
    for attention, rendered in zip(prediction.attention[1:], pixels[1:]):
        built.append(_clone(template, attention, rendered, uids))
    if multiframe:
        built = [_multiframe(prediction, pixels, built[0], uids)]
    logger.info(
        "built %d secondary capture(s) of %dx%d in series %s for study %s",
        len(built), pixels[0].shape[1], pixels[0].shape[0], series_uid, built[0].StudyInstanceUID,
    )
    return built


def build_summary_capture(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    series_uid: str | None = None,
    series_number: int = DEFAULT_SUMMARY_SERIES_NUMBER,
    captures: CaptureSet | None = None,
) -> Dataset:
    """The summary capture: one single-frame SC, its own series in the primary's study.

    The key slices (:func:`reports.capture.key_slices`, the attention peak among them) in a
    row under the result, the decision and the research-use warning
    (:meth:`reports.capture.CaptureSet.summary`); its Source Image Sequence names the source
    image of every slice shown, and it takes its patient orientation from them (one series,
    one orientation). Parameters as :func:`build_secondary_captures`.
    """
    headers = _checked_headers(prediction, source_datasets, "build_summary_capture")
    captures = captures or capture_set(prediction, source_datasets)
    shown = sorted(key_slices(prediction, SUMMARY_SLICES), key=lambda s: s.model_slice)
    pixels = captures.summary(SUMMARY_SLICES)
    main = shown[0] if prediction.peak is None else next(
        (s for s in shown if s.model_slice == prediction.peak.model_slice), shown[0])
    summary = _single_frame(
        prediction, main, pixels, _reference(main.source, headers, source_datasets[0]), uids, context,
        series_uid=series_uid or uids.new(), series_number=series_number, instance_number=1,
        sources=list(dict.fromkeys(s.source for s in shown)), what="summary capture",
    )
    logger.info("built the summary capture of %dx%d for study %s", pixels.shape[1], pixels.shape[0],
                summary.StudyInstanceUID)
    return summary
