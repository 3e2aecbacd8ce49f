"""``fpe-node resend STUDY``: queue a study's results for delivery again.

Every outbox row of the study (sent, failed or dead-lettered) becomes pending with a fresh
deadline and the study goes back to ``reporting``; the running node's outbox sends them on
its next pass, with the same SOP Instance UIDs (archives see a re-send, not a new result).
Results held because they come from demonstration weights stay held unless
``delivery.allow_demonstration_results`` is on.

A study analysed whose results never reached the outbox (the node stopped in between) has no
rows to re-queue: its analysis is queued again instead (:mod:`dicom_node.recovery`), and the
running node's worker re-runs it and sends the results. A study in ``report_failed``
(building, writing or queueing its results raised) is retried the same way: resend is its
retry, start-up never re-runs it by itself.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dicom_node.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``resend`` sub-command."""
    parser = subparsers.add_parser("resend", help="queue a study's results for delivery again")
    parser.add_argument("study", metavar="STUDY", help="Study Instance UID")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Re-queue; exit 0 when rows (or a lost study's analysis) were re-queued, 1 when there was nothing to re-queue."""
    from dicom_node.delivery import destinations_from_registry, requeue_study
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
    from dicom_node.lifecycle import Lifecycle
    from dicom_node.outbox import Outbox, SenderByKind
    from dicom_node.peers import PeerRegistry
    from dicom_node.recovery import recover_study
    from dicom_node.scu import StoreScu
    from dicom_node.stow import StowClient

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        sessions = build_session_factory(engine)
        outbox = Outbox(
            sessions, settings.delivery, settings.storage.data_dir,
            SenderByKind(StoreScu(settings.delivery.calling_ae_title or settings.network.ae_title), StowClient()),
            destinations_from_registry(PeerRegistry(sessions)),
        )
        # results lost before the outbox (latest analysis never queued): re-run, else re-send the rows
        recovered = recover_study(sessions, Lifecycle(sessions, settings.completion), settings, args.study, by="resend")
        lost = recovered is not None and recovered.action == "requeue"
        count = 0 if lost else requeue_study(outbox, args.study)
    finally:
        engine.dispose()
    if recovered is not None and lost:
        print(f"study {args.study}: {recovered.why}; its analysis is queued again and the node sends the results")
        return 0
    if count == 0:
        print(f"nothing to resend for study {args.study} (no results queued, or held demonstration results)")
        return 1
    print(f"{count} result objects of study {args.study} queued again")
    return 0
