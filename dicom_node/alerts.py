"""Alerts: rules evaluated periodically on the index, sent by webhook or e-mail, recorded.

Rules (``alerts.rules``):

``dead_letter``
    Results of a study were dead-lettered: the study entered ``dead_lettered`` or
    ``partly_delivered`` (some destination never stored its objects before
    ``delivery.deadline_s``).
``analysis_failed``
    An analysis failed (``not_analysed`` because of an internal error, or interrupted
    :data:`dicom_node.lifecycle.MAX_ATTEMPTS` times) or its results could not be built or queued
    (``report_failed``).
``disk_high``
    The data directory's filesystem is above ``retention.disk_high_watermark_pct`` (the SCP
    refuses C-STOREs there, 0xA700).
``no_analysis``
    Studies wait whose last instance arrived more than ``alerts.no_analysis_after_s`` ago, and no
    study was analysed for that long: studies arrive but results stopped flowing.

The event rules read the study timeline (``study_event`` rows, written by
:mod:`dicom_node.lifecycle` in the transaction of each transition) past a cursor kept in the
index (``alert_cursor``, :mod:`dicom_node.index.alert`), so a restart neither repeats nor misses
an alert. Events younger than :data:`SETTLE_S` are left for the next evaluation: an event id taken
by a transaction that commits later than a higher one is then still seen.

Channels (``alerts.webhooks``, ``alerts.emails``): a JSON POST (payload templates ``json``,
``slack``, ``teams``) or an e-mail over SMTP (optional STARTTLS and login). Each alert is tried
``alerts.retry_attempts`` times per channel with a doubling delay, at most once per rule and
channel every ``alerts.rate_limit_s`` (later ones are recorded as ``suppressed``), and recorded
with its outcome; :func:`recent` lists them for the console.

Alerts carry UIDs, states and counts; Patient ID and Accession Number only with
``alerts.include_patient_data`` (the index never holds patient names).
"""

from __future__ import annotations

import datetime as dt
import logging
import smtplib
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Protocol

import httpx
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.index.alert import AlertCursor, AlertRecord
from dicom_node.index.analysis import Analysis
from dicom_node.index.base import utcnow
from dicom_node.index.db import write_session
from dicom_node.index.models import Patient, Study, StudyEvent
from dicom_node.index.outbox import OutboxItem, OutboxState
from dicom_node.lifecycle import INTERRUPTED_REASON, StudyState
from dicom_node.settings import AlertSettings, EmailChannelSettings, Settings, WebhookChannelSettings, redact_webhook_url
from dicom_node.worker import INTERNAL_ERROR_REASON

log = logging.getLogger(__name__)

SETTLE_S = 2.0
"""Study events younger than this are read at the next evaluation (late commits of lower ids)."""

FAILED_ANALYSIS_PREFIXES = (INTERNAL_ERROR_REASON, INTERRUPTED_REASON)
"""How :mod:`dicom_node.worker` and :mod:`dicom_node.lifecycle` word a failed run's reason."""

MAX_LISTED = 10
"""Studies named in one alert; the rest are counted."""

CURSOR_SOURCE = "study_event"
"""``alert_cursor.source`` of the event rules' position in the study timeline."""

NO_CHANNEL = "none"
"""``channel`` of an alert recorded while no channel is configured (outcome ``not_sent``)."""

_DEAD_STATES = (StudyState.DEAD_LETTERED.value, StudyState.PARTLY_DELIVERED.value)
_WAITING_STATES = tuple(
    state.value for state in (StudyState.RECEIVED, StudyState.COMPLETE, StudyState.QUEUED, StudyState.ANALYSING)
)


@dataclass(frozen=True)
class Alert:
    """One alert, before it is sent: what fired, a title, a text and structured fields."""

    rule: str
    title: str
    text: str
    severity: str = "warning"
    fields: dict[str, Any] = field(default_factory=dict)
    cursor: int | None = None


@dataclass(frozen=True)
class SentAlert:
    """An alert as recorded (for the console): when, which rule, to where, and what became of it."""

    at: dt.datetime
    rule: str
    channel: str
    outcome: str
    attempts: int
    error: str | None
    title: str
    text: str


class ChannelError(RuntimeError):
    """A channel refused an alert (HTTP status, SMTP refusal)."""


class Channel(Protocol):
    """Where alerts go."""

    @property
    def label(self) -> str:
        """``kind:name``, recorded with each alert (never a URL or password)."""

    def send(self, alert: Alert, node_ae: str) -> None:
        """Deliver one alert or raise."""


# -- channels ---------------------------------------------------------------------------------


def webhook_payload(alert: Alert, template: str, node_ae: str) -> dict[str, Any]:
    """The JSON body for ``template``: ``json`` (every field), ``slack`` (incoming webhook ``text``),
    ``teams`` (Office 365 connector MessageCard)."""
    if template == "slack":
        return {"text": f"*[fpe-node {node_ae}] {alert.title}*\n{alert.text}"}
    if template == "teams":
        return {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": alert.title,
            "themeColor": "D70000" if alert.severity == "critical" else "FFA500",
            "title": f"[fpe-node {node_ae}] {alert.title}",
            "text": alert.text.replace("\n", "<br>"),
        }
    return {
        "source": "fpe-node",
        "version": __version__,
        "node": node_ae,
        "rule": alert.rule,
        "severity": alert.severity,
        "title": alert.title,
        "text": alert.text,
        "fields": alert.fields,
        "at": utcnow().isoformat(),
    }


@dataclass(frozen=True)
class WebhookChannel:
    """POST the alert as JSON to ``settings.url``; a 2xx answer is success."""

    settings: WebhookChannelSettings

    @property
    def label(self) -> str:
        """``webhook:<name>``."""
        return f"webhook:{self.settings.name}"

    def send(self, alert: Alert, node_ae: str) -> None:
        """One attempt."""
        try:
            response = httpx.post(
                self.settings.url, json=webhook_payload(alert, self.settings.template, node_ae),
                timeout=self.settings.timeout_s, follow_redirects=False,
            )
        except httpx.HTTPError as exc:  # its message may quote the URL, whose path is the webhook's secret
            secret = self.settings.url
            raise ChannelError(f"{type(exc).__name__}: {str(exc).replace(secret, redact_webhook_url(secret))}") from exc
        if not 200 <= response.status_code < 300:
            raise ChannelError(f"HTTP {response.status_code}")


@dataclass(frozen=True)
class EmailChannel:
    """Send the alert as a plain-text e-mail over SMTP (RFC 5321; STARTTLS RFC 3207)."""

    settings: EmailChannelSettings

    @property
    def label(self) -> str:
        """``email:<name>``."""
        return f"email:{self.settings.name}"

    def send(self, alert: Alert, node_ae: str) -> None:
        """One attempt."""
        config = self.settings
        message = EmailMessage()
        message["Subject"] = f"[fpe-node {node_ae}] {alert.title}"
        message["From"] = config.sender
        message["To"] = ", ".join(config.recipients)
        message.set_content(f"{alert.text}\n\nrule: {alert.rule}\nseverity: {alert.severity}\n")
        with smtplib.SMTP(config.host, config.port, timeout=config.timeout_s) as smtp:
            if config.starttls:
                cafile = str(config.ca_file) if config.ca_file is not None else None
                smtp.starttls(context=ssl.create_default_context(cafile=cafile))
            if config.username:
                password = config.password.get_secret_value() if config.password is not None else ""
                smtp.login(config.username, password)
            refused = smtp.send_message(message)
        if refused:
            raise ChannelError(f"{len(refused)} recipient(s) refused")


def channels_from(settings: AlertSettings) -> list[Channel]:
    """The configured channels, webhooks first."""
    return [*(WebhookChannel(hook) for hook in settings.webhooks), *(EmailChannel(mail) for mail in settings.emails)]


# -- rules ------------------------------------------------------------------------------------


def _study_line(session: Session, study: Study, include_patient_data: bool, detail: str) -> str:
    line = f"study {study.study_uid}: {detail}"
    if include_patient_data:
        patient = session.get(Patient, study.patient_pk) if study.patient_pk is not None else None
        line += f" (patient ID {patient.patient_id if patient else '?'}, accession {study.accession or '-'})"
    return line


def _listed(lines: Sequence[str]) -> str:
    shown = list(lines[:MAX_LISTED])
    if len(lines) > MAX_LISTED:
        shown.append(f"... and {len(lines) - MAX_LISTED} more")
    return "\n".join(shown)


_ALERTED_STATES = (*_DEAD_STATES, StudyState.REPORT_FAILED.value, StudyState.NOT_ANALYSED.value)


def _new_events(session: Session, after_id: int, settled_before: dt.datetime) -> tuple[int, list[tuple[StudyEvent, Study]]]:
    """The highest settled event id past ``after_id``, and the transitions among them into a state a rule watches.

    A note (:meth:`dicom_node.lifecycle.Lifecycle.note`) repeats the study's current state; an entry
    is a transition when the study's entry before it had another state.
    """
    last = session.scalar(
        select(func.max(StudyEvent.id)).where(StudyEvent.id > after_id, StudyEvent.at <= settled_before)
    )
    if last is None:
        return after_id, []
    rows = session.execute(
        select(StudyEvent, Study).join(Study, Study.id == StudyEvent.study_pk)
        .where(StudyEvent.id > after_id, StudyEvent.id <= last, StudyEvent.state.in_(_ALERTED_STATES))
        .order_by(StudyEvent.id)
    ).all()
    transitions = []
    for event, study in rows:
        before = session.scalar(
            select(StudyEvent.state).where(StudyEvent.study_pk == event.study_pk, StudyEvent.id < event.id)
            .order_by(StudyEvent.id.desc()).limit(1)
        )
        if before != event.state:
            transitions.append((event, study))
    return int(last), transitions


def dead_letter_alert(session: Session, events: Sequence[tuple[StudyEvent, Study]], include_patient_data: bool) -> Alert | None:
    """Studies whose results were dead-lettered in ``events``."""
    lines: list[str] = []
    destinations: set[str] = set()
    uids: list[str] = []
    for event, study in events:
        if event.state not in _DEAD_STATES:
            continue
        dead = session.execute(
            select(OutboxItem.destination, func.count()).where(
                OutboxItem.study_uid == study.study_uid, OutboxItem.state == OutboxState.DEAD.value
            ).group_by(OutboxItem.destination)
        ).all()
        where = ", ".join(f"{name} ({count} object{'s' if count != 1 else ''})" for name, count in dead) or "-"
        destinations.update(name for name, _count in dead)
        uids.append(study.study_uid)
        lines.append(_study_line(session, study, include_patient_data, f"{event.state}; dead letters at {where}"))
    if not lines:
        return None
    return Alert(
        "dead_letter", f"{len(lines)} stud{'ies' if len(lines) != 1 else 'y'} with dead-lettered results",
        "Results were not stored at their destination before the delivery deadline "
        "(retry them with `fpe-node resend` or the console):\n" + _listed(lines),
        severity="critical",
        fields={"studies": uids, "destinations": sorted(destinations)},
    )


def _failed_run(event: StudyEvent) -> bool:
    if event.state == StudyState.REPORT_FAILED.value:
        return True
    return event.state == StudyState.NOT_ANALYSED.value and (event.detail or "").startswith(FAILED_ANALYSIS_PREFIXES)


def analysis_failed_alert(
    session: Session, events: Sequence[tuple[StudyEvent, Study]], include_patient_data: bool
) -> Alert | None:
    """Failed analyses and report failures in ``events``."""
    failed = [(event, study) for event, study in events if _failed_run(event)]
    if not failed:
        return None
    lines = [_study_line(session, study, include_patient_data, f"{event.state}: {event.detail or ''}") for event, study in failed]
    return Alert(
        "analysis_failed", f"{len(failed)} failed analys{'es' if len(failed) != 1 else 'is'} or report{'s' if len(failed) != 1 else ''}",
        "The node could not analyse these studies or build their results (see the node's log):\n" + _listed(lines),
        severity="critical",
        fields={"studies": [study.study_uid for _event, study in failed], "states": sorted({e.state for e, _s in failed})},
    )


def disk_high_alert(used_pct: float, watermark_pct: float) -> Alert | None:
    """The disk above the high watermark."""
    if used_pct <= watermark_pct:
        return None
    return Alert(
        "disk_high", f"disk use {used_pct:.1f}% above the high watermark",
        f"The data directory's filesystem is {used_pct:.1f}% full, above retention.disk_high_watermark_pct "
        f"({watermark_pct:g}%): processed studies are purged first, and C-STOREs are refused (0xA700) "
        "while nothing can be purged.",
        severity="critical",
        fields={"used_pct": round(used_pct, 2), "watermark_pct": watermark_pct},
    )


def no_analysis_alert(session: Session, now: dt.datetime, after_s: float) -> Alert | None:
    """Studies waiting longer than ``after_s`` while no study was analysed for that long."""
    since = now - dt.timedelta(seconds=after_s)
    last_analysis = session.scalar(select(func.max(Analysis.created_at)))
    if last_analysis is not None and _aware(last_analysis) >= since:
        return None
    waiting = session.scalar(
        select(func.count()).select_from(Study).where(Study.state.in_(_WAITING_STATES), Study.last_received_at < since)
    ) or 0
    if not waiting:
        return None
    last = "never" if last_analysis is None else _aware(last_analysis).isoformat(timespec="seconds")
    return Alert(
        "no_analysis", f"no study analysed for {after_s:g} s while {waiting} wait",
        f"{waiting} stud{'ies' if waiting != 1 else 'y'} received more than {after_s:g} s ago still wait "
        f"(received, complete, queued or analysing); the last analysis was {last}. "
        "Check the inference workers (/health/ready) and the node's log.",
        severity="critical",
        fields={"waiting": int(waiting), "last_analysis": None if last_analysis is None else last},
    )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


# -- evaluation -------------------------------------------------------------------------------


class Alerts:
    """Evaluate the rules, send what fired on every channel, record each outcome.

    Parameters
    ----------
    settings
        The node's settings (``alerts``, ``retention.disk_high_watermark_pct``, ``network.ae_title``).
    session_factory
        Sessions on the index.
    disk_used_pct
        Current use of the data directory's filesystem, percent
        (:meth:`dicom_node.retention.Retention.used_pct`).
    channels
        Where alerts go; default :func:`channels_from` the settings.
    clock, sleep
        Current UTC time and the wait between attempts (tests pass their own).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        disk_used_pct: Callable[[], float],
        *,
        channels: Sequence[Channel] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings.alerts
        self.watermark_pct = settings.retention.disk_high_watermark_pct
        self.node_ae = settings.network.ae_title
        self._sessions = session_factory
        self._disk_used_pct = disk_used_pct
        self.channels = list(channels_from(settings.alerts) if channels is None else channels)
        self._clock = clock
        self._sleep = sleep
        self.evaluations = 0
        """Evaluations finished (tests wait on it)."""
        self._cursor = self._initial_cursor()

    def _initial_cursor(self) -> int:
        """Where the event rules go on: the stored cursor; at the very first start, the newest event now."""
        with write_session(self._sessions) as session:
            stored = session.get(AlertCursor, CURSOR_SOURCE)
            if stored is not None:
                return int(stored.position)
            position = int(session.scalar(select(func.max(StudyEvent.id))) or 0)
            session.add(AlertCursor(source=CURSOR_SOURCE, position=position))
            return position

    def _store_cursor(self, position: int) -> None:
        with write_session(self._sessions) as session:
            stored = session.get(AlertCursor, CURSOR_SOURCE)
            if stored is None:
                session.add(AlertCursor(source=CURSOR_SOURCE, position=position))
            elif position > stored.position:
                stored.position, stored.updated_at = position, self._clock()

    def start(self, scheduler: Any, *, when: Callable[[], bool] | None = None) -> None:
        """Evaluate every ``alerts.check_interval_s`` on the node's APScheduler (nothing when disabled).

        ``when``: evaluate only while it says so (several receivers: the holder of the
        ``completion`` lease alone, so an alert is sent once).
        """
        if not self.settings.enabled:
            return

        def tick() -> None:
            if when is None or when():
                self.run()

        scheduler.add_job(
            tick, trigger="interval", seconds=self.settings.check_interval_s, id="alerts",
            coalesce=True, max_instances=1,
        )

    def run(self) -> None:
        """:meth:`evaluate`, logging instead of raising (a scheduler job)."""
        try:
            self.evaluate()
        except OperationalError as exc:  # the index is unreachable: /health/ready says so; try again next time
            log.warning("alert evaluation skipped: index unavailable (%s)", type(exc.orig).__name__)
        except Exception:  # noqa: BLE001 - a failing rule must not end the job; logged with traceback
            log.exception("alert evaluation failed")

    def evaluate(self) -> list[SentAlert]:
        """Evaluate every enabled rule once; send and record what fired. Returns the records made."""
        now = self._clock()
        enabled = set(self.settings.rules)
        fired: list[Alert | None] = []
        with self._sessions() as session:
            cursor, events = _new_events(session, self._cursor, now - dt.timedelta(seconds=SETTLE_S))
            patient_data = self.settings.include_patient_data
            if "dead_letter" in enabled:
                fired.append(_with_cursor(dead_letter_alert(session, events, patient_data), cursor))
            if "analysis_failed" in enabled:
                fired.append(_with_cursor(analysis_failed_alert(session, events, patient_data), cursor))
            if "no_analysis" in enabled:
                fired.append(no_analysis_alert(session, now, self.settings.no_analysis_after_s))
        if "disk_high" in enabled:
            fired.append(disk_high_alert(self._disk_used_pct(), self.watermark_pct))
        records = [record for alert in fired if alert is not None for record in self._dispatch(alert)]
        if cursor != self._cursor:  # after the alerts are recorded: a crash in between repeats, never loses one
            self._store_cursor(cursor)
            self._cursor = cursor
        self.evaluations += 1
        return records

    def _dispatch(self, alert: Alert) -> list[SentAlert]:
        if not self.channels:
            return [self._record(alert, NO_CHANNEL, "not_sent", 0, None)]
        return [self._deliver(alert, channel) for channel in self.channels]

    def _deliver(self, alert: Alert, channel: Channel) -> SentAlert:
        if self._rate_limited(alert.rule, channel.label):
            log.info("alert %s on %s suppressed (rate limit)", alert.rule, channel.label)
            return self._record(alert, channel.label, "suppressed", 0, None)
        error: str | None = None
        attempts = 0
        for attempt in range(self.settings.retry_attempts):
            if attempt:
                self._sleep(self.settings.retry_initial_s * 2 ** (attempt - 1))
            attempts += 1
            try:
                channel.send(alert, self.node_ae)
            except (ChannelError, httpx.HTTPError, OSError, smtplib.SMTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("alert %s on %s: attempt %d failed: %s", alert.rule, channel.label, attempts, error)
                continue
            log.info("alert %s sent on %s (attempt %d)", alert.rule, channel.label, attempts)
            return self._record(alert, channel.label, "sent", attempts, None)
        log.error("alert %s on %s not sent after %d attempts: %s", alert.rule, channel.label, attempts, error)
        return self._record(alert, channel.label, "failed", attempts, error)

    def _rate_limited(self, rule: str, channel: str) -> bool:
        if self.settings.rate_limit_s <= 0:
            return False
        since = self._clock() - dt.timedelta(seconds=self.settings.rate_limit_s)
        with self._sessions() as session:
            last = session.scalar(
                select(func.max(AlertRecord.at)).where(
                    AlertRecord.rule == rule, AlertRecord.channel == channel, AlertRecord.outcome == "sent"
                )
            )
        return last is not None and _aware(last) > since

    def _record(self, alert: Alert, channel: str, outcome: str, attempts: int, error: str | None) -> SentAlert:
        row = AlertRecord(
            at=self._clock(), rule=alert.rule, channel=channel, outcome=outcome, attempts=attempts,
            error=error, title=alert.title[:200], text=alert.text, cursor=alert.cursor,
        )
        with write_session(self._sessions) as session:
            session.add(row)
        return _sent(row)


def _with_cursor(alert: Alert | None, cursor: int) -> Alert | None:
    if alert is None:
        return None
    return Alert(alert.rule, alert.title, alert.text, alert.severity, alert.fields, cursor)


def _sent(row: AlertRecord) -> SentAlert:
    return SentAlert(_aware(row.at), row.rule, row.channel, row.outcome, row.attempts, row.error, row.title, row.text)


def recent(session: Session, limit: int = 50) -> list[SentAlert]:
    """The ``limit`` most recent alerts, newest first (what was sent, to where, outcome)."""
    rows = session.scalars(select(AlertRecord).order_by(AlertRecord.id.desc()).limit(limit))
    return [_sent(row) for row in rows]
