"""What the HTTP side may reach of the running node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
