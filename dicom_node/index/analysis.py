"""The ``analysis`` table: what the inference worker concluded for a study (one row per run).

Each run of the worker on a study adds a row: the outcome (``analysed``, ``not_analysed``,
``not_eligible``), the reason when there is no prediction, the pipeline and series used, the
score and decision with the model identity, per-stage timings and warnings. Re-runs add rows;
:func:`latest_analysis` gives the current one. JSON-valued columns hold text (portable between
SQLite and PostgreSQL).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from dicom_node.index.base import UID, Base, IntPK, Timestamp, utcnow
from dicom_node.index.models import Study


class Analysis(Base):
    """One worker run on one study."""

    __tablename__ = "analysis"

    id: Mapped[IntPK]
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    pipeline: Mapped[str | None] = mapped_column(String(8), default=None)
    primary_study_uid: Mapped[UID | None] = mapped_column(default=None)
    score: Mapped[float | None] = mapped_column(Float, default=None)
    positive: Mapped[bool | None] = mapped_column(Boolean, default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    calibrated: Mapped[bool | None] = mapped_column(Boolean, default=None)
    model_name: Mapped[str | None] = mapped_column(String(64), default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    demonstration: Mapped[bool | None] = mapped_column(Boolean, default=None)
    series_used: Mapped[str] = mapped_column(Text, default="{}")  # JSON: role -> SeriesInstanceUID
    timings: Mapped[str] = mapped_column(Text, default="{}")  # JSON: stage -> seconds
    warnings: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    summary: Mapped[str] = mapped_column(Text, default="{}")  # JSON: inference.predictor.result_summary

    def series_used_dict(self) -> dict[str, str]:
        """``series_used`` decoded."""
        return dict(json.loads(self.series_used))

    def timings_dict(self) -> dict[str, float]:
        """``timings`` decoded."""
        return dict(json.loads(self.timings))

    def warnings_list(self) -> list[str]:
        """``warnings`` decoded."""
        return list(json.loads(self.warnings))


def record_analysis(
    session: Session,
    study_pk: int,
    outcome: str,
    summary: dict[str, Any],
    *,
    job_id: int | None = None,
    primary_study_uid: str | None = None,
    extra_timings: dict[str, float] | None = None,
) -> Analysis:
    """Add the row of one run from a :func:`inference.predictor.result_summary` dict."""
    model = summary.get("model") or {}
    timings = {**dict(summary.get("timings_s") or {}), **(extra_timings or {})}
    row = Analysis(
        study_pk=study_pk,
        job_id=job_id,
        outcome=outcome,
        reason=summary.get("reason"),
        pipeline=summary.get("pipeline"),
        primary_study_uid=primary_study_uid,
        score=summary.get("score"),
        positive=summary.get("positive"),
        threshold=summary.get("threshold"),
        calibrated=summary.get("calibrated"),
        model_name=model.get("name"),
        model_version=model.get("version"),
        weights_sha256=model.get("weights_sha256"),
        demonstration=model.get("demonstration"),
        series_used=json.dumps(summary.get("series_used") or {}, sort_keys=True),
        timings=json.dumps(timings, sort_keys=True),
        warnings=json.dumps(list(summary.get("warnings") or [])),
        summary=json.dumps(summary, sort_keys=True),
    )
    session.add(row)
    session.flush()
    return row


def latest_analysis(session: Session, study_uid: str) -> Analysis | None:
    """The most recent run on a study, ``None`` when it was never analysed."""
    return session.execute(
        select(Analysis)
        .join(Study, Study.id == Analysis.study_pk)
        .where(Study.study_uid == study_uid)
        .order_by(Analysis.id.desc())
        .limit(1)
    ).scalar_one_or_none()
