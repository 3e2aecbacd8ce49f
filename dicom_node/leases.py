"""Leases and fencing tokens: how processes that share only the index divide the work.

Any number of receivers, workers and senders (``fpe-node serve --role ...``) may run against
one PostgreSQL index. Nothing travels between them in memory; they coordinate through rows:

* **Jobs and outbox rows.** A claim is one conditional ``UPDATE`` (``FOR UPDATE SKIP LOCKED``
  on PostgreSQL) that sets ``claimed_by``, ``lease_until = now + lease`` and raises
  ``fence`` by one. The holder renews ``lease_until`` every third of the lease from a
  :class:`LeaseKeeper` thread, so a process that dies, is paused (``SIGSTOP``) or loses the
  index stops renewing. A row whose lease ran out may be claimed again, which raises the fence.
* **Fencing.** A holder's final write (a worker's analysis row, result outbox rows and study
  state, in one transaction; a sender's attempt outcome) first checks, in the same
  transaction, that the row still carries *its* fence. A presumed-dead holder that wakes up
  after another process re-claimed the row finds a higher fence: its write changes nothing
  and it drops its work (:class:`LeaseLost`).
* **Named leases** (``node_lease``): one holder at a time for duties that must not run twice,
  here the completion timers of the receivers (:class:`NamedLease`).

Clocks: lease times are the processes' own UTC clocks (keep the machines on NTP); a lease of
tens of seconds is far longer than any skew NTP leaves.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.leases import NodeLease

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The claim was taken over (its fence moved on): the holder's work must not be written."""


def holder_token(kind: str = "") -> str:
    """``host:pid:nonce`` naming one claim (at most 64 characters, the columns' width)."""
    host = socket.gethostname()[:32]
    prefix = f"{kind}@" if kind else ""
    return f"{prefix}{host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"[:64]


def holder_is_dead_here(holder: str | None, *, this_process: bool = False) -> bool:
    """True when ``holder`` names a process of *this* host that no longer runs.

    Start-up uses it to take back at once what a killed process of the same machine held,
    instead of waiting for its lease to run out. A holder on another host is never judged.
    ``this_process``: count this process as gone too (at start-up it holds nothing yet, so a
    claim in its PID is an earlier process's that had the same PID).
    """
    if not holder:
        return False
    parts = holder.split("@", 1)[-1].rsplit(":", 2)  # host:pid:nonce (the host may be cut short)
    if len(parts) != 3 or not parts[0] or not socket.gethostname().startswith(parts[0]):
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return this_process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def lease_end(seconds: float, now: dt.datetime | None = None) -> dt.datetime:
    """When a lease of ``seconds`` taken now ends."""
    return (now or utcnow()) + dt.timedelta(seconds=seconds)


def rows_changed(session: Session, statement: Any) -> int:
    """Run a conditional UPDATE and return how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement.execution_options(synchronize_session=False)))
    return int(result.rowcount)


class LeaseKeeper:
    """A daemon thread that calls ``renew()`` every ``interval_s`` until stopped.

    ``renew`` returns False when the claim is gone (the fence moved on); the keeper then logs
    it and stops (the holder's fenced final write is refused anyway). An exception (the index unreachable) is logged and retried at the
    next tick: the lease simply runs out if the index stays away.

    Use as a context manager around the work the lease covers.
    """

    def __init__(self, renew: Callable[[], bool], interval_s: float, *, what: str) -> None:
        self._renew = renew
        self._interval = max(0.2, interval_s)
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"fpe-lease-{what}"[:32], daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._renew():
                    log.warning("lease of %s lost: another process took it over", self._what)
                    return
            except Exception:  # noqa: BLE001 - the index may be away for a moment; the lease runs out if it stays away
                log.warning("lease of %s not renewed (index unreachable?); retrying", self._what, exc_info=True)


class NamedLease:
    """A lease by name in ``node_lease``, held by at most one process at a time.

    :meth:`hold` takes the lease when it is free, expired or held by a dead process of this
    host, and renews it when this process holds it; it returns whether this process holds it
    now. Call it at least every third of ``lease_s``.
    """

    def __init__(self, sessions: sessionmaker[Session], name: str, lease_s: float, *, kind: str = "") -> None:
        self._sessions = sessions
        self.name = name
        self.lease_s = lease_s
        self.holder = holder_token(kind or name)
        self._held = False

    @property
    def held(self) -> bool:
        """Whether the last :meth:`hold` found this process holding the lease."""
        return self._held

    def hold(self) -> bool:
        """Take or renew the lease; True when this process holds it afterwards."""
        now = utcnow()
        until = lease_end(self.lease_s, now)
        was_held = self._held
        with write_session(self._sessions) as session:
            row = session.get(NodeLease, self.name)
            if row is None:
                session.add(NodeLease(name=self.name, holder=self.holder, lease_until=until, fence=1))
                try:
                    session.flush()
                except IntegrityError:  # another process created it at the same moment
                    session.rollback()
                    self._held = False
                    return False
                self._held = True
            elif row.holder == self.holder:
                self._held = rows_changed(session, update(NodeLease).where(
                    NodeLease.name == self.name, NodeLease.holder == self.holder
                ).values(lease_until=until)) == 1
            else:
                free = row.holder is None or row.lease_until is None or row.lease_until < now or holder_is_dead_here(row.holder)
                self._held = free and rows_changed(session, update(NodeLease).where(
                    NodeLease.name == self.name, NodeLease.fence == row.fence,
                ).values(holder=self.holder, lease_until=until, fence=row.fence + 1)) == 1
        if self._held != was_held:
            log.info("%s lease %s by this process", self.name, "taken" if self._held else "lost")
        return self._held

    def release(self) -> None:
        """Give the lease up (clean stop), so another process takes it at once."""
        if not self._held:
            return
        with write_session(self._sessions) as session:
            session.execute(
                update(NodeLease).where(NodeLease.name == self.name, NodeLease.holder == self.holder)
                .values(holder=None, lease_until=None).execution_options(synchronize_session=False)
            )
        self._held = False
