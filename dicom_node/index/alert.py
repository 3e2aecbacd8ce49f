"""The ``alert`` table: every alert the node sent, failed to send or suppressed (:mod:`dicom_node.alerts`).

One row per alert and channel. ``cursor`` records how far the rule had read the index when the
alert was made (the last study event id it covered). The ``alert_cursor`` table keeps how far the
event rules have read the study timeline, so a restarted node goes on from there instead of
alerting twice or missing what happened while it was down. The text never holds patient data
unless ``alerts.include_patient_data`` allowed it.
"""

from __future__ import annotations

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.index.base import Base, IntPK, Timestamp, utcnow


class AlertRecord(Base):
    """One alert on one channel and what became of it."""

    __tablename__ = "alert"
    __table_args__ = (Index("ix_alert_rule_channel_at", "rule", "channel", "at"),)

    id: Mapped[IntPK]
    at: Mapped[Timestamp] = mapped_column(default=utcnow)
    rule: Mapped[str] = mapped_column(String(32))
    """``dead_letter``, ``analysis_failed``, ``disk_high`` or ``no_analysis``."""
    channel: Mapped[str] = mapped_column(String(80))
    """``webhook:<name>`` or ``email:<name>`` (never the URL or the password)."""
    outcome: Mapped[str] = mapped_column(String(16))
    """``sent``, ``failed`` (every attempt failed) or ``suppressed`` (rate limit)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    title: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    cursor: Mapped[int | None] = mapped_column(Integer, default=None)
    """Study events up to this id were covered (event-driven rules); NULL for state rules."""


class AlertCursor(Base):
    """How far the alert rules have read an append-only table (``study_event``)."""

    __tablename__ = "alert_cursor"

    source: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    """The highest id read."""
    updated_at: Mapped[Timestamp] = mapped_column(default=utcnow)
