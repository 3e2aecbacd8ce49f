"""What the HTTP side may reach of the running node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings

if TYPE_CHECKING:  # bootstrap imports pynetdicom; the web side can run without a node
    from dicom_node.bootstrap import Node


@dataclass
class WebContext:
    """The settings, the index and (when served by ``fpe-node serve``) the node itself.

    Attributes
    ----------
    settings
        The node's validated settings.
    session_factory
        Sessions on the node's index.
    node
        The running node (SCP, workers, delivery), or ``None`` when the application runs on an
        index alone (tests, a read-only console).
    """

    settings: Settings
    session_factory: sessionmaker[Session]
    node: Node | None = None


def web_context(request: Request) -> WebContext:
    """The node's :class:`WebContext` (set on the application by :func:`dicom_node.web.app.create_app`)."""
    context: WebContext = request.app.state.context
    return context


def client_address(request: Request) -> str:
    """Where the request came from, for the audit trail: the peer of the TCP connection (a
    proxy's address when behind one; ``X-Forwarded-For`` is not trusted)."""
    return request.client.host if request.client is not None else "unknown"
