"""From files to a prediction: DICOM folders (one or several studies of a patient) or NIfTI volumes.

DICOM: every file is parsed once (``load``; pixel data left on disk until decoded), series classified and a pipeline chosen by
:class:`inference.selection.Selector` (``select``), each chosen series decoded (``decode``) and
stacked into a checked volume (``volume``) by :mod:`inference.volumes`; the
:class:`~inference.predictor.Predictor` does the rest. NIfTI: one file per role, read by
SimpleITK (NIfTI's RAS+ world becomes DICOM LPS on reading); the pipeline follows from the
roles given (``ncct`` -> CT, ``dwi`` -> MR).

The same functions serve ``fpe-node predict``, the node's worker and the training cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk
from pydicom.dataset import Dataset

from inference.dicom_headers import SeriesHeader, read_series_headers
from inference.predictor import CaseInput, Predictor
from inference.preprocess import RoleVolume
from inference.result import NotAnalysed, Pipeline, Prediction, Role
from inference.selection import PipelinePlan, Selector, case_files
from inference.volumes import (
    DEFAULT_MIN_COVERAGE_MM,
    Volume,
    VolumeError,
    load_case_volumes,
    read_planes,
    volume_after_drops,
)

log = logging.getLogger(__name__)

PRIMARY_ROLES: dict[Role, Pipeline] = {"ncct": "CT", "dwi": "MR"}


def role_volume(role: Role, volume: Volume) -> RoleVolume:
    """A :class:`Volume` of :mod:`inference.volumes` as the preprocessing input."""
    return RoleVolume(
        role=role,
        image=volume.to_sitk(),
        series_uid=volume.series_uid,
        study_uid=volume.study_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid or None,
        slice_sources=tuple(volume.sources),
        warnings=tuple(volume.notes),
        source_planes=volume.source_planes,
    )


def _is_diffusion(role: str, derivation: str) -> bool:
    return role == "dwi" or bool(derivation)


def load_plan_volumes(
    plan: PipelinePlan,
    headers: Sequence[SeriesHeader],
    *,
    min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM,
    datasets: dict[Path, Dataset] | None = None,
) -> tuple[dict[Role, RoleVolume], tuple[str, ...], dict[str, float]]:
    """Decode and stack every role of a plan; returns volumes, warnings, ``decode``/``volume`` times.

    Plain series are decoded (:func:`read_planes`) and stacked (:func:`volume_after_drops`)
    separately so the two stages are timed apart; diffusion roles (split by b-value, trace,
    ADC from b0) go through :func:`load_case_volumes` together, so a DWI series shared by the
    ``dwi`` and a computed ``adc`` role is decoded once, and their time counts as ``volume``.

    Raises
    ------
    VolumeError
        Naming the role whose series cannot make a sound volume.
    """
    listed = case_files(plan, headers)
    files: dict[str, tuple[tuple[Path | Dataset, ...], str, float | None]] = dict(listed)
    if datasets is not None:
        files = {role: (_kept(paths, datasets), derivation, b) for role, (paths, derivation, b) in listed.items()}
    timings = {"decode": 0.0, "volume": 0.0}
    volumes: dict[Role, RoleVolume] = {}
    warnings: list[str] = list(plan.warnings)
    diffusion = {role: spec for role, spec in files.items() if _is_diffusion(role, spec[1])}
    for role, (paths, _, _) in files.items():  # type: ignore[assignment]
        if role in diffusion:
            continue
        started = time.perf_counter()
        dropped: list[str] = []
        try:
            planes, facts = read_planes(paths, dropped)
            decoded = time.perf_counter()
            volume = volume_after_drops(planes, facts, dropped, min_coverage_mm=min_coverage_mm)
        except VolumeError as exc:
            raise type(exc)(f"{role}: {exc.reason}", exc.series_uid) from exc
        timings["decode"] += decoded - started
        timings["volume"] += time.perf_counter() - decoded
        volumes[role] = role_volume(role, volume)  # type: ignore[index, arg-type]
        warnings.extend(dropped)
    if diffusion:
        started = time.perf_counter()
        loaded = load_case_volumes({role: (list(spec[0]), spec[1], spec[2]) for role, spec in diffusion.items()},
                                   min_coverage_mm=min_coverage_mm)
        timings["volume"] += time.perf_counter() - started
        warnings.extend(loaded.warnings)
        for role, volume in loaded.volumes.items():
            volumes[role] = role_volume(role, volume)  # type: ignore[index, arg-type]
    if datasets is not None:
        for paths, _, _ in files.values():
            for item in paths:
                datasets.pop(Path(item.filename) if isinstance(item, Dataset) else item, None)  # type: ignore[arg-type]
    return volumes, tuple(dict.fromkeys(warnings)), timings


def _kept(paths: Sequence[Path], datasets: Mapping[Path, Dataset]) -> tuple[Path | Dataset, ...]:
    """Each file's kept dataset, or the path itself where none was kept."""
    return tuple(datasets.get(path, path) for path in paths)


def _lacking_reason(
    selector: Selector, headers: Sequence[SeriesHeader], warnings: Sequence[str] = ()
) -> NotAnalysed:
    return NotAnalysed(selector.explain(headers).not_ready_reason(), warnings=tuple(warnings))


def dicom_case(
    paths: Sequence[Path], selector: Selector, *, min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM
) -> CaseInput | NotAnalysed:
    """Read, select and load the case held in ``paths`` (files or folders of DICOM).

    Every file is read in isolation: one that cannot be read is dropped with a warning naming
    its SOP Instance UID (carried into the result's ``warnings``), never the case.
    """
    started = time.perf_counter()
    datasets: dict[Path, Dataset] = {}  # each file parsed once: the volumes decode from these
    problems: list[str] = []
    headers = read_series_headers(paths, datasets, problems)
    loaded = time.perf_counter()
    if not headers:
        return NotAnalysed("no DICOM image found", warnings=tuple(problems))
    return case_from_headers(headers, selector, min_coverage_mm=min_coverage_mm, load_s=loaded - started,
                             datasets=datasets, reading_warnings=problems)


def _series_label(headers: Sequence[SeriesHeader], series_uid: str) -> str:
    """How a reason names a series: its number, description and UID (what a PACS operator can find)."""
    for header in headers:
        if header.series_uid == series_uid:
            number = f" {header.series_number}" if header.series_number is not None else ""
            description = f" '{header.series_description}'" if header.series_description else ""
            return f"series{number}{description} ({series_uid})"
    return f"series {series_uid}" if series_uid else "series"


def case_from_headers(
    headers: Sequence[SeriesHeader],
    selector: Selector,
    *,
    min_coverage_mm: float = DEFAULT_MIN_COVERAGE_MM,
    load_s: float = 0.0,
    datasets: dict[Path, Dataset] | None = None,
    reading_warnings: Sequence[str] = (),
) -> CaseInput | NotAnalysed:
    """Select a pipeline among ``headers`` (one patient, possibly several studies) and load its volumes.

    ``datasets``: the datasets kept when ``headers`` were read (see :func:`load_plan_volumes`).
    ``reading_warnings``: the instances dropped while reading ``headers``
    (:func:`inference.dicom_headers.read_series_headers` ``problems``); they lead the result's
    warnings, with those of instances dropped while decoding.
    """
    started = time.perf_counter()
    plan = selector.select(headers)
    selected = time.perf_counter()
    if plan is None:
        return _lacking_reason(selector, headers, reading_warnings)
    try:
        volumes, warnings, timings = load_plan_volumes(plan, headers, min_coverage_mm=min_coverage_mm, datasets=datasets)
    except VolumeError as exc:
        return NotAnalysed(f"{_series_label(headers, exc.series_uid)} not usable: {exc.reason}", plan.pipeline,
                           plan.series_used, (),
                           tuple(dict.fromkeys((*reading_warnings, *plan.warnings))))
    timings.update({"load": load_s, "select": selected - started})
    log.info("case selected: %s pipeline, series %s", plan.pipeline, plan.series_used)
    return CaseInput(plan.pipeline, volumes, tuple(dict.fromkeys((*reading_warnings, *warnings))), timings)


def nifti_case(role_paths: Mapping[Role, Path]) -> CaseInput:
    """A case from one NIfTI (or any SimpleITK-readable) volume per role.

    Raises
    ------
    ValueError
        When no primary role (``ncct`` or ``dwi``) is given, or roles of both pipelines are.
    """
    pipelines = {PRIMARY_ROLES[role] for role in role_paths if role in PRIMARY_ROLES}
    if len(pipelines) != 1:
        raise ValueError("give exactly one primary role: ncct (CT pipeline) or dwi (MR pipeline)")
    started = time.perf_counter()
    volumes = {}
    for role, path in role_paths.items():
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        if image.GetDimension() != 3:
            raise ValueError(f"{role}: {Path(path).name} is not a 3-D volume")
        volumes[role] = RoleVolume(role=role, image=image, series_uid=f"file:{Path(path).name}")
    elapsed = time.perf_counter() - started
    return CaseInput(pipelines.pop(), volumes, (), {"load": 0.0, "decode": elapsed, "select": 0.0, "volume": 0.0})


def predict_paths(paths: Sequence[Path], predictor: Predictor, selector: Selector) -> Prediction | NotAnalysed:
    """``fpe-node predict`` in one call: DICOM files/folders to a prediction."""
    case = dicom_case(paths, selector)
    if isinstance(case, NotAnalysed):
        return case
    return predictor.predict(case)
