"""Where the model looked: slice weights x Grad-CAM, combined into one map on the model grid.

The res25 classifier mixes per-slice scores through a softmax over the slices; those *slice
weights* say which slices drive the logit. Within a slice, Grad-CAM (Selvaraju et al., ICCV
2017) on the last convolutional stage (``layer4``) says which region does: the feature maps
``A_k`` weighted by the spatial mean of the gradient of the target logit,
``cam = ReLU(sum_k mean(dy/dA_k) A_k)``. The target ``y`` is the logit for the predicted class
(``+logit`` when the prediction is positive, ``-logit`` when negative) unless the caller names
one.

Combined map: ``heat[s] = w_s * upsample(cam[s])`` on the model grid (``n_slices x H x W``),
divided by its maximum so it lies in [0, 1]. When Grad-CAM is zero everywhere (possible with
untrained weights) the map falls back to the slice weights alone, constant within each slice.

Only the head of the network (pooling, slice attention, classifier) is differentiated: the
trunk runs once without gradients, so the map costs little more than the forward pass. With
:func:`attention_from_features` it does not run again at all: the predictor's one inference
forward returns the ``layer4`` maps with the logits and only the head is differentiated.

Mapping the map back onto the primary series' geometry belongs to ``inference.predictor``;
:func:`peak` and :func:`hot_region_outline` work on any 3-D / 2-D array, so they can run on the
map after it has been resampled onto the primary series.

**On the source grid** (:func:`source_attention`, kept as ``Prediction.source_attention``): the
map as a reader sees it over the primary series, one plane per acquired source image:

- *smooth*: Grad-CAM is upsampled bicubically in-plane onto the model grid
  (``combine(..., mode="bicubic")``, continuous first derivatives, no 7 x 7 blocks or kinks),
  then each source pixel takes the trilinear interpolation of that grid at the pixel's patient
  position, through the same geometry the preprocessing cropped with (the model grid lies in
  the primary's patient space: identity transform). Source planes between model slices get the
  linear blend of the two model slices around them; a gantry-tilted plane is sampled where it
  lies, so its values follow the tilt;
- *masked*: 0 outside the preprocessing brain mask (``PreprocessedCase.mask_image``, computed
  at ``recipe.mask_spacing_mm``), smoothed by a Gaussian of one mask voxel and taken at 0.5 on
  the source grid so its edge is a smooth line, not 2 mm steps. Source planes above or below
  the brain are 0 for that reason (the model grid covers the mask with a margin, so no brain
  pixel falls outside it);
- *normalised*: divided by its maximum over all source planes of the case, so 1 is the
  strongest attention in this case and 0.5 half of it: **relative attention within the case**,
  not comparable between cases nor a probability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from inference.model.res25 import Res25, Res25Output
from inference.model.runtime import autocast
from inference.result import SourceInstance, SourcePlane

if TYPE_CHECKING:  # the ensemble module imports the checkpoint module, which imports runtime
    from inference.model.ensemble import Res25Ensemble

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class AttentionMap:
    """Attention of one case on the model grid.

    Attributes
    ----------
    heat
        ``(n_slices, H, W)`` combined map in [0, 1].
    slice_weights
        ``(n_slices,)`` softmax weights of the classifier.
    cam
        ``(n_slices, h, w)`` Grad-CAM on the ``layer4`` grid (non-negative, not normalised).
    target_sign
        ``+1.0``: evidence for FPE; ``-1.0``: evidence against.
    """

    heat: FloatArray
    slice_weights: FloatArray
    cam: FloatArray
    target_sign: float


@dataclass(frozen=True)
class Peak:
    """Where a map peaks, with the outline of the hot region around it.

    ``row`` and ``column`` are pixel indices; ``outline`` is a closed polygon (first point
    repeated last) of ``(row, column)`` pixel-corner coordinates in the same index space (the
    centre of pixel ``(r, c)`` is ``(r, c)``; its corners are at ``r +- 0.5, c +- 0.5``). Use
    :func:`to_image_coordinates` for DICOM SCOORD ``(column, row)`` points.
    """

    slice_index: int
    row: int
    column: int
    value: float
    outline: tuple[tuple[float, float], ...]


def grad_cam(model: Res25 | Res25Ensemble, volumes: Tensor, target_sign: Tensor | float | None = None,
             precision: str = "fp32") -> tuple[Res25Output, Tensor]:
    """Forward pass plus Grad-CAM of the last convolutional stage.

    Parameters
    ----------
    model
        Network in ``eval()`` mode.
    volumes
        ``(B, in_channels, n_slices, H, W)`` on the model's device.
    target_sign
        Per case (``(B,)``) or scalar ``+1`` / ``-1``; ``None``: the predicted class
        (``sign(logit)``, ``+1`` at 0).
    precision
        Autocast precision of the trunk (the differentiated head always runs in fp32).

    Returns
    -------
    output, cam
        The network outputs (detached, fp32) and ``(B, n_slices, h, w)`` Grad-CAM maps.
    """
    if model.training:
        raise RuntimeError("grad_cam() needs a model in eval() mode")
    with torch.inference_mode(False):
        with torch.no_grad(), autocast(volumes.device, precision):
            feature_maps = model.trunk(model.slice_images(volumes.clone()))
    return grad_cam_from_features(model, feature_maps, volumes.shape[0], target_sign)


def grad_cam_from_features(model: Res25 | Res25Ensemble, feature_maps: Tensor, batch: int,
                           target_sign: Tensor | float | None = None) -> tuple[Res25Output, Tensor]:
    """Grad-CAM from ``layer4`` maps a forward pass already computed: only the head runs again.

    Parameters
    ----------
    model
        Network in ``eval()`` mode (its :meth:`~inference.model.res25.Res25.head` is differentiated).
    feature_maps
        ``(B * n_slices, C, h, w)`` or ``(B, n_slices, C, h, w)`` ``layer4`` maps, e.g. the
        ``features`` of :func:`inference.model.runtime.run` with ``return_features=True``;
        inference-mode tensors are accepted (they are copied).
    batch
        ``B``, the number of cases.
    target_sign
        As for :func:`grad_cam`.

    Returns
    -------
    output, cam
        The head's outputs (detached, fp32) and ``(B, n_slices, h, w)`` Grad-CAM maps.
    """
    if model.training:
        raise RuntimeError("grad_cam() needs a model in eval() mode")
    with torch.inference_mode(False):
        maps = feature_maps.reshape(-1, *feature_maps.shape[-3:]) if feature_maps.dim() == 5 else feature_maps
        maps = maps.float().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model.head(maps, batch)
            logits = out.logits[:, 0]
            if target_sign is None:
                sign = torch.where(logits.detach() >= 0, 1.0, -1.0)
            else:
                sign = torch.as_tensor(target_sign, dtype=logits.dtype, device=logits.device).expand(batch)
            (grads,) = torch.autograd.grad((logits * sign).sum(), maps)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * maps.detach()).sum(dim=1))
    cam = cam.reshape(batch, model.config.n_slices, *cam.shape[1:])
    detached = Res25Output(out.logits.detach(), out.aux_logits.detach(), out.slice_scores.detach(),
                           out.slice_weights.detach())
    return detached, cam


def combine(slice_weights: NDArray[np.floating], cam: NDArray[np.floating], shape: tuple[int, int],
            mode: Literal["bilinear", "bicubic"] = "bilinear") -> FloatArray:
    """``w_s * upsample(cam_s)`` on a ``(n_slices, *shape)`` grid, scaled to [0, 1].

    Bilinear (or bicubic, smooth to the first derivative; its overshoot below 0 is cut) upsampling
    with pixel centres aligned (``align_corners=False``). Falls back to the slice weights alone
    where ``cam`` is zero everywhere.
    """
    weights = np.asarray(slice_weights, dtype=np.float32).reshape(-1)
    cam_t = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    if cam_t.dim() != 3 or cam_t.shape[0] != weights.shape[0]:
        raise ValueError(f"cam must be (n_slices, h, w) with n_slices={weights.shape[0]}, got {tuple(cam_t.shape)}")
    if float(cam_t.max()) <= 0.0:
        logger.debug("Grad-CAM is zero everywhere: attention map from slice weights only")
        cam_t = torch.ones_like(cam_t)
    up = F.interpolate(cam_t[:, None], size=tuple(shape), mode=mode, align_corners=False)[:, 0]
    heat = (up * torch.as_tensor(weights)[:, None, None]).clamp_min(0).numpy()
    top = float(heat.max())
    return (heat / top).astype(np.float32) if top > 0 else np.zeros_like(heat, dtype=np.float32)


def attention_map(model: Res25 | Res25Ensemble, volume: Tensor, target_sign: float | None = None,
                  precision: str = "fp32") -> tuple[Res25Output, AttentionMap]:
    """Outputs and the combined attention map of ONE case ``(1, C, n_slices, H, W)``."""
    if volume.dim() != 5 or volume.shape[0] != 1:
        raise ValueError(f"attention_map() takes one case (1, C, S, H, W), got {tuple(volume.shape)}")
    out, cam = grad_cam(model, volume, target_sign, precision)
    return out, _combined(out, cam, target_sign, (volume.shape[3], volume.shape[4]))


def attention_from_features(model: Res25 | Res25Ensemble, features: Tensor, shape: tuple[int, int],
                            target_sign: float | None = None) -> tuple[Res25Output, AttentionMap]:
    """Outputs of the head and the combined attention map of ONE case from its ``layer4`` maps.

    ``features`` is the ``(1, n_slices, C, h, w)`` output of a forward pass run with
    ``return_features=True``: the trunk does not run again. ``shape`` is the model grid's
    ``(H, W)``; ``target_sign`` names the decision to explain (``None``: ``sign(logit)``).
    """
    if features.dim() != 5 or features.shape[0] != 1:
        raise ValueError(f"attention_from_features() takes one case (1, S, C, h, w), got {tuple(features.shape)}")
    out, cam = grad_cam_from_features(model, features, 1, target_sign)
    return out, _combined(out, cam, target_sign, shape)


def _combined(out: Res25Output, cam: Tensor, target_sign: float | None, shape: tuple[int, int]) -> AttentionMap:
    sign = target_sign if target_sign is not None else (1.0 if float(out.logits[0, 0]) >= 0 else -1.0)
    weights = out.slice_weights[0].float().cpu().numpy()
    cam_np = cam[0].float().cpu().numpy()
    heat = combine(weights, cam_np, (int(shape[0]), int(shape[1])))
    return AttentionMap(heat=heat, slice_weights=weights, cam=cam_np, target_sign=float(sign))


def peak(heat: NDArray[np.floating], fraction: float = 0.5) -> Peak:
    """Location of the maximum of a 3-D map ``(slices, rows, columns)`` and its hot region.

    The outline surrounds the 4-connected region around the peak, on the peak's slice, where
    the map is at least ``fraction`` of the peak value.
    """
    volume = np.asarray(heat, dtype=np.float32)
    if volume.ndim != 3 or volume.size == 0:
        raise ValueError(f"heat must be a non-empty 3-D array, got shape {volume.shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    s, r, c = (int(v) for v in np.unravel_index(int(np.argmax(volume)), volume.shape))
    outline = hot_region_outline(volume[s], r, c, fraction)
    return Peak(slice_index=s, row=r, column=c, value=float(volume[s, r, c]), outline=outline)


def _grow_region(mask: NDArray[np.bool_], row: int, column: int) -> NDArray[np.bool_]:
    """4-connected component of ``mask`` that holds ``(row, column)`` (vectorised flood fill)."""
    region = np.zeros_like(mask)
    region[row, column] = True
    while True:
        grown = region.copy()
        grown[1:, :] |= region[:-1, :]
        grown[:-1, :] |= region[1:, :]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _boundary_edges(region: NDArray[np.bool_]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed pixel-edge boundary, clockwise on screen; corner ``(i, j)`` = point ``(i-0.5, j-0.5)``."""
    padded = np.pad(region, 1)
    inside = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(pixels: NDArray[np.bool_], start: tuple[int, int], end: tuple[int, int]) -> None:
        rows, cols = np.nonzero(pixels)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((r + start[0], c + start[1]), []).append((r + end[0], c + end[1]))

    add(inside & ~padded[:-2, 1:-1], (0, 0), (0, 1))  # top, heading right
    add(inside & ~padded[1:-1, 2:], (0, 1), (1, 1))  # right side, heading down
    add(inside & ~padded[2:, 1:-1], (1, 1), (1, 0))  # bottom, heading left
    add(inside & ~padded[1:-1, :-2], (1, 0), (0, 0))  # left side, heading up
    return edges


def _trace(edges: dict[tuple[int, int], list[tuple[int, int]]], start: tuple[int, int]) -> list[tuple[int, int]]:
    """Follow the boundary from ``start`` until it closes.

    At a corner where two region pixels touch diagonally the walk turns left, so it stays on
    the outer boundary and never enters a hole that touches it there: a simple polygon.
    """
    path = [start]
    previous, current = start, edges[start].pop()
    while current != start:
        path.append(current)
        options = edges[current]
        if len(options) > 1:
            heading = (current[0] - previous[0], current[1] - previous[1])
            left_turn = (current[0] - heading[1], current[1] + heading[0])
            following = left_turn if left_turn in options else options[0]
            options.remove(following)
        else:
            following = options.pop()
        previous, current = current, following
    path.append(start)
    return path


def _drop_collinear(path: list[tuple[int, int]]) -> list[tuple[int, int]]:
    kept = [path[0]]
    for here, after in zip(path[1:-1], path[2:]):
        before = kept[-1]
        if (here[0] - before[0]) * (after[1] - here[1]) != (here[1] - before[1]) * (after[0] - here[0]):
            kept.append(here)
    kept.append(path[-1])
    return kept


def hot_region_outline(plane: NDArray[np.floating], row: int, column: int,
                       fraction: float = 0.5) -> tuple[tuple[float, float], ...]:
    """Closed outline ``((row, column), ...)`` of the hot region of a 2-D map around a pixel.

    The region is the 4-connected set of pixels around ``(row, column)`` whose value is at
    least ``fraction`` of the value there; the outline follows the pixel edges of its outer
    boundary clockwise on screen, collinear points removed, first point repeated last.
    """
    image = np.asarray(plane, dtype=np.float32)
    level = float(image[row, column]) * fraction
    region = _grow_region(image >= level, row, column)
    rows, cols = np.nonzero(region)
    first = int(np.argmin(rows * image.shape[1] + cols))
    start = (int(rows[first]), int(cols[first]))  # top-left corner of the first pixel in raster order
    path = _drop_collinear(_trace(_boundary_edges(region), start))
    return tuple((float(i) - 0.5, float(j) - 0.5) for i, j in path)


def to_image_coordinates(outline: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    """``(row, column)`` index points as DICOM image coordinates ``(column, row)``.

    PS3.3 C.10.5.1.2: the top left-hand corner of the top left pixel is ``(0.0, 0.0)``, its
    centre ``(0.5, 0.5)``; SCOORD points are (column, row) pairs (PS3.3 C.18.6.1.1).
    """
    return tuple((column + 0.5, row + 0.5) for row, column in outline)


# --------------------------------------------------------------------------- on the source grid


def grid_image(values: NDArray[np.floating], origin: Sequence[float], spacing: Sequence[float]) -> sitk.Image:
    """A ``(slices, rows, columns)`` array on an axis-aligned LPS grid as a SimpleITK image.

    ``origin`` is the centre of voxel (0, 0, 0), ``spacing`` (column, row, slice) in mm (the
    :class:`inference.preprocess.ModelGrid` convention).
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    return image


def smoothed_mask(mask: sitk.Image, sigma_mm: float) -> sitk.Image:
    """A binary mask as a float image in [0, 1] blurred by a Gaussian of ``sigma_mm``.

    Taken at 0.5 after interpolation, its edge is a smooth line at the original boundary
    instead of the staircase of the mask's voxels.
    """
    if sigma_mm <= 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm!r}")
    binary = sitk.Cast(mask > 0, sitk.sitkFloat32)
    if min(binary.GetSize()) >= 4:  # the recursive filter needs four pixels along each axis
        return sitk.SmoothingRecursiveGaussian(binary, float(sigma_mm))
    return sitk.DiscreteGaussian(binary, [float(sigma_mm) ** 2] * 3, 32, 0.01, True)


def plane_reference(plane: SourcePlane) -> sitk.Image:
    """A one-slice image with the geometry of a source plane (PS3.3 C.7.6.2.1.1).

    Pixel ``(column i, row j)`` lies at ``position + i * column spacing * row cosines +
    j * row spacing * column cosines``; the column cosines are made exactly orthogonal to the
    row cosines (headers round them), the third axis is their cross product.
    """
    row = np.asarray(plane.orientation_patient[:3], dtype=float)
    column = np.asarray(plane.orientation_patient[3:], dtype=float)
    row /= float(np.linalg.norm(row))
    column = column - float(np.dot(column, row)) * row
    column /= float(np.linalg.norm(column))
    reference = sitk.Image([plane.columns, plane.rows, 1], sitk.sitkFloat32)
    reference.SetOrigin(plane.position_patient)
    reference.SetSpacing((float(plane.pixel_spacing[1]), float(plane.pixel_spacing[0]), 1.0))
    reference.SetDirection(tuple(float(v) for v in np.column_stack([row, column, np.cross(row, column)]).flatten()))
    return reference


def _sample(image: sitk.Image, reference: sitk.Image) -> NDArray[np.float32]:
    resampled = sitk.Resample(image, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)[0]


def _brain_corners(brain: sitk.Image) -> NDArray[np.float64]:
    """Patient positions (8, 3) of the corners of the box around the brain's voxels (>= 0.5), edges included."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(brain) >= 0.5)[:, ::-1]  # (i, j, k)
    if indices.size == 0:
        return np.zeros((0, 3))
    low, high = indices.min(axis=0) - 1.0, indices.max(axis=0) + 1.0
    corners = [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    return np.array([brain.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c)) for c in corners])


def _window(plane: SourcePlane, corners: NDArray[np.float64]) -> tuple[slice, slice] | None:
    """The rows and columns of a plane the brain's box can reach; None when the plane misses the box."""
    reference = plane_reference(plane)
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    local = (corners - np.asarray(plane.position_patient)) @ direction  # (column mm, row mm, normal mm)
    if local[:, 2].min() > 0.0 or local[:, 2].max() < 0.0:
        return None
    column_mm, row_mm = float(plane.pixel_spacing[1]), float(plane.pixel_spacing[0])
    c0, c1 = int(np.floor(local[:, 0].min() / column_mm)), int(np.ceil(local[:, 0].max() / column_mm)) + 1
    r0, r1 = int(np.floor(local[:, 1].min() / row_mm)), int(np.ceil(local[:, 1].max() / row_mm)) + 1
    rows = slice(max(r0, 0), min(r1, plane.rows))
    columns = slice(max(c0, 0), min(c1, plane.columns))
    if rows.start >= rows.stop or columns.start >= columns.stop:
        return None
    return rows, columns


def _window_reference(plane: SourcePlane, rows: slice, columns: slice) -> sitk.Image:
    full = plane_reference(plane)
    window = sitk.Image([columns.stop - columns.start, rows.stop - rows.start, 1], sitk.sitkFloat32)
    window.SetOrigin(full.TransformIndexToPhysicalPoint((columns.start, rows.start, 0)))
    window.SetSpacing(full.GetSpacing())
    window.SetDirection(full.GetDirection())
    return window


def brain_level(brain: sitk.Image, reference: sitk.Image) -> FloatArray:
    """The smoothed mask (:func:`smoothed_mask`) interpolated on a one-slice ``reference``, in [0, 1]."""
    return _sample(brain, reference)


def brain_inside(brain: sitk.Image, reference: sitk.Image) -> NDArray[np.bool_]:
    """The brain on a one-slice ``reference``: where the smoothed mask interpolates to at least
    0.5 (the rule :func:`source_attention` masks with)."""
    return brain_level(brain, reference) >= 0.5


def source_attention(heat: sitk.Image, brain: sitk.Image, planes: Sequence[SourcePlane]) -> FloatArray:
    """The attention on every source plane, masked to the brain, 1 = the case's maximum.

    Parameters
    ----------
    heat
        The attention on the model grid in patient space (:func:`grid_image` of
        ``combine(..., mode="bicubic")``), sampled trilinearly at each source pixel.
    brain
        The brain mask as a float image in [0, 1] (:func:`smoothed_mask`); a pixel is brain
        where it interpolates to at least 0.5.
    planes
        The source planes (one matrix size, as a series has; :class:`SourcePlane`).

    Returns
    -------
    numpy.ndarray
        float32 ``(len(planes), rows, columns)`` in [0, 1]: 0 outside the brain and outside the
        model grid, divided by the maximum over all planes (all 0 when the map is 0 in the brain).
        See the module docstring ("On the source grid"). Only the part of each plane the brain's
        bounding box can reach is sampled (the rest is 0 anyway): planes above and below the
        brain cost nothing.
    """
    if not planes:
        raise ValueError("source_attention() needs at least one source plane")
    shapes = {(plane.rows, plane.columns) for plane in planes}
    if len(shapes) != 1:
        raise ValueError(f"source planes of more than one matrix size: {sorted(shapes)}")
    rows, columns = shapes.pop()
    out = np.zeros((len(planes), rows, columns), dtype=np.float32)
    corners = _brain_corners(brain)
    if len(corners) == 0:
        return out
    for index, plane in enumerate(planes):
        window = _window(plane, corners)
        if window is None:
            continue
        reference = _window_reference(plane, *window)
        inside = brain_inside(brain, reference)
        out[index][window] = np.where(inside, np.maximum(_sample(heat, reference), 0.0), 0.0)
    top = float(out.max())
    if top > 0:
        out /= np.float32(top)
    return out


def planes_of_image(image: sitk.Image, sources: Sequence[SourceInstance]) -> tuple[SourcePlane, ...]:
    """The slices of a volume as source planes, for a volume whose acquired planes are not known.

    ``sources[k]`` is the source image of slice ``k`` (third index) of ``image``.
    """
    size = image.GetSize()
    if len(sources) != size[2]:
        raise ValueError(f"{len(sources)} sources for {size[2]} slices")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = image.GetSpacing()
    orientation = tuple(float(v) for v in (*direction[:, 0], *direction[:, 1]))
    return tuple(
        SourcePlane(
            source=source,
            position_patient=tuple(float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),  # type: ignore[arg-type]
            orientation_patient=orientation,  # type: ignore[arg-type]
            pixel_spacing=(float(spacing[1]), float(spacing[0])),
            rows=int(size[1]),
            columns=int(size[0]),
        )
        for k, source in enumerate(sources)
    )


# --------------------------------------------------------------------------- smooth outline

# Marching squares: for each cell (corners top-left, top-right, bottom-right, bottom-left, bits
# 1, 2, 4, 8 set where the corner is at or above the level), the edges its contour crosses,
# in pairs. Edges: 0 top, 1 right, 2 bottom, 3 left. Saddles (5, 10) are split by the cell's
# mean value (below: the high corners stay apart).
_CELL_SEGMENTS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((3, 0),), 2: ((0, 1),), 3: ((3, 1),), 4: ((1, 2),), 6: ((0, 2),), 7: ((3, 2),), 8: ((2, 3),),
    9: ((2, 0),), 11: ((2, 1),), 12: ((1, 3),), 13: ((1, 0),), 14: ((0, 3),),
}
_SADDLE_APART = {5: ((3, 0), (1, 2)), 10: ((0, 1), (2, 3))}
_SADDLE_JOINED = {5: ((3, 2), (1, 0)), 10: ((0, 3), (2, 1))}

Edge = tuple[str, int, int]  # ("h", r, c): from (r, c) to (r, c+1); ("v", r, c): from (r, c) to (r+1, c)


def _cell_edge(r: int, c: int, side: int) -> Edge:
    return (("h", r, c), ("v", r, c + 1), ("h", r + 1, c), ("v", r, c))[side]  # type: ignore[return-value]


def _crossing(field: NDArray[np.float64], edge: Edge, level: float) -> tuple[float, float]:
    kind, r, c = edge
    r2, c2 = (r, c + 1) if kind == "h" else (r + 1, c)
    a, b = float(field[r, c]), float(field[r2, c2])
    t = 0.5 if a == b else min(max((level - a) / (b - a), 0.0), 1.0)
    return (r + t * (r2 - r), c + t * (c2 - c))


def _fill_holes(region: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``region`` with every background pixel not 4-connected to the image border added."""
    outside = np.zeros_like(region)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~region[0, :], ~region[-1, :], ~region[:, 0], ~region[:, -1]
    background = ~region
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= background
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _eight_connected(mask: NDArray[np.bool_], row: int, column: int) -> NDArray[np.bool_]:
    region = np.zeros_like(mask)
    region[row, column] = True
    while True:
        padded = np.pad(region, 1)
        grown = np.zeros_like(padded)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                grown |= np.roll(np.roll(padded, dr, axis=0), dc, axis=1)
        grown = grown[1:-1, 1:-1] & mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _simplify(points: list[tuple[float, float]], tolerance: float) -> list[tuple[float, float]]:
    """Douglas-Peucker on an open chain (end points kept)."""
    if len(points) < 3:
        return points
    start, end = np.asarray(points[0]), np.asarray(points[-1])
    chord = end - start
    length = float(np.hypot(*chord))
    inner = np.asarray(points[1:-1])
    if length == 0.0:
        distances = np.hypot(*(inner - start).T)
    else:
        distances = np.abs(chord[0] * (inner[:, 1] - start[1]) - chord[1] * (inner[:, 0] - start[0])) / length
    far = int(np.argmax(distances))
    if float(distances[far]) <= tolerance:
        return [points[0], points[-1]]
    split = far + 1
    return _simplify(points[: split + 1], tolerance)[:-1] + _simplify(points[split:], tolerance)


def iso_contour(plane: NDArray[np.floating], row: int, column: int, level: float,
                tolerance: float = 0.05) -> tuple[tuple[float, float], ...]:
    """Smooth closed outline ``((row, column), ...)`` of the region around a pixel at ``level``.

    The region is the 8-connected set of pixels around ``(row, column)`` whose value is at least
    ``level``, its holes filled; the outline is its marching-squares iso-line at ``level``
    (Lorensen and Cline's method in 2-D): the points where the linear interpolation between
    neighbouring pixel centres crosses the level, so it follows the map's own smooth shape
    instead of pixel edges. Pixel centres are at integer coordinates. Where the map is 0 outside a
    mask the line stays within half a pixel of the last pixel inside. Points closer than
    ``tolerance`` pixels to a straight line between their neighbours are dropped
    (Douglas-Peucker); the polygon is clockwise on screen, first point repeated last.
    """
    image = np.asarray(plane, dtype=np.float64)
    if not 0 <= row < image.shape[0] or not 0 <= column < image.shape[1] or image[row, column] < level:
        raise ValueError(f"pixel ({row}, {column}) is not at or above the level {level!r}")
    region = _fill_holes(_eight_connected(image >= level, row, column))
    # only this region crosses the level: the rest is below it; padded so the line always closes
    field = np.pad(np.where(region, np.maximum(image, level), np.minimum(image, np.nextafter(level, -np.inf))), 1,
                   constant_values=min(0.0, level - 1.0))
    above = field >= level
    links: dict[Edge, list[Edge]] = {}
    rows, cols = np.nonzero(np.pad(region, 1))
    for r in range(int(rows.min()) - 1, int(rows.max()) + 1):
        for c in range(int(cols.min()) - 1, int(cols.max()) + 1):
            case = int(above[r, c]) | int(above[r, c + 1]) << 1 | int(above[r + 1, c + 1]) << 2 | int(above[r + 1, c]) << 3
            if case in (0, 15):
                continue
            segments: tuple[tuple[int, int], ...]
            if case in _SADDLE_APART:
                mean = float(field[r : r + 2, c : c + 2].mean())
                segments = _SADDLE_JOINED[case] if mean >= level else _SADDLE_APART[case]
            else:
                segments = _CELL_SEGMENTS[case]
            for a, b in segments:
                ea, eb = _cell_edge(r, c, a), _cell_edge(r, c, b)
                links.setdefault(ea, []).append(eb)
                links.setdefault(eb, []).append(ea)
    start = min(links)
    loop = [start]
    previous, current = start, links[start][0]
    while current != start:
        loop.append(current)
        following = next(e for e in links[current] if e != previous) if len(set(links[current])) > 1 else previous
        previous, current = current, following
    points = [_crossing(field, edge, level) for edge in loop]
    # undo the padding; a region touching the border closes on the image's outer pixel edge at most
    high_r, high_c = image.shape[0] - 0.5, image.shape[1] - 0.5
    points = [(min(max(r - 1.0, -0.5), high_r), min(max(c - 1.0, -0.5), high_c)) for r, c in points]
    # clockwise on screen (x = column to the right, y = row downwards): positive shoelace sum
    area = sum(points[i - 1][1] * points[i][0] - points[i][1] * points[i - 1][0] for i in range(len(points)))
    if area < 0:
        points.reverse()
    closed = points + [points[0]]
    kept = _simplify(closed, tolerance)
    if len(kept) < 4:  # a tiny region: keep every crossing
        kept = closed
    return tuple(kept)
