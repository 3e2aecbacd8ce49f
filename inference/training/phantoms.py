"""A small synthetic, learnable stroke cohort: phantom heads whose label depends on a lesion.

Each case is an MR study of three co-registered volumes (DWI, ADC, FLAIR) written as NIfTI
files, with a manifest CSV (see :mod:`inference.training.manifest`). The head is an ellipsoid
brain with ventricles; an ischaemic lesion (bright on DWI, dark on ADC, faint on FLAIR) lies in
either hemisphere. The label follows the lesion's size -- a small infarct core means a
first-pass effect (label 1), a large one means none (label 0) -- so it does not change under
the left-right flip used as augmentation. Nuisance variation the model must ignore: head
position and size, lesion position and side, per-channel intensity scale and offset, noise.

It is a test and smoke-run cohort, not a model of real anatomy: it proves the training loop
learns and that nothing leaks (the same cohort with shuffled labels must score about 0.5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from inference.training.manifest import Case

log = logging.getLogger(__name__)

MR_ROLES = ("dwi", "adc", "flair")
# Tissue values (DWI and FLAIR arbitrary units; ADC in 1e-6 mm^2/s).
_BRAIN = {"dwi": 300.0, "adc": 800.0, "flair": 400.0}
_CSF = {"dwi": 60.0, "adc": 3000.0, "flair": 80.0}
_LESION = {"dwi": 900.0, "adc": 350.0, "flair": 520.0}


@dataclass(frozen=True)
class PhantomSpec:
    """Geometry and difficulty of the phantom cohort.

    ``shape`` is (slices, rows, columns) of the written volumes; ``spacing_mm`` the matching
    (slice, row, column) spacing. Lesion radii are fractions of the brain's in-plane radius.
    """

    shape: tuple[int, int, int] = (20, 48, 48)
    spacing_mm: tuple[float, float, float] = (6.0, 4.0, 4.0)
    small_lesion: tuple[float, float] = (0.05, 0.10)
    large_lesion: tuple[float, float] = (0.30, 0.42)
    position_jitter: float = 0.08  # of the field of view, each axis
    size_jitter: float = 0.08  # relative head size variation
    intensity_jitter: float = 0.25  # relative per-channel scale variation
    noise: float = 0.05  # Gaussian noise, relative to brain intensity


@dataclass(frozen=True)
class PhantomCase:
    """One generated case: its volumes (role -> slices x rows x columns) and label."""

    case_id: str
    label: int
    volumes: dict[str, NDArray[np.float32]]
    lesion_radius: float


def make_case(index: int, label: int, seed: int, spec: PhantomSpec = PhantomSpec()) -> PhantomCase:
    """Build case ``index`` deterministically from ``seed``."""
    rng = np.random.default_rng([seed, index])
    z, y, x = _physical_grid(spec)
    extent = np.array([spec.shape[i] * spec.spacing_mm[i] for i in range(3)])
    centre = rng.uniform(-spec.position_jitter, spec.position_jitter, 3) * extent
    scale = 1.0 + rng.uniform(-spec.size_jitter, spec.size_jitter)
    radii = np.array([0.36, 0.36, 0.30]) * extent * scale  # z, y (AP), x (LR)
    brain = _ellipsoid(z, y, x, centre, radii)
    ventricles = _ellipsoid(z, y, x, centre + [0.0, -0.05 * extent[1], 0.0], radii * [0.45, 0.35, 0.18])
    lesion_fraction = rng.uniform(*(spec.large_lesion if label == 0 else spec.small_lesion))
    lesion_radius = float(lesion_fraction * radii[2])
    side = rng.choice([-1.0, 1.0])
    lesion_centre = centre + [
        rng.uniform(-0.35, 0.35) * radii[0],
        rng.uniform(-0.35, 0.35) * radii[1],
        side * rng.uniform(0.35, 0.55) * radii[2],
    ]
    lesion = _ellipsoid(z, y, x, lesion_centre, np.array([lesion_radius * 1.2, lesion_radius, lesion_radius])) & brain
    lesion &= ~ventricles
    volumes = {}
    for role in MR_ROLES:
        image = np.zeros(spec.shape, dtype=np.float64)
        image[brain] = _BRAIN[role]
        image[ventricles & brain] = _CSF[role]
        image[lesion] = _LESION[role]
        gain = 1.0 + rng.uniform(-spec.intensity_jitter, spec.intensity_jitter)
        offset = rng.uniform(-0.05, 0.05) * _BRAIN[role]
        image = image * gain + np.where(brain, offset, 0.0)
        image += rng.normal(0.0, spec.noise * _BRAIN[role], spec.shape) * np.where(brain, 1.0, 0.3)
        volumes[role] = np.clip(image, 0.0, None).astype(np.float32)
    return PhantomCase(f"phantom{index:03d}", label, volumes, lesion_radius)


def _physical_grid(spec: PhantomSpec) -> tuple[NDArray[np.float64], ...]:
    axes = [(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(spec.shape, spec.spacing_mm)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return z, y, x


def _ellipsoid(
    z: NDArray[np.float64], y: NDArray[np.float64], x: NDArray[np.float64], centre: NDArray[np.float64], radii: NDArray[np.float64]
) -> NDArray[np.bool_]:
    distance = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    return np.asarray(distance <= 1.0)


def cohort_labels(n_cases: int, seed: int, positive_fraction: float = 0.5) -> list[int]:
    """Labels for a cohort of ``n_cases``: ``round(n * fraction)`` ones, shuffled with ``seed``."""
    n_positive = int(round(n_cases * positive_fraction))
    labels = np.array([1] * n_positive + [0] * (n_cases - n_positive))
    np.random.default_rng(seed).shuffle(labels)
    return [int(v) for v in labels]


def write_nifti(path: Path, volume: NDArray[np.float32], spacing_mm: tuple[float, float, float]) -> Path:
    """Write a (slices, rows, columns) volume as NIfTI with the given spacing (SimpleITK order x, y, z)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((spacing_mm[2], spacing_mm[1], spacing_mm[0]))
    extent = [n * d for n, d in zip(volume.shape[::-1], image.GetSpacing())]
    image.SetOrigin(tuple(-e / 2.0 for e in extent))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_cohort(
    folder: Path,
    n_cases: int = 40,
    *,
    seed: int = 0,
    spec: PhantomSpec = PhantomSpec(),
    shuffle_labels_seed: int | None = None,
) -> Path:
    """Write ``n_cases`` phantom MR cases as NIfTI plus ``manifest.csv``; return the manifest path.

    With ``shuffle_labels_seed`` the images are the same but the manifest's labels are
    permuted: the leakage control, on which a sound pipeline scores about chance.
    """
    from inference.training.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    labels = cohort_labels(n_cases, seed)
    cases = []
    for index, label in enumerate(labels):
        phantom = make_case(index, label, seed, spec)
        series = {
            role: write_nifti(folder / phantom.case_id / f"{role}.nii.gz", phantom.volumes[role], spec.spacing_mm)
            for role in MR_ROLES
        }
        cases.append((phantom.case_id, label, series))
    manifest_labels = [label for _, label, _ in cases]
    if shuffle_labels_seed is not None:
        manifest_labels = [int(v) for v in np.random.default_rng(shuffle_labels_seed).permutation(manifest_labels)]
    rows = [
        Case(case_id, manifest_label, "MR", "nifti", line, None, series)
        for line, ((case_id, _, series), manifest_label) in enumerate(zip(cases, manifest_labels), start=2)
    ]
    manifest = folder / "manifest.csv"
    write_manifest(manifest, rows)
    log.info("wrote %d phantom cases to %s", n_cases, folder)
    return manifest
