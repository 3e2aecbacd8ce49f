"""Named leases held by one process at a time (``node_lease``): who runs the completion timers.

A row per lease name. A process takes a lease that is free or expired, or renews one it holds,
with one conditional ``UPDATE``; taking it raises ``fence``. See :mod:`dicom_node.leases`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.index.base import Base, UTCDateTime


class NodeLease(Base):
    """One named lease (``completion``: the receiver that decides when studies are complete)."""

    __tablename__ = "node_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """``host:pid:nonce`` of the process holding it (NULL: released)."""
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    fence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Raised each time another process takes the lease."""
