"""Build the node's object graph once from the settings: ``build_node(settings)``.

Reading order of a study's path: :mod:`dicom_node.scp` (association, C-STORE) ->
:mod:`dicom_node.storage` (file) -> :mod:`dicom_node.index.repository` (rows) -> listeners:
:mod:`dicom_node.completion` (timers on the node's APScheduler) -> :mod:`dicom_node.lifecycle`
(queue) -> :mod:`dicom_node.worker` (inference in worker processes) -> :mod:`dicom_node.delivery`
(SR and captures built, outbox, :mod:`dicom_node.scu`). :mod:`dicom_node.retention` purges on
the same scheduler and guards the disk. :mod:`dicom_node.atna` sends the audit table to a syslog
collector.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.alerts import Alerts
from dicom_node.atna import AuditExporter, build_exporter
from dicom_node.completion import Completion, SelectionReadiness
from dicom_node.delivery import Delivery, build_delivery, destinations_from_registry
from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.lifecycle import Lifecycle
from dicom_node.logs import use_installation_secret
from dicom_node.peers import PeerRegistry, actor_for
from dicom_node.quarantine import QuarantineCheck, reconcile_orphans
from dicom_node.leases import NamedLease
from dicom_node.recovery import count_report_failed
from dicom_node.retention import Retention
from dicom_node.scp import AssociationTracker, Ingest, IngestListener, ListenerDispatcher, StorageSCP
from dicom_node.selector import build_selector
from dicom_node.settings import Settings, SettingsError
from dicom_node.storage import DiskGuard, FileStore
from dicom_node.tls import server_context
from dicom_node.worker import InferenceWorkers
from inference.selection import Selector

log = logging.getLogger(__name__)

SHARED_ORPHAN_AGE_S = 600.0
"""With roles apart, a file without an index row is an orphan only once it is this old."""

ROLES: dict[str, frozenset[str]] = {
    "all": frozenset({"receiver", "worker", "sender"}),
    "receiver": frozenset({"receiver"}),
    "worker": frozenset({"worker"}),
    "sender": frozenset({"sender"}),
}
"""What each ``fpe-node serve --role`` runs in its process (``all``: the single-machine node).

* ``receiver``: the SCP (associations, files, index rows), completion timers (the lease holder
  queues ready studies), retention, alerts and the audit export;
* ``worker``: ``inference.workers`` worker processes: claim, analyse, build and commit results;
* ``sender``: the outbox runner: claim due rows, deliver, settle studies.

Every role serves the console, API, health and metrics when ``console.enabled``.
"""


@dataclass
class Node:
    """The assembled node; :meth:`start` listens, :meth:`stop` shuts down cleanly."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    files: FileStore
    peers: PeerRegistry
    dispatcher: ListenerDispatcher
    scp: StorageSCP
    scheduler: BackgroundScheduler
    lifecycle: Lifecycle
    completion: Completion
    retention: Retention
    delivery: Delivery
    workers: InferenceWorkers
    selector: Selector  # completion's; the worker builds the same one (dicom_node.selector.build_selector)
    exporter: AuditExporter | None = None  # audit messages to the syslog collector (audit.enabled)
    alerts: Alerts | None = None  # rules evaluated on the scheduler (dicom_node.alerts)
    role: str = "all"  # fpe-node serve --role (ROLES)

    def runs(self, part: str) -> bool:
        """Whether this process runs ``part`` (``receiver``, ``worker`` or ``sender``)."""
        return part in ROLES[self.role]

    def add_listener(self, listener: IngestListener) -> None:
        """Follow arrivals with ``listener`` (call before :meth:`start`; e.g. needing the session factory)."""
        self.dispatcher.listeners.append(listener)

    def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int] | None:
        """Rebuild pending work from the index, then start what this process's role runs.

        A receiver starts its timers, retention, alerts and audit export, then the SCP; a worker
        its worker processes; a sender the outbox runner (rows left pending, or claimed by a
        sender that died, are picked up as their leases allow).

        Returns the SCP's bound address, or ``None`` when this process runs no receiver.
        """
        self.lifecycle.rebuild_pending()
        failed = count_report_failed(self.session_factory)
        if failed:
            log.warning("%d studies are report_failed (results could not be built or queued); "
                        "`fpe-node studies --state report_failed` lists them, `fpe-node resend STUDY` retries", failed)
        receiver = self.runs("receiver")
        if receiver:
            self.scheduler.add_job(
                self.retention.run, trigger="interval", seconds=self.settings.retention.check_interval_s,
                id="retention", next_run_time=dt.datetime.now(dt.timezone.utc), coalesce=True, max_instances=1,
            )
            if self.alerts is not None:  # with several receivers, the completion lease holder alone
                self.alerts.start(self.scheduler, when=lambda: self.completion.decides)
        self.scheduler.start()
        if receiver:
            self.completion.start()
        if self.runs("sender"):
            self.delivery.start()
        if self.runs("worker"):
            self.workers.start()
        bound = self.scp.start(host, port) if receiver else None
        audit.record(
            self.session_factory, actor=actor_for("fpe-node"), action=audit.NODE_START,
            detail=audit.node_detail(self.settings.network.ae_title, bound[0] if bound else None,
                                     bound[1] if bound else None, role=self.role),
        )
        if receiver and self.exporter is not None:  # with several receivers, the completion lease holder alone
            self.exporter.start(when=lambda: self.completion.decides)
        log.info("fpe-node role %s started (%s)", self.role, ", ".join(sorted(ROLES[self.role])))
        return bound

    def stop(self, grace_s: float = 10.0) -> None:
        """Finish in-flight stores, stop workers, sending, listeners and timers, audit the stop
        (sent to the collector if it is up), release the database."""
        started = self.scp.listening
        address = self.scp.address if started else (self.settings.network.host, self.settings.network.port)
        self.scp.stop(grace_s)
        self.workers.stop()
        self.delivery.stop()
        self.completion.release()
        self.dispatcher.close()
        if self.scheduler.running:
            # wait=False: APScheduler 3 holds its job-store lock while waiting for running jobs,
            # and a completion job that schedules its next check would wait on that lock for
            # ever. Jobs are idempotent and rebuilt from the index at the next start.
            self.scheduler.shutdown(wait=False)
        if started or not self.runs("receiver"):
            audit.record(
                self.session_factory, actor=actor_for("fpe-node"), action=audit.NODE_STOP,
                detail=audit.node_detail(self.settings.network.ae_title, address[0] if started else None,
                                         address[1] if started else None, role=self.role),
            )
        if self.exporter is not None:
            self.exporter.stop()
        self.engine.dispose()


def build_node(
    settings: Settings,
    listeners: Iterable[IngestListener] = (),
    *,
    disk_guard: DiskGuard | None = None,
    role: str = "all",
) -> Node:
    """Create the data directory and index (migrated to head), seed peers, build the SCP.

    TLS certificates and keys (``network.tls``, ``delivery.tls``) are checked first: a bad one
    raises :class:`~dicom_node.settings.SettingsError` naming the field before anything is written.

    Parameters
    ----------
    settings:
        The validated settings.
    listeners:
        Told about stored instances and released associations (e.g. completion).
    disk_guard:
        Decides whether a C-STORE may be written; default :class:`Retention`, which purges
        processed studies before refusing above ``retention.disk_high_watermark_pct``.
    role:
        What this process runs (:data:`ROLES`); ``all`` is the single-machine node.
    """
    if role not in ROLES:
        raise SettingsError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    if "worker" in ROLES[role] and settings.inference.workers:
        _check_worker_device(settings)
    tls_context = server_context(settings.network.tls) if settings.network.tls.enabled else None
    files = FileStore(settings.storage.data_dir, fsync=settings.storage.fsync)
    use_installation_secret(settings.storage.data_dir)  # created at first start
    leftovers = files.clean_tmp()
    if leftovers:
        log.info("removed %d partial files left by an earlier stop", leftovers)
    engine = build_engine(settings)
    upgrade_to_head(engine)
    session_factory = build_session_factory(engine)
    if "receiver" in ROLES[role]:  # the receivers' files: a worker or sender never walks the storage folder
        # Before the SCP listens. Other receivers may be writing to a shared folder: files they put in
        # place moments ago are not orphans (a study's store takes seconds, not minutes).
        shared = role != "all"
        reconciled = reconcile_orphans(files, session_factory, min_age_s=SHARED_ORPHAN_AGE_S if shared else 0.0)
        if reconciled.adopted or reconciled.quarantined:
            log.warning("files without index rows: %d adopted, %d quarantined",
                        reconciled.adopted, reconciled.quarantined)
    peers = PeerRegistry(session_factory)
    peers.seed(settings.peers)
    scheduler = BackgroundScheduler(timezone=dt.timezone.utc)
    lifecycle = Lifecycle(session_factory, settings.completion, job_lease_s=settings.leases.job_s)
    readiness = _selection_readiness(settings, session_factory)
    # Several receivers share the index: the holder of the completion lease queues ready studies.
    lease = NamedLease(session_factory, "completion", settings.leases.completion_s, kind="receiver") \
        if role == "receiver" else None
    completion = Completion(
        settings.completion, lifecycle, session_factory, scheduler, data_dir=settings.storage.data_dir,
        uid_root=settings.uid.root, could_use=readiness.could_use, pipeline_ready=readiness.pipeline_ready,
        lease=lease,
    )
    retention = Retention(settings.retention, settings.storage, session_factory)
    guard = disk_guard or retention
    # The later check runs first, so a series is judged without its quarantined instances.
    dispatcher = ListenerDispatcher([QuarantineCheck(session_factory, settings.storage.data_dir), completion, *listeners])
    ingest = Ingest(
        files=files,
        session_factory=session_factory,
        disk_guard=guard,
        dispatcher=dispatcher,
        tracker=AssociationTracker(),
    )
    scp = StorageSCP(settings.network, ingest=ingest, registry=peers, tls_context=tls_context)
    delivery = build_delivery(settings, session_factory, lifecycle, destinations_from_registry(peers))
    workers = InferenceWorkers(settings)
    alerts = Alerts(settings, session_factory, retention.used_pct)
    return Node(
        settings, engine, session_factory, files, peers, dispatcher, scp, scheduler, lifecycle, completion, retention,
        delivery, workers, readiness.selector, build_exporter(settings, session_factory), alerts, role,
    )


def _check_worker_device(settings: Settings) -> None:
    """Stop start-up, naming the field, when the workers could not run as configured
    (``inference.device: cuda`` without CUDA, ``inference.precision: bf16`` where it is not native)."""
    from inference.model.precision import PrecisionSettingError, check_precision_setting
    from inference.model.runtime import select_device

    try:
        device = select_device(settings.inference.device)
    except RuntimeError as exc:
        raise SettingsError(f"inference.device: {exc}") from exc
    try:
        check_precision_setting(settings.inference.precision, device)
    except PrecisionSettingError as exc:
        raise SettingsError(str(exc)) from exc


def _selection_readiness(settings: Settings, session_factory: sessionmaker[Session]) -> SelectionReadiness:
    """Completion's readiness rules: the worker's selector (:func:`dicom_node.selector.build_selector`).

    A bad rules file or an unreadable checkpoint stops start-up.
    """
    return SelectionReadiness(build_selector(settings), session_factory, settings.storage.data_dir)
