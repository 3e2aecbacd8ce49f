"""From a prediction to results in the archive: reports, files, outbox, study states.

One study's path after inference (in the worker process: :meth:`Delivery.prepare` builds and
writes the files, :meth:`Delivery.queue_in` adds the outbox rows in the transaction that
records the analysis; :meth:`Delivery.on_result` does both in a transaction of its own)::

    Prediction | NotAnalysed
      -> source headers from the index (patient and study are copied from them)
      -> reports.pmap / reports.seg overlays when switched on, then reports.sr.build_sr
         (listing them as evidence), + reports.sc captures, + reports.pdf when switched on
      -> files under storage.results_dir/<study>/<series>/<sop>.dcm (temp, fsync, rename)
      -> outbox rows (routing, demonstration guard) and, in the same transaction,
         the study's move to ``reporting``
      -> the outbox runner of a sender process sends; the transaction that records the last
         row's outcome moves the study to ``delivered`` / ``partly_delivered`` / ``dead_lettered``.

When nothing is to be sent (no destination, no rule matches, or results of demonstration
weights while ``delivery.allow_demonstration_results`` is off) the results stay in the node,
the study keeps its state and its timeline says why.

Never silent (issue 9): when loading the sources, building, writing or queueing the results
raises (any exception), the study moves to ``report_failed`` with the step and the error in
its timeline, ``fpe-node studies`` lists and counts it, and ``fpe-node resend`` retries it (its
analysis runs again, :mod:`dicom_node.recovery`). Files written for a run whose transaction
never commits (its worker was fenced out) are removed (:meth:`Delivery.discard`). The node never retries it by itself: a
result that fails to build fails the same way until the cause is fixed.

Versions (issue 4 item 5): a re-run's SR names the SR(s) it supersedes in its Predecessor
Documents Sequence: the earlier SR the node built for the study, and any re-encoded copy an
archive stored instead (SR class fallback, recorded in the outbox).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.index.db import write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.index.outbox import OutboxItem, OutboxState
from dicom_node.lifecycle import Lifecycle, StudyState, TransitionError, note_in, transition
from dicom_node.outbox import (
    AnyDestination,
    DeliveryRow,
    Outbox,
    OutboxRunner,
    ResultFile,
    ResultKind,
    RoutingContext,
    SenderByKind,
    StudyDelivery,
)
from dicom_node.scu import Destination, ScuTimeouts, StoreScu
from dicom_node.tls import client_contexts
from dicom_node.settings import Settings
from dicom_node.storage import FileStore
from dicom_node.stow import StowClient, StowDestination
from inference.result import NotAnalysed, Prediction, SourceInstance
from reports.sr import SR_CLASS_UIDS, PriorReport, ReportContext, build_sr, reencode_sr
from reports.uids import UIDFactory

log = logging.getLogger(__name__)

Result = Prediction | NotAnalysed
#: Builds the result objects of one study: ``(result, source headers, predecessors, timings)`` ->
#: ``[(kind, dataset)]``; it adds the seconds each kind took to ``timings`` (``build_sr``, ...).
Builder = Callable[
    [Result, Sequence[Dataset], Sequence[PriorReport], dict[str, float]], list[tuple[ResultKind, Dataset]]
]

KEPT_NOTE = "results kept in the node"
"""Start of the timeline note written when results are built but nothing is sent."""

_SETTLED_STATE = {
    StudyDelivery.DELIVERED: StudyState.DELIVERED,
    StudyDelivery.PARTLY_DELIVERED: StudyState.PARTLY_DELIVERED,
    StudyDelivery.DEAD_LETTERED: StudyState.DEAD_LETTERED,
}
_SR_CLASS_KEYS = {uid: key for key, uid in SR_CLASS_UIDS.items()}


def report_context(settings: Settings, uids: UIDFactory) -> ReportContext:
    """The node's identity written into every result (device observer, equipment)."""
    return ReportContext(
        software_version=__version__,
        device_uid=uids.for_name(settings.network.ae_title),
        device_name=settings.network.ae_title,
        institution_name=settings.reports.institution_name,
        station_name=settings.network.ae_title,
    )


def sr_recoder(uids: UIDFactory) -> Callable[[Dataset, str], Dataset]:
    """The SCU's SR fallback: :func:`reports.sr.reencode_sr` keyed by SOP Class UID."""

    def recode(dataset: Dataset, sop_class_uid: str) -> Dataset:
        key = _SR_CLASS_KEYS.get(sop_class_uid)
        if key is None:
            raise ValueError(f"{sop_class_uid} is not an SR class the node encodes")
        return reencode_sr(dataset, key, uids)

    return recode


def build_store_scu(settings: Settings, uids: UIDFactory, **options: Any) -> StoreScu:
    """The node's C-STORE SCU: its calling AE title, timeouts and the SR fallback."""
    timeout = settings.delivery.association_timeout_s
    return StoreScu(
        settings.delivery.calling_ae_title or settings.network.ae_title,
        ScuTimeouts(acse_s=timeout, dimse_s=timeout, network_s=timeout, connect_s=min(timeout, 10.0)),
        max_pdu=settings.network.max_pdu,
        recoder=sr_recoder(uids),
        tls=client_contexts(settings),
        **options,
    )


def build_stow_client(settings: Settings, uids: UIDFactory) -> StowClient:
    """The node's STOW-RS client: its timeout, the SR fallback, and what DICOM over TLS uses when
    sending: the CA bundle (``delivery.tls.ca_bundle``, else ``network.tls.ca_bundle``) for
    destinations without one, and ``delivery.tls.minimum_version``."""
    return StowClient(
        settings.delivery.stow_timeout_s, recoder=sr_recoder(uids),
        default_ca_bundle=settings.delivery.tls.ca_bundle or settings.network.tls.ca_bundle,
        minimum_tls_version=settings.delivery.tls.minimum_version,
    )


def report_builder(settings: Settings, uids: UIDFactory, context: ReportContext) -> Builder:
    """The default builder: the SR (with the overlays it lists as evidence), captures and PDF as the settings say."""

    def build(
        result: Result, sources: Sequence[Dataset], predecessors: Sequence[PriorReport], timings: dict[str, float]
    ) -> list[tuple[ResultKind, Dataset]]:
        overlays = _build_overlays(settings, result, sources, uids, context, timings)
        started = time.perf_counter()
        sr = build_sr(result, sources, uids, context, predecessors=predecessors, overlays=[ds for _, ds in overlays])
        objects: list[tuple[ResultKind, Dataset]] = [("sr", sr), *overlays]
        timings["build_sr"] = time.perf_counter() - started
        if isinstance(result, Prediction) and result.attention and (
            settings.reports.secondary_capture or settings.reports.summary_capture
        ):
            started = time.perf_counter()
            objects += [("sc", ds) for ds in _build_captures(settings, result, sources, uids, context)]
            timings["build_sc"] = time.perf_counter() - started
        if isinstance(result, Prediction) and settings.reports.pdf:
            started = time.perf_counter()
            objects += [("pdf", ds) for ds in _build_pdf(result, sources, uids, context)]
            timings["build_pdf"] = time.perf_counter() - started
        return objects

    return build


def wants_overlays(settings: Settings, result: Result) -> bool:
    """Whether a Parametric Map or Segmentation is built for ``result`` (its attention on the source grid)."""
    return (
        isinstance(result, Prediction)
        and result.source_attention is not None
        and (settings.reports.parametric_map or settings.reports.segmentation)
    )


def _build_overlays(
    settings: Settings, result: Result, sources: Sequence[Dataset], uids: UIDFactory, context: ReportContext,
    timings: dict[str, float],
) -> list[tuple[ResultKind, Dataset]]:
    """The Parametric Map and Segmentation the settings ask for (none without source-grid attention).

    An overlay the source headers cannot make (a plane's header missing or unreadable, planes of
    mixed geometry: :class:`ValueError` from its builder) is left out with a warning naming the
    study and the reason; the SR and the other objects are still built and sent.
    """
    if not isinstance(result, Prediction) or not wants_overlays(settings, result):
        return []
    from reports.pmap import build_parametric_map
    from reports.seg import build_segmentation

    wanted: list[tuple[ResultKind, Callable[..., Dataset]]] = []
    if settings.reports.parametric_map:
        wanted.append(("pm", build_parametric_map))
    if settings.reports.segmentation:
        wanted.append(("seg", build_segmentation))
    objects: list[tuple[ResultKind, Dataset]] = []
    for kind, build in wanted:
        started = time.perf_counter()
        try:
            objects.append((kind, build(result, sources, uids, context)))
        except ValueError as exc:  # an optional object the sources cannot make: the SR still goes out
            log.warning("study %s: no %s built: %s", result.sources[0].study_uid if result.sources else "?", kind, exc)
        timings[f"build_{kind}"] = time.perf_counter() - started
    return objects


def _build_captures(
    settings: Settings, result: Prediction, sources: Sequence[Dataset], uids: UIDFactory, context: ReportContext
) -> list[Dataset]:
    """The per-slice captures and the summary capture, as the settings ask, from one capture set."""
    from reports.sc import build_secondary_captures, build_summary_capture, capture_set

    captures = capture_set(result, sources)
    built: list[Dataset] = []
    if settings.reports.secondary_capture:
        built += build_secondary_captures(
            result, sources, uids, context, multiframe=settings.reports.multiframe_sc, captures=captures
        )
    if settings.reports.summary_capture:
        built.append(build_summary_capture(result, sources, uids, context, captures=captures))
    return built


def _build_pdf(result: Prediction, sources: Sequence[Dataset], uids: UIDFactory, context: ReportContext) -> list[Dataset]:
    from reports.pdf import build_pdf

    return [build_pdf(result, sources, uids, context)]


def dataset_bytes(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file (PS3.10), strict: an invalid file meta raises."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class DeliveryReport:
    """What :meth:`Delivery.on_result` did for one study."""

    study_uid: str
    files: list[ResultFile] = field(default_factory=list)
    rows: list[DeliveryRow] = field(default_factory=list)
    sending: bool = False
    kept_reason: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    step: str = "loading the source headers"
    """The step in progress (the one that failed when ``failed_reason`` is set)."""
    failed_reason: str | None = None
    """Why the study went to ``report_failed`` (``None``: it did not)."""
    demonstration: bool = False
    """The result is of untrained demonstration weights (held unless allowed)."""
    context: RoutingContext | None = None
    """What routing rules match on, once the results are built."""
    queued: bool = True
    """False when there is nothing to queue (no SR for a study not analysed)."""
    destinations: list[str] = field(default_factory=list)
    """The destinations' names when the results were built (routing picks among them)."""


class Delivery:
    """Turns results into files and outbox rows, and study states follow delivery.

    Parameters
    ----------
    settings:
        The node's settings.
    session_factory:
        The index.
    lifecycle:
        Study transitions (``reporting`` and the three delivery outcomes).
    outbox:
        The outbox; build it with ``settle_in=delivery.settle_in`` (see :func:`build_delivery`).
    builder:
        Builds the objects (default :func:`report_builder`).
    runner:
        Woken when rows are queued, so sending starts at once.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        lifecycle: Lifecycle,
        outbox: Outbox,
        builder: Builder,
        runner: OutboxRunner | None = None,
    ) -> None:
        self.settings = settings
        self._sessions = session_factory
        self.lifecycle = lifecycle
        self.outbox = outbox
        self.builder = builder
        self.runner = runner
        self.files = FileStore(settings.storage.data_dir, fsync=settings.storage.fsync)

    def start(self) -> None:
        """Start sending (the runner resumes rows left pending by an earlier run)."""
        if self.runner is not None:
            self.runner.start()

    def stop(self) -> None:
        """Stop sending after the pass in progress (rows stay in the index)."""
        if self.runner is not None:
            self.runner.stop()

    # -- prediction -> outbox -----------------------------------------------------------

    def on_result(self, study_uid: str, result: Result) -> DeliveryReport:
        """Build, write and queue the results of one study (after its analysis was recorded).

        :meth:`prepare` then :meth:`queue_in` in a unit of work of its own (a worker runs the
        two itself, queueing in the transaction that records its analysis). Never raises for a
        failure of its own steps: the study goes to ``report_failed`` and the report says why.
        """
        report = self.prepare(study_uid, result)
        with write_session(self._sessions) as session:
            self.queue_in(session, report)
        self.after_commit(report)
        return report

    def prepare(self, study_uid: str, result: Result) -> DeliveryReport:
        """Build and write the result files of one study; nothing is written to the index yet.

        A failure of any step is caught and kept in the report (``failed_reason``, logged with
        its traceback); :meth:`queue_in` then moves the study to ``report_failed``.
        """
        report = DeliveryReport(study_uid, demonstration=self._is_demonstration(result))
        if isinstance(result, NotAnalysed) and not self.settings.reports.sr_for_not_analysed:
            report.kept_reason = "no SR for studies not analysed (reports.sr_for_not_analysed is off)"
            report.queued = False
            return report
        sources: list[Dataset] = []
        try:
            sources = self._build(study_uid, result, report)
            report.step = "queueing the results"
            report.context = RoutingContext(pipeline=result.pipeline, calling_ae_title=self._calling_ae(study_uid))
            report.destinations = [destination.name for destination in self.outbox.destinations()]
        except Exception as exc:  # noqa: BLE001 - any failure ends in a visible state, not only in the log
            report.failed_reason = self._failure_reason(study_uid, report.step, exc, sources)
        return report

    def queue_in(self, session: Session, report: DeliveryReport) -> None:
        """Queue prepared results in the caller's transaction: outbox rows and ``reporting``,
        a "kept in the node" note, or ``report_failed`` when :meth:`prepare` failed."""
        study_uid = report.study_uid
        if report.failed_reason is not None:
            try:
                transition(session, study_uid, StudyState.REPORT_FAILED, report.failed_reason,
                           expected=[StudyState.ANALYSED, StudyState.NOT_ANALYSED])
            except TransitionError as exc:  # moved on meanwhile (re-opened, purged): the timeline still says
                log.warning("study %s: results failed but state not moved: %s", study_uid, exc)
                note_in(session, study_uid, report.failed_reason)
            return
        if not report.queued:
            return
        assert report.context is not None
        report.rows = self.outbox.add_rows(session, report.files, report.context, demonstration=report.demonstration,
                                           names=report.destinations)
        self._start_reporting(session, study_uid, report.rows, report)
        if not report.sending:
            report.kept_reason = self._kept_reason(report.rows, report.demonstration, report.destinations)
            note_in(session, study_uid, f"{KEPT_NOTE}: {report.kept_reason}")

    def after_commit(self, report: DeliveryReport) -> None:
        """Once :meth:`queue_in` committed: wake this process's sender and log what happened."""
        if report.failed_reason is not None or not report.queued:
            return
        if report.sending and self.runner is not None:
            self.runner.wake()
        log.info("study %s: %d result objects written, %s", report.study_uid, len(report.files),
                 "queued for delivery" if report.sending else f"kept ({report.kept_reason})")

    def discard(self, report: DeliveryReport) -> int:
        """Remove the files :meth:`prepare` wrote (their transaction never committed: fenced out)."""
        return discard_result_files([Path(result_file.path) for result_file in report.files], report.study_uid)

    def _build(self, study_uid: str, result: Result, report: DeliveryReport) -> list[Dataset]:
        """The building steps of :meth:`prepare`; ``report.step`` names the one in progress. Returns the sources."""
        started = time.perf_counter()
        sources = self.source_headers(study_uid, result, every_plane=wants_overlays(self.settings, result))
        predecessors = self.predecessors(study_uid)
        report.timings_s["load_sources"] = time.perf_counter() - started
        report.step = "building the results"
        started = time.perf_counter()
        objects = self.builder(result, sources, predecessors, report.timings_s)
        report.timings_s["build"] = time.perf_counter() - started
        report.step = "writing the results"
        started = time.perf_counter()
        report.files = [self._write(kind, dataset) for kind, dataset in objects]
        report.timings_s["write"] = time.perf_counter() - started
        return sources

    def _failure_reason(self, study_uid: str, step: str, error: Exception, sources: Sequence[Dataset]) -> str:
        """The ``report_failed`` reason: the step and the error; logged.

        The log line names the step and the exception type only (its message may quote a
        source value; the traceback follows it); the timeline gets the message with the
        sources' patient identifiers masked.
        """
        reason = (f"{step} failed: {type(error).__name__}: {_masked(str(error), sources)}"[:900]
                  + "; fpe-node resend retries")
        log.error("study %s: %s failed (%s); study is report_failed, fpe-node resend retries",
                  study_uid, step, type(error).__name__, exc_info=error)
        return reason

    def _start_reporting(self, session: Session, study_uid: str, rows: list[DeliveryRow], report: DeliveryReport) -> None:
        pending = [row for row in rows if row.state == OutboxState.PENDING.value]
        if not pending:
            return
        destinations = sorted({row.destination for row in pending})
        try:
            timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in report.timings_s.items())
            transition(session, study_uid, StudyState.REPORTING,
                       f"{len(pending)} objects queued for {', '.join(destinations)} ({timings})")
        except TransitionError as exc:
            log.warning("study %s: results queued but state not moved to reporting: %s", study_uid, exc)
        report.sending = True

    @staticmethod
    def _kept_reason(rows: list[DeliveryRow], demonstration: bool, destinations: Sequence[str]) -> str:
        if rows and demonstration:
            return "untrained demonstration weights (delivery.allow_demonstration_results is off)"
        if not destinations:
            return "no destination configured"
        return "no routing rule matches"

    def _is_demonstration(self, result: Result) -> bool:
        if isinstance(result, Prediction):
            return result.model.demonstration
        return self.settings.inference.checkpoint is None  # the node runs demonstration weights

    def _write(self, kind: ResultKind, dataset: Dataset) -> ResultFile:
        study_uid = str(dataset.StudyInstanceUID)
        series_uid = str(dataset.SeriesInstanceUID)
        sop_uid = str(dataset.SOPInstanceUID)
        relative = f"results/{study_uid}/{series_uid}/{sop_uid}.dcm"
        path = self.files.publish(self.files.write_temp([dataset_bytes(dataset)]), relative)
        return ResultFile(path, study_uid, series_uid, sop_uid, str(dataset.SOPClassUID), kind)

    # -- what the reports need from the index -------------------------------------------

    def _calling_ae(self, study_uid: str) -> str | None:
        with self._sessions() as session:
            return session.scalars(select(Study.calling_ae).where(Study.study_uid == study_uid)).first()

    def source_headers(self, study_uid: str, result: Result, *, every_plane: bool = False) -> list[Dataset]:
        """Headers (no pixels) of the source images the reports copy from.

        First the first source instance of the primary series (patient and study are copied
        from it), then the source image of each attention slice (the captures' references),
        and with ``every_plane`` that of every source plane (the overlays' frames).
        A study not analysed without sources uses any instance of the study.
        """
        wanted = _wanted_sources(result, every_plane=every_plane)
        with self._sessions() as session:
            if wanted:
                rows = session.execute(
                    select(Instance.sop_instance_uid, Instance.path)
                    .where(Instance.sop_instance_uid.in_(wanted), Instance.quarantine_reason.is_(None))
                ).all()
                paths = {uid: path for uid, path in rows}
                ordered = [paths[uid] for uid in wanted if uid in paths]
            else:
                ordered = list(session.scalars(
                    select(Instance.path).join(Series).join(Study)
                    .where(Study.study_uid == study_uid, Instance.quarantine_reason.is_(None))
                    .order_by(Series.number, Instance.instance_number).limit(1)
                ))
        headers: list[Dataset] = []
        for relative in ordered:
            try:
                headers.append(dcmread(self.settings.storage.data_dir / relative, stop_before_pixels=True))
            except (OSError, InvalidDicomError) as exc:
                log.warning("study %s: source header %s unreadable: %s", study_uid, Path(relative).name, exc)
        if not headers:
            raise LookupError(f"study {study_uid}: no source instance found in the index for its results")
        return headers

    def predecessors(self, study_uid: str) -> list[PriorReport]:
        """The SRs a new SR of this study supersedes: the latest built one and its sent copies."""
        with self._sessions() as session:
            latest = session.scalars(
                select(OutboxItem).where(OutboxItem.study_uid == study_uid, OutboxItem.kind == "sr")
                .order_by(OutboxItem.created_at.desc(), OutboxItem.id.desc())
            ).first()
            if latest is not None:
                copies = session.scalars(
                    select(OutboxItem).where(OutboxItem.sop_instance_uid == latest.sop_instance_uid)
                ).all()
                return _prior_reports(latest, copies)
        return self._predecessor_from_files(study_uid)

    def _predecessor_from_files(self, study_uid: str) -> list[PriorReport]:
        folder = self.settings.storage.results_dir / study_uid
        newest: tuple[float, PriorReport] | None = None
        for path in folder.glob("*/*.dcm") if folder.is_dir() else ():
            try:
                header = dcmread(path, stop_before_pixels=True)
            except (OSError, InvalidDicomError):
                continue
            if str(header.SOPClassUID) in _SR_CLASS_KEYS:
                mtime = path.stat().st_mtime
                if newest is None or mtime > newest[0]:
                    newest = (mtime, PriorReport.from_dataset(header))
        return [] if newest is None else [newest[1]]

    # -- outbox -> study state ----------------------------------------------------------

    def settle_in(self, session: Session, study_uid: str, outcome: StudyDelivery) -> None:
        """Move the study to the delivery outcome, in the transaction that settled its last outbox row."""
        target = _SETTLED_STATE.get(outcome)
        if target is None:
            return
        try:
            transition(session, study_uid, target, f"delivery {outcome.value}", expected=[StudyState.REPORTING])
        except TransitionError as exc:
            log.warning("study %s: delivery %s but state not moved: %s", study_uid, outcome.value, exc)

    def resend(self, study_uid: str) -> int:
        """Re-queue a study's results (``fpe-node resend``); the study goes back to ``reporting``."""
        return requeue_study(self.outbox, study_uid)


def discard_result_files(paths: Sequence[Path], study_uid: str) -> int:
    """Remove result files no outbox row names (never sent anywhere) and the folders they leave
    empty; returns how many were removed. A file that cannot be removed is logged and left."""
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("study %s: unsent result file %s not removed: %s", study_uid, path.name, exc)
    for folder in {path.parent for path in paths}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def requeue_study(outbox: Outbox, study_uid: str) -> int:
    """Re-queue a study's outbox rows and move it to ``reporting`` in one transaction."""

    def to_reporting(session: Session, count: int) -> None:
        if count:
            try:
                transition(session, study_uid, StudyState.REPORTING, f"resend: {count} objects re-queued")
            except TransitionError as exc:
                log.warning("study %s: re-queued without a state change: %s", study_uid, exc)

    return outbox.resend(study_uid, in_transaction=to_reporting)


_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames")


def _masked(message: str, sources: Sequence[Dataset]) -> str:
    """``message`` with every patient-identifying value of ``sources`` replaced by ``***``."""
    values: set[str] = set()
    for ds in sources:
        for keyword in _IDENTIFYING:
            value = ds.get(keyword)
            items = list(value) if isinstance(value, MultiValue) else [value]
            values.update(str(item) for item in items if item is not None and len(str(item)) >= 3)
    for value in sorted(values, key=len, reverse=True):
        message = message.replace(value, "***")
    return message


def _wanted_sources(result: Result, *, every_plane: bool = False) -> list[str]:
    """SOP Instance UIDs of the headers the reports need, primary first, without repeats."""
    sources: Sequence[SourceInstance] = result.sources
    wanted: list[str] = []
    if isinstance(result, Prediction):
        primary_series = result.series_used.get(result.primary_role)
        primary = [s for s in sources if s.series_uid == primary_series] or list(sources)
        wanted += [s.sop_instance_uid for s in primary[:1]]
        wanted += [a.source.sop_instance_uid for a in result.attention]
        if result.peak is not None:
            wanted.append(result.peak.source.sop_instance_uid)
        if every_plane:
            wanted += [plane.source.sop_instance_uid for plane in result.source_planes]
    else:
        wanted += [s.sop_instance_uid for s in sources[:1]]
    return list(dict.fromkeys(wanted))


def _prior_reports(latest: OutboxItem, copies: Sequence[OutboxItem]) -> list[PriorReport]:
    priors = {(latest.sop_class_uid, latest.sop_instance_uid): PriorReport(
        latest.study_uid, latest.series_uid, latest.sop_class_uid, latest.sop_instance_uid)}
    for row in copies:
        if row.sent_sop_instance_uid and row.sent_sop_class_uid:
            key = (row.sent_sop_class_uid, row.sent_sop_instance_uid)
            priors.setdefault(key, PriorReport(row.study_uid, row.series_uid, *key))
    return list(priors.values())


def destinations_from_registry(registry: Any) -> Callable[[], list[AnyDestination]]:
    """Destinations read fresh from the peer registry (peers with the destination role):
    a STOW-RS destination for a ``dicomweb`` peer, a C-STORE SCP for the others."""

    def destinations() -> list[AnyDestination]:
        found: list[AnyDestination] = []
        for peer in registry.destinations():
            if peer.dicomweb is not None:
                found.append(StowDestination(peer.name, peer.dicomweb))
                continue
            if peer.port is None or not peer.ae_titles:
                log.warning("destination %s has no port or AE title: skipped", peer.name)
                continue
            found.append(
                Destination(peer.name, peer.ae_titles[0], peer.host, int(peer.port), tls=peer.tls, tls_verify=peer.tls_verify)
            )
        return found

    return destinations


def build_delivery(
    settings: Settings,
    session_factory: sessionmaker[Session],
    lifecycle: Lifecycle,
    destinations: Callable[[], Sequence[AnyDestination]],
    *,
    builder: Builder | None = None,
    scu: StoreScu | None = None,
    stow: StowClient | None = None,
) -> Delivery:
    """Wire outbox, SCU, runner and report builder for :func:`dicom_node.bootstrap.build_node`.

    In ``build_node``::

        delivery = build_delivery(settings, session_factory, lifecycle, destinations_from_registry(peers))
        # a worker process: delivery.prepare + delivery.queue_in in its analysis's transaction;
        # a sender (role sender or all): Node.start: delivery.start(); Node.stop: delivery.stop()
    """
    uids = UIDFactory(settings.uid.root)
    holder: dict[str, Delivery] = {}
    outbox = Outbox(
        session_factory, settings.delivery, settings.storage.data_dir,
        SenderByKind(scu or build_store_scu(settings, uids), stow or build_stow_client(settings, uids)),
        destinations,
        settle_in=lambda session, study_uid, outcome: holder["delivery"].settle_in(session, study_uid, outcome),
        lease_s=settings.leases.outbox_s,
    )
    runner = OutboxRunner(outbox, settings.delivery.scan_interval_s)
    delivery = Delivery(
        settings, session_factory, lifecycle, outbox,
        builder or report_builder(settings, uids, report_context(settings, uids)), runner,
    )
    holder["delivery"] = delivery
    return delivery
