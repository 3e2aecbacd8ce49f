"""Apply the preprocessing recipe to one case's volumes (see :mod:`inference.recipe`).

Input: one :class:`RoleVolume` per role, each a SimpleITK image in modality units (HU for CT)
placed in patient space (DICOM LPS, PS3.3 C.7.6.2.1.1), as :mod:`inference.volumes` builds
them from DICOM series or SimpleITK reads them from NIfTI. Output: a :class:`PreprocessedCase`
holding the model input ``(channels, slices, rows, columns)`` and the model grid's geometry,
which the predictor needs to map the attention map back onto the primary series.

Training and serving both call :func:`preprocess_case`; there is no second implementation.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from inference.recipe import ChannelSpec, PipelineRecipe, Recipe
from inference.registration import RegistrationError, RegistrationResult, align, block_average
from inference.result import Pipeline, Role, SourceInstance, SourcePlane

log = logging.getLogger(__name__)

_CT_HEAD_HU = -300.0
_CT_SOFT_TISSUE_HU = (-20.0, 100.0)
_OPENING_MM = 4.0


class PreprocessingError(ValueError):
    """The case cannot be turned into a model input; the message is the reason."""


@dataclass(frozen=True)
class RoleVolume:
    """One role's volume and where it came from.

    ``slice_sources[k]`` is the source image of slice ``k`` of ``image`` (third index), when
    the volume was built from DICOM; NIfTI volumes have none.
    """

    role: Role
    image: sitk.Image
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str | None = None
    slice_sources: tuple[SourceInstance | None, ...] = ()
    warnings: tuple[str, ...] = ()
    source_planes: tuple[SourcePlane, ...] = ()  # the acquired planes (Volume.source_planes)

    def __post_init__(self) -> None:
        if self.image.GetDimension() != 3:
            raise ValueError(f"{self.role}: volume must be 3-D, got {self.image.GetDimension()}-D")
        if self.slice_sources and len(self.slice_sources) != self.image.GetSize()[2]:
            raise ValueError(
                f"{self.role}: {len(self.slice_sources)} slice sources for {self.image.GetSize()[2]} slices"
            )


@dataclass(frozen=True)
class ModelGrid:
    """Geometry of the model grid: axis-aligned in LPS, ``size`` as (columns, rows, slices)."""

    origin: tuple[float, float, float]  # centre of voxel (0, 0, 0), mm
    spacing: tuple[float, float, float]  # (column, row, slice) spacing, mm
    size: tuple[int, int, int]  # (columns, rows, slices)

    def reference(self) -> sitk.Image:
        """An empty image with this geometry (the resampling target)."""
        image = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        return image

    def slice_centre_z(self, model_slice: int) -> float:
        """Patient z (mm) of the centre of model slice ``model_slice``."""
        return self.origin[2] + model_slice * self.spacing[2]


@dataclass(frozen=True)
class PreprocessedCase:
    """The model input of one case and what is needed to interpret it."""

    pipeline: Pipeline
    tensor: np.ndarray  # float32 (channels, slices, rows, columns)
    channel_names: tuple[str, ...]
    grid: ModelGrid
    mask: np.ndarray  # bool (slices, rows, columns): brain on the model grid
    # the same mask at recipe.mask_spacing_mm in the primary's space (UInt8, 1 = brain), as computed
    mask_image: sitk.Image | None = field(default=None, repr=False, compare=False)
    registrations: dict[Role, RegistrationResult] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    # register: wall time until registration ends (the primary's mask and resampling run beside it);
    # preprocess: the rest. Their sum is the wall time of preprocess_case.
    timings_s: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- masks


def _largest_component(mask: sitk.Image) -> sitk.Image:
    relabelled = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.Cast(relabelled == 1, sitk.sitkUInt8)


def _fill_holes_per_slice(mask: sitk.Image) -> sitk.Image:
    """Fill holes slice by slice along the third axis (a head is open at the neck in 3-D).

    The slices are taken in index space: those of an oblique image (most real MR) each have
    another in-plane origin, and ``JoinSeries`` refuses inputs that do not share one.
    """
    plain = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(mask))
    slices = [sitk.BinaryFillhole(plain[:, :, k]) for k in range(plain.GetSize()[2])]
    filled = sitk.JoinSeries(slices)
    filled.CopyInformation(mask)
    return sitk.Cast(filled, sitk.sitkUInt8)


def _radius_voxels(image: sitk.Image, radius_mm: float) -> list[int]:
    return [max(1, int(round(radius_mm / spacing))) for spacing in image.GetSpacing()]


def ct_intracranial_mask(ct: sitk.Image) -> sitk.Image:
    """Intracranial soft tissue of a (reduced-resolution) CT in HU.

    Head = largest component above -300 HU with holes filled; inside it, soft tissue
    (-20..100 HU) is opened by ``_OPENING_MM`` to cut it from the scalp through the skull's
    foramina, its largest component kept and its holes filled (ventricles, clot, lesion).
    """
    head = _fill_holes_per_slice(_largest_component(ct > _CT_HEAD_HU))
    low, high = _CT_SOFT_TISSUE_HU
    soft = sitk.And(sitk.And(ct >= low, ct <= high), head)
    opened = sitk.BinaryMorphologicalOpening(soft, _radius_voxels(soft, _OPENING_MM))
    if not np.any(sitk.GetArrayViewFromImage(opened)):
        return head
    return _fill_holes_per_slice(_largest_component(opened))


def mr_brain_mask(image: sitk.Image) -> sitk.Image:
    """Brain of a (reduced-resolution) DWI: Otsu threshold, largest component, closed, filled."""
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), float(min(image.GetSpacing())))
    foreground = sitk.OtsuThreshold(smoothed, 0, 1)
    brain = _largest_component(foreground)
    closed = sitk.BinaryMorphologicalClosing(brain, _radius_voxels(brain, _OPENING_MM))
    return _fill_holes_per_slice(closed)


def brain_mask(primary: sitk.Image, pipeline_recipe: PipelineRecipe, recipe: Recipe) -> tuple[sitk.Image, list[str]]:
    """The recipe's mask of the primary volume at ``recipe.mask_spacing_mm`` (step 3)."""
    spacing = recipe.mask_spacing_mm
    small = sitk.Cast(block_average(primary, (spacing, spacing, spacing)), sitk.sitkFloat32)
    warnings: list[str] = []
    if pipeline_recipe.mask == "ct_intracranial":
        mask = ct_intracranial_mask(small)
    else:
        mask = mr_brain_mask(small)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    volume_ml = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * voxel_ml
    if volume_ml == 0.0:
        raise PreprocessingError("no head found in the primary series (empty mask)")
    if volume_ml < recipe.min_brain_ml:
        warnings.append(f"brain mask only {volume_ml:.0f} ml (< {recipe.min_brain_ml:.0f} ml): crop may be wrong")
    return mask, warnings


# --------------------------------------------------------------------------- crop and grid


def _mask_bounds(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (min, max corners, LPS mm) of the mask's voxels, voxel edges included."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (i, j, k)
    low = indices.min(axis=0) - 0.5
    high = indices.max(axis=0) + 0.5
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=float)
    spacing = np.asarray(mask.GetSpacing())
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    points = np.asarray(mask.GetOrigin()) + (corners * spacing) @ direction.T
    return points.min(axis=0), points.max(axis=0)


def model_grid(mask: sitk.Image, recipe: Recipe) -> ModelGrid:
    """The crop box around the mask (step 4), sampled as the recipe's grid (step 5)."""
    low, high = _mask_bounds(mask)
    low = low - recipe.crop_margin_mm
    high = high + recipe.crop_margin_mm
    side = float(max(high[0] - low[0], high[1] - low[1]))
    centre = (low + high) / 2.0
    low_xy = centre[:2] - side / 2.0
    slices, rows, columns = recipe.grid
    spacing = (side / columns, side / rows, float(high[2] - low[2]) / slices)
    origin = (
        float(low_xy[0] + spacing[0] / 2.0),
        float(low_xy[1] + spacing[1] / 2.0),
        float(low[2] + spacing[2] / 2.0),
    )
    return ModelGrid(origin=origin, spacing=spacing, size=(columns, rows, slices))


def resample_to_grid(
    image: sitk.Image,
    grid: ModelGrid,
    transform: sitk.Transform,
    *,
    background: float,
    antialias: bool,
    interpolator: int = sitk.sitkLinear,
) -> np.ndarray:
    """One interpolation from the source volume onto the model grid, as ``(slices, rows, columns)``."""
    source = block_average(image, grid.spacing) if antialias else image
    resampled = sitk.Resample(
        sitk.Cast(source, sitk.sitkFloat32), grid.reference(), transform, interpolator, background, sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(resampled)


# --------------------------------------------------------------------------- intensity


def normalise(values: np.ndarray, channel: ChannelSpec, mask: np.ndarray) -> np.ndarray:
    """Step 6: CT window to [0, 1] or MR z-score inside the mask."""
    if channel.normalisation == "window":
        assert channel.window is not None  # checked by ChannelSpec
        low, high = channel.window
        return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    inside = values[mask]
    if inside.size < 2:
        raise PreprocessingError(f"channel {channel.name}: brain mask is empty on the model grid")
    mean = float(inside.mean(dtype=np.float64))
    std = float(inside.std(dtype=np.float64))
    if std <= 0.0:
        raise PreprocessingError(f"channel {channel.name}: constant image inside the brain mask")
    clip = channel.zscore_clip
    return np.clip((values - mean) / std, -clip, clip).astype(np.float32)


# --------------------------------------------------------------------------- the case


def _check_roles(volumes: Mapping[Role, RoleVolume], pipeline_recipe: PipelineRecipe) -> list[str]:
    missing = [role for role in pipeline_recipe.required_roles if role not in volumes]
    if missing:
        raise PreprocessingError(f"{pipeline_recipe.pipeline} pipeline lacks {', '.join(missing)}")
    return [
        f"{role} missing: its channel is zero-filled"
        for role in pipeline_recipe.optional_roles
        if role not in volumes
    ]


def register_roles(
    volumes: Mapping[Role, RoleVolume], pipeline_recipe: PipelineRecipe, recipe: Recipe
) -> dict[Role, RegistrationResult]:
    """Step 2 for every non-primary role present."""
    primary = volumes[pipeline_recipe.primary_role]
    results: dict[Role, RegistrationResult] = {
        primary.role: RegistrationResult(transform=sitk.Euler3DTransform(), method="same-grid")
    }
    for role in pipeline_recipe.roles[1:]:
        if role not in volumes:
            continue
        moving = volumes[role]
        results[role] = align(
            primary.image,
            moving.image,
            recipe.registration,
            fixed_frame_uid=primary.frame_of_reference_uid,
            moving_frame_uid=moving.frame_of_reference_uid,
        )
        log.info("registered %s to %s: %s", role, primary.role, results[role].summary())
    return results


def _registrations(registering: "Future[dict[Role, RegistrationResult]]") -> dict[Role, RegistrationResult]:
    try:
        return registering.result()
    except RegistrationError as exc:
        raise PreprocessingError(f"registration failed: {exc}") from exc


def preprocess_case(volumes: Mapping[Role, RoleVolume], recipe: Recipe, pipeline: Pipeline) -> PreprocessedCase:
    """Turn one case's volumes into the model input, following ``recipe`` exactly.

    Raises
    ------
    PreprocessingError
        With a reason a reader understands (a required role missing, no head found, ...).
    """
    pipeline_recipe = recipe.for_pipeline(pipeline)
    warnings = [w for volume in volumes.values() for w in volume.warnings]
    warnings += _check_roles(volumes, pipeline_recipe)
    started = time.perf_counter()
    primary = volumes[pipeline_recipe.primary_role]
    identity = sitk.Euler3DTransform()
    resampled: dict[tuple[Role, float], np.ndarray] = {}  # one resampling per role, however many channels
    # Registration (ITK, one thread, the GIL released) runs beside the primary's mask and
    # resampling, which do not depend on it: on two cores the two overlap.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="register") as pool:
        registering = pool.submit(register_roles, volumes, pipeline_recipe, recipe)
        try:
            mask_image, mask_warnings = brain_mask(primary.image, pipeline_recipe, recipe)
            grid = model_grid(mask_image, recipe)
            mask = resample_to_grid(
                mask_image, grid, identity, background=0.0, antialias=False, interpolator=sitk.sitkNearestNeighbor
            ) > 0
            for channel in pipeline_recipe.channels:
                key = (channel.role, channel.background)
                if channel.role == primary.role and key not in resampled:
                    resampled[key] = resample_to_grid(
                        primary.image, grid, identity, background=channel.background, antialias=recipe.antialias
                    )
        except PreprocessingError:
            _registrations(registering)  # a registration failure is reported first, as before
            raise
        registrations = _registrations(registering)
    warnings += [r.warning for r in registrations.values() if r.warning]
    registered = time.perf_counter()
    warnings += mask_warnings

    channels = []
    for channel in pipeline_recipe.channels:
        if channel.role not in volumes:
            channels.append(np.zeros(mask.shape, dtype=np.float32))
            continue
        key = (channel.role, channel.background)
        if key not in resampled:
            resampled[key] = resample_to_grid(
                volumes[channel.role].image,
                grid,
                registrations[channel.role].transform,
                background=channel.background,
                antialias=recipe.antialias,
            )
        channels.append(normalise(resampled[key], channel, mask))
    tensor = np.ascontiguousarray(np.stack(channels, axis=0), dtype=np.float32)
    finished = time.perf_counter()
    return PreprocessedCase(
        pipeline=pipeline,
        tensor=tensor,
        channel_names=tuple(channel.name for channel in pipeline_recipe.channels),
        grid=grid,
        mask=mask,
        mask_image=mask_image,
        registrations=registrations,
        warnings=tuple(dict.fromkeys(warnings)),
        timings_s={"register": registered - started, "preprocess": finished - registered},
    )
