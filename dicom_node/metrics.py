"""Prometheus metrics of the node (``/metrics``), derived at scrape time.

Where the index holds the truth -- studies by state, the outbox, dead letters, analyses with
their stage timings, scores and decisions, completion waits, time to result, alerts -- the
numbers are read from it when Prometheus scrapes (:class:`NodeCollector`), so they are the
same whichever process of the node serves them and survive restarts. Only what lives in the
serving process is counted in memory: the SCP's C-STORE statuses, accepted associations and
front-door refusals (:attr:`dicom_node.scp.StorageSCP.refusals`), the delivery attempts of its
outbox, the worker processes and the models they loaded.

Histograms over append-only rows (``analysis``, ``study_event``) are accumulated incrementally:
each scrape reads the rows above a floor id, skipping those already counted; the floor trails
the highest id seen by :data:`LOOKBACK_ROWS`, so a row whose id was taken before a higher one
but committed after it is still counted once.

Every metric is described in ``docs/metrics.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.alert import AlertRecord
from dicom_node.index.analysis import Analysis
from dicom_node.index.models import Study, StudyEvent
from dicom_node.index.outbox import OPEN_STATES, OutboxItem, OutboxState
from dicom_node.lifecycle import StudyState
from dicom_node.retention import disk_usage
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "fpenode"
LOOKBACK_ROWS = 1000
"""How far below the highest id seen a scrape looks again for rows committed late."""

SCORE_BUCKETS = tuple(round(0.1 * step, 1) for step in range(1, 11))
"""Upper bounds of the score histogram (scores are probabilities in [0, 1])."""
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds, seconds, of the per-stage analysis time histogram."""
WAIT_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds, seconds, of the completion wait histogram."""
RESULT_BUCKETS = (10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0)
"""Upper bounds, seconds, of the time-to-result histogram."""

_RESULT_STATES = (StudyState.DELIVERED.value, StudyState.PARTLY_DELIVERED.value)


@dataclass
class _Histogram:
    """Cumulative bucket counts per label tuple."""

    bounds: tuple[float, ...]
    series: dict[tuple[str, ...], tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1  # +Inf
        total[0] += value

    def family(self, name: str, documentation: str, label_names: Sequence[str]) -> HistogramMetricFamily:
        metric = HistogramMetricFamily(name, documentation, labels=list(label_names))
        for labels, (counts, total) in sorted(self.series.items()):
            buckets = [(_bound(bound), float(count)) for bound, count in zip(self.bounds, counts)]
            buckets.append(("+Inf", float(counts[-1])))
            metric.add_metric(list(labels), buckets, total[0])
        return metric


def _bound(value: float) -> str:
    return repr(float(value))


@dataclass
class _RowScan:
    """Ids of an append-only table counted so far (see the module's note on late commits)."""

    floor: int = 0
    seen: set[int] = field(default_factory=set)

    def fresh(self, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` (every id above :attr:`floor`) were not counted yet; remembers them."""
        ids = set(ids)
        new = ids - self.seen
        self.seen |= new
        if ids:
            self.floor = max(self.floor, max(ids) - LOOKBACK_ROWS)
            self.seen = {row_id for row_id in self.seen if row_id > self.floor}
        return new


@dataclass
class _Tallies:
    """What the scans accumulated."""

    analyses: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    decisions: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    scores: _Histogram = field(default_factory=lambda: _Histogram(SCORE_BUCKETS))
    stages: _Histogram = field(default_factory=lambda: _Histogram(STAGE_BUCKETS))
    waits: _Histogram = field(default_factory=lambda: _Histogram(WAIT_BUCKETS))
    results: _Histogram = field(default_factory=lambda: _Histogram(RESULT_BUCKETS))


class NodeCollector(Collector):
    """The node's metrics, read from the index and the running node at each scrape.

    Parameters
    ----------
    settings
        The node's settings (data directory, watermark).
    session_factory
        Sessions on the index.
    node
        The running node (:class:`dicom_node.bootstrap.Node`) for the in-process counters, or
        ``None`` (index-derived metrics only).
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], node: Any = None) -> None:
        self.settings = settings
        self._sessions = session_factory
        self.node = node
        self._lock = threading.Lock()
        self._tallies = _Tallies()
        self._analysis_scan = _RowScan()
        self._event_scan = _RowScan()

    def describe(self) -> list[Metric]:
        """No description up front: the registry must not call :meth:`collect` at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every metric; the index-derived ones only when the index answers (``fpenode_index_up``)."""
        with self._lock:
            yield from self._process_metrics()
            yield from self._disk_metrics()
            try:
                with self._sessions() as session:
                    index_metrics = list(self._index_metrics(session))
            except (DBAPIError, SQLAlchemyTimeoutError) as exc:  # a scrape answers while the index is down
                log.warning("metrics: index unavailable (%s)", type(exc).__name__)
                index_metrics = []
            yield _gauge("index_up", "1 when the scrape could read the index, else 0.", value=1.0 if index_metrics else 0.0)
            yield from index_metrics

    # -- the serving process ------------------------------------------------------------------

    def _process_metrics(self) -> Iterator[Metric]:
        node = self.node
        if node is None:
            return
        scp = node.scp
        received = CounterMetricFamily(
            f"{PREFIX}_instances_received", "C-STORE requests answered by the SCP, by the status returned.", labels=["status"]
        )
        for status, count in sorted(scp.ingest.statuses.items()):
            received.add_metric([status], count)
        yield received
        yield CounterMetricFamily(
            f"{PREFIX}_associations_accepted", "Associations the SCP accepted.", value=scp.ingest.tracker.accepted
        )
        refused = CounterMetricFamily(
            f"{PREFIX}_scp_refusals",
            "Connections, associations and messages the SCP refused, by reason (dicom_node.transport.Refusal).",
            labels=["reason"],
        )
        for reason, count in sorted(dict(scp.refusals).items()):
            refused.add_metric([reason], count)
        yield refused
        yield _gauge("scp_listening", "1 while the SCP accepts associations.", value=1.0 if scp_listening(node) else 0.0)
        attempts = CounterMetricFamily(
            f"{PREFIX}_delivery_attempts",
            "C-STORE attempts of result objects by this process's outbox, by destination and result (sent, failed).",
            labels=["destination", "result"],
        )
        for (destination, result), count in sorted(dict(node.delivery.outbox.attempts).items()):
            attempts.add_metric([destination, result], count)
        yield attempts
        workers = node.workers
        loaded = workers.loaded_models()
        yield _gauge("workers_configured", "Inference worker processes the settings ask for.", value=workers.configured)
        yield _gauge("workers_alive", "Inference worker processes running.", value=workers.alive())
        yield _gauge("workers_model_loaded", "Running inference workers that loaded their model.", value=len(loaded))
        info = InfoMetricFamily(
            f"{PREFIX}_model", "Model served by the inference workers (name, version, weights SHA-256, demonstration).",
            labels=["name", "version", "weights_sha256", "demonstration"],
        )
        for identity in {tuple(sorted((k, str(v)) for k, v in identity.items())) for identity in loaded.values()}:
            values = dict(identity)
            info.add_metric(
                [values.get("name", ""), values.get("version", ""), values.get("weights_sha256", ""),
                 values.get("demonstration", "").lower()],
                {},
            )
        yield info

    def _disk_metrics(self) -> Iterator[Metric]:
        try:
            usage = disk_usage(self.settings.storage.data_dir)
        except OSError:
            return
        yield _gauge("disk_used_bytes", "Bytes used on the data directory's filesystem.", value=usage.used)
        yield _gauge("disk_total_bytes", "Size of the data directory's filesystem, bytes.", value=usage.total)
        yield _gauge(
            "disk_high_watermark_ratio", "retention.disk_high_watermark_pct as a ratio (0-1).",
            value=self.settings.retention.disk_high_watermark_pct / 100.0,
        )

    # -- the index ------------------------------------------------------------------------------

    def _index_metrics(self, session: Session) -> Iterator[Metric]:
        counts = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Studies in the index by life-cycle state.", labels=["state"])
        for known in StudyState:
            studies.add_metric([known.value], float(counts.pop(known.value, 0)))
        for other, count in sorted(counts.items()):  # states of a later version
            studies.add_metric([other], float(count))
        yield studies
        yield from self._outbox_metrics(session)
        self._scan_analyses(session)
        self._scan_events(session)
        tallies = self._tallies
        analyses = CounterMetricFamily(
            f"{PREFIX}_analyses", "Worker runs recorded in the index, by outcome, pipeline and model.",
            labels=["outcome", "pipeline", "model_name", "model_version"],
        )
        for labels, count in sorted(tallies.analyses.items()):
            analyses.add_metric(list(labels), count)
        yield analyses
        decisions = CounterMetricFamily(
            f"{PREFIX}_decisions", "Predictions by decision (positive, negative), pipeline and model.",
            labels=["decision", "pipeline", "model_name", "model_version"],
        )
        for labels, count in sorted(tallies.decisions.items()):
            decisions.add_metric(list(labels), count)
        yield decisions
        yield tallies.scores.family(
            f"{PREFIX}_score", "Scores of predictions by pipeline and model (drift after a scanner or protocol change).",
            ["pipeline", "model_name", "model_version"],
        )
        yield tallies.stages.family(
            f"{PREFIX}_analysis_stage_seconds", "Time of each analysis stage (load, decode, select, volume, register, "
            "preprocess, infer, attention).", ["stage"],
        )
        yield tallies.waits.family(
            f"{PREFIX}_completion_wait_seconds",
            "From a study's arrival (or re-opening) to its completion, by trigger (ready: usable series complete; "
            "timeout: completion.study_timeout_s).", ["trigger"],
        )
        yield tallies.results.family(
            f"{PREFIX}_time_to_result_seconds",
            "From a study's arrival (or re-opening) to its results stored at the destinations (delivered, partly_delivered).",
            ["state"],
        )
        alerts = CounterMetricFamily(
            f"{PREFIX}_alerts", "Alerts recorded by rule, channel and outcome (sent, failed, suppressed, not_sent).",
            labels=["rule", "channel", "outcome"],
        )
        rows = session.execute(
            select(AlertRecord.rule, AlertRecord.channel, AlertRecord.outcome, func.count())
            .group_by(AlertRecord.rule, AlertRecord.channel, AlertRecord.outcome)
        ).all()
        for rule, channel, outcome, count in sorted(rows):
            alerts.add_metric([rule, channel, outcome], count)
        yield alerts

    def _outbox_metrics(self, session: Session) -> Iterator[Metric]:
        rows = session.execute(
            select(OutboxItem.destination, OutboxItem.state, func.count()).group_by(OutboxItem.destination, OutboxItem.state)
        ).all()
        items = GaugeMetricFamily(
            f"{PREFIX}_outbox_items", "Outbox rows (result object x destination) by destination and state.",
            labels=["destination", "state"],
        )
        depth: dict[str, float] = {}
        dead: dict[str, float] = {}
        for destination, state, count in sorted(rows):
            items.add_metric([destination, state], float(count))
            depth.setdefault(destination, 0.0)
            dead.setdefault(destination, 0.0)
            if state in OPEN_STATES:
                depth[destination] += count
            elif state == OutboxState.DEAD.value:
                dead[destination] += count
        yield items
        yield _labelled_gauge("outbox_depth", "Outbox rows waiting for an attempt (pending, failed), by destination.",
                              "destination", depth)
        yield _labelled_gauge("dead_letters", "Outbox rows dead-lettered (not stored before delivery.deadline_s), "
                              "by destination.", "destination", dead)

    def _scan_analyses(self, session: Session) -> None:
        rows = session.execute(
            select(Analysis.id, Analysis.outcome, Analysis.pipeline, Analysis.model_name, Analysis.model_version,
                   Analysis.score, Analysis.positive, Analysis.timings)
            .where(Analysis.id > self._analysis_scan.floor)
        ).all()
        fresh = self._analysis_scan.fresh(row.id for row in rows)
        tallies = self._tallies
        for row in rows:
            if row.id not in fresh:
                continue
            model = (row.pipeline or "", row.model_name or "", row.model_version or "")
            key = (row.outcome, *model)
            tallies.analyses[key] = tallies.analyses.get(key, 0) + 1
            if row.score is not None:
                tallies.scores.observe(model, float(row.score))
            if row.positive is not None:
                decision = ("positive" if row.positive else "negative", *model)
                tallies.decisions[decision] = tallies.decisions.get(decision, 0) + 1
            for stage, seconds in _timings(row.timings).items():
                tallies.stages.observe((stage,), seconds)

    def _scan_events(self, session: Session) -> None:
        """Completion waits and time to result from the study timeline."""
        wanted = (StudyState.COMPLETE.value, *_RESULT_STATES)
        rows = session.execute(
            select(StudyEvent.id, StudyEvent.study_pk, StudyEvent.state, StudyEvent.at, StudyEvent.detail)
            .where(StudyEvent.id > self._event_scan.floor, StudyEvent.state.in_(wanted))
        ).all()
        fresh = self._event_scan.fresh(row.id for row in rows)
        todo = sorted((row for row in rows if row.id in fresh), key=lambda row: row.id)
        timelines = _timelines(session, sorted({row.study_pk for row in todo}))
        for row in todo:
            cycle = _cycle_of(timelines.get(row.study_pk, []), row.id)
            if cycle is None or cycle.previous == row.state:  # a note repeating the state, not a transition
                continue
            seconds = max(0.0, (_aware(row.at) - cycle.started).total_seconds())
            if row.state == StudyState.COMPLETE.value:
                if StudyState.COMPLETE.value not in cycle.entered:
                    trigger = "timeout" if (row.detail or "").startswith("study timeout") else "ready"
                    self._tallies.waits.observe((trigger,), seconds)
            elif not cycle.entered & set(_RESULT_STATES):  # a re-send of the same cycle is not a new result
                self._tallies.results.observe((row.state,), seconds)


_TimelineRow = tuple[int, str, dt.datetime]


def _timelines(session: Session, study_pks: Sequence[int], chunk: int = 500) -> dict[int, list[_TimelineRow]]:
    """Every timeline entry of the studies, in id order (one query per ``chunk`` studies)."""
    timelines: dict[int, list[_TimelineRow]] = {}
    for first in range(0, len(study_pks), chunk):
        rows = session.execute(
            select(StudyEvent.study_pk, StudyEvent.id, StudyEvent.state, StudyEvent.at)
            .where(StudyEvent.study_pk.in_(study_pks[first:first + chunk])).order_by(StudyEvent.id)
        ).all()
        for study_pk, event_id, state, at in rows:
            timelines.setdefault(study_pk, []).append((event_id, state, _aware(at)))
    return timelines


@dataclass(frozen=True)
class _Cycle:
    """Where a timeline stood before one of its entries."""

    started: dt.datetime
    """When the study last entered ``received`` (arrival or re-opening)."""
    entered: frozenset[str]
    """States entered since then."""
    previous: str | None
    """State of the entry just before."""


def _cycle_of(timeline: Sequence[_TimelineRow], event_id: int) -> _Cycle | None:
    """The cycle ``event_id`` belongs to; ``None`` when no arrival precedes it.

    Notes (:meth:`dicom_node.lifecycle.Lifecycle.note`) repeat the current state; only an entry
    whose state differs from the one before is a transition.
    """
    started: dt.datetime | None = None
    entered: set[str] = set()
    previous: str | None = None
    for row_id, state, at in timeline:
        if row_id >= event_id:
            break
        if state != previous:
            if state == StudyState.RECEIVED.value:
                started, entered = at, set()
            else:
                entered.add(state)
        previous = state
    return None if started is None else _Cycle(started, frozenset(entered), previous)


def _timings(text: str | None) -> dict[str, float]:
    try:
        values = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, (int, float))} if isinstance(values, dict) else {}


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _gauge(name: str, documentation: str, *, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=float(value))


def _labelled_gauge(name: str, documentation: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)
    return metric


def scp_listening(node: Any) -> bool:
    """True while the node's SCP accepts associations on its plain or its TLS listener."""
    for listener in ("address", "tls_address"):  # each raises RuntimeError while that listener is not started
        try:
            getattr(node.scp, listener)
        except (RuntimeError, AttributeError):
            continue
        return True
    return False


def build_registry(
    settings: Settings, session_factory: sessionmaker[Session], node: Any = None,
    extra: Callable[[CollectorRegistry], None] | None = None,
) -> CollectorRegistry:
    """A registry of its own (no process-global state) holding :class:`NodeCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(settings, session_factory, node))
    if extra is not None:
        extra(registry)
    return registry
