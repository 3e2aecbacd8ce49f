"""The inference worker: runs off the network path, in worker processes.

A C-STORE handler never runs inference. Completion puts a ready study in the queue
(:meth:`dicom_node.lifecycle.Lifecycle.enqueue`); :class:`InferenceWorkers` starts
``settings.inference.workers`` processes (``multiprocessing`` *spawn* context: a fresh
interpreter, no inherited sockets, threads or database connections), each building one
:class:`Analyst` -- index connection, selection rules, eligibility rules and the model, loaded
once -- and then claiming jobs one at a time. For each study (:meth:`Analyst.run_job`):

1. **gather**: the instances of the study and of the same patient's other studies acquired within
   ``inference.case_window_h`` (NCCT and CTA are often separate orders), with the headers the
   C-STORE handler parsed and the index keeps (:mod:`dicom_node.headers`): planning opens no
   file; only the series the plan chooses are read, to decode their pixels;
2. **eligibility** of the study itself (``not_eligible`` with the reason: no result);
3. **selection, volumes, preprocessing, inference** (:mod:`inference.case`,
   :class:`inference.predictor.Predictor`);
4. **results**: the SR, overlays, captures and PDF are built and their files written
   (:meth:`dicom_node.delivery.Delivery.prepare`);
5. **one transaction** (the transactional outbox): the run in the ``analysis`` table (score,
   series used, per-stage timings, warnings or reason), the study's move ``analysing ->
   analysed | not_analysed | not_eligible``, the results' outbox rows and the move to
   ``reporting`` (or ``report_failed``, or a "kept in the node" note) commit together, after
   checking the job's fencing token. A sender process (any one) then delivers the rows.

While it works, a :class:`~dicom_node.leases.LeaseKeeper` thread renews the job's lease. A
worker that dies or is paused stops renewing; once the lease runs out another worker claims
the study again with a new token, and the first worker's late commit is refused
(:class:`~dicom_node.leases.LeaseLost`): its result files are removed and nothing of it is
recorded. Nothing travels between processes in memory: workers, senders and receivers share
only the index and the storage folder.

When the case's primary series (NCCT, DWI) lies in another study of the patient, the result
belongs to that study: this study ends ``not_analysed`` saying so and the primary study is
queued again, so its case now includes this study's series.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.delivery import Delivery, build_delivery, destinations_from_registry
from dicom_node.headers import HeaderRow, header_rows, usable_headers
from dicom_node.index.analysis import record_analysis
from dicom_node.index.db import build_engine, build_session_factory, write_session
from dicom_node.index.models import Instance, Series, Study
from dicom_node.leases import LeaseKeeper, LeaseLost
from dicom_node.lifecycle import Job, Lifecycle, StudyState, TransitionError, as_utc
from dicom_node.peers import PeerRegistry
from dicom_node.selector import build_selector
from dicom_node.settings import Settings
from inference.case import case_from_headers
from inference.dicom_headers import series_headers
from inference.eligibility import EligibilityRules, check_study, load_eligibility_rules
from inference.lifetime import die_with_owner
from inference.predictor import CaseInput, Predictor, result_summary
from inference.result import NotAnalysed, Prediction

log = logging.getLogger(__name__)

Result = Prediction | NotAnalysed
RESTART_PAUSE_S = 2.0
"""How often the node looks for a worker process that died (and starts a new one)."""
INTERNAL_ERROR_REASON = "internal error during analysis"
"""Start of the ``not_analysed`` reason of a run that raised (alerts match it)."""


@dataclass(frozen=True)
class JobOutcome:
    """What one job ended with (``result`` is None for a study that is not eligible)."""

    study_uid: str
    state: StudyState
    result: Result | None
    reason: str | None = None
    fenced: bool = False
    """True when the run was not recorded: the job's lease ran out and another worker holds it
    (its fence moved on), or the study left ``analysing`` meanwhile."""


@dataclass(frozen=True)
class CaseFiles:
    """The instances a study's case may draw on, as index rows (headers stored at the C-STORE)."""

    study_pk: int
    calling_ae: str | None
    arrived_at: dt.datetime
    own: tuple[HeaderRow, ...]  # the study's own instances
    related: tuple[HeaderRow, ...]  # same patient, other studies within the case window


def _study_time(study: Study) -> dt.datetime:
    if study.acquired_at is not None:
        acquired = study.acquired_at
        return (acquired if acquired.tzinfo else acquired.astimezone()).astimezone(dt.timezone.utc)
    return as_utc(study.first_received_at)


def _rows_of(session: Session, study_pk: int) -> tuple[HeaderRow, ...]:
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.header)
        .join(Series, Series.id == Instance.series_pk)
        .where(Series.study_pk == study_pk, Instance.quarantine_reason.is_(None))  # quarantined: never in a case
        .order_by(Instance.id)
    ).all()
    return tuple(header_rows(rows))


def gather_case_files(session: Session, study_uid: str, window_h: float) -> CaseFiles:
    """Instances of the study and of its patient's studies acquired within ``window_h`` hours of it."""
    study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
    related: list[HeaderRow] = []
    if study.patient_pk is not None:
        anchor = _study_time(study)
        window = dt.timedelta(hours=window_h)
        others = session.execute(
            select(Study).where(Study.patient_pk == study.patient_pk, Study.id != study.id)
        ).scalars()
        for other in others:
            if abs(_study_time(other) - anchor) <= window:
                related.extend(_rows_of(session, other.id))
    return CaseFiles(
        study_pk=study.id,
        calling_ae=study.calling_ae,
        arrived_at=as_utc(study.first_received_at),
        own=_rows_of(session, study.id),
        related=tuple(related),
    )


class Analyst:
    """One worker's tools, built once: index, lifecycle, rules and the model.

    Parameters
    ----------
    settings:
        The node's settings (the worker reads ``storage``, ``index``, ``completion`` and
        ``inference``).
    session_factory, predictor:
        Given by tests or by an in-process caller; built from the settings otherwise.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session_factory: sessionmaker[Session] | None = None,
        predictor: Predictor | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        inference = settings.inference
        self.settings = settings
        self.sessions = session_factory or build_session_factory(build_engine(settings))
        self.lifecycle = Lifecycle(self.sessions, settings.completion, job_lease_s=settings.leases.job_s)
        self.predictor = predictor or Predictor.load(
            inference.checkpoint, device=inference.device, precision=inference.precision,
            torch_threads=inference.torch_threads,
        )
        self.selector = build_selector(settings, self.predictor.recipe)
        self.eligibility: EligibilityRules = load_eligibility_rules(inference.eligibility_rules)
        self.delivery = delivery

    @classmethod
    def serving(cls, settings: Settings) -> "Analyst":
        """The analyst of a worker process: it also builds the results and queues them with its analysis."""
        sessions = build_session_factory(build_engine(settings))
        lifecycle = Lifecycle(sessions, settings.completion, job_lease_s=settings.leases.job_s)
        delivery = build_delivery(settings, sessions, lifecycle, destinations_from_registry(PeerRegistry(sessions)))
        return cls(settings, session_factory=sessions, delivery=delivery)

    # -- one job ----------------------------------------------------------------------------

    def run_next(self) -> JobOutcome | None:
        """Claim the next queued study and analyse it; ``None`` when the queue is empty."""
        job = self.lifecycle.claim_next()
        return None if job is None else self.run_job(job)

    def run_job(self, job: Job) -> JobOutcome:
        """Analyse one claimed study, record the run and finish its state (never raises for a bad study).

        The job's lease is renewed every third of ``leases.job_s`` while the study is worked on.
        """
        started = time.perf_counter()
        with LeaseKeeper(lambda: self.lifecycle.renew(job), self.settings.leases.job_s / 3, what=f"job {job.job_id}"):
            try:
                outcome = self._analyse(job)
            except Exception as exc:  # noqa: BLE001 - one bad study must not stop the worker; logged with traceback
                log.exception("analysis of study %s failed", job.study_uid)
                reason = f"{INTERNAL_ERROR_REASON} ({type(exc).__name__}); see the node's log"
                outcome = self._finish(job, StudyState.NOT_ANALYSED, NotAnalysed(reason), None)
        log.info(
            "study %s: %s in %.1f s%s", job.study_uid, outcome.state.value, time.perf_counter() - started,
            " (not recorded: the study is another worker's now, or moved on)" if outcome.fenced else "",
        )
        return outcome

    def _analyse(self, job: Job) -> JobOutcome:
        with self.sessions() as session:
            files = gather_case_files(session, job.study_uid, self.settings.inference.case_window_h)
        load_started = time.perf_counter()
        data_dir = self.settings.storage.data_dir
        problems: list[str] = []  # instances dropped as unreadable: named in the result's warnings
        # Planning reads the headers the C-STORE handler stored; only the chosen series' files are opened.
        own_headers = series_headers(usable_headers(self.sessions, data_dir, files.own, problems))
        related_headers = series_headers(usable_headers(self.sessions, data_dir, files.related, problems))
        load_s = time.perf_counter() - load_started
        if not own_headers:
            return self._finish(job, StudyState.NOT_ANALYSED, NotAnalysed("no DICOM image of the study is on disk"), None)
        arrival_local = files.arrived_at.astimezone().replace(tzinfo=None)  # StudyDate/Time are local, naive
        decision = check_study(own_headers, self.eligibility, calling_ae_title=files.calling_ae, now=arrival_local)
        if not decision.eligible:
            return self._finish(job, StudyState.NOT_ELIGIBLE, NotAnalysed(decision.reason), None)
        case = case_from_headers(own_headers + related_headers, self.selector, load_s=load_s,
                                 reading_warnings=problems)
        if isinstance(case, NotAnalysed):
            return self._finish(job, StudyState.NOT_ANALYSED, case, None)
        primary_study = self._primary_study(case)
        if primary_study != job.study_uid:
            return self._redirect(job, primary_study)
        result = self.predictor.predict(case)
        state = StudyState.ANALYSED if isinstance(result, Prediction) else StudyState.NOT_ANALYSED
        return self._finish(job, state, result, primary_study)

    def _primary_study(self, case: CaseInput) -> str:
        role = self.predictor.recipe.for_pipeline(case.pipeline).primary_role
        return case.volumes[role].study_uid

    def _redirect(self, job: Job, primary_study: str) -> JobOutcome:
        """The case belongs to another study of the patient: queue that one again instead."""
        reason = f"analysed with study {primary_study}, which holds the case's primary series"
        requeued = self.lifecycle.enqueue(primary_study, f"series of study {job.study_uid} joined its case", rerun=True)
        log.info("study %s: case belongs to study %s (re-queued: %s)", job.study_uid, primary_study, requeued)
        outcome = self._finish(job, StudyState.NOT_ANALYSED, NotAnalysed(reason), primary_study, deliver=False)
        return JobOutcome(outcome.study_uid, outcome.state, None, reason, fenced=outcome.fenced)

    def _finish(
        self, job: Job, state: StudyState, result: Result, primary_study: str | None, *, deliver: bool = True
    ) -> JobOutcome:
        """Record the run, the state and (serving) the results' outbox rows in one fenced transaction."""
        summary = result_summary(result)
        reason = result.reason if isinstance(result, NotAnalysed) else None
        delivered = None if state is StudyState.NOT_ELIGIBLE or not deliver else result
        prepared = None
        if self.delivery is not None and delivered is not None:
            prepared = self.delivery.prepare(job.study_uid, delivered)
        try:
            with write_session(self.sessions) as session:
                record_analysis(session, job.study_pk, state.value, summary, job_id=job.job_id, primary_study_uid=primary_study)
                self.lifecycle.finish_job(session, job, state, reason or _prediction_detail(result))
                if prepared is not None and self.delivery is not None:
                    self.delivery.queue_in(session, prepared)
        except (LeaseLost, TransitionError) as exc:
            removed = self.delivery.discard(prepared) if prepared is not None and self.delivery is not None else 0
            log.warning("study %s: run not recorded (%s); %d result files removed", job.study_uid, exc, removed)
            return JobOutcome(job.study_uid, state, None, reason, fenced=True)
        if prepared is not None and self.delivery is not None:
            self.delivery.after_commit(prepared)
        return JobOutcome(job.study_uid, state, delivered, reason)


def _prediction_detail(result: Result) -> str | None:
    if isinstance(result, Prediction):
        return f"{result.pipeline} score {result.score:.3f} ({'positive' if result.positive else 'negative'})"
    return None


# --------------------------------------------------------------------------- processes


def model_identity(predictor: Predictor) -> dict[str, Any]:
    """What a worker serves, as it reports it to the node: the model card's name, version, weights digest."""
    card = predictor.card
    return {
        "name": card.name, "version": card.version, "weights_sha256": card.weights_sha256,
        "demonstration": bool(card.demonstration),
    }


def _worker_main(
    settings: Settings, stop: EventType, poll_s: float, owner_pid: int, from_main_thread: bool,
    loaded: Any = None, number: int = 0,
) -> None:
    """Body of one worker process: build the serving :class:`Analyst` once, then claim jobs until told to stop.

    The process ends with the node's (:func:`inference.lifetime.die_with_owner`): a node killed
    with ``SIGKILL`` leaves no worker behind. Once the model is loaded, ``(number, identity)``
    goes to the ``loaded`` queue (:meth:`InferenceWorkers.loaded_models`, read by
    ``/health/ready`` and ``/metrics``): the process's own status, not study data, which goes
    only through the index.
    """
    die_with_owner(owner_pid, from_main_thread)
    from dicom_node.logs import configure

    configure(settings.logging.level)
    from dicom_node.logs import use_installation_secret

    use_installation_secret(settings.storage.data_dir)  # a spawned process: key its log hashes too
    analyst = Analyst.serving(settings)
    log.info("inference worker ready (model %s %s)", analyst.predictor.card.name, analyst.predictor.card.version)
    if loaded is not None:
        loaded.put((number, model_identity(analyst.predictor)))
    while not stop.is_set():
        try:
            outcome = analyst.run_next()
        except Exception:  # noqa: BLE001 - the index away for a moment: the claim's lease covers the study
            log.exception("claiming the next study failed; retrying in %.1f s", max(poll_s, 1.0))
            stop.wait(max(poll_s, 1.0))
            continue
        if outcome is None:
            stop.wait(poll_s)


class InferenceWorkers:
    """``settings.inference.workers`` worker processes on this machine.

    Each process claims studies from the index, analyses them and commits its results' outbox
    rows itself; the sender of any node process delivers them. Nothing comes back to this
    process but each worker's model identity once loaded.

    Parameters
    ----------
    settings:
        The node's settings (picklable; each process builds its own connections and model).
    poll_s:
        How long an idle worker waits before looking at the queue again.
    """

    def __init__(self, settings: Settings, *, poll_s: float = 0.5) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._loaded_queue: Any = self._context.Queue()
        self._loaded: dict[int, dict[str, Any]] = {}
        self._loaded_lock = threading.Lock()
        self._processes: list[Any] = []  # multiprocessing.Process, built by start()
        self._lineage: tuple[int, bool] = (os.getpid(), True)
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start the processes (nothing when no worker is configured).

        Each process learns this process's PID and whether it was started from the main thread
        (:func:`inference.lifetime.die_with_owner`), so it ends when the node ends.
        """
        if not self.settings.inference.workers:
            log.info("no inference worker configured: studies stay queued")
            return
        lineage = (os.getpid(), threading.current_thread() is threading.main_thread())
        self._processes = [
            self._context.Process(
                target=_worker_main,
                args=(self.settings, self._stop, self.poll_s, *lineage, self._loaded_queue, number),
                name=f"fpe-inference-{number}",
                daemon=True,
            )
            for number in range(self.settings.inference.workers)
        ]
        for process in self._processes:
            process.start()
        log.info("started %d inference worker process(es)", len(self._processes))
        self._lineage = lineage
        self._supervisor = threading.Thread(target=self._supervise, name="fpe-workers", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """Start a new process in place of one that died (killed, out of memory, crashed).

        The study it held keeps its lease until it runs out; then any worker claims it again
        (:meth:`dicom_node.lifecycle.Lifecycle.claim_next`). Restarts are spaced by
        :data:`RESTART_PAUSE_S` so a worker that dies at once does not spin.
        """
        while not self._stop.wait(RESTART_PAUSE_S):
            for number, process in enumerate(self._processes):
                if process.is_alive() or self._stop.is_set():
                    continue
                log.error("inference worker %s ended (exit code %s); starting a new one", process.name, process.exitcode)
                with self._loaded_lock:
                    self._loaded.pop(number, None)
                replacement = self._context.Process(
                    target=_worker_main,
                    args=(self.settings, self._stop, self.poll_s, *self._lineage, self._loaded_queue, number),
                    name=f"fpe-inference-{number}",
                    daemon=True,
                )
                replacement.start()
                self._processes[number] = replacement

    def alive(self) -> int:
        """Number of worker processes running."""
        return sum(process.is_alive() for process in self._processes)

    @property
    def configured(self) -> int:
        """Number of worker processes the settings ask for."""
        return int(self.settings.inference.workers)

    def loaded_models(self) -> dict[int, dict[str, Any]]:
        """Model identity (:func:`model_identity`) of each running worker that has loaded its model, by number.

        A worker reports once, after building its :class:`Analyst`; a worker that died is left out.
        """
        with self._loaded_lock:
            while True:
                try:
                    number, identity = self._loaded_queue.get_nowait()
                except (queue.Empty, OSError, ValueError):  # empty, or closed at shutdown
                    break
                self._loaded[int(number)] = dict(identity)
            return {
                number: identity for number, identity in self._loaded.items()
                if self._processes[number].is_alive()
            }

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the workers to stop after their current study; terminate any still running after ``timeout_s``.

        A terminated worker's study keeps its lease until it runs out; then any worker re-claims it.
        """
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(RESTART_PAUSE_S + 1.0)
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop in time; terminating it", process.name)
                process.terminate()
                process.join(5.0)
