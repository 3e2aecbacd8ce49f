"""The FastAPI application of the node (REST API, console, health, metrics).

FastAPI over Starlette: the REST resources are typed pydantic models, from which FastAPI
generates the OpenAPI document served at ``/api/openapi.json`` (interactive docs at
``/api/docs``); the settings already are pydantic models, so one validation library serves both.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node import __version__
from dicom_node.web.context import WebContext


def create_app(context: WebContext) -> FastAPI:
    """The application serving ``context``; its routers come from the ``dicom_node.web`` modules."""
    from dicom_node.web import api, console, health

    app = FastAPI(
        title="fpe-node",
        version=__version__,
        description="REST API of fpe-node, a DICOM node predicting the first-pass effect. Research use only.",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.context = context
    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(console.router)
    app.add_exception_handler(StarletteHTTPException, _console_login_redirect)  # type: ignore[arg-type]
    return app


_MACHINE_PATHS = ("/api/", "/health/", "/metrics")


async def _console_login_redirect(request: Request, exc: StarletteHTTPException) -> Response:
    """A console form posted after its session ended (401) goes to the login form, like a page
    asked for without a session; the REST API, probes and metrics keep their JSON answers."""
    if exc.status_code == status.HTTP_401_UNAUTHORIZED and not request.url.path.startswith(_MACHINE_PATHS):
        return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    return await http_exception_handler(request, exc)
