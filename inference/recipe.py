"""The one preprocessing recipe: what turns a case's volumes into the model's input tensor.

A :class:`Recipe` is a frozen, validated value. It travels inside every checkpoint the node
writes (``Recipe.to_dict()`` is plain JSON), so the node serves a model with exactly the
preprocessing it was trained with; training (``inference.training``) and serving
(``inference.predictor``) both call :func:`inference.preprocess.preprocess_case` with it. A
checkpoint of the original code carries no recipe: :data:`DEFAULT_RECIPE` applies and the
result says so.

The recipe, step by step (implemented in :mod:`inference.registration` and
:mod:`inference.preprocess`):

1. **Standard orientation.** The model grid is axis-aligned with the DICOM patient coordinate
   system (PS3.3 C.7.6.2.1.1) with identity direction cosines, called ``LPS`` here as in ITK's
   ``DICOMOrient``: array index ``[k, j, i]`` of a channel runs inferior -> superior (k),
   anterior -> posterior (j, image rows) and patient right -> left (i, image columns), i.e. the
   radiological display of an axial slice. The reorientation is folded into the single final
   resampling of each channel (one interpolation, not two); NIfTI volumes read by SimpleITK are
   already in LPS physical space.
2. **Rigid co-registration** of every other role to the primary role (CT: CTA to NCCT;
   MR: ADC and FLAIR to DWI): a 6-parameter Euler transform, Mattes mutual information,
   regular-step gradient descent, multi-resolution on copies shrunk to about
   ``registration.working_spacing_mm`` voxels. Skipped when the role shares the primary's
   FrameOfReferenceUID (PS3.3 C.7.4.1) *and* its voxel grid; with the same frame of reference
   and another grid the identity transform is used (the scanner already aligned them). NIfTI
   volumes have no frame of reference: they are registered unless their grid equals the
   primary's.
3. **Head/brain mask** on the primary at ``mask_spacing_mm``: CT intracranial mask (head
   > -300 HU, soft tissue -20..100 HU inside it, opened to cut it from the scalp, largest
   component, holes filled per slice); MR brain mask (Otsu threshold of the smoothed DWI,
   largest component, closed, holes filled per slice).
4. **Crop to the brain**: the mask's bounding box in patient space plus ``crop_margin_mm``,
   squared in plane (the larger of the two in-plane extents, centred) so pixels stay square.
5. **Resample to the model grid** ``grid = (slices, rows, columns)`` (default 25 x 224 x 224)
   over that box, linear interpolation, after an anti-aliasing block average (bin shrink)
   where the source is much finer than the grid (thin CT slices into 25 thick ones).
6. **Intensity per channel**: CT windows map Hounsfield units ``[low, high]`` linearly to
   ``[0, 1]`` and clip; MR channels are z-scored with the mean and standard deviation inside
   the brain mask and clipped to ``[-zscore_clip, zscore_clip]``.
7. **Channel order** as listed in the pipeline's ``channels`` (MR: ADC, DWI, FLAIR;
   CT: NCCT brain window, CTA vessel window, NCCT stroke window).

The CT pipeline's third channel is the *NCCT stroke window*: the same non-contrast CT in a
narrow window of 40 HU centred at 40 HU (20..60 HU). It spreads the few Hounsfield units that
separate early ischaemic grey matter, normal parenchyma and a hyperdense clot over the whole
channel range, which the 80 HU brain window compresses.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference.result import Pipeline, Role

RECIPE_FORMAT: Literal["fpe-node-recipe/1"] = "fpe-node-recipe/1"


def _frozen() -> ConfigDict:
    return ConfigDict(frozen=True, extra="forbid")


class ChannelSpec(BaseModel):
    """One input channel of the model: which role it comes from and how it is normalised."""

    model_config = _frozen()

    name: str = Field(..., min_length=1, description="Stable channel name, e.g. 'ncct_brain'.")
    role: Role = Field(..., description="Series role the channel is made from.")
    normalisation: Literal["window", "zscore"] = Field(..., description="CT window or MR z-score.")
    window: tuple[float, float] | None = Field(
        default=None, description="For 'window': [low, high] in modality units (HU) mapped to [0, 1]."
    )
    zscore_clip: float = Field(default=5.0, gt=0, description="For 'zscore': values clipped to +-this.")
    background: float = Field(
        default=0.0, description="Value outside the source volume, in modality units (CT: air, -1024 HU)."
    )

    @model_validator(mode="after")
    def _window_when_windowed(self) -> "ChannelSpec":
        if self.normalisation == "window":
            if self.window is None:
                raise ValueError(f"channel {self.name!r}: 'window' normalisation needs a window")
            low, high = self.window
            if not high > low:
                raise ValueError(f"channel {self.name!r}: window {self.window} must have high > low")
        return self


class PipelineRecipe(BaseModel):
    """The recipe of one pipeline (CT or MR)."""

    model_config = _frozen()

    pipeline: Pipeline
    primary_role: Role = Field(..., description="The role the others are registered to; its grid defines the crop.")
    mask: Literal["ct_intracranial", "mr_brain"]
    channels: tuple[ChannelSpec, ...] = Field(..., min_length=1)
    optional_roles: tuple[Role, ...] = Field(
        default=(), description="Roles whose channel is zero-filled (with a warning) when the series is missing."
    )

    @model_validator(mode="after")
    def _primary_is_a_channel(self) -> "PipelineRecipe":
        roles = {channel.role for channel in self.channels}
        if self.primary_role not in roles:
            raise ValueError(f"{self.pipeline}: primary role {self.primary_role!r} feeds no channel")
        if self.primary_role in self.optional_roles:
            raise ValueError(f"{self.pipeline}: the primary role cannot be optional")
        names = [channel.name for channel in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.pipeline}: duplicate channel names {names}")
        return self

    @property
    def roles(self) -> tuple[Role, ...]:
        """Roles the pipeline reads, primary first, each once."""
        ordered: list[Role] = [self.primary_role]
        for channel in self.channels:
            if channel.role not in ordered:
                ordered.append(channel.role)
        return tuple(ordered)

    @property
    def required_roles(self) -> tuple[Role, ...]:
        """Roles without which the case is not analysed."""
        return tuple(role for role in self.roles if role not in self.optional_roles)


class RegistrationSpec(BaseModel):
    """Rigid co-registration parameters (SimpleITK ``ImageRegistrationMethod``)."""

    model_config = _frozen()

    enabled: bool = True
    working_spacing_mm: float = Field(default=4.0, gt=0, description="Images are block-averaged to about this voxel size first.")
    histogram_bins: int = Field(default=32, ge=8, le=256, description="Mattes mutual information bins.")
    sampling_percentage: float = Field(default=0.2, gt=0, le=1, description="Fraction of fixed voxels sampled per level.")
    seed: int = Field(default=20240501, ge=0, description="Sampling seed: same input, same transform.")
    shrink_factors: tuple[int, ...] = Field(default=(2, 1), min_length=1, description="Pyramid levels over the working copies.")
    smoothing_sigmas_mm: tuple[float, ...] = Field(default=(4.0, 0.0), min_length=1, description="Gaussian sigma per level, mm.")
    iterations: int = Field(default=100, ge=1, description="Maximum optimiser iterations per level.")
    learning_rate: float = Field(default=1.0, gt=0, description="Initial step of the regular-step gradient descent.")
    min_step: float = Field(default=1e-3, gt=0, description="Optimiser stops below this step.")
    grid_tolerance_mm: float = Field(default=1e-3, ge=0, description="Grids closer than this count as identical.")

    @model_validator(mode="after")
    def _levels_match(self) -> "RegistrationSpec":
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm need one value per level")
        return self


class Recipe(BaseModel):
    """The whole preprocessing recipe (see the module docstring for each step)."""

    model_config = _frozen()

    format: Literal["fpe-node-recipe/1"] = RECIPE_FORMAT
    orientation: Literal["LPS"] = Field(default="LPS", description="Axes of the model grid (identity direction cosines).")
    grid: tuple[int, int, int] = Field(default=(25, 224, 224), description="Model grid (slices, rows, columns).")
    mask_spacing_mm: float = Field(default=2.0, gt=0, description="Voxel size the head/brain mask is computed at.")
    crop_margin_mm: float = Field(default=5.0, ge=0, description="Margin around the brain's bounding box.")
    min_brain_ml: float = Field(default=300.0, ge=0, description="A smaller mask falls back to the head with a warning.")
    antialias: bool = Field(default=True, description="Block-average sources much finer than the model grid.")
    registration: RegistrationSpec = RegistrationSpec()
    ct: PipelineRecipe
    mr: PipelineRecipe

    @model_validator(mode="after")
    def _grid_positive(self) -> "Recipe":
        if any(size < 1 for size in self.grid):
            raise ValueError(f"grid {self.grid} must be positive")
        if self.ct.pipeline != "CT" or self.mr.pipeline != "MR":
            raise ValueError("the ct recipe must be pipeline CT and the mr recipe pipeline MR")
        return self

    def for_pipeline(self, pipeline: Pipeline) -> PipelineRecipe:
        """The recipe of ``pipeline``."""
        return self.ct if pipeline == "CT" else self.mr

    def with_grid(self, grid: tuple[int, int, int]) -> "Recipe":
        """The same recipe on another model grid (reduced models in tests and training)."""
        return self.model_copy(update={"grid": tuple(int(v) for v in grid)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (what checkpoints carry)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Validate a dict written by :meth:`to_dict`; raises ``pydantic.ValidationError``."""
        return cls.model_validate(data)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form (preprocessing caches key on it)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


CT_RECIPE = PipelineRecipe(
    pipeline="CT",
    primary_role="ncct",
    mask="ct_intracranial",
    channels=(
        ChannelSpec(name="ncct_brain", role="ncct", normalisation="window", window=(0.0, 80.0), background=-1024.0),
        ChannelSpec(name="cta_vessel", role="cta", normalisation="window", window=(-100.0, 500.0), background=-1024.0),
        ChannelSpec(name="ncct_stroke", role="ncct", normalisation="window", window=(20.0, 60.0), background=-1024.0),
    ),
)
"""CT: NCCT brain window W80/L40, CTA W600/L200 (vessels bright, parenchyma dim), NCCT stroke window W40/L40."""

MR_RECIPE = PipelineRecipe(
    pipeline="MR",
    primary_role="dwi",
    mask="mr_brain",
    channels=(
        ChannelSpec(name="adc", role="adc", normalisation="zscore"),
        ChannelSpec(name="dwi", role="dwi", normalisation="zscore"),
        ChannelSpec(name="flair", role="flair", normalisation="zscore"),
    ),
)
"""MR: ADC, DWI (trace, highest b), FLAIR, each z-scored inside the brain mask."""

DEFAULT_RECIPE = Recipe(ct=CT_RECIPE, mr=MR_RECIPE)
"""The recipe applied when a checkpoint carries none (original checkpoints, demonstration weights)."""
