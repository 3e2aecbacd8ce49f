"""Operator actions on studies and on the node: one implementation for the CLI, the REST API and the console.

- :func:`force_complete`: a study still receiving (``received``, waiting for its series to go
  quiet or for the study timeout) is declared complete and queued now.
- :func:`rerun_analysis`: a processed study is queued for analysis again.
- :func:`resend_results`: a study's results are queued for delivery again (``fpe-node resend``).
- :func:`retry_dead_letter` / :func:`drop_dead_letter`: one dead-lettered result object is sent
  again with a fresh deadline, or given up (removed from the outbox, noted in the study's timeline).
- :func:`suspend` / :func:`resume`: analysis (workers claim no job) or delivery (the outbox tries
  nothing) stop and start node-wide. The flag lives in the index (``node_suspension``), so the
  running node's worker processes and outbox obey a suspension made by the CLI too; queued work
  waits and nothing is lost.

Each action is audited (:mod:`dicom_node.audit`: ``study.complete``, ``study.rerun``,
``study.resend``, ``dead_letter.retry``, ``dead_letter.drop``, ``node.suspend``, ``node.resume``)
and raises :class:`ActionError` when refused (:class:`ActionNotFound` for an unknown study or
dead letter), with a message for the user.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.models import Series, Study
from dicom_node.index.outbox import OutboxItem, OutboxState
from dicom_node.index.users import Suspension
from dicom_node.lifecycle import (
    BUSY_STATES,
    PROCESSED_STATES,
    WAITING_STATES,
    StudyState,
    TransitionError,
    enqueue_in,
    record_event,
    study_state,
    transition,
)

if TYPE_CHECKING:
    from dicom_node.outbox import Outbox
    from dicom_node.web.context import WebContext

log = logging.getLogger(__name__)

Suspendable = Literal["analysis", "delivery"]
SUSPENDABLE: tuple[Suspendable, ...] = ("analysis", "delivery")


class ActionError(Exception):
    """A refused action (wrong state, nothing to do); ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ActionNotFound(ActionError):
    """The study or dead letter is not in the index."""


@dataclass(frozen=True)
class ActionResult:
    """What an action did, for the CLI, the API and the console."""

    message: str
    count: int = 1


def _state_or_404(session: Session, study_uid: str) -> StudyState:
    state = study_state(session, study_uid)
    if state is None:
        raise ActionNotFound(f"study {study_uid} is not in the index")
    return state


# -- studies --------------------------------------------------------------------------------------


def force_complete(context: WebContext, study_uid: str, *, actor: str, source: str) -> ActionResult:
    """Declare a study still receiving complete and queue its analysis now.

    Every series counts as complete from now on, as when the study timeout ends the wait
    (a later usable series re-opens the study as usual). The running node's completion timer
    finds the study queued and leaves it.

    Raises
    ------
    ActionError
        The study is not ``received`` (already complete, queued, analysed ...).
    """
    with write_session(context.session_factory) as session:
        state = _state_or_404(session, study_uid)
        if state is not StudyState.RECEIVED:
            raise ActionError(f"study {study_uid} is {state.value}, not waiting for more instances")
        study_pk = session.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
        session.execute(
            update(Series).where(Series.study_pk == study_pk, Series.complete_at.is_(None)).values(complete_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        enqueue_in(session, study_uid, f"forced complete by {actor}")
        audit.add_entry(session, actor=actor, action="study.complete", source=source, detail={"study_uid": study_uid})
    return ActionResult(f"study {study_uid} forced complete and queued for analysis")


def rerun_analysis(context: WebContext, study_uid: str, *, actor: str, source: str) -> ActionResult:
    """Queue a processed study for analysis again (its new results replace the old ones at the archive).

    Raises
    ------
    ActionError
        The study is still receiving, already waiting or being worked on, or purged.
    """
    with write_session(context.session_factory) as session:
        state = _state_or_404(session, study_uid)
        if state not in PROCESSED_STATES:
            why = {
                StudyState.RECEIVED: "still receiving (force it complete instead)",
                StudyState.PURGED: "purged (its images are gone)",
            }.get(state, "already waiting or being worked on" if state in WAITING_STATES | BUSY_STATES else state.value)
            raise ActionError(f"study {study_uid} cannot be re-run: {why}")
        if not enqueue_in(session, study_uid, f"re-run by {actor}", rerun=True):
            raise ActionError(f"study {study_uid} is already queued")
        audit.add_entry(session, actor=actor, action="study.rerun", source=source,
                     detail={"study_uid": study_uid, "from": state.value})
    return ActionResult(f"study {study_uid} queued for analysis again")


def resend_results(context: WebContext, study_uid: str, *, actor: str, source: str) -> ActionResult:
    """Queue a study's results for delivery again (``fpe-node resend``).

    Every outbox row (sent, failed, dead) becomes pending with a fresh deadline and the study goes
    back to ``reporting``; held demonstration results stay held unless
    ``delivery.allow_demonstration_results``. A study whose results never reached the outbox
    (or in ``report_failed``) has its analysis queued again instead (:mod:`dicom_node.recovery`).

    Raises
    ------
    ActionError
        Nothing to resend.
    """
    from dicom_node.delivery import requeue_study
    from dicom_node.lifecycle import Lifecycle
    from dicom_node.recovery import recover_study

    settings = context.settings
    with context.session_factory() as session:
        _state_or_404(session, study_uid)
    recovered = recover_study(
        context.session_factory, Lifecycle(context.session_factory, settings.completion), settings, study_uid, by="resend"
    )
    if recovered is not None and recovered.action == "requeue":
        result = ActionResult(f"study {study_uid}: {recovered.why}; its analysis is queued again and the node sends the results")
        count = 0
    else:
        count = requeue_study(_outbox(context), study_uid)
        if count == 0:
            raise ActionError(
                f"nothing to resend for study {study_uid} (no results queued, or held demonstration results)"
            )
        result = ActionResult(f"{count} result objects of study {study_uid} queued again", count)
        _wake_delivery(context)
    with write_session(context.session_factory) as session:
        audit.add_entry(session, actor=actor, action="study.resend", source=source,
                     detail={"study_uid": study_uid, "objects": count, "analysis_requeued": count == 0})
    return result


def _outbox(context: WebContext) -> Outbox:
    """The running node's outbox, else one on the index (re-queueing needs no association)."""
    from dicom_node.outbox import Outbox

    if context.node is not None:
        return context.node.delivery.outbox
    from dicom_node.delivery import destinations_from_registry
    from dicom_node.peers import PeerRegistry
    from dicom_node.scu import StoreScu

    settings = context.settings
    return Outbox(
        context.session_factory, settings.delivery, settings.storage.data_dir,
        StoreScu(settings.delivery.calling_ae_title or settings.network.ae_title),
        destinations_from_registry(PeerRegistry(context.session_factory)),
    )


def _wake_delivery(context: WebContext) -> None:
    if context.node is not None and context.node.delivery.runner is not None:
        context.node.delivery.runner.wake()


# -- dead letters ---------------------------------------------------------------------------------


def _dead_row(session: Session, item_id: int) -> OutboxItem:
    row = session.get(OutboxItem, item_id)
    if row is None:
        raise ActionNotFound(f"no outbox item {item_id}")
    if row.state != OutboxState.DEAD.value:
        raise ActionError(f"outbox item {item_id} is {row.state}, not a dead letter")
    return row


def retry_dead_letter(context: WebContext, item_id: int, *, actor: str, source: str) -> ActionResult:
    """Send one dead-lettered result object again, with a fresh deadline; its study goes back to ``reporting``.

    Raises
    ------
    ActionError
        Unknown item, not dead, or its file is gone (the study was purged).
    """
    now = utcnow()
    with write_session(context.session_factory) as session:
        row = _dead_row(session, item_id)
        if not (context.settings.storage.data_dir / row.path).is_file():
            raise ActionError(f"the file of outbox item {item_id} is gone (study purged); re-run the study instead")
        row.state = OutboxState.PENDING.value
        row.attempts = 0
        row.next_try_at = now
        row.updated_at = now
        row.deadline_at = now + dt.timedelta(seconds=context.settings.delivery.deadline_s)
        row.last_error = None
        state = study_state(session, row.study_uid)
        if state is not None and state is not StudyState.REPORTING:
            try:
                transition(session, row.study_uid, StudyState.REPORTING, f"dead letter {item_id} retried by {actor}")
            except TransitionError as exc:
                log.warning("study %s: dead letter retried without a state change: %s", row.study_uid, exc)
        audit.add_entry(session, actor=actor, action="dead_letter.retry", source=source,
                     detail={"id": item_id, "study_uid": row.study_uid, "destination": row.destination})
        message = f"{row.kind} {row.sop_instance_uid} queued again for {row.destination}"
    _wake_delivery(context)
    return ActionResult(message)


def drop_dead_letter(context: WebContext, item_id: int, *, actor: str, source: str) -> ActionResult:
    """Give up one dead-lettered result object: remove it from the outbox, note it in the study's timeline.

    The result file stays in the node until retention purges the study; ``resend`` cannot bring
    the dropped row back, a re-run makes new results.
    """
    with write_session(context.session_factory) as session:
        row = _dead_row(session, item_id)
        detail = {"id": item_id, "study_uid": row.study_uid, "destination": row.destination, "kind": row.kind,
                  "sop_instance_uid": row.sop_instance_uid}
        study = session.execute(select(Study.id, Study.state).where(Study.study_uid == row.study_uid)).one_or_none()
        if study is not None:
            record_event(session, study.id, study.state,
                         f"dead letter {item_id} ({row.kind} for {row.destination}) dropped by {actor}")
        session.delete(row)
        audit.add_entry(session, actor=actor, action="dead_letter.drop", source=source, detail=detail)
    return ActionResult(f"dead letter {item_id} dropped")


# -- node-wide suspension -----------------------------------------------------------------------------


def _check_what(what: str) -> Suspendable:
    if what not in SUSPENDABLE:
        raise ActionError(f"cannot suspend {what!r}: analysis or delivery")
    return what  # type: ignore[return-value]


def suspend(context: WebContext, what: Suspendable, *, actor: str, source: str) -> ActionResult:
    """Stop ``analysis`` (no job is claimed; a study in progress finishes) or ``delivery`` (the
    outbox tries nothing) node-wide until :func:`resume`. Idempotent."""
    what = _check_what(what)
    with write_session(context.session_factory) as session:
        if session.get(Suspension, what) is not None:
            return ActionResult(f"{what} is already suspended", 0)
        session.add(Suspension(what=what, since=utcnow(), actor=actor[:128]))
        audit.add_entry(session, actor=actor, action="node.suspend", source=source, detail={"what": what})
    log.warning("%s suspended node-wide by %s", what, actor)
    return ActionResult(f"{what} suspended")


def resume(context: WebContext, what: Suspendable, *, actor: str, source: str) -> ActionResult:
    """Start ``analysis`` or ``delivery`` again after :func:`suspend`. Idempotent."""
    what = _check_what(what)
    with write_session(context.session_factory) as session:
        row = session.get(Suspension, what)
        if row is None:
            return ActionResult(f"{what} is not suspended", 0)
        session.delete(row)
        audit.add_entry(session, actor=actor, action="node.resume", source=source, detail={"what": what})
    log.warning("%s resumed by %s", what, actor)
    if what == "delivery":
        _wake_delivery(context)
    return ActionResult(f"{what} resumed")


def suspended(context: WebContext) -> set[str]:
    """What is suspended node-wide now."""
    with context.session_factory() as session:
        return set(session.scalars(select(Suspension.what)))


# -- peers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoResult:
    """The answer of a peer to C-ECHO (PS3.7 section 9.1.5): ``status`` 0x0000 is success, ``None`` no answer."""

    peer: str
    ok: bool
    status: int | None
    message: str


def echo_peer(context: WebContext, name: str, *, actor: str, source: str, timeout_s: float = 10.0) -> EchoResult:
    """C-ECHO a registered peer's SCP (host, port, first AE title and TLS flags from the registry);
    audited ``peer.echo``.

    Raises
    ------
    ActionNotFound
        No peer of that name.
    ActionError
        The peer has no host and port to call.
    """
    from pynetdicom import AE

    from dicom_node.peers import PeerRegistry
    from dicom_node.scp import VERIFICATION_SOP_CLASS

    registry = PeerRegistry(context.session_factory)
    peer = registry.get(name)
    if peer is None:
        raise ActionNotFound(f"no peer named {name!r}")
    if peer.port is None or peer.host == "*":
        raise ActionError(f"peer {peer.name} has no host and port to echo")
    settings = context.settings
    ae = AE(ae_title=settings.delivery.calling_ae_title or settings.network.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    tls_args = None
    if peer.tls:  # DICOM TLS (PS3.15 B.1) as the delivery uses it: the site's client contexts
        from dicom_node.tls import client_contexts

        contexts = client_contexts(settings)
        tls_args = (contexts.verified if peer.tls_verify else contexts.unverified, peer.host)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_titles[0], tls_args=tls_args)
    status: int | None = None
    if not assoc.is_established:
        message = f"peer {peer.name}: association to {peer.host}:{peer.port} as {peer.ae_titles[0]} failed"
    else:
        try:
            response = assoc.send_c_echo()
        finally:
            assoc.release()
        status = int(response.Status) if "Status" in response else None
        message = f"peer {peer.name}: C-ECHO status 0x{status:04X}" if status is not None else f"peer {peer.name}: no C-ECHO response"
    result = EchoResult(peer.name, status == 0, status, message)
    registry.audit(actor=actor, action="peer.echo", source=source, detail={"name": peer.name, "status": status})
    return result
