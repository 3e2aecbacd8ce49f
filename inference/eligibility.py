"""Study-level eligibility: does this study belong to the model's intended use?

The rules are data (``config/eligibility.yaml``, or the file named by
``settings.inference.eligibility_rules``), validated into :class:`EligibilityRules`. A study is
eligible when it comes from an accepted sender, holds at least one image series of an accepted
modality, has a description that matches an include pattern (or a series whose BodyPartExamined
is listed) and no study-level description that matches an exclude pattern, and is recent: priors that a PACS prefetches along with a new study are the commonest
study that must not be analysed.

The decision always carries a reason a radiologist can read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from config import CONFIG_DIR
from inference.dicom_headers import SeriesHeader

log = logging.getLogger(__name__)

DEFAULT_ELIGIBILITY_RULES = CONFIG_DIR / "eligibility.yaml"


def _compile(patterns: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return tuple(compiled)


class EligibilityRules(BaseModel):
    """Validated eligibility rules (see ``config/eligibility.yaml`` for the meaning of each field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(1, ge=1, le=1)
    senders: tuple[str, ...] = Field((), description="Accepted calling AE titles; empty: any.")
    excluded_senders: tuple[str, ...] = Field((), description="Calling AE titles never accepted.")
    modalities: tuple[str, ...] = Field(("CT", "MR"), min_length=1)
    include: tuple[str, ...] = Field(..., min_length=1, description="Regexes; one must match some description.")
    body_parts: tuple[str, ...] = Field(
        (), description="BodyPartExamined values that qualify a study like an include pattern."
    )
    exclude: tuple[str, ...] = Field((), description="Regexes; none may match a study-level description.")
    max_study_age_h: float | None = Field(24.0, gt=0)
    max_future_h: float = Field(2.0, ge=0)

    @field_validator("include", "exclude")
    @classmethod
    def _valid_regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _compile(value)
        return value

    @field_validator("senders", "excluded_senders", "modalities", "body_parts")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in value)

    @property
    def include_patterns(self) -> tuple[re.Pattern[str], ...]:
        return _compile(self.include)

    @property
    def exclude_patterns(self) -> tuple[re.Pattern[str], ...]:
        return _compile(self.exclude)


def load_eligibility_rules(path: Path | None = None) -> EligibilityRules:
    """Read and validate the rules (bundled defaults when ``path`` is None).

    Raises
    ------
    ValueError
        When the file is not valid YAML or a rule is invalid; the message names the field.
    """
    path = DEFAULT_ELIGIBILITY_RULES if path is None else Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return EligibilityRules.model_validate(data)


@dataclass(frozen=True)
class StudyFacts:
    """What eligibility looks at, for one study."""

    study_uid: str
    calling_ae_title: str | None
    modalities: frozenset[str]  # of image series only
    study_texts: tuple[str, ...]  # StudyDescription, ProtocolName, procedure descriptions
    series_texts: tuple[str, ...]  # SeriesDescriptions
    study_datetime: datetime | None
    body_parts: frozenset[str] = frozenset()  # BodyPartExamined of the series


@dataclass(frozen=True)
class EligibilityDecision:
    """Eligible or not, and why."""

    eligible: bool
    reason: str


def study_facts(headers: Sequence[SeriesHeader], calling_ae_title: str | None = None) -> StudyFacts:
    """Collect :class:`StudyFacts` from the series headers of one study."""
    if not headers:
        raise ValueError("a study needs at least one series")
    texts: list[str] = []
    for header in headers:
        for text in (header.study_description, header.protocol_name, header.procedure_description):
            if text and text not in texts:
                texts.append(text)
    return StudyFacts(
        study_uid=headers[0].study_uid,
        calling_ae_title=calling_ae_title,
        modalities=frozenset(h.modality for h in headers if h.has_pixels and h.rows > 0),
        study_texts=tuple(texts),
        series_texts=tuple(sorted({h.series_description for h in headers if h.series_description})),
        study_datetime=min((h.study_datetime for h in headers if h.study_datetime), default=None),
        body_parts=frozenset(h.body_part for h in headers if h.body_part),
    )


def decide(rules: EligibilityRules, facts: StudyFacts, now: datetime | None = None) -> EligibilityDecision:
    """Decide eligibility. ``now`` is the arrival time; None skips the age check (offline use)."""
    for check in (_check_sender, _check_modality, _check_descriptions):
        reason = check(rules, facts)
        if reason:
            return _log(facts, EligibilityDecision(False, reason))
    if now is not None:
        reason = _check_age(rules, facts, now)
        if reason:
            return _log(facts, EligibilityDecision(False, reason))
    return _log(facts, EligibilityDecision(True, "eligible"))


def _log(facts: StudyFacts, decision: EligibilityDecision) -> EligibilityDecision:
    log.info("study %s eligible=%s (%s)", facts.study_uid, decision.eligible, decision.reason)
    return decision


def _check_sender(rules: EligibilityRules, facts: StudyFacts) -> str | None:
    sender = (facts.calling_ae_title or "").strip().upper()
    if sender and sender in rules.excluded_senders:
        return f"sender {sender} is excluded"
    if rules.senders and sender not in rules.senders:
        return f"sender {sender or '(unknown)'} is not one of the accepted senders"
    return None


def _check_modality(rules: EligibilityRules, facts: StudyFacts) -> str | None:
    if facts.modalities & set(rules.modalities):
        return None
    found = ", ".join(sorted(facts.modalities)) or "no images"
    return f"no image series of modality {'/'.join(rules.modalities)} ({found})"


def _check_descriptions(rules: EligibilityRules, facts: StudyFacts) -> str | None:
    for text in facts.study_texts:
        for pattern in rules.exclude_patterns:
            if pattern.search(text):
                return f"description {text!r} matches excluded pattern {pattern.pattern!r}"
    every = facts.study_texts + facts.series_texts
    if any(pattern.search(text) for text in every for pattern in rules.include_patterns):
        return None
    if facts.body_parts & set(rules.body_parts):
        return None
    return "no study, protocol, procedure or series description, nor body part, names a head/stroke examination"


def _check_age(rules: EligibilityRules, facts: StudyFacts, now: datetime) -> str | None:
    if facts.study_datetime is None:
        return None  # tolerant reader: an undated study is judged on the other rules
    age = now - facts.study_datetime
    if rules.max_study_age_h is not None and age > timedelta(hours=rules.max_study_age_h):
        return f"study is {age.total_seconds() / 3600:.0f} h old (a prior); the limit is {rules.max_study_age_h:g} h"
    if -age > timedelta(hours=rules.max_future_h):
        return f"study date is {(-age).total_seconds() / 3600:.0f} h in the future"
    return None


def check_study(
    headers: Sequence[SeriesHeader],
    rules: EligibilityRules,
    *,
    calling_ae_title: str | None = None,
    now: datetime | None = None,
) -> EligibilityDecision:
    """Convenience: :func:`study_facts` then :func:`decide`."""
    return decide(rules, study_facts(headers, calling_ae_title), now)
