"""Attention-map secondary captures: what the model looked at, in any viewer.

One image per model slice position (25 by default): the primary series resampled at that
position at its native in-plane resolution (``AttentionSlice.image``, never rescaled), the
attention map blended over it with a colour map, a colour scale bar beside it, and a text
panel below with the result, threshold, model and version, "NOT FOR DIAGNOSTIC USE" and,
for demonstration weights, a warning that the result is random. The text is burned in, so
every image says Burned In Annotation YES (General Image module, PS3.3 C.7.6.1).

Each capture is a new series in the primary's study; patient and study are copied from the
source image (highdicom ``SCImage.from_ref_dataset``). Single-frame Secondary Capture Image
Storage (what every viewer shows) is the default; one Multi-frame True Color Secondary Capture
(PS3.3 A.8.5) is the option.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from inference.result import AttentionSlice, Prediction
from reports.codes import Fpe, Std, coding_scheme_identification
from reports.header import required_uid, source_header
from reports.sr import MANUFACTURER, ReportContext, declare_character_set, result_text
from reports.uids import UIDFactory

__all__ = [
    "SC_STORAGE",
    "MULTIFRAME_TRUE_COLOR_SC_STORAGE",
    "DISCLAIMER",
    "render_slice",
    "caption_lines",
    "build_secondary_captures",
]

logger = logging.getLogger(__name__)

SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.4")
DISCLAIMER = "NOT FOR DIAGNOSTIC USE - research only"
DEMO_WARNING = "DEMONSTRATION WEIGHTS - RESULT IS RANDOM"
DEFAULT_SC_SERIES_NUMBER = 9902

# Attention below this is left transparent, above it the colour fades in up to MAX_ALPHA.
HEAT_FLOOR = 0.2
MAX_ALPHA = 0.6
_BAR_WIDTH = 14
_BAR_GAP = 6
_LABEL_ROOM = 34
_MIN_WIDTH = 360
_MARGIN = 6

# Anchor colours of the map (blue -> cyan -> green -> yellow -> red), like "jet".
_ANCHORS = np.array(
    [[0, 0, 160], [0, 120, 255], [0, 220, 220], [60, 220, 60], [255, 230, 0], [255, 120, 0], [220, 0, 0]], dtype=np.float64
)


def _lookup_table() -> np.ndarray:
    levels = np.linspace(0.0, 1.0, 256)
    positions = np.linspace(0.0, 1.0, len(_ANCHORS))
    channels = [np.interp(levels, positions, _ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


_LUT = _lookup_table()


def colour_map(values: np.ndarray) -> np.ndarray:
    """RGB (uint8) of values in [0, 1] on the blue-to-red scale used by the overlay and the bar."""
    clipped = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return _LUT[(clipped * 255.0 + 0.5).astype(np.uint8)]


@dataclass(frozen=True)
class Window:
    """Display window applied to modality values (PS3.3 C.11.2.1.2, linear)."""

    centre: float
    width: float

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Grey levels 0..255 of ``image``."""
        low = self.centre - self.width / 2.0
        scaled = (np.asarray(image, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / max(self.width, 1e-6))
        return (np.clip(np.nan_to_num(scaled), 0.0, 255.0) + 0.5).astype(np.uint8)


# Brain window for non-contrast CT, a vessel window for CTA (HU).
_CT_WINDOWS = {"ncct": Window(40.0, 80.0), "cta": Window(150.0, 600.0)}


def display_window(prediction: Prediction) -> Window:
    """The window for the primary series: fixed HU windows for CT, percentiles for MR."""
    if prediction.pipeline == "CT" and prediction.primary_role in _CT_WINDOWS:
        return _CT_WINDOWS[prediction.primary_role]
    values = np.concatenate([np.asarray(s.image, dtype=np.float64).ravel() for s in prediction.attention])
    low, high = np.percentile(values[np.isfinite(values)], [1.0, 99.5]) if values.size else (0.0, 1.0)
    return Window(centre=(low + high) / 2.0, width=max(high - low, 1.0))


@lru_cache(maxsize=8)
def bundled_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (scalable when Pillow has FreeType, else its bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ImportError):
        return ImageFont.load_default()


def caption_lines(prediction: Prediction, attention: AttentionSlice) -> list[str]:
    """The burned-in text of one capture (result, threshold, model, disclaimer, demo flag)."""
    model = prediction.model
    verdict = "likely" if prediction.positive else "unlikely"
    if model.calibrated:
        threshold = f"{100.0 * model.threshold:.0f}%"
    else:
        threshold = f"{model.threshold:.2f} (uncalibrated score)"
    lines = [
        result_text(prediction),
        f"FPE {verdict} at threshold {threshold}",
        f"Model {model.name} {model.version} ({model.variant})",
        f"Slice {attention.model_slice + 1} of {len(prediction.attention)}, weight {attention.slice_weight:.3f}",
        DISCLAIMER,
    ]
    if model.demonstration:
        lines.append(DEMO_WARNING)
    return lines


def _overlay(attention: AttentionSlice, window: Window) -> np.ndarray:
    """The source image in grey with the attention blended over it (rows x columns x 3)."""
    image = np.asarray(attention.image)
    heat = np.asarray(attention.heat, dtype=np.float32)
    if image.shape != heat.shape or image.ndim != 2:
        raise ValueError(f"attention slice {attention.model_slice}: image {image.shape} and heat {heat.shape} differ")
    grey = window.apply(image).astype(np.float32)[..., None]
    alpha = (MAX_ALPHA * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0))[..., None]
    blended = grey * (1.0 - alpha) + colour_map(heat).astype(np.float32) * alpha
    return (blended + 0.5).astype(np.uint8)


def render_slice(prediction: Prediction, attention: AttentionSlice, window: Window | None = None) -> np.ndarray:
    """One capture as RGB pixels: image + colour bar on top, text panel below.

    The image keeps the primary's native in-plane matrix (one pixel per source pixel); the
    canvas is widened, never the image scaled, when the text needs more room.
    """
    window = window or display_window(prediction)
    picture = _overlay(attention, window)
    rows, cols = picture.shape[:2]
    font_size = max(12, min(22, cols // 36))
    font = bundled_font(font_size)
    lines = caption_lines(prediction, attention)
    line_height = font_size + 4
    width = max(cols + _BAR_GAP + _BAR_WIDTH + _LABEL_ROOM, _MIN_WIDTH, _text_width(lines, font) + 2 * _MARGIN)
    height = rows + _MARGIN + line_height * len(lines) + _MARGIN
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(picture, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    _draw_colour_bar(canvas, draw, cols + _BAR_GAP, rows, bundled_font(max(10, font_size - 2)))
    y = rows + _MARGIN
    for index, line in enumerate(lines):
        colour = (255, 80, 80) if line in (DISCLAIMER, DEMO_WARNING) else (255, 255, 255)
        draw.text((_MARGIN, y + index * line_height), line, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _text_width(lines: Sequence[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(max(font.getbbox(line)[2] for line in lines))


def _draw_colour_bar(
    canvas: Image.Image, draw: ImageDraw.ImageDraw, left: int, height: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> None:
    """Vertical scale: high attention at the top, low at the bottom, labelled."""
    ramp = np.linspace(1.0, 0.0, max(height, 2))
    bar = np.repeat(colour_map(ramp)[:, None, :], _BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (left, 0))
    draw.text((left + _BAR_WIDTH + 2, 0), "high", fill=(255, 255, 255), font=font)
    draw.text((left + _BAR_WIDTH + 2, max(0, height - font.getbbox("low")[3] - 1)), "low", fill=(255, 255, 255), font=font)


def _patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of the row and column directions (PS3.3 C.7.6.1.1.1)."""

    def letters(vector: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
        chosen = [names[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 0.25]
        return "".join(chosen) or "L"

    return letters(orientation[:3]), letters(orientation[3:6])


def _reference_dataset(attention: AttentionSlice, headers: dict[str, Dataset], fallback: Dataset) -> Dataset:
    return headers.get(attention.source.sop_instance_uid, fallback)


def _source_image_item(attention: AttentionSlice) -> Dataset:
    """Source Image Sequence item (PS3.3 C.7.6.1.1.4): the source image this slice shows."""
    item = Dataset()
    item.ReferencedSOPClassUID = attention.source.sop_class_uid
    item.ReferencedSOPInstanceUID = attention.source.sop_instance_uid
    if attention.source.frame is not None:
        item.ReferencedFrameNumber = attention.source.frame
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def _contributing_equipment(context: ReportContext, prediction: Prediction) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=Std.PROCESSING_ALGORITHM,
        manufacturer_model_name=prediction.model.name,
        software_versions=[context.software_version, f"{prediction.model.name} {prediction.model.version}"],
        institution_name=context.institution_name,
        station_name=context.station_name,
        contribution_description="Attention map of a first-pass-effect prediction (research use)",
    )


def _series_description(prediction: Prediction) -> str:
    demo = " DEMO" if prediction.model.demonstration else ""
    return f"FPE attention map{demo} (research use, not for diagnosis)"[:64]


def _finish(ds: Dataset, prediction: Prediction, context: ReportContext) -> None:
    """Attributes the result objects share: burned-in text, derivation, research labels."""
    ds.BurnedInAnnotation = "YES"
    # The head is an unpaired body part (Image Laterality, General Image module PS3.3 C.7.6.1: U);
    # stating it satisfies the General Series Laterality condition (C.7.3.1).
    ds.ImageLaterality = "U"
    ds.RecognizableVisualFeatures = "NO"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = _series_description(prediction)
    ds.DerivationDescription = (
        f"Attention map of {prediction.model.name} {prediction.model.version} blended over the primary series; "
        "research use, not for diagnosis"
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
    attention: AttentionSlice,
    pixels: np.ndarray,
    reference: Dataset,
    uids: UIDFactory,
    context: ReportContext,
    series_uid: str,
    series_number: int,
) -> Dataset:
    orientation = _patient_orientation(attention.orientation_patient)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=uids.new(),
        instance_number=attention.model_slice + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_contributing_equipment(context, prediction)],
    )
    _finish(sc, prediction, context)
    sc.SourceImageSequence = DicomSequence([_source_image_item(attention)])
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
        ("SourceImageSequence", DicomSequence([_source_image_item(attention)])),
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
    ds.SourceImageSequence = DicomSequence([_source_image_item(a) for a in prediction.attention])
    ds.PixelData = stack.tobytes()
    return ds


def build_secondary_captures(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    uids: UIDFactory,
    context: ReportContext,
    *,
    multiframe: bool = False,
    series_uid: str | None = None,
    series_number: int = DEFAULT_SC_SERIES_NUMBER,
) -> list[Dataset]:
    """The attention-map captures of one prediction, a new series in the primary's study.

    Parameters
    ----------
    prediction:
        Must carry ``attention`` slices (one capture per model slice position).
    source_datasets:
        Headers of the primary series' images; the captures copy patient and study from the
        header of the first capture's source image (the first header when not found), type 2
        attributes it lacks written empty (:func:`reports.header.source_header`).
    uids, context:
        UID factory and the node's identity (see :mod:`reports.sr`).
    multiframe:
        One Multi-frame True Color SC instead of one single-frame SC per slice.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        Ready for ``save_as``; single-frame captures numbered by model slice (1-based).

    Raises
    ------
    ValueError
        When the prediction has no attention slices or no source header is given.
    """
    if not prediction.attention:
        raise ValueError("prediction has no attention slices: no secondary capture to build")
    if not source_datasets:
        raise ValueError("build_secondary_captures needs the headers of the primary series")
    headers = {required_uid(ds, "SOPInstanceUID"): ds for ds in source_datasets}
    window = display_window(prediction)
    series_uid = series_uid or uids.new()
    pixels = [render_slice(prediction, attention, window) for attention in prediction.attention]
    first = prediction.attention[0]
    reference = source_header(_reference_dataset(first, headers, source_datasets[0]))
    template = _single_frame(prediction, first, pixels[0], reference, uids, context, series_uid, series_number)
    captures = [template]
    for attention, rendered in zip(prediction.attention[1:], pixels[1:]):
        captures.append(_clone(template, attention, rendered, uids))
    if multiframe:
        captures = [_multiframe(prediction, pixels, captures[0], uids)]
    logger.info(
        "built %d secondary capture(s) in series %s for study %s", len(captures), series_uid, captures[0].StudyInstanceUID
    )
    return captures
