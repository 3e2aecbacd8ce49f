"""Rigid co-registration of a case's other roles onto its primary role (recipe step 2).

The transforms map points of the primary (fixed) image to points of the moving image, the
SimpleITK convention, so ``sitk.Resample(moving, reference_on_fixed_grid, transform)`` brings
the moving image onto the fixed image's physical space. Registration runs on block-averaged
working copies of about ``RegistrationSpec.working_spacing_mm`` voxels; the resulting
transform is applied once, in the final resampling to the model grid.

Whether to register follows the frame of reference rule of PS3.3 C.7.4.1: images that share a
FrameOfReferenceUID are spatially related by the scanner, so they need no registration; with
the same grid as well they need no resampling either.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from inference.recipe import RegistrationSpec

log = logging.getLogger(__name__)

Method = Literal["same-grid", "same-frame", "registered", "initial-only"]

_Z_SEARCH_MM = 80.0  # head-foot offsets tried before optimising
_Z_STEP_MM = 8.0
CANDIDATE_THREADS = 2
"""Threads that evaluate the starting translations (each on one ITK thread: reproducible sums)."""


class RegistrationError(ValueError):
    """Two series cannot be registered; the message says why."""


@dataclass(frozen=True)
class RegistrationResult:
    """How one moving role was brought onto the primary."""

    transform: sitk.Transform  # fixed (primary) point -> moving point
    method: Method
    metric_before: float | None = None  # Mattes MI (negative; lower is better)
    metric_after: float | None = None
    iterations: int = 0
    stop_condition: str = ""
    rotation_deg: float = 0.0  # magnitude of the rotation found
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    warning: str | None = None

    def summary(self) -> dict[str, object]:
        """JSON-friendly description (for timings/warnings in results and logs)."""
        return {
            "method": self.method,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "iterations": self.iterations,
            "rotation_deg": round(self.rotation_deg, 3),
            "translation_mm": [round(v, 3) for v in self.translation_mm],
        }


def same_grid(first: sitk.Image, second: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """True when both images have the same size, spacing, origin and direction cosines."""
    if first.GetSize() != second.GetSize():
        return False
    if not np.allclose(first.GetSpacing(), second.GetSpacing(), rtol=0, atol=tolerance_mm):
        return False
    if not np.allclose(first.GetOrigin(), second.GetOrigin(), rtol=0, atol=tolerance_mm):
        return False
    return bool(np.allclose(first.GetDirection(), second.GetDirection(), rtol=0, atol=1e-6))


def block_average(image: sitk.Image, target_spacing: tuple[float, float, float]) -> sitk.Image:
    """Average blocks of voxels so that no axis is much finer than ``target_spacing``.

    ``target_spacing`` is given along the patient axes (x, y, z); each image axis takes the
    spacing of the patient axis its direction cosine points along most. Integer factors only
    (``BinShrink``), so this is an exact box filter: an anti-aliasing step before resampling
    thin slices onto a coarse grid, and the cheap way to make reduced-resolution copies.
    """
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    factors = []
    for axis, spacing in enumerate(image.GetSpacing()):
        cosines = np.abs(direction[:, axis])
        wanted = float(np.dot(cosines / cosines.sum(), np.asarray(target_spacing, dtype=float)))
        factors.append(max(1, min(int(math.floor(wanted / spacing + 1e-6)), image.GetSize()[axis])))
    if all(factor == 1 for factor in factors):
        return image
    return sitk.BinShrink(image, factors)


def working_copy(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Float32 copy block-averaged to about ``spacing_mm`` voxels."""
    return sitk.Cast(block_average(image, (spacing_mm, spacing_mm, spacing_mm)), sitk.sitkFloat32)


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Largest connected component above Otsu's threshold (the head against air)."""
    smoothed = sitk.SmoothingRecursiveGaussian(image, float(min(image.GetSpacing())))
    mask = sitk.OtsuThreshold(smoothed, 0, 1)
    components = sitk.ConnectedComponent(mask)
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    return sitk.Cast(largest, sitk.sitkUInt8)


def _physical_points(mask: sitk.Image) -> np.ndarray:
    """Physical (x, y, z) of every voxel centre inside ``mask``."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)  # (i, j, k)
    spacing = np.asarray(mask.GetSpacing())
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + (indices * spacing) @ direction.T


def _z_extent(points: np.ndarray) -> tuple[float, float, float]:
    return float(points[:, 2].min()), float(points[:, 2].mean()), float(points[:, 2].max())


def translation_candidates(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> list[np.ndarray]:
    """Starting translations (fixed point -> moving point) to try before optimising.

    In plane, the head masks' centroids are aligned (a head is seen whole in plane). Along the
    head-foot axis the two series may cover different parts (a CTA from the neck, an NCCT cut
    below the vertex), so the candidates align their tops, bottoms and centroids, keep the
    scanner's coordinates, and step through +-``_Z_SEARCH_MM``; the best mutual information wins.
    """
    fixed_points = _physical_points(fixed_mask)
    moving_points = _physical_points(moving_mask)
    if len(fixed_points) == 0 or len(moving_points) == 0:
        raise ValueError("empty head mask: nothing to register")
    in_plane = moving_points[:, :2].mean(axis=0) - fixed_points[:, :2].mean(axis=0)
    fixed_z, moving_z = _z_extent(fixed_points), _z_extent(moving_points)
    shifts = {round(m - f, 1) for f, m in zip(fixed_z, moving_z)} | {0.0}
    shifts |= {float(v) for v in np.arange(-_Z_SEARCH_MM, _Z_SEARCH_MM + 1e-6, _Z_STEP_MM)}
    return [np.array([in_plane[0], in_plane[1], dz]) for dz in sorted(shifts)]


def initial_transform(
    methods: Sequence[sitk.ImageRegistrationMethod], fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image
) -> sitk.Euler3DTransform:
    """The candidate translation (rotation zero) with the best metric, centred on the fixed head.

    The rotation centre is the fixed head's centroid, which keeps rotation and translation
    parameters nearly independent for the optimiser. ``methods``: identically configured
    registration methods; the candidates are shared out among them, one thread each (ITK
    releases the GIL). ``MetricEvaluate`` ignores sampling, smoothing and shrinking, so a value
    does not depend on which method computes it, and the first of equal values wins as in
    order.
    """
    centre = tuple(float(v) for v in _physical_points(fixed_mask).mean(axis=0))
    candidates = []
    for translation in translation_candidates(fixed_mask, foreground_mask(moving)):
        candidate = sitk.Euler3DTransform()
        candidate.SetCenter(centre)
        candidate.SetTranslation(tuple(float(v) for v in translation))
        candidates.append(candidate)

    def evaluate(method: sitk.ImageRegistrationMethod, share: Sequence[int]) -> list[tuple[int, float]]:
        values = []
        for index in share:
            method.SetInitialTransform(candidates[index], inPlace=False)
            try:
                values.append((index, float(method.MetricEvaluate(fixed, moving))))
            except RuntimeError:  # ITK: all samples map outside the moving image at this offset
                continue
        return values

    shares = [range(start, len(candidates), len(methods)) for start in range(len(methods))]
    if len(methods) == 1:
        values = evaluate(methods[0], shares[0])
    else:
        with ThreadPoolExecutor(max_workers=len(methods) - 1, thread_name_prefix="candidates") as pool:
            others = [pool.submit(evaluate, method, share) for method, share in zip(methods[1:], shares[1:])]
            values = evaluate(methods[0], shares[0])
            for other in others:
                values += other.result()
    if not values:
        raise RegistrationError("the series do not overlap at any starting position tried")
    best = min(sorted(values), key=lambda item: item[1])  # lowest metric; the earliest candidate on a tie
    return candidates[best[0]]


def _rotation_angle_deg(transform: sitk.Euler3DTransform) -> float:
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    cosine = (np.trace(matrix) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run ITK filters on one thread inside the block, then restore the previous default.

    ITK's pool threader sums the metric and pyramid filters over work units in whatever order
    they finish, which changes the last bits of the transform from run to run. The working
    copies are small, so one thread costs little and buys bit-for-bit reproducibility.
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _optimizer_scales(fixed_mask: sitk.Image, centre: tuple[float, float, float]) -> list[float]:
    """Scales making one radian of rotation weigh what it moves the head by (RMS radius squared)."""
    points = _physical_points(fixed_mask)
    radius_sq = float(np.mean(np.sum((points - np.asarray(centre)) ** 2, axis=1)))
    return [radius_sq] * 3 + [1.0] * 3


def _registration_method(
    spec: RegistrationSpec, fixed_mask: sitk.Image, centre: tuple[float, float, float]
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=spec.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(spec.sampling_percentage, spec.seed)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=spec.learning_rate,
        minStep=spec.min_step,
        numberOfIterations=spec.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScales(_optimizer_scales(fixed_mask, centre))
    method.SetShrinkFactorsPerLevel(list(spec.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(spec.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register_rigid(fixed: sitk.Image, moving: sitk.Image, spec: RegistrationSpec) -> RegistrationResult:
    """Find the rigid transform (fixed point -> moving point) maximising mutual information.

    Both images are block-averaged to ``spec.working_spacing_mm`` first; the metric is
    sampled inside the fixed image's head mask with a fixed seed, so the same input gives the
    same transform. When the optimiser ends with a worse metric than it started from, the
    best starting translation is kept and a warning says so.
    """
    fixed_small = working_copy(fixed, spec.working_spacing_mm)
    moving_small = working_copy(moving, spec.working_spacing_mm)
    with _single_threaded():
        fixed_mask = foreground_mask(fixed_small)
        centre = tuple(float(v) for v in _physical_points(fixed_mask).mean(axis=0))
        method = _registration_method(spec, fixed_mask, centre)  # type: ignore[arg-type]
        helpers = [_registration_method(spec, fixed_mask, centre) for _ in range(CANDIDATE_THREADS - 1)]  # type: ignore[arg-type]
        start = initial_transform([method, *helpers], fixed_small, moving_small, fixed_mask)
        transform = sitk.Euler3DTransform(start)
        method.SetInitialTransform(transform, inPlace=True)
        metric_before = float(method.MetricEvaluate(fixed_small, moving_small))
        try:
            method.Execute(fixed_small, moving_small)
            # Evaluate the end point the same way as the start (full resolution, no smoothing).
            metric_after = float(method.MetricEvaluate(fixed_small, moving_small))
        except RuntimeError as exc:  # ITK: the optimiser moved the images apart
            log.warning("registration optimiser failed (%s); keeping the starting position", str(exc).splitlines()[-1][:120])
            metric_after = math.inf
    warning = None
    method_name: Method = "registered"
    if not metric_after <= metric_before:
        warning = f"registration made mutual information worse ({metric_before:.4f} -> {metric_after:.4f}); kept the initial alignment"
        transform = start
        method_name = "initial-only"
    result = RegistrationResult(
        transform=transform,
        method=method_name,
        metric_before=metric_before,
        metric_after=metric_after,
        iterations=int(method.GetOptimizerIteration()),
        stop_condition=method.GetOptimizerStopConditionDescription(),
        rotation_deg=_rotation_angle_deg(transform),
        translation_mm=tuple(float(v) for v in transform.GetTranslation()),  # type: ignore[arg-type]
        warning=warning,
    )
    log.debug("registration %s", result.summary())
    return result


def align(
    fixed: sitk.Image,
    moving: sitk.Image,
    spec: RegistrationSpec,
    *,
    fixed_frame_uid: str | None = None,
    moving_frame_uid: str | None = None,
) -> RegistrationResult:
    """Decide how ``moving`` reaches ``fixed`` and do it (recipe step 2).

    Same FrameOfReferenceUID and grid: nothing to do. Same FrameOfReferenceUID only: the
    identity (the scanner's patient coordinates already agree, PS3.3 C.7.4.1). No frame of
    reference (NIfTI) with the same grid: assumed co-registered, as research cohorts deliver
    them. Otherwise, or when the recipe disables nothing: :func:`register_rigid`.
    """
    identity = sitk.Euler3DTransform()
    grids_match = same_grid(fixed, moving, spec.grid_tolerance_mm)
    same_frame = fixed_frame_uid is not None and fixed_frame_uid == moving_frame_uid
    if grids_match and (same_frame or (fixed_frame_uid is None and moving_frame_uid is None)):
        return RegistrationResult(transform=identity, method="same-grid")
    if same_frame:
        return RegistrationResult(transform=identity, method="same-frame")
    if not spec.enabled:
        return RegistrationResult(
            transform=identity,
            method="same-frame",
            warning="registration disabled by the recipe: frames of reference assumed to agree",
        )
    return register_rigid(fixed, moving, spec)
