"""``fpe-node serve``: run the node in the foreground until SIGTERM or SIGINT.

Logs go to stderr. On SIGTERM/SIGINT the node stops accepting associations, lets stores in
progress finish (each is answered only once on disk and indexed), then exits 0.

``--role`` picks what this process runs (:data:`dicom_node.bootstrap.ROLES`): ``all`` (the
default) is the single-machine node; ``receiver``, ``worker`` and ``sender`` processes, any
number of each on any machines, share one PostgreSQL index (``index.url``) and one storage
folder (``storage.data_dir``, a shared filesystem) and nothing else::

    fpe-node serve --role receiver     # DICOM port, completion timers
    fpe-node serve --role worker       # inference.workers analysis processes
    fpe-node serve --role sender       # delivers the outbox
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from dicom_node.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser("serve", help="run the DICOM node in the foreground (logs to stderr)")
    parser.add_argument("--host", help="address to listen on (default: network.host)")
    parser.add_argument("--port", type=int, help="port to listen on (default: network.port; 0: any free port)")
    parser.add_argument(
        "--role", choices=("all", "receiver", "worker", "sender"), default="all",
        help="what this process runs (default all: the single-machine node); receivers, workers and senders "
        "may run apart, sharing a PostgreSQL index and the storage folder",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds open associations get to finish at shutdown (default 10)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Build the node, serve until a stop signal, shut down cleanly."""
    from dicom_node.bootstrap import build_node  # pynetdicom only when serving

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, finishing stores in progress", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.role != "all" and settings.index_url.startswith("sqlite"):
        log.warning("role %s on a SQLite index: processes on this machine only; use PostgreSQL (index.url) "
                    "to run roles on several machines", args.role)
    try:
        node = build_node(settings, role=args.role)  # checks the TLS certificates and keys first
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    bound = node.start(args.host, args.port)
    web = None
    try:
        if settings.console.enabled:
            web = _start_console(settings, node)
        if bound is not None:
            host, port = bound
            # One parseable line for supervisors and tests: the bound port (useful with --port 0).
            log.info("fpe-node serving AE %s on %s port %d", settings.network.ae_title, host, port)
            if node.scp.tls_context is not None and node.scp.tls_address != (host, port):
                tls_host, tls_port = node.scp.tls_address
                log.info("fpe-node serving AE %s over TLS on %s port %d", settings.network.ae_title, tls_host, tls_port)
        else:
            log.info("fpe-node %s running (no DICOM port in this role)", args.role)
        while not stop.wait(0.5):
            pass
    finally:
        if web is not None:
            web.stop()
        node.stop(grace_s=args.grace)
    return 0


def _start_console(settings: Settings, node: Any) -> Any:
    """The console, REST API, health and metrics on ``console.host``/``console.port``."""
    from dicom_node.web.app import create_app
    from dicom_node.web.context import WebContext
    from dicom_node.web.server import WebServer

    web = WebServer(
        create_app(WebContext(settings, node.session_factory, node)), settings.console.host, settings.console.port
    )
    web_host, web_port = web.start()
    # Parseable like the SCP's line: the console's bound port (useful with console.port 0).
    log.info("fpe-node console on http://%s:%d/", web_host, web_port)
    return web
