"""The node's HTTP side: REST API, web console, health probes and Prometheus metrics.

``fpe-node serve`` runs it next to the SCP on ``console.host``/``console.port``
(:class:`dicom_node.web.server.WebServer`); :func:`dicom_node.web.app.create_app` assembles the
FastAPI application from the routers of :mod:`dicom_node.web.api` (JSON under ``/api/v1``),
:mod:`dicom_node.web.console` (server-rendered pages) and :mod:`dicom_node.web.health`
(``/health/*`` and ``/metrics``, no login).
"""
