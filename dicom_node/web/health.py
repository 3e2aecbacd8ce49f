"""Probes for load balancers and Kubernetes, and the Prometheus metrics (no login, no patient data).

* ``GET /health/live``: the process answers (200).
* ``GET /health/ready``: 200 when every check passes, else 503; the JSON names each check with
  its outcome:

  ``index``
      a ``SELECT 1`` on the index within :data:`INDEX_TIMEOUT_S` (PostgreSQL: a probe engine of
      its own with a bounded connect and statement timeout, so the answer comes quickly even
      when the server is stopped or unreachable);
  ``disk``
      the data directory's filesystem below ``retention.disk_high_watermark_pct`` (above it the
      SCP refuses C-STOREs);
  ``workers``
      every configured inference worker process alive;
  ``model``
      every running worker has loaded its model (each reports once it has,
      :meth:`dicom_node.worker.InferenceWorkers.loaded_models`);
  ``scp``
      the SCP accepts associations.

  With ``inference.workers`` 0 (a receive-only node) the worker and model checks pass, saying so.
* ``GET /metrics``: Prometheus text exposition (:mod:`dicom_node.metrics`). Unauthenticated like
  the probes: scrape it on loopback (``console.host`` 127.0.0.1, the default) or through the
  TLS proxy that fronts the console, restricted to the Prometheus server (see docs/metrics.md).
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.metrics import build_registry, scp_listening
from dicom_node.retention import disk_usage
from dicom_node.web.context import WebContext

router = APIRouter(tags=["health"])

INDEX_TIMEOUT_S = 2.0
"""Longest the index check may take (connect and query) before it counts as failed."""


@dataclass(frozen=True)
class Check:
    """One readiness check's outcome."""

    ok: bool
    detail: str


class ReadinessProbe:
    """The checks of ``/health/ready`` for one application.

    Parameters
    ----------
    context
        The web context (settings, index, and the node when served by ``fpe-node serve``).
    """

    def __init__(self, context: WebContext) -> None:
        self.context = context
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fpe-health")
        self._pending: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()
        self._probe_sessions = self._build_probe_sessions()

    def _build_probe_sessions(self) -> sessionmaker[Session]:
        url = make_url(self.context.settings.index_url)
        if url.get_backend_name() != "postgresql":
            return self.context.session_factory  # SQLite: a local file, the node's own sessions
        timeout_ms = int(INDEX_TIMEOUT_S * 1000)
        engine: Engine = create_engine(
            url, hide_parameters=True, pool_size=1, max_overflow=0, pool_pre_ping=True, pool_timeout=INDEX_TIMEOUT_S,
            connect_args={"connect_timeout": max(1, int(INDEX_TIMEOUT_S)), "options": f"-c statement_timeout={timeout_ms}"},
        )
        return sessionmaker(engine)

    def checks(self) -> dict[str, Check]:
        """Every check, named."""
        result = {"index": self._index(), "disk": self._disk()}
        node = self.context.node
        if node is None:
            skipped = Check(True, "no node in this process (application on the index alone)")
            result.update(workers=skipped, model=skipped, scp=skipped, sender=skipped)
            return result
        runs = getattr(node, "runs", lambda part: True)
        role = getattr(node, "role", "all")
        elsewhere = Check(True, f"not run by this process (role {role})")
        result.update(self._workers(node) if runs("worker") else {"workers": elsewhere, "model": elsewhere})
        if runs("receiver"):
            result["scp"] = Check(True, "listening") if scp_listening(node) else Check(False, "not listening")
        else:
            result["scp"] = elsewhere
        if runs("sender"):
            sending = node.delivery.runner is not None and node.delivery.runner.running
            result["sender"] = Check(True, "delivering") if sending else Check(False, "delivery thread not running")
        else:
            result["sender"] = elsewhere
        return result

    def _index(self) -> Check:
        with self._lock:
            if self._pending is not None and not self._pending.done():
                return Check(False, "the previous index check has not returned yet")
            self._pending = self._executor.submit(self._select_one)
            pending = self._pending
        try:
            pending.result(timeout=INDEX_TIMEOUT_S + 0.5)
        except concurrent.futures.TimeoutError:
            return Check(False, f"no answer within {INDEX_TIMEOUT_S:g} s")
        except Exception as exc:  # noqa: BLE001 - any failure of the index is the check's outcome
            return Check(False, f"unreachable ({type(exc).__name__})")
        return Check(True, "reachable")

    def _select_one(self) -> None:
        with self._probe_sessions() as session:
            session.execute(text("SELECT 1"))

    def _disk(self) -> Check:
        settings = self.context.settings
        try:
            usage = disk_usage(settings.storage.data_dir)
        except OSError as exc:
            return Check(False, f"data directory unreadable ({type(exc).__name__})")
        used_pct = 100.0 * usage.used / usage.total if usage.total else 100.0
        watermark = settings.retention.disk_high_watermark_pct
        detail = f"{used_pct:.1f}% used, high watermark {watermark:g}%"
        return Check(used_pct < watermark, detail)

    @staticmethod
    def _workers(node: Any) -> dict[str, Check]:
        workers = node.workers
        configured = workers.configured
        if configured == 0:
            none = Check(True, "no inference worker configured (inference.workers 0): studies are queued only")
            return {"workers": none, "model": none}
        alive = workers.alive()
        loaded = len(workers.loaded_models())
        return {
            "workers": Check(alive == configured, f"{alive} of {configured} alive"),
            "model": Check(loaded == configured, f"{loaded} of {configured} loaded their model"),
        }


_SETUP_LOCK = threading.Lock()


def _state(request: Request, name: str, build: Any) -> Any:
    state = request.app.state
    with _SETUP_LOCK:
        value = getattr(state, name, None)
        if value is None:
            value = build(state.context)
            setattr(state, name, value)
    return value


@router.get("/health/live")
def live() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/health/ready",
    responses={503: {"description": "a check failed; the body names each check and its outcome"}},
)
def ready(request: Request) -> JSONResponse:
    """200 when the index answers, the disk has room, the workers run with their model and the SCP listens; else 503."""
    probe: ReadinessProbe = _state(request, "readiness", ReadinessProbe)
    checks = probe.checks()
    ok = all(check.ok for check in checks.values())
    body = {
        "status": "ready" if ok else "not ready",
        "checks": {name: {"ok": check.ok, "detail": check.detail} for name, check in checks.items()},
        "failing": [name for name, check in checks.items() if not check.ok],
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def _registry(context: WebContext) -> CollectorRegistry:
    return build_registry(context.settings, context.session_factory, context.node)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text exposition of the node's metrics (docs/metrics.md)."""
    registry: CollectorRegistry = _state(request, "metrics_registry", _registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
