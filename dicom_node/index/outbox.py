"""The persistent outbox: one row per (result object, destination).

Rows are written when a study's results are built and updated after every delivery attempt,
so a restart resumes exactly where the node stopped (see :mod:`dicom_node.outbox`).

States
------
``pending``
    Not tried yet.
``failed``
    Tried, not stored; ``next_try_at`` says when the next attempt is due.
``sent``
    The archive answered the C-STORE with Success or Warning (PS3.4 B.2.3), or a DICOMweb
    archive listed the instance as stored in its STOW-RS response (PS3.18 10.5.3);
    ``sent_sop_class_uid`` and ``sent_sop_instance_uid`` record the class and UID it stored
    (an SR class fallback re-encodes with a UID derived from the original's).
``dead``
    Not stored before ``deadline_at``, or refused for good (a STOW-RS failure reason that a
    retry cannot change): dead-lettered, logged, shown by ``fpe-node studies``.
``held``
    Kept in the node on purpose (results of demonstration weights while
    ``delivery.allow_demonstration_results`` is off); ``fpe-node resend`` re-queues them.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum

from sqlalchemy import Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.index.base import UID, Base, IntPK, Timestamp, UTCDateTime, utcnow


class OutboxState(str, Enum):
    """Delivery state of one outbox row."""

    PENDING = "pending"
    FAILED = "failed"
    SENT = "sent"
    DEAD = "dead"
    HELD = "held"


#: States in which a row still waits for an attempt.
OPEN_STATES = (OutboxState.PENDING.value, OutboxState.FAILED.value)


class OutboxItem(Base):
    """One result object to be stored at one destination."""

    __tablename__ = "outbox_item"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_item_object_destination"),
        Index("ix_outbox_item_state_next_try", "state", "next_try_at"),
    )

    id: Mapped[IntPK]
    study_uid: Mapped[UID] = mapped_column(index=True)
    series_uid: Mapped[UID]
    sop_instance_uid: Mapped[UID]
    sop_class_uid: Mapped[UID]
    #: Kind of result: "sr", "sc" or "pdf" (routing rules match on it).
    kind: Mapped[str] = mapped_column(String(8))
    #: Path of the file relative to ``storage.data_dir``.
    path: Mapped[str] = mapped_column(String(1024))
    #: Name of the destination peer.
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: DICOM status of the last C-STORE response; NULL when none came.
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: HTTP status of the last STOW-RS response (DICOMweb destinations); NULL for DIMSE or when none came.
    last_http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The SOP class the archive stored (the SR fallback may differ from ``sop_class_uid``).
    sent_sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sent_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    updated_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    next_try_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    deadline_at: Mapped[Timestamp]
    last_try_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: The sender that claimed the row for an attempt (``host:pid:nonce``), NULL when unclaimed.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: Until when that claim holds (renewed while it sends); past it another sender may claim the row.
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Fencing token raised by every claim; an attempt's outcome is recorded only under the current one.
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    def __repr__(self) -> str:
        return (
            f"OutboxItem(id={self.id}, sop={self.sop_instance_uid}, destination={self.destination!r}, "
            f"state={self.state}, attempts={self.attempts})"
        )
