"""Series selection: which series plays which role, and which pipeline is ready.

The rules are data (``config/selection.yaml`` or ``settings.inference.selection_rules``),
validated into :class:`SelectionRules`. Each series (a :class:`~inference.dicom_headers.SeriesHeader`)
is first checked against the ``never`` rules (localizers, dose reports and other non-images,
secondary captures and AI results, perfusion, MIPs, reformats), then against each role's criteria.
Candidates of a role are ranked by the role's ``prefer`` keys (e.g. thinner slices first for
``ncct``, trace before directional and b closest to 1000 for ``dwi``); ties go to the series
acquired first, so a later equal series never displaces a choice.

Roles and pipelines
-------------------
- CT: ``ncct`` (required, primary), ``cta`` (optional in the rules file; the served recipe
  decides: ``Selector(required_roles={"CT": recipe.ct.required_roles, ...})``, and the default
  recipe, which has a CTA channel, requires it).
- MR: ``dwi`` (required, primary: trace-weighted at the highest b >= 500 s/mm2), ``adc``
  (required, but derivable: computed from b0 and the trace when the DWI series holds both) and
  ``flair`` (required: the model's third MR channel).

DWI handling (PS3.3 C.8.13.5.9 for directionality): a series with several b-values is split and
the highest b used; a series holding only directional images at the highest b (DIRECTIONAL or
BMATRIX, or several images per position) is planned as "build the trace" (geometric mean over the
directions), and the plan says so. When no ADC series came and the DWI series holds b0 frames, ADC
is planned from b0 and the trace, and the plan warns.

Cases across studies
--------------------
NCCT and CTA are often separate orders. Roles may come from any study of the same patient (Patient
ID (0010,0020) and Issuer of Patient ID (0010,0021)) acquired within ``case_window_h`` of the
primary series' study; the primary (NCCT or DWI) is chosen among studies within the window of the
newest study holding a candidate for it, and the result belongs to the primary's study. For the other roles a series of the
primary's own study ranks before one of another study.

Callables for the completion logic: :meth:`Selector.could_use` (could this series fill any role?)
and :meth:`Selector.pipeline_ready` (do these series make a ready pipeline?).
:func:`would_change_selection` tells whether a new plan justifies re-running a case.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config import CONFIG_DIR
from inference.dicom_headers import SeriesHeader
from inference.result import Pipeline, Role

log = logging.getLogger(__name__)

DEFAULT_SELECTION_RULES = CONFIG_DIR / "selection.yaml"
ROLES: tuple[Role, ...] = ("ncct", "cta", "dwi", "adc", "flair")
PIPELINES: tuple[Pipeline, ...] = ("CT", "MR")
PreferKey = Literal["thinner", "more_positions", "earlier", "trace_over_directional", "b_close_to_1000"]
B0_MAX = 50.0  # s/mm2: frames at or below count as b0

# --------------------------------------------------------------------------- rule models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Range(_Frozen):
    """Closed numeric range; either end may be open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g}"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _upper(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(v.strip().upper() for v in values)


class Criteria(_Frozen):
    """Conditions on a series; every condition given must hold."""

    modality_any: tuple[str, ...] = ()
    sop_class_prefix_any: tuple[str, ...] = ()
    has_pixels: bool | None = None
    image_type_all: tuple[str, ...] = ()
    image_type_any: tuple[str, ...] = ()
    image_type_none: tuple[str, ...] = ()
    description_any: tuple[str, ...] = ()
    description_none: tuple[str, ...] = ()
    orientation: Literal["axial", "axial_or_3d", "any"] = "any"
    contrast: Literal["present", "absent", "any"] = "any"
    slice_thickness_mm: Range | None = None
    n_positions: Range | None = None
    coverage_mm: Range | None = None
    max_b_value: Range | None = None
    any_of: tuple["Criteria", ...] = ()

    @field_validator("modality_any", "image_type_all", "image_type_any", "image_type_none")
    @classmethod
    def _to_upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _upper(value)

    @field_validator("description_any", "description_none")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value

    def is_empty(self) -> bool:
        return not any(getattr(self, name) not in (None, (), "any") for name in type(self).model_fields if name in Criteria.model_fields)


class NeverRule(Criteria):
    """A series matching this is never chosen, for ``reason``."""

    reason: str = Field(..., min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> "NeverRule":
        if self.is_empty():
            raise ValueError(f"never-rule {self.reason!r} names no criterion")
        return self


class RoleRule(Criteria):
    """Criteria for a role, the pipeline it serves and how candidates are ranked."""

    pipeline: Pipeline
    prefer: tuple[PreferKey, ...] = ("earlier",)


class PipelineRule(_Frozen):
    """What one pipeline needs."""

    primary: Role
    required: tuple[Role, ...]
    optional: tuple[Role, ...] = ()
    derivable: dict[Role, Role] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _primary_required(self) -> "PipelineRule":
        if self.primary not in self.required:
            raise ValueError(f"primary role {self.primary} must be required")
        return self


class SelectionRules(_Frozen):
    """Validated selection rules (``config/selection.yaml`` documents each field)."""

    version: int = Field(1, ge=1, le=1)
    axial_tolerance_deg: float = Field(30.0, gt=0, le=90)
    never: tuple[NeverRule, ...] = ()
    roles: dict[Role, RoleRule]
    pipelines: dict[Pipeline, PipelineRule]
    prefer_pipeline: Pipeline = "MR"

    @model_validator(mode="after")
    def _consistent(self) -> "SelectionRules":
        for name, pipeline in self.pipelines.items():
            for role in (*pipeline.required, *pipeline.optional, *pipeline.derivable):
                if role not in self.roles:
                    raise ValueError(f"pipeline {name} names role {role}, which has no rule")
                if self.roles[role].pipeline != name:
                    raise ValueError(f"role {role} belongs to pipeline {self.roles[role].pipeline}, not {name}")
        return self


def with_required_roles(rules: SelectionRules, required: Mapping[Pipeline, Sequence[Role]]) -> SelectionRules:
    """The rules with each named pipeline's required roles replaced (the rest of its roles optional).

    Raises
    ------
    pydantic.ValidationError
        When a role does not belong to the pipeline or the primary role is left out.
    """
    data = rules.model_dump()
    for pipeline, roles in required.items():
        spec = data["pipelines"][pipeline]
        own = [role for role, rule in rules.roles.items() if rule.pipeline == pipeline]
        spec["required"] = tuple(roles)
        spec["optional"] = tuple(role for role in own if role not in roles)
    return SelectionRules.model_validate(data)


def load_selection_rules(path: Path | None = None) -> SelectionRules:
    """Read and validate the selection rules (bundled defaults when ``path`` is None).

    Raises
    ------
    pydantic.ValidationError
        Naming each invalid field.
    ValueError
        When the file is not YAML.
    """
    path = DEFAULT_SELECTION_RULES if path is None else Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return SelectionRules.model_validate(data)


# --------------------------------------------------------------------------- criteria checks


def _description(header: SeriesHeader) -> str:
    return header.series_description or header.protocol_name


def _thickness(header: SeriesHeader) -> float | None:
    """The series' thinnest slice thickness (a mixed series is judged on its thinnest part), else its spacing."""
    return header.slice_thickness if header.slice_thickness else header.slice_spacing


def _thickness_text(header: SeriesHeader, thickness: float) -> str:
    if header.slice_thickness_max is not None and header.slice_thickness_max - thickness > 1e-3:
        return f"{thickness:g}-{header.slice_thickness_max:g} mm ({', '.join(p.describe() for p in header.parts)})"
    return f"{thickness:g} mm"


def _check_strings(criteria: Criteria, header: SeriesHeader) -> list[str]:
    failures = []
    if criteria.modality_any and header.modality not in criteria.modality_any:
        failures.append(f"modality {header.modality or '?'} is not {'/'.join(criteria.modality_any)}")
    if criteria.sop_class_prefix_any and not any(
        uid.startswith(prefix) for uid in header.sop_class_uids for prefix in criteria.sop_class_prefix_any
    ):
        failures.append("SOP class not listed")
    if criteria.has_pixels is not None and header.has_pixels != criteria.has_pixels:
        failures.append("has no pixel data" if criteria.has_pixels else "has pixel data")
    types = header.image_types
    missing = [t for t in criteria.image_type_all if t not in types]
    if missing:
        failures.append(f"ImageType lacks {'/'.join(missing)}")
    if criteria.image_type_any and not types & set(criteria.image_type_any):
        failures.append(f"ImageType has none of {'/'.join(criteria.image_type_any)}")
    unwanted = sorted(types & set(criteria.image_type_none))
    if unwanted:
        failures.append(f"ImageType is {'/'.join(unwanted)}")
    text = _description(header)
    if criteria.description_any and not any(re.search(p, text, re.IGNORECASE) for p in criteria.description_any):
        failures.append(f"description {text!r} does not match")
    hit = next((p for p in criteria.description_none if re.search(p, text, re.IGNORECASE)), None)
    if hit:
        failures.append(f"description {text!r} matches an excluded pattern")
    return failures


def _check_geometry(criteria: Criteria, header: SeriesHeader, tolerance_deg: float, partial: bool) -> list[str]:
    failures = []
    volumetric = criteria.orientation == "axial_or_3d" and header.mr_acquisition_type == "3D"
    if criteria.orientation in ("axial", "axial_or_3d") and not volumetric:
        tilt = header.axial_tilt_deg
        if tilt is None:
            failures.append("orientation unknown")
        elif tilt > tolerance_deg:
            failures.append(f"not axial (slice normal {tilt:.0f} deg from head-foot, limit {tolerance_deg:g})")
    if criteria.contrast == "present" and not header.contrast_agent:
        failures.append("no ContrastBolusAgent")
    if criteria.contrast == "absent" and header.contrast_agent:
        failures.append("ContrastBolusAgent is set")
    thickness = _thickness(header)
    if criteria.slice_thickness_mm is not None:
        if thickness is None:
            failures.append("slice thickness unknown")
        elif not criteria.slice_thickness_mm.holds(thickness):
            failures.append(f"slice thickness {_thickness_text(header, thickness)} not {criteria.slice_thickness_mm.describe()}")
    if partial:  # counts, coverage and b-values are only known once the series is complete
        return failures
    if criteria.n_positions is not None and not criteria.n_positions.holds(header.n_positions):
        failures.append(f"{header.n_positions} slice positions, needs {criteria.n_positions.describe()}")
    if criteria.coverage_mm is not None:
        coverage = header.coverage_mm or 0.0
        if not criteria.coverage_mm.holds(coverage):
            failures.append(f"covers {coverage:.0f} mm, needs {criteria.coverage_mm.describe()}")
    if criteria.max_b_value is not None:
        if not header.b_values:
            failures.append("no b-values")
        elif not criteria.max_b_value.holds(header.b_values[-1]):
            failures.append(f"highest b-value {header.b_values[-1]:g} not {criteria.max_b_value.describe()}")
    return failures


def criteria_failures(
    criteria: Criteria, header: SeriesHeader, tolerance_deg: float, partial: bool = False
) -> list[str]:
    """Why ``header`` does not meet ``criteria`` (empty: it does).

    ``partial``: the series may be incomplete; slice count, coverage and b-value criteria are
    not checked.
    """
    failures = _check_strings(criteria, header) + _check_geometry(criteria, header, tolerance_deg, partial)
    if criteria.any_of:
        alternatives = [criteria_failures(c, header, tolerance_deg, partial) for c in criteria.any_of]
        if all(alternatives):
            failures.append(" or ".join("; ".join(a) for a in alternatives))
    return failures


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Classification:
    """How one series fares: excluded (and why), and per role what fails (empty list: candidate)."""

    header: SeriesHeader
    excluded: str | None
    role_failures: dict[Role, tuple[str, ...]]

    @property
    def candidate_roles(self) -> tuple[Role, ...]:
        if self.excluded:
            return ()
        return tuple(role for role, failures in self.role_failures.items() if not failures)


def classify(header: SeriesHeader, rules: SelectionRules, partial: bool = False) -> Classification:
    """Check the never-rules, then every role's criteria (``partial``: see :func:`criteria_failures`)."""
    for rule in rules.never:
        if not criteria_failures(rule, header, rules.axial_tolerance_deg):
            return Classification(header, rule.reason, {})
    failures = {
        role: tuple(criteria_failures(rule, header, rules.axial_tolerance_deg, partial))
        for role, rule in rules.roles.items()
    }
    return Classification(header, None, failures)


# --------------------------------------------------------------------------- DWI plan


@dataclass(frozen=True)
class DiffusionPlan:
    """How the DWI (and possibly ADC) channel is obtained from one series."""

    b_value: float
    trace_available: bool  # trace-weighted images at b_value are in the series
    n_directions: int  # directions to combine when the trace must be built
    has_b0: bool
    split: bool  # the series holds several b-values

    def describe(self) -> str:
        parts = []
        if self.split:
            parts.append(f"b={self.b_value:g} taken from a series with several b-values")
        if not self.trace_available:
            parts.append(f"trace built as geometric mean of {self.n_directions} directions at b={self.b_value:g}")
        return "; ".join(parts)


def diffusion_plan(header: SeriesHeader) -> DiffusionPlan | None:
    """Plan the DWI channel from a series with b-values; None when it has none."""
    if not header.b_values:
        return None
    b_max = header.b_values[-1]
    directional = bool(header.directionalities & {"DIRECTIONAL", "BMATRIX"}) or header.n_directions_at_max_b > 1
    isotropic = "ISOTROPIC" in header.directionalities or "TRACEW" in header.image_types
    trace = isotropic or (not directional and header.images_per_position_at_max_b <= 1.0)
    n_directions = header.n_directions_at_max_b or int(round(header.images_per_position_at_max_b))
    return DiffusionPlan(
        b_value=b_max,
        trace_available=trace,
        n_directions=n_directions,
        has_b0=header.b_values[0] <= B0_MAX and len(header.b_values) > 1,
        split=len(header.b_values) > 1,
    )


# --------------------------------------------------------------------------- ranking


def _when(header: SeriesHeader) -> datetime:
    return header.acquisition_datetime or header.study_datetime or datetime.max


def rank_key(role_rule: RoleRule, header: SeriesHeader) -> tuple[float, ...]:
    """Sort key of a candidate (smaller is better) from the role's ``prefer`` list."""
    key: list[float] = []
    for prefer in role_rule.prefer:
        if prefer == "thinner":
            key.append(_thickness(header) or math.inf)
        elif prefer == "more_positions":
            key.append(-float(header.n_positions))
        elif prefer == "earlier":
            when = _when(header)
            key.append(when.timestamp() if when != datetime.max else math.inf)
        elif prefer == "trace_over_directional":
            plan = diffusion_plan(header)
            key.append(0.0 if plan is not None and plan.trace_available else 1.0)
        elif prefer == "b_close_to_1000":
            key.append(abs(header.b_values[-1] - 1000.0) if header.b_values else math.inf)
    return tuple(key)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class RoleChoice:
    """The series chosen for one role."""

    role: Role
    series_uid: str
    study_uid: str
    description: str
    rank: tuple[float, ...]
    b_value: float | None = None
    derivation: str = ""  # how the channel is obtained when not read as is
    derived_from: Role | None = None  # for a role computed from another role's series
    has_b0: bool = False  # a DWI series that also holds b0 frames (ADC can be computed)


@dataclass(frozen=True)
class PipelinePlan:
    """One pipeline's selection: ready or what it lacks."""

    pipeline: Pipeline
    ready: bool
    roles: dict[Role, RoleChoice]
    lacking: tuple[str, ...]
    primary_study_uid: str | None
    warnings: tuple[str, ...] = ()
    absent_optional: tuple[Role, ...] = ()  # optional roles no series fills (e.g. no CTA)

    @property
    def series_used(self) -> dict[str, str]:
        """role -> SeriesInstanceUID (a derived role names the series it is computed from)."""
        return {role: choice.series_uid for role, choice in self.roles.items()}


@dataclass(frozen=True)
class SeriesDecision:
    """Per series: the role it plays, or why none."""

    study_uid: str
    series_uid: str
    series_number: int | None
    modality: str
    description: str
    n_instances: int
    role: Role | None
    candidate_roles: tuple[Role, ...]
    reason: str


@dataclass(frozen=True)
class Explanation:
    """The dry run: every series' decision, every pipeline's state, the pipeline that would run."""

    series: tuple[SeriesDecision, ...]
    pipelines: dict[Pipeline, PipelinePlan]
    chosen: Pipeline | None
    notes: tuple[str, ...] = ()
    patient: str = ""  # short hash of the patient key (never the ID itself)

    @property
    def plan(self) -> PipelinePlan | None:
        """The plan of the pipeline that would run, None when none is ready."""
        return self.pipelines[self.chosen] if self.chosen else None

    def not_ready_reason(self) -> str:
        """Why no pipeline runs: what each pipeline lacks, then each series left unused and why.

        The ``not_analysed`` reason of a study no pipeline can use (the worker's and ``explain``'s).
        """
        parts = [f"{name}: {', '.join(plan.lacking)}" for name, plan in sorted(self.pipelines.items()) if plan.lacking]
        reason = "no pipeline is ready: " + ("; ".join(parts) if parts else "no usable series")
        unused = [
            f"#{d.series_number if d.series_number is not None else '?'} {d.modality or '?'} {d.description!r}: {d.reason}"
            for d in self.series
            if d.role is None
        ]
        return reason + (f" (series: {' | '.join(unused)})" if unused else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able structure (for ``fpe-node explain --json``)."""
        return {
            "patient": self.patient,
            "chosen_pipeline": self.chosen,
            "notes": list(self.notes),
            "series": [
                {
                    "study_uid": d.study_uid,
                    "series_uid": d.series_uid,
                    "series_number": d.series_number,
                    "modality": d.modality,
                    "description": d.description,
                    "instances": d.n_instances,
                    "role": d.role,
                    "candidate_roles": list(d.candidate_roles),
                    "reason": d.reason,
                }
                for d in self.series
            ],
            "pipelines": {
                name: {
                    "ready": plan.ready,
                    "lacking": list(plan.lacking),
                    "absent_optional": list(plan.absent_optional),
                    "primary_study_uid": plan.primary_study_uid,
                    "warnings": list(plan.warnings),
                    "roles": {
                        role: {
                            "series_uid": c.series_uid,
                            "study_uid": c.study_uid,
                            "description": c.description,
                            "b_value": c.b_value,
                            "derivation": c.derivation,
                        }
                        for role, c in plan.roles.items()
                    },
                }
                for name, plan in self.pipelines.items()
            },
        }


def _display_order(header: SeriesHeader) -> tuple[str, str, int, str]:
    when = header.study_datetime.isoformat() if header.study_datetime else ""
    return (when, header.study_uid, header.series_number if header.series_number is not None else 1 << 30, header.series_uid)


# Key of the patient tags in logs; the node sets its per-installation secret
# (dicom_node.logs.use_installation_secret), until then a random per-process key.
_hash_key: bytes = os.urandom(32)


def set_hash_key(key: bytes) -> None:
    """Key :func:`short_hash` (called by the node with its installation secret)."""
    global _hash_key
    _hash_key = key


def short_hash(value: str) -> str:
    """A short non-reversible tag for a value (patient keys are never printed or logged): keyed HMAC-SHA-256.

    An unkeyed hash of a Patient ID from a small space (a 7-digit MRN) is reversed by trying
    every value; keyed with a secret it is not.
    """
    return hmac.new(_hash_key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:10]


def patient_key(header: SeriesHeader) -> tuple[str, str]:
    """Patient identity for cases across studies: (Patient ID, Issuer of Patient ID)."""
    return (header.patient_id.strip(), header.issuer_of_patient_id.strip())


class Selector:
    """Selection with one rule set, case window and pipeline preference (built once, reused).

    Parameters
    ----------
    rules:
        Validated rules; :func:`load_selection_rules` by default.
    case_window_h:
        Roles may come from studies of the same patient within this many hours of the primary's.
    prefer_pipeline:
        Pipeline used when both are ready; None: the rules' ``prefer_pipeline``.
    required_roles:
        Per pipeline, the roles the served recipe cannot do without (``PipelineRecipe.required_roles``):
        they replace the rules' ``required``; the pipeline's other roles become optional. The
        default recipe's CT pipeline, for instance, needs a CTA channel.
    """

    def __init__(
        self,
        rules: SelectionRules | None = None,
        *,
        case_window_h: float = 24.0,
        prefer_pipeline: Pipeline | None = None,
        required_roles: Mapping[Pipeline, Sequence[Role]] | None = None,
    ) -> None:
        rules = rules or load_selection_rules()
        self.rules = with_required_roles(rules, required_roles) if required_roles else rules
        self.case_window = timedelta(hours=case_window_h)
        self.prefer_pipeline: Pipeline = prefer_pipeline or self.rules.prefer_pipeline

    def __eq__(self, other: object) -> bool:
        """Same rules (required roles included), case window and pipeline preference: same judgement."""
        if not isinstance(other, Selector):
            return NotImplemented
        return (self.rules, self.case_window, self.prefer_pipeline) == (other.rules, other.case_window, other.prefer_pipeline)

    __hash__ = None  # type: ignore[assignment]

    # -- callables for the completion logic ------------------------------------------------

    def could_use(self, header: SeriesHeader, *, complete: bool = False) -> bool:
        """True when the series could fill some role (worth waiting for / loading).

        ``complete=False``: judged on what even a partly received series shows (modality,
        ImageType, description, orientation, contrast, slice thickness), slice count, coverage
        and b-values left out; such a verdict is a first guess (completion waits for the whole
        series before it counts). ``complete=True``: every criterion, on the whole series (the
        judgement :meth:`explain` makes).
        """
        return bool(classify(header, self.rules, partial=not complete).candidate_roles)

    def pipeline_ready(self, headers: Sequence[SeriesHeader]) -> bool:
        """True when these series make at least one pipeline ready."""
        return self.explain(headers).chosen is not None

    def select(self, headers: Sequence[SeriesHeader]) -> PipelinePlan | None:
        """The ready plan that would run, None when no pipeline is ready."""
        return self.explain(headers).plan

    # -- the dry run -----------------------------------------------------------------------

    def explain(self, headers: Sequence[SeriesHeader]) -> Explanation:
        """Classify every series, plan every pipeline, pick one (see the module docstring).

        The series should belong to one patient. Given several, the patient of the newest study
        is planned and the other patients' series are reported as such (see :meth:`explain_all`).
        """
        ordered = sorted(headers, key=_display_order)
        classifications = [classify(h, self.rules) for h in ordered]
        notes: list[str] = []
        patients = {patient_key(h) for h in ordered if h.has_pixels}
        patient = self._newest_patient(ordered)
        if len(patients) > 1:
            notes.append(f"series of {len(patients)} patients given; planning the newest study's patient only")
        same_patient = [c for c in classifications if patient_key(c.header) == patient]
        plans = {name: self._plan_pipeline(name, same_patient) for name in self.rules.pipelines}
        chosen = self._choose(plans)
        decisions = tuple(self._decision(c, plans, patient) for c in classifications)
        tag = short_hash("|".join(patient)) if patient else ""
        for name, plan in plans.items():
            log.debug(
                "patient %s pipeline %s ready=%s roles=%s lacking=%s",
                tag, name, plan.ready, plan.series_used, "; ".join(plan.lacking) or "-",
            )
        return Explanation(series=decisions, pipelines=plans, chosen=chosen, notes=tuple(notes), patient=tag)

    def explain_all(self, headers: Sequence[SeriesHeader]) -> list[Explanation]:
        """One :class:`Explanation` per patient (Patient ID + issuer), newest study first."""
        groups: dict[tuple[str, str], list[SeriesHeader]] = defaultdict(list)
        for header in headers:
            groups[patient_key(header)].append(header)
        newest_first = sorted(
            groups.values(),
            key=lambda hs: max((h.study_datetime or datetime.min) for h in hs),
            reverse=True,
        )
        return [self.explain(group) for group in newest_first]

    def _newest_patient(self, headers: Sequence[SeriesHeader]) -> tuple[str, str] | None:
        dated = [h for h in headers if h.has_pixels] or list(headers)
        if not dated:
            return None
        newest = max(dated, key=lambda h: ((h.study_datetime or datetime.min), h.study_uid))
        return patient_key(newest)

    def _choose(self, plans: dict[Pipeline, PipelinePlan]) -> Pipeline | None:
        ready = [name for name, plan in plans.items() if plan.ready]
        if not ready:
            return None
        return self.prefer_pipeline if self.prefer_pipeline in ready else ready[0]

    def _within(self, header: SeriesHeader, anchor: datetime | None) -> bool:
        when = header.study_datetime or header.acquisition_datetime
        if anchor is None or when is None:
            return True  # tolerant: undated series are not excluded by the window
        return abs(when - anchor) <= self.case_window

    def _ranked(self, role: Role, classifications: Sequence[Classification], primary_study: str | None) -> list[SeriesHeader]:
        rule = self.rules.roles[role]
        candidates = [c.header for c in classifications if role in c.candidate_roles]
        return sorted(
            candidates,
            key=lambda h: ((0 if primary_study is None or h.study_uid == primary_study else 1), rank_key(rule, h), h.series_uid),
        )

    def _plan_pipeline(self, name: Pipeline, classifications: Sequence[Classification]) -> PipelinePlan:
        spec = self.rules.pipelines[name]
        # The primary comes from the newest study holding a candidate for it (never a prior's).
        candidates = [c for c in classifications if spec.primary in c.candidate_roles]
        newest = max((c.header.study_datetime for c in candidates if c.header.study_datetime), default=None)
        primaries = self._ranked(spec.primary, [c for c in candidates if self._within(c.header, newest)], None)
        if not primaries:
            return PipelinePlan(name, False, {}, (f"no {spec.primary} series",), None, (), spec.optional)
        primary = primaries[0]
        anchor = primary.study_datetime or primary.acquisition_datetime
        case = [c for c in classifications if self._within(c.header, anchor)]
        roles: dict[Role, RoleChoice] = {spec.primary: self._choice(spec.primary, primary)}
        for role in (*spec.required, *spec.optional):
            if role in roles:
                continue
            ranked = self._ranked(role, case, primary.study_uid)
            if ranked:
                roles[role] = self._choice(role, ranked[0])
        lacking, warnings = self._derive(spec, roles)
        warnings += tuple(c.derivation for c in roles.values() if c.derivation and c.derived_from is None)
        elsewhere = [role for role, c in roles.items() if c.study_uid != primary.study_uid]
        if elsewhere:
            warnings += (f"{', '.join(elsewhere)} taken from another study of the same patient",)
        absent = tuple(role for role in spec.optional if role not in roles)
        return PipelinePlan(name, not lacking, roles, lacking, primary.study_uid, warnings, absent)

    def _choice(self, role: Role, header: SeriesHeader) -> RoleChoice:
        plan = diffusion_plan(header) if role == "dwi" else None
        return RoleChoice(
            role=role,
            series_uid=header.series_uid,
            study_uid=header.study_uid,
            description=_description(header),
            rank=rank_key(self.rules.roles[role], header),
            b_value=plan.b_value if plan else None,
            derivation=plan.describe() if plan else "",
            has_b0=bool(plan and plan.has_b0),
        )

    def _derive(self, spec: PipelineRule, roles: dict[Role, RoleChoice]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        lacking: list[str] = []
        warnings: list[str] = []
        for role in spec.required:
            if role in roles:
                continue
            source_role = spec.derivable.get(role)
            source = roles.get(source_role) if source_role else None
            if role == "adc" and source is not None and source.has_b0:
                roles[role] = RoleChoice(
                    role, source.series_uid, source.study_uid, source.description, (math.inf,),
                    derivation="ADC computed from b0 and trace", derived_from=source_role,
                )
                warnings.append("ADC computed from b0 and trace (no ADC series received)")
            else:
                lacking.append(f"no {role} series")
        return tuple(lacking), tuple(warnings)

    # -- per-series explanation ------------------------------------------------------------

    def _decision(
        self, c: Classification, plans: dict[Pipeline, PipelinePlan], patient: tuple[str, str] | None
    ) -> SeriesDecision:
        header = c.header
        role, reason = self._why(c, plans, patient)
        return SeriesDecision(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            series_number=header.series_number,
            modality=header.modality,
            description=_description(header),
            n_instances=header.n_instances,
            role=role,
            candidate_roles=c.candidate_roles,
            reason=reason,
        )

    def _why(
        self, c: Classification, plans: dict[Pipeline, PipelinePlan], patient: tuple[str, str] | None
    ) -> tuple[Role | None, str]:
        header = c.header
        if c.excluded:
            return None, c.excluded
        for plan in plans.values():
            for role, choice in plan.roles.items():
                if choice.series_uid == header.series_uid and choice.derived_from is None:
                    detail = f" ({choice.derivation})" if choice.derivation else ""
                    return role, f"{role} for the {plan.pipeline} pipeline{detail}"
        if c.candidate_roles:
            if patient is not None and patient_key(header) != patient:
                return None, f"{'/'.join(c.candidate_roles)} candidate of another patient"
            role = c.candidate_roles[0]
            plan = plans[self.rules.roles[role].pipeline]
            better = plan.roles.get(role)
            primary = self.rules.pipelines[plan.pipeline].primary
            if better is None and primary not in plan.roles:
                return None, f"{role} candidate, unused: the {plan.pipeline} pipeline has no {primary} series"
            if better is None:
                return None, f"{role} candidate outside the case window"
            return None, f"{role} candidate; series {better.description!r} preferred ({', '.join(self.rules.roles[role].prefer)})"
        return None, self._closest_failure(c)

    def _closest_failure(self, c: Classification) -> str:
        order = list(self.rules.roles)
        same_modality = [
            (len(f), order.index(role), role, f)
            for role, f in c.role_failures.items()
            if not any(x.startswith("modality") for x in f)
        ]
        if not same_modality:
            return f"no role for modality {c.header.modality or '?'}"
        _, _, role, failures = min(same_modality)
        return f"not {role}: " + "; ".join(failures)


# --------------------------------------------------------------------------- re-runs


def would_change_selection(old: PipelinePlan | None, new: PipelinePlan | None) -> bool:
    """Should a case be re-run because ``new`` (after more series arrived) beats ``old``?

    True when a pipeline became ready, a different pipeline now runs, a role is filled that was
    empty (an optional CTA arrived, a real ADC replaces a computed one), or a role's new series
    ranks strictly better. A series that merely arrived, or ties the one chosen, changes nothing.
    """
    if new is None or not new.ready:
        return False
    if old is None or not old.ready or old.pipeline != new.pipeline:
        return True
    for role, choice in new.roles.items():
        before = old.roles.get(role)
        if before is None:
            return True
        if before.series_uid == choice.series_uid:
            continue
        if before.derived_from is not None and choice.derived_from is None:
            return True
        if choice.rank < before.rank:
            return True
    return False


# --------------------------------------------------------------------------- conveniences


def case_files(
    plan: PipelinePlan, headers: Sequence[SeriesHeader]
) -> dict[str, tuple[tuple[Path, ...], str, float | None]]:
    """role -> (files, derivation, b-value) of a plan, as :func:`inference.volumes.load_case_volumes` takes it.

    Raises
    ------
    KeyError
        When a chosen series is not among ``headers`` or was not read from files.
    """
    by_uid = {(h.study_uid, h.series_uid): h for h in headers}
    files: dict[str, tuple[tuple[Path, ...], str, float | None]] = {}
    for role, choice in plan.roles.items():
        header = by_uid[(choice.study_uid, choice.series_uid)]
        if not header.paths:
            raise KeyError(f"series {choice.series_uid} has no files")
        files[role] = (header.paths, choice.derivation, choice.b_value)
    return files



def explain(headers: Sequence[SeriesHeader], rules: SelectionRules | None = None, **kwargs: Any) -> Explanation:
    """Dry run with the given (or bundled) rules; see :meth:`Selector.explain`."""
    return Selector(rules, **kwargs).explain(headers)


def could_use(header: SeriesHeader, rules: SelectionRules | None = None) -> bool:
    """See :meth:`Selector.could_use`."""
    return Selector(rules).could_use(header)


def pipeline_ready(headers: Sequence[SeriesHeader], rules: SelectionRules | None = None, **kwargs: Any) -> bool:
    """See :meth:`Selector.pipeline_ready`."""
    return Selector(rules, **kwargs).pipeline_ready(headers)
