"""Serving the application with uvicorn in a thread of ``fpe-node serve``."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class WebServerError(RuntimeError):
    """The console could not listen (address in use, bad host) or did not start."""


class WebServer:
    """uvicorn on a socket bound here, so that port 0 gives a known free port and bind errors are clear.

    Parameters
    ----------
    app
        The application (:func:`dicom_node.web.app.create_app`).
    host, port
        Where to listen (``console.host``, ``console.port``; port 0: any free port).
    """

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 15.0) -> tuple[str, int]:
        """Bind, start serving in a daemon thread, return the bound address once it accepts requests."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise WebServerError(f"console.host/console.port: cannot listen on {self.host}:{self.port}: {exc}") from exc
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        # No access log: request lines would go to the node's log; patient data is never in URLs,
        # but the node's log stays about the node.
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fpe-node-console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise WebServerError(f"the console did not start on {host}:{port}")
            time.sleep(0.02)
        return str(host), int(port)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish requests in progress and stop."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
