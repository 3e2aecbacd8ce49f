"""The pixels of the attention captures: what a reader sees at a glance, on a PACS or a phone.

Every capture of one prediction shares one **frame**: the box around the brain (the
preprocessing mask on the primary series, all slices together) plus a margin, sampled with
square pixels so that the brain is at least :data:`BRAIN_PIXELS` pixels across its narrower
side (:func:`capture_frame`). The source pixels are resampled into that frame (cubic B-spline,
modality values), then the display window is applied (:func:`display_window`: the source's own
VOI window for MR, the reading window of the role for CT).

The attention is drawn as *relative attention*: the map on the primary series' grid, 0 outside
the brain, divided by its maximum in this case (1 = the case's maximum, on every slice alike,
so that slices the classifier weighted little still show where they looked). Below
:data:`ATTENTION_FLOOR` nothing is drawn (the grey image shows through); above it the colour
fades in, its opacity rising linearly to :data:`MAX_ALPHA` at 1. No colour is ever drawn outside
the brain mask.

Below the image a text band (never more than the image's own area) gives the result, the
decision, the slice and its classifier weight, a labelled colour scale, the model and the
research-use warning; the slice where the attention peaks says so in its band and carries white
marks on the image's edges pointing at the peak. :func:`render_summary` lays the key slices out
in one row under the score, the decision and the warning (one image for a thumbnail or a phone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from inference.result import AttentionSlice, Prediction
from reports.sr import result_text

__all__ = [
    "ATTENTION_FLOOR",
    "BRAIN_PIXELS",
    "DEMO_WARNING",
    "DISCLAIMER",
    "MAX_ALPHA",
    "SCALE_LABEL",
    "CaptureFrame",
    "CapturePlane",
    "CaptureSet",
    "Window",
    "bundled_font",
    "caption_lines",
    "capture_frame",
    "attention_colour",
    "colour_map",
    "display_window",
    "key_slices",
]

DISCLAIMER = "NOT FOR DIAGNOSTIC USE - research only"
DEMO_WARNING = "DEMONSTRATION WEIGHTS - RESULT IS RANDOM"

ATTENTION_FLOOR = 0.2
"""Relative attention below this is not drawn (transparent)."""
MAX_ALPHA = 0.65
"""Opacity of the colour at relative attention 1."""
BRAIN_PIXELS = 544
"""The brain's narrower extent in a capture, in pixels (at least 512 for a viewing size)."""
MAX_SIDE = 1024
"""No capture image side exceeds this (a mask far from a head's shape gets fewer pixels)."""
MARGIN_FRACTION = 0.08
"""Room left around the brain on every side, as a fraction of its extent (the skull shows)."""
SCALE_LABEL = "relative attention (1 = maximum in this case)"
SUMMARY_SLICES = 3
"""Key slices in the summary capture."""
SUMMARY_TILE = 400

_PAD = 10
_WHITE = (255, 255, 255)
_RED = (255, 90, 90)
_YELLOW = (255, 215, 0)
_GREY = (190, 190, 190)

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
    """RGB (uint8) of values in [0, 1] on the blue-to-red scale (also the Parametric Map's palette)."""
    clipped = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return _LUT[(clipped * 255.0 + 0.5).astype(np.uint8)]


def attention_colour(values: np.ndarray) -> np.ndarray:
    """RGB (uint8) of relative attention: the whole blue-to-red scale spans [floor, 1] (the colour bar)."""
    level = (np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0) - ATTENTION_FLOOR) / (1.0 - ATTENTION_FLOOR)
    return colour_map(level)


def attention_alpha(values: np.ndarray) -> np.ndarray:
    """Opacity of the colour: 0 up to :data:`ATTENTION_FLOOR`, rising linearly to :data:`MAX_ALPHA` at 1."""
    level = (np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0) - ATTENTION_FLOOR) / (1.0 - ATTENTION_FLOOR)
    return (MAX_ALPHA * np.clip(level, 0.0, 1.0)).astype(np.float32)


@lru_cache(maxsize=16)
def bundled_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (scalable when Pillow has FreeType, else its bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ImportError):
        return ImageFont.load_default()


# --------------------------------------------------------------------------- window


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


# Brain window for non-contrast CT, a vessel window for CTA (HU): what a stroke reader looks at,
# whatever window the scanner stored (often a bone or a soft-tissue one).
_CT_WINDOWS = {"ncct": Window(40.0, 80.0), "cta": Window(150.0, 600.0)}


def _first_value(value: object) -> float | None:
    """First value of a (possibly multi-valued) DS, None when absent or not a number."""
    if value is None or value == "":
        return None
    try:
        first = value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value  # type: ignore[index]
        number = float(first)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def source_window(header: Dataset, frame: int | None = None) -> Window | None:
    """The VOI window the source image carries (PS3.3 C.11.2: first value of Window Center/Width).

    For a multi-frame (enhanced) image the Frame VOI LUT functional group of that frame
    (PS3.3 C.7.6.16.2.10), per-frame first, then shared. None when absent or when the width is
    not positive (the window is then not usable, C.11.2.1.2).
    """
    candidates: list[Dataset] = []
    if frame is not None:
        per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
        if 0 < frame <= len(per_frame):
            candidates.extend(per_frame[frame - 1].get("FrameVOILUTSequence") or [])
        for shared in header.get("SharedFunctionalGroupsSequence") or []:
            candidates.extend(shared.get("FrameVOILUTSequence") or [])
    candidates.append(header)
    for item in candidates:
        centre, width = _first_value(item.get("WindowCenter")), _first_value(item.get("WindowWidth"))
        if centre is not None and width is not None and width > 0:
            return Window(centre, width)
    return None


def _percentile_window(values: np.ndarray) -> Window:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return Window(0.5, 1.0)
    low, high = np.percentile(finite, [1.0, 99.5])
    return Window(centre=float(low + high) / 2.0, width=max(float(high - low), 1e-3))


def display_window(
    prediction: Prediction, headers: dict[str, Dataset] | None = None, brain: Sequence[np.ndarray] | None = None
) -> Window:
    """The window of the captures: one for every capture of the prediction.

    CT: the role's reading window (brain 40/80 HU for NCCT, 150/600 HU for CTA). MR: the VOI
    window of the source image the attention peaks on (else the first capture's source), as
    the reader sees it in the PACS; when the source has none, the 1st-99.5th percentiles of the
    shown planes inside the brain (``brain``: boolean masks of ``prediction.attention``'s planes).
    """
    if prediction.pipeline == "CT" and prediction.primary_role in _CT_WINDOWS:
        return _CT_WINDOWS[prediction.primary_role]
    if headers and prediction.attention:
        shown = prediction.peak.source if prediction.peak is not None else prediction.attention[0].source
        header = headers.get(shown.sop_instance_uid)
        window = source_window(header, shown.frame) if header is not None else None
        if window is not None:
            return window
    if not prediction.attention:
        return Window(0.5, 1.0)
    images = [np.asarray(s.image, dtype=np.float64) for s in prediction.attention]
    if brain is not None and any(np.any(m) for m in brain):
        return _percentile_window(np.concatenate([image[np.asarray(m, bool)] for image, m in zip(images, brain)]))
    return _percentile_window(np.concatenate([image.ravel() for image in images]))


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CapturePlane:
    """One model slice's plane of the primary series, as a capture shows it.

    ``image`` holds modality values, ``attention`` the relative attention (0 outside the brain,
    1 = the case's maximum) and ``brain`` the smoothed brain mask in [0, 1] (brain where it is at
    least 0.5, boolean masks are taken as 0 / 1), all on the source image's grid
    (rows x columns); ``pixel_spacing`` is (row spacing, column spacing) in mm.
    """

    attention_slice: AttentionSlice
    image: np.ndarray
    attention: np.ndarray
    brain: np.ndarray
    pixel_spacing: tuple[float, float]

    def __post_init__(self) -> None:
        shapes = {np.shape(self.image), np.shape(self.attention), np.shape(self.brain)}
        if len(shapes) != 1 or np.ndim(self.image) != 2:
            raise ValueError(
                f"capture plane of model slice {self.attention_slice.model_slice}: image, attention and brain "
                f"shapes differ or are not 2-D: {sorted(shapes)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.pixel_spacing):
            raise ValueError(f"capture plane pixel spacing must be positive, got {self.pixel_spacing}")

    def inside(self) -> np.ndarray:
        """The brain as a boolean mask on the source grid."""
        return np.asarray(self.brain, dtype=np.float32) >= 0.5


@dataclass(frozen=True)
class CaptureFrame:
    """Where a capture's image samples the source plane: square pixels of ``pixel_mm``.

    Picture pixel (i, j) shows source pixel coordinates (``top + i * row_step``,
    ``left + j * column_step``) (row, column, pixel centres, PS3.3 C.10.5.1.2).
    """

    top: float
    left: float
    row_step: float
    column_step: float
    rows: int
    columns: int
    pixel_mm: float

    def to_picture(self, row: float, column: float) -> tuple[float, float]:
        """Picture (row, column) of a source pixel position."""
        return (row - self.top) / self.row_step, (column - self.left) / self.column_step

    def resample(self, array: np.ndarray, *, cubic: bool, outside: float) -> np.ndarray:
        """``array`` (source grid) resampled into the frame: cubic convolution or linear (Pillow).

        Pillow places pixel centres at +0.5 (its coordinates run along pixel edges), so picture
        pixel i, centred on source coordinate ``top + i * row_step``, spans the box edges
        ``top + 0.5 - row_step / 2 + i * row_step``; the source is padded with ``outside`` so that
        the box never leaves it.
        """
        source = np.asarray(array, dtype=np.float32)
        top_edge = self.top + 0.5 - self.row_step / 2.0
        left_edge = self.left + 0.5 - self.column_step / 2.0
        bottom_edge = top_edge + self.rows * self.row_step
        right_edge = left_edge + self.columns * self.column_step
        pad = int(math.ceil(max(0.0, -top_edge, -left_edge, bottom_edge - source.shape[0],
                                right_edge - source.shape[1]))) + 3
        padded = np.pad(source, pad, mode="constant", constant_values=np.float32(outside))
        box = (left_edge + pad, top_edge + pad, right_edge + pad, bottom_edge + pad)
        method = Image.Resampling.BICUBIC if cubic else Image.Resampling.BILINEAR
        resized = Image.fromarray(padded, mode="F").resize((self.columns, self.rows), method, box=box)
        return np.asarray(resized, dtype=np.float32)


def _bounds(masks: Sequence[np.ndarray]) -> tuple[int, int, int, int] | None:
    union = np.zeros(np.shape(masks[0]), dtype=bool)
    for mask in masks:
        union |= np.asarray(mask, dtype=bool)
    if not union.any():
        return None
    rows = np.flatnonzero(union.any(axis=1))
    columns = np.flatnonzero(union.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])


def capture_frame(planes: Sequence[CapturePlane]) -> CaptureFrame:
    """The frame every capture of a prediction shares (module docstring).

    The box around the brain of all planes (the whole plane when no plane has brain), widened
    by :data:`MARGIN_FRACTION` on each side, sampled with square pixels such that the brain's
    narrower extent is :data:`BRAIN_PIXELS` pixels; no side longer than :data:`MAX_SIDE`.
    """
    if not planes:
        raise ValueError("no capture planes: nothing to frame")
    shape = np.shape(planes[0].image)
    if any(np.shape(p.image) != shape for p in planes):
        raise ValueError("capture planes of one prediction must share one grid")
    row_mm, column_mm = planes[0].pixel_spacing
    bounds = _bounds([p.inside() for p in planes]) or (0, shape[0] - 1, 0, shape[1] - 1)
    first_row, last_row, first_column, last_column = bounds
    height_mm = (last_row - first_row + 1) * row_mm
    width_mm = (last_column - first_column + 1) * column_mm
    margin_mm = MARGIN_FRACTION * max(height_mm, width_mm)
    box_height, box_width = height_mm + 2 * margin_mm, width_mm + 2 * margin_mm
    pixel_mm = min(height_mm, width_mm) / BRAIN_PIXELS
    pixel_mm = max(pixel_mm, max(box_height, box_width) / MAX_SIDE)
    rows = max(1, int(round(box_height / pixel_mm)))
    columns = max(1, int(round(box_width / pixel_mm)))
    # Centre the sampled box on the brain's box (source pixel centres).
    centre_row = (first_row + last_row) / 2.0
    centre_column = (first_column + last_column) / 2.0
    row_step, column_step = pixel_mm / row_mm, pixel_mm / column_mm
    return CaptureFrame(
        top=centre_row - (rows - 1) / 2.0 * row_step,
        left=centre_column - (columns - 1) / 2.0 * column_step,
        row_step=row_step,
        column_step=column_step,
        rows=rows,
        columns=columns,
        pixel_mm=pixel_mm,
    )


# --------------------------------------------------------------------------- text


def _threshold_text(prediction: Prediction) -> str:
    model = prediction.model
    return f"{100.0 * model.threshold:.0f}%" if model.calibrated else f"{model.threshold:.2f} (uncalibrated score)"


def decision_text(prediction: Prediction) -> str:
    """The decision in words, e.g. ``FPE likely at threshold 50%``."""
    verdict = "likely" if prediction.positive else "unlikely"
    return f"FPE {verdict} at threshold {_threshold_text(prediction)}"


def slice_text(prediction: Prediction, attention: AttentionSlice) -> str:
    """Which slice this is, its classifier weight, and where the attention peaks."""
    total = len(prediction.attention)
    text = f"Slice {attention.model_slice + 1} of {total}, slice weight {attention.slice_weight:.3f}"
    peak = prediction.peak
    if peak is not None and peak.model_slice == attention.model_slice:
        return f"{text} - PEAK ATTENTION"
    if peak is not None:
        return f"{text} (peak: slice {peak.model_slice + 1})"
    return text


def caption_lines(prediction: Prediction, attention: AttentionSlice) -> list[str]:
    """The burned-in text lines of one capture (the colour scale is drawn between them)."""
    model = prediction.model
    lines = [
        result_text(prediction),
        decision_text(prediction),
        slice_text(prediction, attention),
        f"Model {model.name} {model.version} ({model.variant})",
        DISCLAIMER,
    ]
    if model.demonstration:
        lines.append(DEMO_WARNING)
    return lines


def _line_colour(line: str) -> tuple[int, int, int]:
    if line in (DISCLAIMER, DEMO_WARNING):
        return _RED
    if line.endswith("PEAK ATTENTION"):
        return _YELLOW
    return _WHITE


def _fitted_font(text: str, width: int, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The bundled font at ``size``, smaller when ``text`` would not fit ``width`` pixels."""
    while size > 10 and bundled_font(size).getbbox(text)[2] > width:
        size -= 1
    return bundled_font(size)


def _bar_height(size: int) -> int:
    return max(10, size // 2 + 4)


def _scale_height(size: int) -> int:
    """Height :func:`_draw_scale` takes at font ``size``: title, bar, tick labels, note."""
    return size + 4 + _bar_height(size) + 5 + 2 * size + 2


def _draw_scale(draw: ImageDraw.ImageDraw, canvas: Image.Image, left: int, top: int, width: int, size: int) -> int:
    """The labelled colour scale (floor .. 1) at (left, top); returns the height it took."""
    font = bundled_font(max(10, size - 4))
    title = _fitted_font(f"Colour: {SCALE_LABEL}", width, max(10, size - 2))
    draw.text((left, top), f"Colour: {SCALE_LABEL}", fill=_WHITE, font=title)
    top += size + 4
    bar_height = _bar_height(size)
    levels = np.linspace(ATTENTION_FLOOR, 1.0, max(width, 2))
    bar = np.repeat(attention_colour(levels)[None, :, :], bar_height, axis=0)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (left, top))
    ticks = (ATTENTION_FLOOR, 0.5, 0.75, 1.0)
    for value in ticks:
        x = left + int(round((value - ATTENTION_FLOOR) / (1.0 - ATTENTION_FLOOR) * (width - 1)))
        draw.line([(x, top + bar_height), (x, top + bar_height + 4)], fill=_WHITE, width=1)
        label = f"{value:g}"
        label_width = font.getbbox(label)[2]
        draw.text((min(max(left, x - label_width // 2), left + width - label_width), top + bar_height + 5), label,
                  fill=_WHITE, font=font)
    note = f"below {ATTENTION_FLOOR:g}: not coloured; no colour outside the brain"
    draw.text((left, top + bar_height + 5 + size), note, fill=_GREY, font=_fitted_font(note, width, max(10, size - 4)))
    return _scale_height(size)


# --------------------------------------------------------------------------- captures


class CaptureSet:
    """The planes, frame and window of one prediction's captures; renders each capture.

    Parameters
    ----------
    prediction:
        Carries the attention slices (one capture each).
    planes:
        The :class:`CapturePlane` of every attention slice, in the same order.
    window:
        The display window (:func:`display_window`).
    """

    def __init__(self, prediction: Prediction, planes: Sequence[CapturePlane], window: Window) -> None:
        if len(planes) != len(prediction.attention):
            raise ValueError(f"{len(planes)} capture planes for {len(prediction.attention)} attention slices")
        self.prediction = prediction
        self.planes = tuple(planes)
        self.window = window
        self.frame = capture_frame(self.planes)
        self.font_size = max(14, min(30, self.frame.columns // 28))

    def plane_of(self, attention: AttentionSlice) -> CapturePlane:
        """The capture plane of one of the prediction's attention slices."""
        for plane in self.planes:
            if plane.attention_slice.model_slice == attention.model_slice:
                return plane
        raise ValueError(f"model slice {attention.model_slice} is not one of this prediction's captures")

    def brain_in_picture(self, plane: CapturePlane) -> np.ndarray:
        """The brain in the picture's pixels, where colour may go: the mask interpolated linearly
        into the frame and taken at 0.5 (a smooth edge, not the source pixels' staircase)."""
        return self.frame.resample(np.asarray(plane.brain, dtype=np.float32), cubic=False, outside=0.0) >= 0.5

    def picture(self, plane: CapturePlane) -> np.ndarray:
        """The image part of a capture (rows x columns x 3): source in grey, attention in colour."""
        frame = self.frame
        low = self.window.centre - self.window.width
        image = frame.resample(plane.image, cubic=True, outside=low)
        grey = self.window.apply(image).astype(np.float32)[..., None]
        attention = frame.resample(plane.attention, cubic=False, outside=0.0)
        alpha = attention_alpha(attention) * self.brain_in_picture(plane)
        blended = grey * (1.0 - alpha[..., None]) + attention_colour(attention).astype(np.float32) * alpha[..., None]
        picture = np.repeat((grey + 0.5).astype(np.uint8), 3, axis=-1)
        coloured = alpha > 0
        picture[coloured] = (blended[coloured] + 0.5).astype(np.uint8)
        return picture

    def _mark_peak(self, draw: ImageDraw.ImageDraw, plane: CapturePlane) -> None:
        """White marks on the picture's four edges pointing at the attention peak (peak slice only)."""
        peak = self.prediction.peak
        if peak is None or peak.model_slice != plane.attention_slice.model_slice:
            return
        row, column = self.frame.to_picture(peak.row, peak.column)
        if not (0 <= row < self.frame.rows and 0 <= column < self.frame.columns):
            return
        size = max(8, self.frame.columns // 40)
        last_row, last_column = self.frame.rows - 1, self.frame.columns - 1
        marks = [
            [(column - size, 0), (column + size, 0), (column, size * 1.6)],
            [(column - size, last_row), (column + size, last_row), (column, last_row - size * 1.6)],
            [(0, row - size), (0, row + size), (size * 1.6, row)],
            [(last_column, row - size), (last_column, row + size), (last_column - size * 1.6, row)],
        ]
        for triangle in marks:
            draw.polygon(triangle, fill=_WHITE, outline=(0, 0, 0))

    def band_height(self, lines: Sequence[str]) -> int:
        """Height of the text band below the picture."""
        line_height = self.font_size + 8
        return 2 * _PAD + line_height * len(lines) + _scale_height(self.font_size) + _PAD

    def capture(self, attention: AttentionSlice) -> np.ndarray:
        """One capture (RGB): the picture on top, the text band with the colour scale below."""
        plane = self.plane_of(attention)
        picture = self.picture(plane)
        lines = caption_lines(self.prediction, attention)
        width = self.frame.columns
        canvas = Image.new("RGB", (width, self.frame.rows + self.band_height(lines)), (0, 0, 0))
        canvas.paste(Image.fromarray(picture, mode="RGB"), (0, 0))
        draw = ImageDraw.Draw(canvas)
        self._mark_peak(draw, plane)
        y = self.frame.rows + _PAD
        text_width = width - 2 * _PAD
        line_height = self.font_size + 8
        for index, line in enumerate(lines):
            if index == 2:  # the colour scale after result, decision
                y += _PAD // 2
                y += _draw_scale(draw, canvas, _PAD, y, text_width, self.font_size) + _PAD // 2
            draw.text((_PAD, y), line, fill=_line_colour(line), font=_fitted_font(line, text_width, self.font_size))
            y += line_height
        return np.asarray(canvas, dtype=np.uint8)

    # -- summary ----------------------------------------------------------------------------

    def summary(self, count: int = SUMMARY_SLICES) -> np.ndarray:
        """The summary capture (RGB): result, decision and warning above the key slices in a row."""
        chosen = sorted(key_slices(self.prediction, count), key=lambda s: s.model_slice)
        tile_width = SUMMARY_TILE
        tile_height = max(1, int(round(tile_width * self.frame.rows / self.frame.columns)))
        width = len(chosen) * tile_width + (len(chosen) + 1) * _PAD
        big, medium, small = 44, 30, 24
        header = [(result_text(self.prediction), big, _WHITE), (decision_text(self.prediction), medium, _WHITE),
                  (DISCLAIMER, medium, _RED)]
        if self.prediction.model.demonstration:
            header.append((DEMO_WARNING, medium, _RED))
        header_height = _PAD + sum(size + 12 for _, size, _ in header)
        label_height = small + 14
        scale_height = _scale_height(small) + _PAD
        height = header_height + label_height + tile_height + 2 * _PAD + scale_height
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        y = _PAD
        for text, size, colour in header:
            draw.text((_PAD, y), text, fill=colour, font=_fitted_font(text, width - 2 * _PAD, size))
            y += size + 12
        peak = self.prediction.peak
        for index, attention in enumerate(chosen):
            left = _PAD + index * (tile_width + _PAD)
            is_peak = peak is not None and peak.model_slice == attention.model_slice
            label = f"Slice {attention.model_slice + 1} of {len(self.prediction.attention)}" + (" - PEAK" if is_peak else "")
            draw.text((left, y), label, fill=_YELLOW if is_peak else _WHITE, font=_fitted_font(label, tile_width, small))
            tile = Image.fromarray(self.picture(self.plane_of(attention)), mode="RGB")
            canvas.paste(tile.resize((tile_width, tile_height), Image.Resampling.LANCZOS), (left, y + label_height))
            if is_peak:
                draw.rectangle([left - 3, y + label_height - 3, left + tile_width + 2, y + label_height + tile_height + 2],
                               outline=_YELLOW, width=3)
        y += label_height + tile_height + 2 * _PAD
        _draw_scale(draw, canvas, _PAD, y, min(width - 2 * _PAD, 2 * tile_width), small)
        return np.asarray(canvas, dtype=np.uint8)


def _weighted_attention(attention: AttentionSlice) -> float:
    """How much a slice mattered: its strongest relative attention times its slice weight."""
    own = attention.relative_attention if attention.relative_attention is not None else attention.heat
    return float(np.max(own)) * max(attention.slice_weight, 1e-9)


def key_slices(prediction: Prediction, count: int = 4) -> list[AttentionSlice]:
    """The slices that mattered most (attention x slice weight), the peak slice first, then in slice order.

    One slice per source image: model slices beyond the series' ends (or closer together than
    its planes) share a source image, and a key image is not shown twice.
    """
    if not prediction.attention:
        return []
    ranked = sorted(prediction.attention, key=lambda s: (-_weighted_attention(s), s.model_slice))
    if prediction.peak is not None:
        peak = next((s for s in prediction.attention if s.model_slice == prediction.peak.model_slice), None)
        if peak is not None:
            ranked = [peak] + [s for s in ranked if s is not peak]
    chosen: list[AttentionSlice] = []
    for candidate in ranked:
        if all(candidate.source != s.source for s in chosen):
            chosen.append(candidate)
        if len(chosen) == count:
            break
    return [chosen[0], *sorted(chosen[1:], key=lambda s: s.model_slice)]
