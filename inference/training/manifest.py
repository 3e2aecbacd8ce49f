"""The cohort manifest: one CSV row per patient, validated in full before any training.

Columns (header row required, names case-insensitive, order free):

``id``
    Case identifier, unique in the manifest. Use a study pseudonym, never a patient ID.
``label``
    First-pass effect: ``1`` (complete recanalisation after one pass) or ``0``.
``modality``
    ``CT`` or ``MR`` -- the pipeline the case is trained on.
``study``
    A study folder of DICOM files; series selection (:mod:`inference.selection`) picks the
    roles, exactly as the node does when it serves.
``ncct``, ``cta``, ``dwi``, ``adc``, ``flair``
    Per-role inputs instead of (or in addition to, overriding) ``study``: a NIfTI file or a
    DICOM series folder each. Only the roles of the row's modality may be given.
``format``
    Optional ``dicom`` or ``nifti``; default: ``nifti`` for ``.nii``/``.nii.gz`` paths,
    else ``dicom``.
``fold``
    Optional fixed cross-validation fold (0-based integer); empty: assigned by stratification.
``split``
    Optional ``train`` or ``test``; empty counts as ``train``. ``fpe-node train`` uses the
    train rows, ``fpe-node evaluate`` the test rows when there are any.

Relative paths are resolved against the manifest's folder. :func:`load_manifest` reports
*every* bad row (missing files, unknown labels or modalities, duplicate ids, roles that do not
belong to the modality, a case whose required roles are missing or that series selection
cannot complete) in one :class:`ManifestError` before anything else runs.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Modality = Literal["CT", "MR"]
InputFormat = Literal["dicom", "nifti"]
Split = Literal["train", "test"]

ROLES_BY_MODALITY: dict[str, tuple[str, ...]] = {"CT": ("ncct", "cta"), "MR": ("dwi", "adc", "flair")}
ALL_ROLES = ("ncct", "cta", "dwi", "adc", "flair")
REQUIRED_COLUMNS = ("id", "label", "modality")
OPTIONAL_COLUMNS = ("study", "format", "fold", "split", *ALL_ROLES)


@dataclass(frozen=True)
class Case:
    """One validated manifest row."""

    case_id: str
    label: int
    modality: Modality
    input_format: InputFormat
    line: int  # line number in the CSV file (header = 1)
    study: Path | None = None
    series: Mapping[str, Path] = field(default_factory=dict)  # role -> NIfTI file or DICOM folder
    fold: int | None = None
    split: Split = "train"

    def input_paths(self) -> list[Path]:
        """Every input path of the case (study folder first, then roles in fixed order)."""
        paths = [self.study] if self.study is not None else []
        return paths + [self.series[role] for role in ALL_ROLES if role in self.series]


@dataclass(frozen=True)
class Problem:
    """One reason a manifest row is bad."""

    line: int
    case_id: str
    message: str

    def __str__(self) -> str:
        shown = f" (id {self.case_id!r})" if self.case_id else ""
        return f"line {self.line}{shown}: {self.message}"


class ManifestError(ValueError):
    """The manifest is not usable; :attr:`problems` lists every bad row."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n  ".join(str(problem) for problem in problems)
        super().__init__(f"manifest {path} has {len(problems)} problem(s):\n  {lines}")


CaseChecker = Callable[[Case], str | None]
"""Checks that a case can be completed (selection finds its roles); returns a reason or None."""


def recipe_required_roles(recipe: Any = None) -> dict[str, tuple[str, ...]]:
    """Roles each pipeline cannot do without under ``recipe`` (default: the default recipe).

    The recipe knows which channels it may zero-fill (:attr:`PipelineRecipe.required_roles`);
    under the default recipe CT needs NCCT and CTA, MR needs DWI, ADC and FLAIR.
    """
    from inference.recipe import DEFAULT_RECIPE

    chosen = recipe or DEFAULT_RECIPE
    return {"CT": tuple(chosen.ct.required_roles), "MR": tuple(chosen.mr.required_roles)}


def load_manifest(
    path: Path | str,
    *,
    check_case: CaseChecker | None = None,
    required_roles: Mapping[str, tuple[str, ...]] | None = None,
) -> list[Case]:
    """Read and validate a manifest; raise :class:`ManifestError` naming every bad row.

    Parameters
    ----------
    path:
        The CSV file.
    check_case:
        Called for every row that is otherwise valid, to confirm the case can be completed
        (e.g. that series selection finds the roles in a study folder); returns a reason when not.
    required_roles:
        Roles that per-role rows must give, by modality (default: :func:`recipe_required_roles`).
    """
    required = recipe_required_roles() if required_roles is None else required_roles
    manifest_path = Path(path)
    try:
        text = manifest_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise ManifestError(manifest_path, [Problem(0, "", "file does not exist")]) from exc
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise ManifestError(manifest_path, [Problem(1, "", "empty file: a header row is required")])
    header = [name.strip().lower() for name in rows[0]]
    header_problems = _check_header(header)
    if header_problems:
        raise ManifestError(manifest_path, header_problems)
    base = manifest_path.parent
    cases: list[Case] = []
    problems: list[Problem] = []
    first_line_of: dict[str, int] = {}
    for line_number, values in enumerate(rows[1:], start=2):
        if not any(value.strip() for value in values):
            continue  # blank line
        record = _record(header, values)
        case, row_problems = _parse_row(record, line_number, base, required)
        case_id = record.get("id", "")
        if case_id:
            if case_id in first_line_of:
                row_problems.append(
                    Problem(line_number, case_id, f"duplicate id (first used on line {first_line_of[case_id]})")
                )
            else:
                first_line_of[case_id] = line_number
        if len(values) > len(header):
            row_problems.append(Problem(line_number, case_id, f"{len(values)} fields but the header has {len(header)}"))
        if case is not None and not row_problems and check_case is not None:
            reason = check_case(case)
            if reason:
                row_problems.append(Problem(line_number, case_id, reason))
        problems.extend(row_problems)
        if case is not None and not row_problems:
            cases.append(case)
    if problems:
        raise ManifestError(manifest_path, problems)
    if not cases:
        raise ManifestError(manifest_path, [Problem(1, "", "no cases")])
    log.info("manifest %s: %d cases valid", manifest_path.name, len(cases))
    return cases


def _check_header(header: list[str]) -> list[Problem]:
    problems = []
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        problems.append(Problem(1, "", f"header lacks column(s) {', '.join(missing)}"))
    unknown = [name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        known = ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
        problems.append(Problem(1, "", f"unknown column(s) {', '.join(unknown)} (known: {known})"))
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        problems.append(Problem(1, "", f"column(s) given twice: {', '.join(repeated)}"))
    return problems


def _record(header: list[str], values: list[str]) -> dict[str, str]:
    return {name: (values[i].strip() if i < len(values) else "") for i, name in enumerate(header)}


def _parse_row(
    record: Mapping[str, str], line: int, base: Path, required_roles: Mapping[str, tuple[str, ...]]
) -> tuple[Case | None, list[Problem]]:
    case_id = record.get("id", "")
    problems: list[str] = []
    if not case_id:
        problems.append("empty id")
    label = _parse_label(record.get("label", ""), problems)
    modality = _parse_modality(record.get("modality", ""), problems)
    fold = _parse_fold(record.get("fold", ""), problems)
    split = _parse_split(record.get("split", ""), problems)
    study = _resolve(record.get("study", ""), base)
    series = {role: path for role in ALL_ROLES if (path := _resolve(record.get(role, ""), base)) is not None}
    _check_paths(study, series, problems)
    input_format = _parse_format(record.get("format", ""), study, series, problems)
    if modality is not None:
        _check_roles(modality, study, series, required_roles, problems)
    row_problems = [Problem(line, case_id, message) for message in problems]
    if row_problems or label is None or modality is None or input_format is None:
        return None, row_problems
    case = Case(case_id, label, modality, input_format, line, study, series, fold, split)
    return case, []


def _parse_label(value: str, problems: list[str]) -> int | None:
    if value in ("0", "1"):
        return int(value)
    problems.append(f"unknown label {value!r} (must be 0 or 1)")
    return None


def _parse_modality(value: str, problems: list[str]) -> Modality | None:
    upper = value.upper()
    if upper == "CT":
        return "CT"
    if upper == "MR":
        return "MR"
    problems.append(f"unknown modality {value!r} (must be CT or MR)")
    return None


def _parse_fold(value: str, problems: list[str]) -> int | None:
    if not value:
        return None
    if value.isdigit():
        return int(value)
    problems.append(f"fold {value!r} is not a non-negative integer")
    return None


def _parse_split(value: str, problems: list[str]) -> Split:
    lowered = value.lower()
    if lowered in ("", "train"):
        return "train"
    if lowered == "test":
        return "test"
    problems.append(f"unknown split {value!r} (must be train, test or empty)")
    return "train"


def _resolve(value: str, base: Path) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_paths(study: Path | None, series: Mapping[str, Path], problems: list[str]) -> None:
    if study is not None and not study.is_dir():
        problems.append(f"study folder {study} does not exist")
    for role, path in series.items():
        if not path.exists():
            problems.append(f"{role} input {path} does not exist")


def _parse_format(
    value: str, study: Path | None, series: Mapping[str, Path], problems: list[str]
) -> InputFormat | None:
    lowered = value.lower()
    if lowered in ("dicom", "nifti"):
        declared: InputFormat | None = "dicom" if lowered == "dicom" else "nifti"
    elif lowered:
        problems.append(f"unknown format {value!r} (must be dicom or nifti)")
        return None
    else:
        declared = None
    inferred: set[InputFormat] = {_format_of(path) for path in series.values()}
    if study is not None:
        inferred.add("dicom")
    if len(inferred) > 1:
        problems.append("mixes NIfTI files and DICOM folders; give one format per case")
        return None
    if declared == "nifti" and study is not None:
        problems.append("a study folder is DICOM; NIfTI cases give per-role files")
        return None
    if declared is not None:
        return declared
    return next(iter(inferred)) if inferred else "dicom"


def _format_of(path: Path) -> InputFormat:
    name = path.name.lower()
    return "nifti" if name.endswith((".nii", ".nii.gz")) else "dicom"


def _check_roles(
    modality: str,
    study: Path | None,
    series: Mapping[str, Path],
    required_roles: Mapping[str, tuple[str, ...]],
    problems: list[str],
) -> None:
    foreign = [role for role in series if role not in ROLES_BY_MODALITY[modality]]
    if foreign:
        problems.append(f"role(s) {', '.join(foreign)} do not belong to modality {modality}")
    if study is None:
        missing = [role for role in required_roles.get(modality, ()) if role not in series]
        if not series:
            problems.append("neither a study folder nor per-role inputs given")
        elif missing:
            problems.append(f"{modality} case lacks required role(s) {', '.join(missing)}")


def write_manifest(path: Path, cases: Iterable[Case]) -> None:
    """Write cases as a manifest CSV (paths relative to its folder where possible)."""
    base = path.parent.resolve()

    def shown(target: Path | None) -> str:
        if target is None:
            return ""
        try:
            return str(target.resolve().relative_to(base))
        except ValueError:
            return str(target)

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "modality", "format", "study", *ALL_ROLES, "fold", "split"])
        for case in cases:
            writer.writerow(
                [case.case_id, case.label, case.modality, case.input_format, shown(case.study)]
                + [shown(case.series.get(role)) for role in ALL_ROLES]
                + ["" if case.fold is None else case.fold, case.split]
            )


def selection_checker(
    case_window_h: float = 24.0, required_roles: Mapping[str, tuple[str, ...]] | None = None
) -> CaseChecker:
    """A :data:`CaseChecker` that runs series selection on each DICOM study folder.

    Per-role rows are checked by :func:`load_manifest` itself (required roles present); a study
    folder is read header-only and the row is bad when selection -- with the recipe's required
    roles, as the node serves it -- cannot make the row's pipeline ready (the reason names what
    it lacks, as ``fpe-node explain`` does).
    """
    from inference.dicom_headers import read_series_headers
    from inference.selection import Selector

    required = recipe_required_roles() if required_roles is None else required_roles

    def check(case: Case) -> str | None:
        if case.study is None:
            return None
        headers = read_series_headers([case.study])
        if not headers:
            return f"study folder {case.study} holds no DICOM series"
        selector = Selector(case_window_h=case_window_h, prefer_pipeline=case.modality,
                            required_roles=required)  # type: ignore[arg-type]
        plan = selector.explain(headers).pipelines.get(case.modality)
        if plan is None or not plan.ready:
            lacking = "; ".join(plan.lacking) if plan is not None else "no plan"
            return f"selection cannot complete the {case.modality} pipeline: {lacking}"
        return None

    return check
