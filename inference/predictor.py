"""Pre-process, predict, post-process: one case's volumes in, a :class:`Prediction` out.

The :class:`Predictor` holds the model, loaded once (from a checkpoint or the deterministic
demonstration weights), in ``eval()`` mode on the device its settings name, and the recipe its
checkpoint carries (or the default recipe, which every result then mentions). For each case:

1. **pre-process**: :func:`inference.preprocess.preprocess_case` with that recipe;
2. **predict**: one forward pass under ``torch.inference_mode()`` that also returns the
   ``layer4`` feature maps; the logit becomes the score through the card's calibration,
   ``positive`` when ``score >= threshold``;
3. **post-process**: the attention map (slice weights x Grad-CAM, :mod:`inference.attention`)
   explaining the reported decision (FPE likely or unlikely), from the ``layer4`` maps of that
   one forward pass (only the network's head is differentiated), is mapped back onto the
   primary series. For each model slice the *nearest plane of the primary volume* is taken as it is (native in-plane resolution, modality units) and the map is
   resampled onto that plane, so every :class:`AttentionSlice` is in the pixel space of a real
   source image (PS3.3 C.10.5.1.2 image coordinates), which the secondary captures need. The
   map is also put on *every* acquired plane of the primary series, smooth and masked to the
   brain (``Prediction.source_attention``, :func:`inference.attention.source_attention`); the
   :class:`AttentionPeak` is its maximum, outlined by a smooth closed iso-line at half the peak
   on that source plane (:func:`source_peak`) for the SR's SCOORD and the overlays.

Anything that makes the case unusable becomes :class:`NotAnalysed` with a reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inference.attention import (
    AttentionMap,
    attention_from_features,
    attention_map,
    brain_level,
    combine,
    grid_image,
    hot_region_outline,
    iso_contour,
    peak,
    plane_reference,
    planes_of_image,
    smoothed_mask,
    source_attention,
    to_image_coordinates,
)
from inference.memory import keep_freed_memory
from inference.model.calibration import sigmoid
from inference.model.checkpoint import DEFAULT_RECIPE_NOTE, LoadedModel, load_model
from inference.model.res25 import Res25Output
from inference.model.precision import PrecisionSetting, serving_precision
from inference.model.runtime import DevicePreference, prepare, run, select_device
from inference.preprocess import ModelGrid, PreprocessedCase, PreprocessingError, RoleVolume, preprocess_case
from inference.recipe import DEFAULT_RECIPE, Recipe
from inference.result import (
    AttentionPeak,
    AttentionSlice,
    NotAnalysed,
    Pipeline,
    Prediction,
    Role,
    SourceInstance,
    SourcePlane,
)

log = logging.getLogger(__name__)

PEAK_FRACTION = 0.5  # the hot region outlined around the peak: at least half its value
STAGES = ("load", "decode", "select", "volume", "register", "preprocess", "infer", "attention")


@dataclass(frozen=True)
class CaseInput:
    """One case ready for the predictor: the volume of each role, and what came before."""

    pipeline: Pipeline
    volumes: Mapping[Role, RoleVolume]
    warnings: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)  # load, decode, select, volume


@dataclass(frozen=True)
class MappedAttention:
    """The attention map on the primary series: one slice per model slice, and its peak."""

    slices: tuple[AttentionSlice, ...]
    peak: AttentionPeak | None


class Predictor:
    """The served model with its recipe; build once per worker process, call per case.

    Parameters
    ----------
    loaded:
        Network and card from :func:`inference.model.checkpoint.load_model`.
    device:
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    precision:
        The setting ``inference.precision``: ``auto``, ``fp32`` or ``bf16``
        (:func:`inference.model.precision.serving_precision`: on CUDA the card's precision, on
        a CPU with native bf16 bf16 when the card's bf16 check changed no decision, else fp32).
        Every :class:`Prediction` names the precision that ran (``model.precision``).

    Raises
    ------
    PrecisionSettingError
        ``precision`` is bf16 where this machine has no native bf16 (the message names
        ``inference.precision``).
    """

    def __init__(self, loaded: LoadedModel, *, device: DevicePreference = "cpu",
                 precision: PrecisionSetting = "auto") -> None:
        self.card = loaded.card
        self.notes = loaded.notes
        self.recipe = self.recipe_of(loaded)
        self.device = select_device(device)
        choice = serving_precision(precision, self.card, self.device)
        self.precision = choice.precision
        log.info("serving %s %s on %s in %s (%s)", self.card.name, self.card.version, self.device.type,
                 choice.precision, choice.reason)
        self.model = prepare(loaded.model, self.device)
        self.model_info = self.card.model_info(precision=self.precision)

    @classmethod
    def load(
        cls,
        checkpoint: Path | None,
        *,
        device: DevicePreference = "auto",
        precision: PrecisionSetting = "auto",
        torch_threads: int = 0,
        keep_memory: bool = True,
    ) -> "Predictor":
        """Load the configured checkpoint (None: demonstration weights) once.

        ``precision``: the setting ``inference.precision`` (see the class).

        ``torch_threads`` > 0 sets torch's intra-op threads for this process (0 keeps torch's default).
        ``keep_memory``: the process keeps the memory it frees for the next case
        (:func:`inference.memory.keep_freed_memory`; a serving process predicts many cases).
        """
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if keep_memory:
            keep_freed_memory()
        return cls(load_model(checkpoint), device=device, precision=precision)

    @staticmethod
    def recipe_of(loaded: LoadedModel) -> Recipe:
        """The recipe a loaded model is served with: its card's, else the default on the card's grid."""
        card = loaded.card
        recipe = Recipe.from_dict(card.recipe) if card.recipe is not None else DEFAULT_RECIPE.with_grid(card.grid)
        if tuple(recipe.grid) != tuple(card.grid):
            raise ValueError(f"checkpoint recipe grid {recipe.grid} differs from the model card's grid {card.grid}")
        return recipe

    # -- the three steps ---------------------------------------------------------------------

    def predict(self, case: CaseInput) -> Prediction | NotAnalysed:
        """Pre-process, predict and post-process one case."""
        timings = dict(case.timings_s)
        warnings = list(case.warnings) + list(self.notes)
        if not self.model_info.recipe_from_checkpoint and DEFAULT_RECIPE_NOTE not in warnings:
            warnings.append(DEFAULT_RECIPE_NOTE)
        series_used: dict[str, str] = {role: volume.series_uid for role, volume in case.volumes.items()}
        sources = _all_sources(case.volumes)
        try:
            prepared = preprocess_case(case.volumes, self.recipe, case.pipeline)
        except PreprocessingError as exc:
            return NotAnalysed(str(exc), case.pipeline, series_used, sources, tuple(dict.fromkeys(warnings)))
        timings.update(prepared.timings_s)
        warnings.extend(prepared.warnings)

        started = time.perf_counter()
        volume = torch.from_numpy(prepared.tensor).unsqueeze(0).to(self.device)
        output = run(self.model, volume, self.device, self.precision, return_features=True)
        timings["infer"] = time.perf_counter() - started

        started = time.perf_counter()
        logit = float(output.logits[0, 0])
        score = self.card.calibration.apply(logit)
        positive = score >= self.card.threshold
        attention = self._attention(volume, output, 1.0 if positive else -1.0)
        primary = case.volumes[self.recipe.for_pipeline(case.pipeline).primary_role]
        mapped = map_attention(attention.heat, attention.slice_weights, prepared.grid, primary)
        planes = primary_planes(primary)
        on_source = self._on_source(attention, prepared, planes)
        shown = capture_views(attention, prepared, primary, mapped.slices, self.recipe.mask_spacing_mm)
        located = source_peak(on_source, planes, prepared.grid) if on_source is not None else None
        timings["attention"] = time.perf_counter() - started
        if not mapped.slices:
            warnings.append("no source images (NIfTI input): attention map not mapped onto a series")

        return Prediction(
            pipeline=case.pipeline,
            score=score,
            positive=positive,
            model=self.model_info,
            primary_role=primary.role,
            series_used=series_used,
            sources=sources,
            attention=shown,
            peak=located or mapped.peak,
            source_attention=on_source,
            source_planes=planes if on_source is not None else (),
            logit=logit,
            aux_scores=tuple(sigmoid(float(v)) for v in output.aux_logits[0]),
            slice_weights=tuple(float(v) for v in output.slice_weights[0]),
            timings_s={stage: round(timings[stage], 4) for stage in STAGES if stage in timings},
            warnings=tuple(dict.fromkeys(warnings)),
        )

    def _attention(self, volume: torch.Tensor, output: Res25Output, target_sign: float) -> AttentionMap:
        """Grad-CAM explaining the reported decision (``target_sign`` +1: FPE likely, -1: unlikely).

        When the forward pass returned the ``layer4`` maps, only the head is differentiated from
        them; a model that returns none (an ensemble's mean has no single set of maps) runs
        :func:`inference.attention.attention_map` on the volume instead.
        """
        if output.features is not None:
            features = output.features.to(self.device)
            _, attention = attention_from_features(
                self.model, features, (volume.shape[3], volume.shape[4]), target_sign=target_sign
            )
        else:
            _, attention = attention_map(self.model, volume, target_sign=target_sign, precision=self.precision)
        return attention

    def _on_source(self, attention: AttentionMap, prepared: PreprocessedCase,
                   planes: tuple[SourcePlane, ...]) -> np.ndarray | None:
        """The attention on the primary's source planes (:func:`inference.attention.source_attention`).

        None without source planes (NIfTI input) or without the preprocessing mask.
        """
        if not planes or prepared.mask_image is None:
            return None
        columns, rows, _ = prepared.grid.size
        smooth = combine(attention.slice_weights, attention.cam, (rows, columns), mode="bicubic")
        heat = grid_image(smooth, prepared.grid.origin, prepared.grid.spacing)
        brain = smoothed_mask(prepared.mask_image, self.recipe.mask_spacing_mm)
        return source_attention(heat, brain, planes)

    def preprocess(self, case: CaseInput) -> PreprocessedCase:
        """The model input of a case under this predictor's recipe (for inspection and training)."""
        return preprocess_case(case.volumes, self.recipe, case.pipeline)


# --------------------------------------------------------------------------- post-processing


def _all_sources(volumes: Mapping[Role, RoleVolume]) -> tuple[SourceInstance, ...]:
    """Every source instance of every role, each once, primary roles' order kept."""
    seen: dict[tuple[str, int | None], SourceInstance] = {}
    for volume in volumes.values():
        for source in volume.slice_sources:
            if source is not None:
                seen.setdefault((source.sop_instance_uid, source.frame), source)
    return tuple(seen.values())


def primary_planes(primary: RoleVolume) -> tuple[SourcePlane, ...]:
    """The primary's acquired planes; its own slices when those are not known; () without sources."""
    if primary.source_planes:
        return primary.source_planes
    if not primary.slice_sources or any(s is None for s in primary.slice_sources):
        return ()
    return planes_of_image(primary.image, [s for s in primary.slice_sources if s is not None])


def _heat_image(heat: np.ndarray, grid: ModelGrid) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(heat, dtype=np.float32))
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    return image


def _plane_geometry(image: sitk.Image, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Position of the first voxel of plane ``k`` and the 3x3 direction matrix."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, int(k))), dtype=float)
    return position, direction


def nearest_plane(image: sitk.Image, point: np.ndarray) -> int:
    """Index of the plane (third axis) of ``image`` nearest to ``point`` along its normal."""
    continuous = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
    return int(min(max(round(continuous[2]), 0), image.GetSize()[2] - 1))


def _plane_reference(image: sitk.Image, k: int) -> sitk.Image:
    size = image.GetSize()
    reference = sitk.Image([size[0], size[1], 1], sitk.sitkFloat32)
    position, _ = _plane_geometry(image, k)
    reference.SetOrigin(tuple(position))
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    return reference


def map_attention(
    heat: np.ndarray, slice_weights: np.ndarray, grid: ModelGrid, primary: RoleVolume
) -> MappedAttention:
    """Map the model-grid attention map onto the primary series (see the module docstring).

    Returns no slices when the primary volume has no source images (NIfTI).
    """
    if not primary.slice_sources or any(s is None for s in primary.slice_sources):
        return MappedAttention((), None)
    heat_image = _heat_image(heat, grid)
    array = sitk.GetArrayViewFromImage(primary.image)
    spacing = primary.image.GetSpacing()
    columns, rows, _ = grid.size
    centre_xy = (grid.origin[0] + (columns - 1) * grid.spacing[0] / 2.0, grid.origin[1] + (rows - 1) * grid.spacing[1] / 2.0)
    slices = []
    for model_slice in range(heat.shape[0]):
        point = np.array([centre_xy[0], centre_xy[1], grid.slice_centre_z(model_slice)])
        k = nearest_plane(primary.image, point)
        plane_heat = sitk.Resample(heat_image, _plane_reference(primary.image, k), sitk.Euler3DTransform(), sitk.sitkLinear, 0.0)
        position, direction = _plane_geometry(primary.image, k)
        source = primary.slice_sources[k]
        assert source is not None
        slices.append(
            AttentionSlice(
                model_slice=model_slice,
                source=source,
                image=np.array(array[k], dtype=np.float32),
                heat=np.clip(sitk.GetArrayFromImage(plane_heat)[0], 0.0, 1.0),
                position_patient=(float(position[0]), float(position[1]), float(position[2])),
                orientation_patient=tuple(float(v) for v in (*direction[:, 0], *direction[:, 1])),  # type: ignore[arg-type]
                pixel_spacing=(float(spacing[1]), float(spacing[0])),
                slice_weight=float(slice_weights[model_slice]),
            )
        )
    return MappedAttention(tuple(slices), _peak(heat, slices, centre_xy[0]))


def capture_views(
    attention: AttentionMap,
    prepared: PreprocessedCase,
    primary: RoleVolume,
    slices: Sequence[AttentionSlice],
    mask_spacing_mm: float,
) -> tuple[AttentionSlice, ...]:
    """The attention slices with their brain mask and their own relative attention (the captures').

    The brain is the smoothed preprocessing mask interpolated on the slice's plane (in [0, 1],
    brain where >= 0.5, the rule of :func:`inference.attention.source_attention`), so that a
    capture can draw its edge at its own resolution.
    Each model slice's Grad-CAM is taken *without* its slice weight (the weight would leave the
    slices the classifier weighted little blank; the captures print it instead), upsampled
    bicubically, sampled on the slice's plane of the primary and masked to the brain exactly as
    :func:`inference.attention.source_attention` does, then divided by the maximum over the model
    slices: one shared scale, 1 = the strongest attention of this case. Both arrays are float16
    (for display; they travel from the worker process with the result). The slices come back
    unchanged without the preprocessing mask.
    """
    if not slices or prepared.mask_image is None or any(s is None for s in primary.slice_sources):
        return tuple(slices)
    columns, rows, _ = prepared.grid.size
    own = combine(np.ones_like(attention.slice_weights), attention.cam, (rows, columns), mode="bicubic")
    heat = grid_image(own, prepared.grid.origin, prepared.grid.spacing)
    brain = smoothed_mask(prepared.mask_image, mask_spacing_mm)
    volume_planes = planes_of_image(primary.image, [s for s in primary.slice_sources if s is not None])
    chosen = [volume_planes[nearest_plane(primary.image, np.asarray(s.position_patient))] for s in slices]
    values = source_attention(heat, brain, chosen)
    return tuple(
        replace(view, brain=brain_level(brain, plane_reference(plane)).astype(np.float16),
                relative_attention=plane_values.astype(np.float16))
        for view, plane, plane_values in zip(slices, chosen, values)
    )


def _side(point: np.ndarray, midline_x: float) -> str:
    # DICOM LPS: +x points to the patient's left (PS3.3 C.7.6.2.1.1).
    return "left" if point[0] >= midline_x else "right"


def source_peak(attention: np.ndarray, planes: tuple[SourcePlane, ...], grid: ModelGrid) -> AttentionPeak | None:
    """The peak of the attention on the source planes, outlined by a smooth closed contour.

    The outline is the iso-line at ``PEAK_FRACTION`` of the peak
    (:func:`inference.attention.iso_contour`) on the peak's source plane: a smooth polygon
    around the region of at least half the case's strongest attention, inside the brain (the
    map is 0 outside it). ``model_slice`` is the model slice nearest to the peak; None when
    the map is 0 everywhere.
    """
    if attention.size == 0 or float(attention.max()) <= 0.0:
        return None
    k, row, column = (int(v) for v in np.unravel_index(int(np.argmax(attention)), attention.shape))
    plane = planes[k]
    outline = to_image_coordinates(iso_contour(attention[k], row, column, PEAK_FRACTION * float(attention[k, row, column])))
    row_dir = np.asarray(plane.orientation_patient[:3])
    column_dir = np.asarray(plane.orientation_patient[3:])
    point = (np.asarray(plane.position_patient) + column * plane.pixel_spacing[1] * row_dir
             + row * plane.pixel_spacing[0] * column_dir)
    n_slices = grid.size[2]
    model_slice = int(min(max(round((point[2] - grid.origin[2]) / grid.spacing[2]), 0), n_slices - 1))
    columns = grid.size[0]
    midline_x = grid.origin[0] + (columns - 1) * grid.spacing[0] / 2.0
    return AttentionPeak(
        model_slice=model_slice,
        source=plane.source,
        row=float(row),
        column=float(column),
        outline=outline,
        region=f"{_side(point, midline_x)} hemisphere, slice {model_slice + 1} of {n_slices}",
    )


def _peak(heat: np.ndarray, slices: list[AttentionSlice], midline_x: float) -> AttentionPeak | None:
    """The peak of the model-grid map, located and outlined on its source image."""
    model_slice = peak(heat, PEAK_FRACTION).slice_index
    plane = slices[model_slice]
    if float(plane.heat.max()) <= 0.0:
        return None
    row, column = (int(v) for v in np.unravel_index(int(np.argmax(plane.heat)), plane.heat.shape))
    outline = to_image_coordinates(hot_region_outline(plane.heat, row, column, PEAK_FRACTION))
    row_dir = np.asarray(plane.orientation_patient[:3])
    column_dir = np.asarray(plane.orientation_patient[3:])
    point = (
        np.asarray(plane.position_patient)
        + column * plane.pixel_spacing[1] * row_dir
        + row * plane.pixel_spacing[0] * column_dir
    )
    # DICOM LPS: +x points to the patient's left (PS3.3 C.7.6.2.1.1).
    side = "left" if point[0] >= midline_x else "right"
    region = f"{side} hemisphere, slice {model_slice + 1} of {heat.shape[0]}"
    return AttentionPeak(
        model_slice=model_slice,
        source=plane.source,
        row=float(row),
        column=float(column),
        outline=outline,
        region=region,
    )



# --------------------------------------------------------------------------- summaries

RESEARCH_NOTE = "research use only, not for diagnosis"


def result_summary(result: Prediction | NotAnalysed) -> dict[str, object]:
    """A JSON-ready summary of a result (``fpe-node predict`` output, the index's record).

    The score is called ``probability`` only when the model is calibrated; otherwise
    ``probability`` is null and ``score`` is an uncalibrated value in [0, 1].
    """
    if isinstance(result, NotAnalysed):
        return {
            "analysed": False,
            "reason": result.reason,
            "pipeline": result.pipeline,
            "series_used": dict(result.series_used),
            "warnings": list(result.warnings),
            "note": RESEARCH_NOTE,
        }
    model = result.model
    peak = result.peak
    return {
        "analysed": True,
        "pipeline": result.pipeline,
        "score": result.score,
        "probability": result.score if model.calibrated else None,
        "calibrated": model.calibrated,
        "threshold": model.threshold,
        "positive": result.positive,
        "finding": "FPE likely" if result.positive else "FPE unlikely",
        "logit": result.logit,
        "aux_scores": list(result.aux_scores),
        "slice_weights": list(result.slice_weights),
        "model": {
            "name": model.name,
            "version": model.version,
            "variant": model.variant,
            "weights_sha256": model.weights_sha256,
            "precision": model.precision,
            "demonstration": model.demonstration,
            "recipe_from_checkpoint": model.recipe_from_checkpoint,
        },
        "primary_role": result.primary_role,
        "series_used": dict(result.series_used),
        "source_instances": len(result.sources),
        "peak": None
        if peak is None
        else {
            "model_slice": peak.model_slice,
            "sop_instance_uid": peak.source.sop_instance_uid,
            "frame": peak.source.frame,
            "row": peak.row,
            "column": peak.column,
            "region": peak.region,
        },
        "timings_s": dict(result.timings_s),
        "warnings": list(result.warnings),
        "note": RESEARCH_NOTE,
    }
