"""The preprocessing cache: every case through the serving recipe once, kept on disk.

Each case is turned into the model input by :func:`inference.preprocess.preprocess_case` --
the function the node serves with, never a second implementation -- and stored as
``<cache>/<key[:2]>/<key>.npy`` with a small JSON sidecar (shape, warnings). Cases are read by :mod:`inference.case` (NIfTI files, or DICOM through series selection and
volume building), as ``fpe-node predict`` and the worker read them. The key is the SHA-256 of

* the case's input *content*: every file under its study folder or role paths, by relative
  name and bytes (so a renamed folder hits, a changed file misses);
* the recipe's digest (:meth:`inference.recipe.Recipe.digest`, which includes the grid);
* the pipeline.

Repeated runs, every fold and ``fpe-node evaluate`` reuse the entries. Writes are atomic
(temporary file then rename), so concurrent runs on one cache are safe. Long loops show a
progress bar (tqdm, on a terminal only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from inference.case import dicom_case, nifti_case
from inference.predictor import CaseInput
from inference.preprocess import PreprocessedCase, PreprocessingError, preprocess_case
from inference.recipe import Recipe
from inference.result import NotAnalysed
from inference.selection import Selector
from inference.training.manifest import ALL_ROLES, Case, recipe_required_roles

log = logging.getLogger(__name__)

CACHE_VERSION = "fpe-node-preprocess-cache/1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CachedCase:
    """A case's preprocessed input on disk."""

    case_id: str
    key: str
    path: Path  # the .npy file
    shape: tuple[int, ...]
    warnings: tuple[str, ...]
    hit: bool  # True when it came from the cache

    def load(self) -> NDArray[np.float32]:
        """The ``(channels, slices, rows, columns)`` array, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(case: Case) -> str:
    """SHA-256 over every input file of the case (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    entries: list[tuple[str, Path]] = []
    if case.study is not None:
        entries += [(f"study/{p.relative_to(case.study)}", p) for p in sorted(case.study.rglob("*")) if p.is_file()]
    for role in ALL_ROLES:
        path = case.series.get(role)
        if path is None:
            continue
        if path.is_dir():
            entries += [(f"{role}/{p.relative_to(path)}", p) for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            entries.append((f"{role}/{''.join(path.suffixes)}", path))
    for name, path in sorted(entries):
        digest.update(name.encode("utf-8") + b"\0" + file_digest(path).encode("ascii") + b"\n")
    return digest.hexdigest()


def cache_key(case: Case, recipe: Recipe) -> str:
    """Key of a case's entry: input content + recipe digest + pipeline."""
    text = json.dumps(
        {"cache": CACHE_VERSION, "content": content_digest(case), "recipe": recipe.digest(), "pipeline": case.modality},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_case(case: Case, recipe: Recipe, case_window_h: float = 24.0) -> CaseInput:
    """The case's role volumes, read exactly as the node reads them (:mod:`inference.case`).

    NIfTI rows: one file per role (:func:`inference.case.nifti_case`). DICOM rows: the study
    folder and/or role folders go through header reading, series selection and volume building
    (:func:`inference.case.dicom_case`) with the roles ``recipe`` requires, preferring the
    row's pipeline.

    Raises
    ------
    PreprocessingError
        When selection or volume building cannot complete the case, or it completes another
        pipeline than the row's modality.
    """
    if case.input_format == "nifti":
        return nifti_case(case.series)  # type: ignore[arg-type]
    selector = Selector(
        case_window_h=case_window_h,
        prefer_pipeline=case.modality,
        required_roles=recipe_required_roles(recipe),  # type: ignore[arg-type]
    )
    loaded = dicom_case(case.input_paths(), selector)
    if isinstance(loaded, NotAnalysed):
        raise PreprocessingError(f"case {case.case_id}: {loaded.reason}")
    if loaded.pipeline != case.modality:
        raise PreprocessingError(f"case {case.case_id}: selection made the {loaded.pipeline} pipeline, the row says {case.modality}")
    return loaded


def run_recipe(case: Case, recipe: Recipe) -> PreprocessedCase:
    """Preprocess one case with the serving code: :func:`load_case` then :func:`inference.preprocess.preprocess_case`."""
    loaded = load_case(case, recipe)
    result = preprocess_case(loaded.volumes, recipe, loaded.pipeline)
    if loaded.warnings:
        result = replace(result, warnings=tuple(dict.fromkeys((*loaded.warnings, *result.warnings))))
    return result


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def preprocess_one(case: Case, recipe: Recipe, cache_dir: Path) -> CachedCase:
    """The case's cached input, computing and storing it on a miss."""
    key = cache_key(case, recipe)
    array_path = cache_dir / key[:2] / f"{key}.npy"
    meta_path = array_path.with_suffix(".json")
    if array_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return CachedCase(case.case_id, key, array_path, tuple(meta["shape"]), tuple(meta["warnings"]), True)
    result = run_recipe(case, recipe)
    tensor = np.ascontiguousarray(result.tensor, dtype=np.float32)
    _atomic_write(array_path, lambda p: np.save(p, tensor, allow_pickle=False))
    meta = {"cache": CACHE_VERSION, "shape": list(tensor.shape), "warnings": list(result.warnings),
            "channels": list(result.channel_names), "pipeline": result.pipeline}
    _atomic_write(meta_path, lambda p: _write_text(p, json.dumps(meta)))
    return CachedCase(case.case_id, key, array_path, tuple(tensor.shape), tuple(result.warnings), False)


def preprocess_cohort(
    cases: Sequence[Case],
    recipe: Recipe,
    cache_dir: Path,
    *,
    progress: bool | None = None,
) -> list[CachedCase]:
    """Every case's cached input, in manifest order (``progress=None``: a bar on terminals only)."""
    cached = []
    for case in tqdm(cases, desc="preprocessing", unit="case", disable=None if progress is None else not progress):
        cached.append(preprocess_one(case, recipe, cache_dir))
    hits = sum(entry.hit for entry in cached)
    log.info("preprocessing: %d cases, %d from the cache", len(cached), hits)
    return cached


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
