"""Build the node's object graph once from the settings: ``build_node(settings)``.

Reading order of a study's path: :mod:`dicom_node.scp` (association, C-STORE) ->
:mod:`dicom_node.storage` (file) -> :mod:`dicom_node.index.repository` (rows) -> listeners.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
from dicom_node.peers import PeerRegistry
from dicom_node.scp import AssociationTracker, Ingest, IngestListener, ListenerDispatcher, StorageSCP
from dicom_node.settings import Settings
from dicom_node.storage import DiskGuard, FileStore, WatermarkDiskGuard

log = logging.getLogger(__name__)


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

    def add_listener(self, listener: IngestListener) -> None:
        """Follow arrivals with ``listener`` (call before :meth:`start`; e.g. needing the session factory)."""
        self.dispatcher.listeners.append(listener)

    def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Start the SCP in background threads; returns the bound address."""
        return self.scp.start(host, port)

    def stop(self, grace_s: float = 10.0) -> None:
        """Finish in-flight stores, stop listeners and release the database."""
        self.scp.stop(grace_s)
        self.dispatcher.close()
        self.engine.dispose()


def build_node(
    settings: Settings,
    listeners: Iterable[IngestListener] = (),
    *,
    disk_guard: DiskGuard | None = None,
) -> Node:
    """Create the data directory and index (migrated to head), seed peers, build the SCP.

    Parameters
    ----------
    settings:
        The validated settings.
    listeners:
        Told about stored instances and released associations (e.g. completion).
    disk_guard:
        Decides whether a C-STORE may be written; default :class:`WatermarkDiskGuard` at
        ``retention.disk_high_watermark_pct`` (retention supplies one that purges first).
    """
    files = FileStore(settings.storage.data_dir, fsync=settings.storage.fsync)
    leftovers = files.clean_tmp()
    if leftovers:
        log.info("removed %d partial files left by an earlier stop", leftovers)
    engine = build_engine(settings)
    upgrade_to_head(engine)
    session_factory = build_session_factory(engine)
    peers = PeerRegistry(session_factory)
    peers.seed(settings.peers)
    guard = disk_guard or WatermarkDiskGuard(settings.storage.data_dir, settings.retention.disk_high_watermark_pct)
    dispatcher = ListenerDispatcher(listeners)
    ingest = Ingest(
        files=files,
        session_factory=session_factory,
        disk_guard=guard,
        dispatcher=dispatcher,
        tracker=AssociationTracker(),
    )
    scp = StorageSCP(settings.network, ingest=ingest, registry=peers)
    return Node(settings, engine, session_factory, files, peers, dispatcher, scp)
