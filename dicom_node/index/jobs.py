"""The analysis job queue table (see :mod:`dicom_node.lifecycle`).

One row per time a study was put in the queue. A partial unique index allows at most one
*open* job (``queued`` or ``running``) per study, so the database itself guarantees that a
study never waits in the queue twice nor runs in two workers at once, on SQLite and on
PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.index.base import Base, IntPK, Timestamp, UTCDateTime, utcnow

OPEN_JOB_STATES = ("queued", "running")
_OPEN_JOB_WHERE = text("state IN ('queued', 'running')")


class AnalysisJob(Base):
    """A study waiting for, or taken by, an inference worker.

    ``priority_at`` is when the study was acquired (UTC; the first arrival when the study
    carries no date): jobs whose ``priority_at`` lies within the live window are claimed
    before older backlog. ``state`` is ``queued`` -> ``running`` -> ``done``, or ``cancelled``
    when a new usable series pulled the study back before a worker took it.

    A ``running`` job carries a lease (``lease_until``) that its worker renews while it works
    and a fencing token (``fence``) that every claim raises: a job whose lease ran out is
    claimed again with a new token, and the first worker's late final write, which names the
    old token, changes nothing (:mod:`dicom_node.leases`).
    """

    __tablename__ = "analysis_job"
    __table_args__ = (
        Index("ix_analysis_job_state", "state"),
        Index(
            "uq_analysis_job_open_study",
            "study_pk",
            unique=True,
            sqlite_where=_OPEN_JOB_WHERE,
            postgresql_where=_OPEN_JOB_WHERE,
        ),
    )

    id: Mapped[IntPK]
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    enqueued_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    priority_at: Mapped[Timestamp]
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    claimed_by: Mapped[str | None] = mapped_column(String(64), default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), default=None)
    """Until when the worker's claim holds (renewed while it works); past it the job may be re-claimed."""
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Fencing token: raised by every claim; a worker's final write must carry the current one."""
