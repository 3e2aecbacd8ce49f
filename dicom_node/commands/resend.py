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
    """Re-queue through :func:`dicom_node.actions.resend_results` (the REST API's code too); exit 0
    when rows (or a lost study's analysis) were re-queued, 1 when there was nothing to re-queue."""
    from dicom_node.actions import ActionError, resend_results
    from dicom_node.audit import LOCAL_SOURCE
    from dicom_node.index.db import build_engine, build_session_factory, upgrade_to_head
    from dicom_node.peers import actor_for
    from dicom_node.web.context import WebContext

    engine = build_engine(settings)
    try:
        upgrade_to_head(engine)
        context = WebContext(settings, build_session_factory(engine))
        result = resend_results(context, args.study, actor=actor_for("fpe-node resend"), source=LOCAL_SOURCE)
    except ActionError as exc:
        print(exc.message)
        return 1
    finally:
        engine.dispose()
    print(result.message)
    return 0
