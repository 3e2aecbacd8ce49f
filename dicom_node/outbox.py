"""Delivering result objects: routing, the persistent outbox, retries and dead letters.

Guarantees (issue 4 item 4)
---------------------------
- **At least once.** A row becomes ``sent`` only after the archive answered the C-STORE
  with Success or Warning (:mod:`dicom_node.scu`); a crash between the answer and the
  update sends the object again on restart. Every attempt sends the same file, so the same
  SOP Instance UID: archives see a re-send, not a second result.
- **Retries** with exponential backoff, ``retry_initial_s * 2**(attempts-1)`` capped at
  ``retry_max_s``; the last attempt is made at the deadline.
- **Dead letters.** An object not stored ``deadline_s`` after it was queued is ``dead``:
  logged at ERROR and shown by ``fpe-node studies`` (:func:`delivery_rows`).
- **Restart resumes**: rows are the only state; a new :class:`Outbox` on the same index
  carries on with every ``pending`` and ``failed`` row when it is due.
- **Demonstration results stay in the node** (rows ``held``) unless
  ``delivery.allow_demonstration_results`` is set: a clinical archive must not receive the
  output of untrained weights by accident.

- **Two kinds of destination, one outbox.** A peer's kind says how its rows are sent:
  ``dimse`` by C-STORE (:class:`dicom_node.scu.StoreScu`), ``dicomweb`` by STOW-RS
  (:class:`dicom_node.stow.StowClient`); :class:`SenderByKind` picks per destination. Retries,
  backoff, deadline, dead letters and routing are the same for both. A failure the sender
  marks ``permanent`` (a STOW-RS failure reason about the object itself) is dead-lettered at
  once, with its reason.

Routing
-------
Destinations are peers with the ``destination`` role. Without a rules file every result goes
to every destination. ``delivery.routing_rules`` names a YAML file such as::

    rules:
      - destinations: [PACS]            # peer names, or "*" for every destination
        kinds: [sr, sc]                 # optional: sr, sc, pdf, pm (Parametric Map), seg
        pipelines: [CT, MR]             # optional: results of these pipelines only
        calling_ae_titles: [CTSCANNER]  # optional: studies received from these AE titles
      - destinations: [RESEARCH]
        kinds: [sr]

An object goes to the union of the destinations of every rule it matches; an object that
matches no rule stays in the node (logged).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit import RESULTS_SENT, add_entry, results_sent_detail
from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.outbox import OPEN_STATES, OutboxItem, OutboxState
from dicom_node.index.users import Suspension
from dicom_node.leases import LeaseKeeper, holder_token, rows_changed
from dicom_node.scu import Destination, OutgoingObject, StoreOutcome
from dicom_node.settings import DeliverySettings, validate_ae_title
from dicom_node.stow import StowClient, StowDestination

log = logging.getLogger(__name__)

ResultKind = Literal["sr", "sc", "pdf", "pm", "seg"]
#: A destination of either kind: C-STORE SCP or DICOMweb (STOW-RS) service.
AnyDestination = Destination | StowDestination
_BATCH_LIMIT = 500
_MIN_SLEEP_S = 0.05


# --- routing -------------------------------------------------------------------------------


class RouteRule(BaseModel):
    """One routing rule: which results go to which destinations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    destinations: tuple[str, ...] = Field(..., min_length=1, description='Peer names, or "*" for all destinations.')
    kinds: tuple[ResultKind, ...] | None = Field(None, description="Result kinds matched (default: all).")
    pipelines: tuple[Literal["CT", "MR"], ...] | None = Field(None, description="Pipelines matched (default: all).")
    calling_ae_titles: tuple[str, ...] | None = Field(
        None, description="AE titles the study was received from (default: any)."
    )

    @field_validator("calling_ae_titles")
    @classmethod
    def _check_titles(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(validate_ae_title(v) for v in value)


class RoutingRules(BaseModel):
    """The routing rules file (``delivery.routing_rules``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[RouteRule, ...] = ()


class RoutingError(ValueError):
    """The routing rules file is missing or invalid; the message names the problem."""


def load_routing_rules(path: Path | None) -> RoutingRules | None:
    """Read and validate the routing rules; ``None`` (every result everywhere) without a file.

    Raises
    ------
    RoutingError
        Naming the file and each bad field.
    """
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return RoutingRules.model_validate(data)
    except OSError as exc:
        raise RoutingError(f"routing rules {path}: {exc}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise RoutingError(f"routing rules {path} are invalid: {exc}") from exc


@dataclass(frozen=True)
class RoutingContext:
    """What routing rules may look at, beside the object's kind."""

    pipeline: str | None = None
    calling_ae_title: str | None = None


def route(
    rules: RoutingRules | None, kind: str, context: RoutingContext, destinations: Sequence[str]
) -> list[str]:
    """The destination names an object of ``kind`` goes to, in ``destinations`` order.

    Names in rules that are not configured destinations are ignored (and logged).
    """
    if rules is None:
        return list(destinations)
    chosen: set[str] = set()
    for rule in rules.rules:
        if rule.kinds is not None and kind not in rule.kinds:
            continue
        if rule.pipelines is not None and context.pipeline not in rule.pipelines:
            continue
        if rule.calling_ae_titles is not None and context.calling_ae_title not in rule.calling_ae_titles:
            continue
        for name in rule.destinations:
            if name == "*":
                chosen.update(destinations)
            elif name in destinations:
                chosen.add(name)
            else:
                log.warning("routing rule names %r, which is not a configured destination", name)
    return [name for name in destinations if name in chosen]


# --- the outbox ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultFile:
    """One result object written under ``storage.results_dir``, ready to queue."""

    path: Path  # absolute, inside storage.data_dir
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: ResultKind


class Sender(Protocol):
    """Sends a batch to one destination (:class:`SenderByKind` is the node's)."""

    def send(self, destination: AnyDestination, objects: Sequence[OutgoingObject]) -> list[StoreOutcome]:
        """One outcome per object, in order; never raises for network failures."""
        ...


class DimseSender(Protocol):
    """Sends a batch to a C-STORE SCP (:class:`dicom_node.scu.StoreScu`)."""

    def send(self, destination: Destination, objects: Sequence[OutgoingObject]) -> list[StoreOutcome]:
        """One outcome per object, in order; never raises for network failures."""
        ...


class SenderByKind:
    """Sends each batch with the sender of its destination's kind: C-STORE or STOW-RS.

    Parameters
    ----------
    dimse:
        The C-STORE SCU.
    dicomweb:
        The STOW-RS client.
    """

    def __init__(self, dimse: DimseSender, dicomweb: StowClient) -> None:
        self.dimse = dimse
        self.dicomweb = dicomweb

    def send(self, destination: AnyDestination, objects: Sequence[OutgoingObject]) -> list[StoreOutcome]:
        """One outcome per object, in order."""
        if isinstance(destination, StowDestination):
            return self.dicomweb.send(destination, objects)
        return self.dimse.send(destination, objects)


class StudyDelivery(str, Enum):
    """How delivery of a study's results ended (for the study's life cycle)."""

    DELIVERED = "delivered"  # every object at every destination
    PARTLY_DELIVERED = "partly_delivered"  # some stored, some dead-lettered
    DEAD_LETTERED = "dead_lettered"  # nothing stored
    KEPT = "kept"  # nothing to send: no destination, no matching rule, or held in the node


@dataclass(frozen=True)
class DeliveryRow:
    """One outbox row as ``fpe-node studies`` shows it."""

    study_uid: str
    sop_instance_uid: str
    kind: str
    destination: str
    state: str
    attempts: int
    sop_class_uid: str
    sent_sop_class_uid: str | None
    sent_sop_instance_uid: str | None
    last_status: int | None
    last_error: str | None
    last_http_status: int | None
    next_try_at: dt.datetime
    deadline_at: dt.datetime
    sent_at: dt.datetime | None


@dataclass
class RunReport:
    """What one pass of the outbox did."""

    attempted: int = 0
    sent: int = 0
    failed: int = 0
    dead: int = 0
    settled: dict[str, StudyDelivery] = field(default_factory=dict)
    suspended: bool = False
    """Delivery is suspended node-wide (:func:`dicom_node.actions.suspend`): nothing was tried."""


def _to_row(item: OutboxItem) -> DeliveryRow:
    return DeliveryRow(
        study_uid=item.study_uid, sop_instance_uid=item.sop_instance_uid, kind=item.kind,
        destination=item.destination, state=item.state, attempts=item.attempts,
        sop_class_uid=item.sop_class_uid, sent_sop_class_uid=item.sent_sop_class_uid,
        sent_sop_instance_uid=item.sent_sop_instance_uid,
        last_status=item.last_status, last_error=item.last_error, last_http_status=item.last_http_status,
        next_try_at=item.next_try_at,
        deadline_at=item.deadline_at, sent_at=item.sent_at,
    )


def delivery_rows(session: Session, study_uid: str | None = None, states: Iterable[str] | None = None) -> list[DeliveryRow]:
    """Outbox rows of one study (or all), optionally only some states, oldest first.

    ``fpe-node studies`` uses it to show each result's delivery and the dead letters
    (``states=["dead"]``).
    """
    query = select(OutboxItem).order_by(OutboxItem.id)
    if study_uid is not None:
        query = query.where(OutboxItem.study_uid == study_uid)
    if states is not None:
        query = query.where(OutboxItem.state.in_(list(states)))
    return [_to_row(item) for item in session.scalars(query)]


def study_delivery_outcome(states: Iterable[str]) -> StudyDelivery | None:
    """A study's delivery outcome from its rows' states; ``None`` while any row is open."""
    states = list(states)
    if any(state in OPEN_STATES for state in states):
        return None
    sent = sum(state == OutboxState.SENT.value for state in states)
    dead = sum(state == OutboxState.DEAD.value for state in states)
    if sent and not dead:
        return StudyDelivery.DELIVERED
    if sent and dead:
        return StudyDelivery.PARTLY_DELIVERED
    if dead:
        return StudyDelivery.DEAD_LETTERED
    return StudyDelivery.KEPT


def backoff_s(attempts: int, delivery: DeliverySettings) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (doubling, capped)."""
    exponent = max(attempts - 1, 0)
    if exponent > 60:
        return delivery.retry_max_s
    return float(min(delivery.retry_initial_s * 2**exponent, delivery.retry_max_s))


class Outbox:
    """The persistent outbox over the index.

    Parameters
    ----------
    session_factory:
        The node's session factory.
    delivery:
        ``settings.delivery``.
    data_dir:
        ``settings.storage.data_dir``: rows hold paths relative to it.
    sender:
        Sends batches (:class:`dicom_node.scu.StoreScu`).
    destinations:
        Returns the configured destinations, read fresh on each pass (peers change without
        a restart).
    clock:
        Current UTC time (tests pass a fake one).
    on_settled:
        Called with ``(study_uid, outcome)`` after the pass, for each study whose last open row
        settled (a notification).
    settle_in:
        Called with ``(session, study_uid, outcome)`` in the transaction that records a study's
        last open row, so the study's state moves with it (a sender killed between the two
        cannot leave the study ``reporting``).
    lease_s:
        ``settings.leases.outbox_s``: how long this sender's claim on the rows of a pass holds
        without renewal.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        delivery: DeliverySettings,
        data_dir: Path,
        sender: Sender,
        destinations: Callable[[], Sequence[AnyDestination]],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        on_settled: Callable[[str, StudyDelivery], None] | None = None,
        rules: RoutingRules | None = None,
        lease_s: float = 120.0,
        settle_in: Callable[[Session, str, StudyDelivery], None] | None = None,
    ) -> None:
        self._sessions = session_factory
        self.settle_in = settle_in
        self.lease_s = lease_s
        self.delivery = delivery
        self.data_dir = Path(data_dir)
        self.sender = sender
        self.destinations = destinations
        self.clock = clock
        self.on_settled = on_settled
        self.rules = rules if rules is not None else load_routing_rules(delivery.routing_rules)
        self._pass_lock = threading.Lock()
        self.attempts: Counter[tuple[str, str]] = Counter()
        """Delivery attempts made by this process, by (destination, ``sent`` | ``failed``) (``/metrics``)."""

    # -- queueing -----------------------------------------------------------------------

    def enqueue(
        self,
        objects: Sequence[ResultFile],
        context: RoutingContext,
        *,
        demonstration: bool,
        in_transaction: Callable[[Session, list[DeliveryRow]], None] | None = None,
    ) -> list[DeliveryRow]:
        """Queue each object for each destination routing gives it.

        Results of demonstration weights are ``held`` unless the settings allow sending them.
        Queuing the same object for the same destination again is a no-op (the row stays).
        ``in_transaction(session, rows)`` runs in the same unit of work before it commits
        (the study's life-cycle transition), so the runner never sees rows without it.
        """
        with write_session(self._sessions) as session:
            rows = self.add_rows(session, objects, context, demonstration=demonstration)
            if in_transaction is not None:
                in_transaction(session, rows)
        return rows

    def add_rows(
        self, session: Session, objects: Sequence[ResultFile], context: RoutingContext, *, demonstration: bool,
        names: Sequence[str] | None = None,
    ) -> list[DeliveryRow]:
        """:meth:`enqueue` in the caller's transaction (a worker's one commit with its analysis).

        ``names``: the destinations' names, read beforehand (default: read now).
        """
        names = [d.name for d in self.destinations()] if names is None else list(names)
        hold = demonstration and not self.delivery.allow_demonstration_results
        now = self.clock()
        deadline = now + dt.timedelta(seconds=self.delivery.deadline_s)
        state = OutboxState.HELD.value if hold else OutboxState.PENDING.value
        rows = []
        for obj in objects:
            targets = route(self.rules, obj.kind, context, names)
            if not targets:
                log.warning("result %s (%s) of study %s has no destination: kept in the node",
                            obj.sop_instance_uid, obj.kind, obj.study_uid)
            for name in targets:
                rows.append(self._add(session, obj, name, state, now, deadline))
        if hold and rows:
            log.info("%d result objects of demonstration weights held in the node "
                     "(delivery.allow_demonstration_results is off)", len(rows))
        return rows

    def _add(
        self, session: Session, obj: ResultFile, destination: str, state: str, now: dt.datetime, deadline: dt.datetime
    ) -> DeliveryRow:
        existing = session.scalars(
            select(OutboxItem).where(
                OutboxItem.sop_instance_uid == obj.sop_instance_uid, OutboxItem.destination == destination
            )
        ).one_or_none()
        if existing is not None:
            return _to_row(existing)
        item = OutboxItem(
            study_uid=obj.study_uid, series_uid=obj.series_uid, sop_instance_uid=obj.sop_instance_uid,
            sop_class_uid=obj.sop_class_uid, kind=obj.kind, path=self._relative(obj.path),
            destination=destination, state=state, attempts=0, created_at=now, updated_at=now,
            next_try_at=now, deadline_at=deadline,
        )
        session.add(item)
        session.flush()
        return _to_row(item)

    def _relative(self, path: Path) -> str:
        path = Path(path)
        try:
            return path.resolve().relative_to(self.data_dir.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    def resend(self, study_uid: str, *, in_transaction: Callable[[Session, int], None] | None = None) -> int:
        """Re-queue the outbox rows of a study with a fresh deadline.

        Every row is re-queued (sent, failed, dead), except ``held`` rows while
        ``delivery.allow_demonstration_results`` is off: a resend never bypasses that setting.
        Returns the number of rows re-queued. The objects keep their SOP Instance UIDs.
        ``in_transaction(session, count)`` runs in the same unit of work before it commits.
        """
        now = self.clock()
        condition = OutboxItem.study_uid == study_uid
        if not self.delivery.allow_demonstration_results:
            condition = condition & (OutboxItem.state != OutboxState.HELD.value)
        with write_session(self._sessions) as session:
            result = session.execute(
                update(OutboxItem)
                .where(condition)
                .values(
                    state=OutboxState.PENDING.value, attempts=0, next_try_at=now, updated_at=now,
                    deadline_at=now + dt.timedelta(seconds=self.delivery.deadline_s), last_error=None,
                )
                .execution_options(synchronize_session=False)
            )
            count = int(getattr(result, "rowcount", 0) or 0)
            if in_transaction is not None:
                in_transaction(session, count)
        log.info("study %s: %d outbox rows re-queued", study_uid, count)
        return count

    def rows(self, study_uid: str | None = None) -> list[DeliveryRow]:
        """Outbox rows of a study (or all)."""
        with self._sessions() as session:
            return delivery_rows(session, study_uid)

    def next_due(self) -> dt.datetime | None:
        """When the earliest open row is due, or ``None`` when nothing waits."""
        with self._sessions() as session:
            value = session.scalars(
                select(OutboxItem.next_try_at).where(
                    OutboxItem.state.in_(OPEN_STATES),
                    or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < self.clock()),  # not another sender's
                ).order_by(OutboxItem.next_try_at)
            ).first()
        return value

    # -- sending ------------------------------------------------------------------------

    def run_once(self) -> RunReport:
        """Attempt every due row once, one association per destination; update the rows."""
        with self._pass_lock:
            report = RunReport()
            if self.suspended():
                report.suspended = True
                return report
            now = self.clock()
            due = self._due(now)
            if not due:
                return report
            known = {d.name: d for d in self.destinations()}
            by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
            for item in due:
                by_destination[item.destination].append(item)
            with LeaseKeeper(lambda: self.renew(due), self.lease_s / 3, what="outbox rows"):
                for name, items in by_destination.items():
                    outcomes = self._send(known.get(name), name, items)
                    self._record(items, outcomes, report, known.get(name))
            self._settle(report)
            return report

    def suspended(self) -> bool:
        """True while delivery is suspended node-wide (a ``node_suspension`` row): rows wait, deadlines run."""
        with self._sessions() as session:
            return session.get(Suspension, "delivery") is not None

    def _due(self, now: dt.datetime) -> list[OutboxItem]:
        """Claim the due rows for this pass: open, due, and not leased by another sender.

        One conditional ``UPDATE`` per row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) sets this
        sender's token, a lease of ``leases.outbox_s`` and raises the row's fence, so two senders
        never attempt the same row at once, and a sender that died mid-pass leaves its rows
        claimable once their lease runs out (:mod:`dicom_node.leases`).
        """
        free = or_(OutboxItem.lease_until.is_(None), OutboxItem.lease_until < now)
        due = OutboxItem.state.in_(OPEN_STATES) & (OutboxItem.next_try_at <= now) & free
        token = holder_token("sender")
        until = now + dt.timedelta(seconds=self.lease_s)
        with write_session(self._sessions) as session:
            ids = list(session.scalars(
                select(OutboxItem.id).where(due).order_by(OutboxItem.id).limit(_BATCH_LIMIT)
                .with_for_update(skip_locked=True)
            ))
            if not ids:
                return []
            rows_changed(session, update(OutboxItem).where(OutboxItem.id.in_(ids), due).values(
                claimed_by=token, lease_until=until, fence=OutboxItem.fence + 1))
            claimed = list(session.scalars(select(OutboxItem).where(OutboxItem.claimed_by == token)
                                           .order_by(OutboxItem.id)))
            session.expunge_all()
        return claimed

    def renew(self, items: Sequence[OutboxItem]) -> bool:
        """Extend the lease of rows this pass claimed; False when another sender took one over."""
        if not items:
            return True
        until = self.clock() + dt.timedelta(seconds=self.lease_s)
        with write_session(self._sessions) as session:  # a pass's token is its own: a re-claimed row carries another
            changed = rows_changed(session, update(OutboxItem).where(
                OutboxItem.id.in_([item.id for item in items]), OutboxItem.claimed_by == items[0].claimed_by,
            ).values(lease_until=until))
        return changed == len(items)

    def _send(self, destination: AnyDestination | None, name: str, items: list[OutboxItem]) -> list[StoreOutcome]:
        if destination is None:
            error = f"{name} is not a configured destination"
            return [StoreOutcome(item.sop_instance_uid, False, error=error) for item in items]
        objects = [
            OutgoingObject(self.data_dir / item.path, item.sop_instance_uid, item.sop_class_uid) for item in items
        ]
        return self.sender.send(destination, objects)

    def _record(
        self, items: list[OutboxItem], outcomes: list[StoreOutcome], report: RunReport, destination: AnyDestination | None
    ) -> None:
        """Update the rows; objects the archive stored are audited in the same transaction."""
        now = self.clock()
        sent: list[tuple[str, str]] = []
        with write_session(self._sessions) as session:
            for item, outcome in zip(items, outcomes, strict=True):
                row = session.get(OutboxItem, item.id)
                if row is None or row.state not in OPEN_STATES:
                    continue  # re-queued or removed meanwhile
                if row.fence != item.fence or row.claimed_by != item.claimed_by:
                    log.warning("outbox row %s: outcome of a claim another sender took over not recorded", item.id)
                    continue  # this pass's lease ran out and another sender claimed the row: its outcome counts
                row.claimed_by, row.lease_until = None, None
                self._apply(row, outcome, now, report)
                if outcome.ok:
                    sent.append((row.study_uid, row.sent_sop_class_uid or row.sop_class_uid))
            if sent:
                self._audit_sent(session, items[0].destination, destination, sent)
            session.flush()  # the study's outcome commits with its last row's
            for study_uid in sorted({item.study_uid for item in items}):
                states = session.scalars(select(OutboxItem.state).where(OutboxItem.study_uid == study_uid)).all()
                settled = study_delivery_outcome(states)
                if settled is not None:
                    report.settled[study_uid] = settled
                    if self.settle_in is not None:
                        self.settle_in(session, study_uid, settled)

    @staticmethod
    def _audit_sent(session: Session, name: str, destination: AnyDestination | None, sent: list[tuple[str, str]]) -> None:
        """One ``dicom.results_sent`` audit row for what one destination stored (dicom_node.audit);
        a DICOMweb destination has no AE title, its host and port are its URL's."""
        port: int | None
        if isinstance(destination, StowDestination):
            address = urlsplit(destination.service.url)
            ae_title, host = None, address.hostname
            port = address.port or (443 if address.scheme == "https" else 80)
        else:
            ae_title = None if destination is None else destination.ae_title
            host = None if destination is None else destination.host
            port = None if destination is None else destination.port
        detail = results_sent_detail(session, destination=name, ae_title=ae_title, host=host, port=port, sent=sent)
        add_entry(session, actor="fpe-node delivery", action=RESULTS_SENT, detail=detail)

    def _apply(self, row: OutboxItem, outcome: StoreOutcome, now: dt.datetime, report: RunReport) -> None:
        report.attempted += 1
        row.attempts += 1
        self.attempts[(row.destination, "sent" if outcome.ok else "failed")] += 1
        row.last_try_at = now
        row.updated_at = now
        row.last_status = outcome.status
        row.last_http_status = outcome.http_status
        if outcome.ok:
            row.state = OutboxState.SENT.value
            row.sent_sop_class_uid = outcome.sent_sop_class_uid
            row.sent_sop_instance_uid = outcome.sent_sop_instance_uid
            row.sent_at = now
            row.last_error = None
            report.sent += 1
            return
        row.last_error = outcome.error
        deadline = row.deadline_at
        if now >= deadline or outcome.permanent:
            row.state = OutboxState.DEAD.value
            report.dead += 1
            log.error(
                "dead letter: %s %s of study %s not stored at %s after %d attempts%s: %s",
                row.kind, row.sop_instance_uid, row.study_uid, row.destination, row.attempts,
                " (refused for good)" if outcome.permanent else "", row.last_error,
            )
            return
        row.state = OutboxState.FAILED.value
        row.next_try_at = min(now + dt.timedelta(seconds=backoff_s(row.attempts, self.delivery)), deadline)
        report.failed += 1

    def _settle(self, report: RunReport) -> None:
        """Log and notify (``on_settled``) each study the pass settled; their states moved in :meth:`_record`."""
        for study_uid, outcome in sorted(report.settled.items()):
            log.info("study %s: delivery %s", study_uid, outcome.value)
            if self.on_settled is not None:
                self.on_settled(study_uid, outcome)


class OutboxRunner:
    """A background thread that runs the outbox when woken or when a row falls due.

    Parameters
    ----------
    outbox:
        The outbox to run.
    scan_interval_s:
        Longest sleep between passes when nothing wakes the runner.
    """

    def __init__(self, outbox: Outbox, scan_interval_s: float) -> None:
        self.outbox = outbox
        self.scan_interval_s = scan_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (pending rows from before a restart are picked up at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fpe-outbox", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the runner's thread is alive (``/health/ready`` of a sender)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Run a pass now (new rows were queued)."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _sleep_s(self) -> float:
        due = self.outbox.next_due()
        if due is None:
            return self.scan_interval_s
        return max(_MIN_SLEEP_S, min((due - self.outbox.clock()).total_seconds(), self.scan_interval_s))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.outbox.run_once()
                sleep_s = self.scan_interval_s if report.suspended else self._sleep_s()
            except Exception:  # noqa: BLE001 - the runner must outlive a bad pass; logged with traceback
                log.exception("outbox pass failed; retrying in %.1f s", self.scan_interval_s)
                sleep_s = self.scan_interval_s
            self._wake.wait(sleep_s)
            self._wake.clear()
