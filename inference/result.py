"""What the inference package hands to the rest of the node: the prediction and its evidence.

These types are the contract between ``inference`` (which fills them) and ``reports`` /
``dicom_node`` (which turn them into DICOM objects and index rows). They hold plain values and
numpy arrays only: no datasets, sockets or database objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Pipeline = Literal["CT", "MR"]
Role = Literal["ncct", "cta", "dwi", "adc", "flair"]


@dataclass(frozen=True)
class SourceInstance:
    """One source image the prediction used (evidence for the SR)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None  # 1-based frame number for multi-frame images


@dataclass(frozen=True)
class SourcePlane:
    """Geometry of one source image plane of the primary series, as acquired.

    The values of ImagePositionPatient (0020,0032), ImageOrientationPatient (0020,0037) and
    PixelSpacing (0028,0030) of the plane (PS3.3 C.7.6.2), kept even where the volume the
    model saw was resampled (gantry tilt, uneven spacing), so results can be drawn on the
    series a viewer shows.
    """

    source: SourceInstance
    position_patient: tuple[float, float, float]  # centre of the first (top left) pixel, mm
    orientation_patient: tuple[float, float, float, float, float, float]  # row then column cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm, as PixelSpacing
    rows: int
    columns: int


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced a prediction (from its checkpoint card)."""

    name: str
    version: str
    variant: str  # "nonlocal" or "plain"
    weights_sha256: str
    calibrated: bool  # the score is a calibrated probability only when True
    threshold: float
    demonstration: bool  # untrained demonstration weights: every output says so
    precision: str = "fp32"  # the precision the model ran in (fp32, bf16, fp16), not only the one it was validated in
    recipe_from_checkpoint: bool = True  # False: original checkpoint, default recipe applied


@dataclass(frozen=True)
class AttentionSlice:
    """One model slice position mapped back onto the primary series.

    ``image`` is the primary series resampled at the model slice position, at the primary's
    native in-plane resolution (rows x columns, in modality units: HU for CT). ``heat`` is the
    attention map on the same grid, scaled to [0, 1].
    """

    model_slice: int  # 0 .. n_slices-1
    source: SourceInstance  # nearest source image of the primary series
    image: np.ndarray
    heat: np.ndarray
    position_patient: tuple[float, float, float]  # ImagePositionPatient of the resampled plane
    orientation_patient: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slice_weight: float  # softmax weight of this slice in the classifier
    # On the same grid as ``image`` (inference.predictor.capture_views), None when not computed:
    # the smoothed brain mask in [0, 1] (brain where >= 0.5), and this slice's own attention (Grad-CAM not scaled by the slice
    # weight), smoothed, 0 outside the brain, 1 = the maximum over the case's model slices.
    brain: np.ndarray | None = field(default=None, repr=False, compare=False)
    relative_attention: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class AttentionPeak:
    """Where the attention map peaks, for the image-anchored SR measurement group."""

    model_slice: int
    source: SourceInstance  # the source image the peak lies on
    row: float
    column: float
    # Closed outline of the hot spot on that source image, (column, row) pixel coordinates
    # as SCOORD POLYLINE needs them (PS3.3 C.18.6), first point repeated last.
    outline: tuple[tuple[float, float], ...]
    region: str  # human-readable, e.g. "left hemisphere, slice 12 of 25"


@dataclass(frozen=True)
class Prediction:
    """A first-pass-effect prediction for one case."""

    pipeline: Pipeline
    score: float  # calibrated probability when model.calibrated, else an uncalibrated score in [0, 1]
    positive: bool  # score >= model.threshold: FPE likely
    model: ModelInfo
    primary_role: Role
    series_used: dict[str, str]  # role -> SeriesInstanceUID
    sources: tuple[SourceInstance, ...]  # every source instance used
    attention: tuple[AttentionSlice, ...] = ()
    peak: AttentionPeak | None = None
    logit: float | None = None
    aux_scores: tuple[float, ...] = ()
    slice_weights: tuple[float, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # e.g. "ADC computed from b0 and trace", "default recipe applied"
    # The attention on every source plane of the primary series (inference.attention.source_attention):
    # float32 (len(source_planes), rows, columns), 0 outside the brain mask, 1 = this case's maximum.
    source_attention: np.ndarray | None = field(default=None, repr=False, compare=False)
    source_planes: tuple[SourcePlane, ...] = ()  # the primary series' planes, ordered along the normal


@dataclass(frozen=True)
class NotAnalysed:
    """A case that could not be analysed, with the reason a radiologist can read."""

    reason: str
    pipeline: Pipeline | None = None
    series_used: dict[str, str] = field(default_factory=dict)
    sources: tuple[SourceInstance, ...] = ()
    warnings: tuple[str, ...] = ()
