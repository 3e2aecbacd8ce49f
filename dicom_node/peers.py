"""The peer registry: which systems may talk to the node, where results go, who changed what.

A peer is one remote system with a unique name, one or more AE titles (a PACS often sends from
another title than the one it queries or receives with), a host (or ``*`` for any address), a
port for its own SCP, and roles: ``source`` (may send studies) and/or ``destination`` (receives
results). ``tls`` marks a peer that talks DICOM over TLS (PS3.15 Annex B): a source must
associate through the TLS listener, a destination is sent to over TLS, its certificate checked
unless ``tls_verify`` is off (an explicit opt-out, warned about at every association). The registry lives in the index, so ``fpe-node peers add`` takes effect at the next
association without a restart; every change writes an :class:`~dicom_node.index.models.AuditEntry`.

Association acceptance (PS3.8 section 7.1.1.3, A-ASSOCIATE-RJ "calling AE title not
recognized") reads the registry afresh for each association request.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from dicom_node.audit import add_entry
from dicom_node.index.db import write_session
from dicom_node.index.models import AuditEntry, Peer, PeerAETitle
from dicom_node.settings import PeerSettings, format_validation_error

log = logging.getLogger(__name__)

ANY_HOST = "*"
ROLE_SOURCE = "source"
ROLE_DESTINATION = "destination"


class PeerError(ValueError):
    """A peer change that cannot be made (duplicate name or AE title, unknown peer, bad YAML)."""


@dataclass(frozen=True)
class PeerInfo:
    """A peer as the rest of the node sees it (detached from the database)."""

    name: str
    ae_titles: tuple[str, ...]
    host: str = ANY_HOST
    port: int | None = None
    roles: tuple[str, ...] = (ROLE_SOURCE,)
    tls: bool = False
    """Source: must associate over TLS; destination: results are sent over TLS."""
    tls_verify: bool = True
    """Destination over TLS: verify its certificate chain and host name (False: explicit opt-out)."""

    @classmethod
    def from_settings(cls, peer: PeerSettings) -> PeerInfo:
        """From a validated settings entry."""
        return cls(
            name=peer.name, ae_titles=peer.ae_titles, host=peer.host, port=peer.port, roles=peer.roles,
            tls=peer.tls, tls_verify=peer.tls_verify,
        )

    @classmethod
    def from_row(cls, row: Peer) -> PeerInfo:
        """From an ORM row (its AE titles loaded)."""
        return cls(
            name=row.name,
            ae_titles=tuple(t.ae_title for t in row.ae_titles),
            host=row.host,
            port=row.port,
            roles=tuple(sorted(row.role_set)),
            tls=bool(row.tls),
            tls_verify=bool(row.tls_verify),
        )

    def as_dict(self) -> dict[str, Any]:
        """The YAML/JSON form (the same fields as a ``peers:`` entry of the settings)."""
        return {
            "name": self.name,
            "ae_titles": list(self.ae_titles),
            "host": self.host,
            "port": self.port,
            "roles": list(self.roles),
            "tls": self.tls,
            "tls_verify": self.tls_verify,
        }


@dataclass(frozen=True)
class Authorization:
    """The answer to an association request: the peer, or why it is refused."""

    peer: PeerInfo | None
    reason: str

    @property
    def accepted(self) -> bool:
        """True when a registered peer may associate."""
        return self.peer is not None


def validate_peer(data: dict[str, Any]) -> PeerInfo:
    """Validate one peer mapping with the settings' rules (AE titles, port, roles).

    Raises
    ------
    PeerError
        Naming each bad field.
    """
    try:
        return PeerInfo.from_settings(PeerSettings(**data))
    except ValidationError as exc:
        raise PeerError(format_validation_error(exc).replace("invalid settings", "invalid peer")) from None


def actor_for(command: str) -> str:
    """The audit actor of a command run by the current OS user, e.g. ``fpe-node peers add (alice)``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    return f"{command} ({user})"


def host_matches(registered: str, address: str) -> bool:
    """True if a connection from ``address`` matches a peer's registered host.

    ``*`` matches any address; an IP address matches itself (IPv4-mapped IPv6 included);
    a host name matches any address it resolves to.
    """
    if registered == ANY_HOST:
        return True
    remote = _ip(address)
    if remote is None:
        return registered == address
    literal = _ip(registered)
    if literal is not None:
        return literal == remote
    try:
        infos = socket.getaddrinfo(registered, None)
    except OSError:
        log.warning("peer host %s does not resolve", registered)
        return False
    return any(_ip(str(info[4][0])) == remote for info in infos)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class PeerRegistry:
    """Peers and their audit trail, stored in the index."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """The index the registry lives in."""
        return self._factory

    # -- reading -------------------------------------------------------------------------
    def list_peers(self) -> list[PeerInfo]:
        """Every peer, by name."""
        with self._factory() as session:
            rows = session.scalars(select(Peer).options(selectinload(Peer.ae_titles)).order_by(Peer.name))
            return [PeerInfo.from_row(row) for row in rows]

    def get(self, name: str) -> PeerInfo | None:
        """One peer by name."""
        with self._factory() as session:
            row = self._row(session, name)
            return None if row is None else PeerInfo.from_row(row)

    def destinations(self) -> list[PeerInfo]:
        """Peers that receive results."""
        return [peer for peer in self.list_peers() if ROLE_DESTINATION in peer.roles]

    def authorize(self, calling_ae: str, address: str, *, check_host: bool = True) -> Authorization:
        """Whether an association from ``calling_ae`` at ``address`` is accepted (read fresh)."""
        title = calling_ae.strip()
        with self._factory() as session:
            row = session.scalar(
                select(Peer).join(PeerAETitle).where(PeerAETitle.ae_title == title).options(selectinload(Peer.ae_titles))
            )
            peer = None if row is None else PeerInfo.from_row(row)
        if peer is None:
            return Authorization(None, "calling AE title not registered")
        if check_host and not host_matches(peer.host, address):
            return Authorization(None, f"calling AE title registered for peer {peer.name} at another host")
        return Authorization(peer, "registered peer")

    # -- changes (audited) ------------------------------------------------------------
    def add(self, peer: PeerInfo, *, actor: str, replace: bool = False, source: str | None = None) -> None:
        """Register a peer; with ``replace`` an existing peer of that name is updated.

        Raises
        ------
        PeerError
            If the name exists (without ``replace``) or an AE title belongs to another peer.
        """
        with write_session(self._factory) as session:
            self._upsert(session, peer, actor=actor, replace=replace, source=source)

    def remove(self, name: str, *, actor: str, source: str | None = None) -> None:
        """Remove a peer and its AE titles.

        Raises
        ------
        PeerError
            If no peer has that name.
        """
        with write_session(self._factory) as session:
            row = self._row(session, name)
            if row is None:
                raise PeerError(f"no peer named {name!r}")
            detail = PeerInfo.from_row(row).as_dict()
            session.delete(row)
            add_entry(session, actor=actor, action="peer.remove", detail=detail, source=source)
        log.info("peer %s removed by %s", name, actor)

    def import_peers(self, peers: Sequence[PeerInfo], *, actor: str, replace_all: bool = False) -> int:
        """Add or update each peer in one transaction; ``replace_all`` removes peers not listed.

        Returns the number of peers added or changed.
        """
        changed = 0
        with write_session(self._factory) as session:
            if replace_all:
                keep = [peer.name for peer in peers]
                for row in session.scalars(select(Peer).where(Peer.name.not_in(keep))):
                    session.add(AuditEntry(actor=actor, action="peer.remove", detail=json.dumps({"name": row.name})))
                    session.delete(row)
                    changed += 1
                session.flush()
            for peer in peers:
                changed += self._upsert(session, peer, actor=actor, replace=True)
        return changed

    def seed(self, peers: Iterable[PeerSettings], *, actor: str = "fpe-node serve (settings)") -> int:
        """Create or update the peers named in the settings (start-up); others are kept."""
        return self.import_peers([PeerInfo.from_settings(p) for p in peers], actor=actor)

    def audit(self, *, actor: str, action: str, detail: dict[str, Any] | None = None, source: str | None = None) -> None:
        """Record an administrative action that is not a peer change (e.g. an echo)."""
        with write_session(self._factory) as session:
            add_entry(session, actor=actor, action=action, detail=detail, source=source)

    def audit_entries(self, limit: int = 100) -> list[AuditEntry]:
        """The newest audit entries first."""
        with self._factory() as session:
            return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))

    def _upsert(self, session: Session, peer: PeerInfo, *, actor: str, replace: bool, source: str | None = None) -> int:
        row = self._row(session, peer.name)
        if row is not None and not replace:
            raise PeerError(f"a peer named {peer.name!r} exists (use --replace to update it)")
        if row is not None and PeerInfo.from_row(row) == peer:
            return 0
        self._check_titles_free(session, peer)
        action = "peer.add" if row is None else "peer.update"
        if row is None:
            row = Peer(name=peer.name)
            session.add(row)
        else:
            session.execute(delete(PeerAETitle).where(PeerAETitle.peer_pk == row.id))
            session.expire(row, ["ae_titles"])
        row.host = peer.host
        row.port = peer.port
        row.roles = ",".join(sorted(set(peer.roles)))
        row.tls = peer.tls
        row.tls_verify = peer.tls_verify
        session.flush()
        for title in peer.ae_titles:
            session.add(PeerAETitle(peer_pk=row.id, ae_title=title))
        add_entry(session, actor=actor, action=action, detail=peer.as_dict(), source=source)
        session.flush()
        log.info("%s %s by %s", action, peer.name, actor)
        return 1

    def _check_titles_free(self, session: Session, peer: PeerInfo) -> None:
        if len(set(peer.ae_titles)) != len(peer.ae_titles):
            raise PeerError(f"peer {peer.name!r} lists an AE title twice")
        taken = session.execute(
            select(PeerAETitle.ae_title, Peer.name)
            .join(Peer)
            .where(PeerAETitle.ae_title.in_(peer.ae_titles), Peer.name != peer.name)
        ).first()
        if taken is not None:
            raise PeerError(f"AE title {taken.ae_title!r} already belongs to peer {taken.name!r}")

    @staticmethod
    def _row(session: Session, name: str) -> Peer | None:
        return session.scalar(select(Peer).where(Peer.name == name).options(selectinload(Peer.ae_titles)))


# -- YAML import/export ------------------------------------------------------------------
def peers_from_yaml(path: Path) -> list[PeerInfo]:
    """Read peers from a YAML file: a ``peers:`` list (as in the settings) or a bare list.

    Raises
    ------
    PeerError
        If the file is unreadable or an entry is invalid (naming its index and field).
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PeerError(f"cannot read {path}: {exc}") from None
    entries = data.get("peers", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise PeerError(f"{path}: expected a list of peers (or a mapping with a 'peers' list)")
    peers = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise PeerError(f"{path}: peers[{number}] is not a mapping")
        try:
            peers.append(validate_peer(entry))
        except PeerError as exc:
            raise PeerError(f"{path}: peers[{number}]: {exc}") from None
    names = [peer.name for peer in peers]
    if len(set(names)) != len(names):
        raise PeerError(f"{path}: a peer name appears twice")
    return peers


def peers_to_yaml(peers: Sequence[PeerInfo]) -> str:
    """The YAML text of a ``peers:`` list, importable again and usable in a site settings file."""
    return yaml.safe_dump({"peers": [peer.as_dict() for peer in peers]}, sort_keys=False)
