"""The peer registry: which systems may talk to the node, where results go, who changed what.

A peer is one remote system with a unique name, one or more AE titles (a PACS often sends from
another title than the one it queries or receives with), a host (or ``*`` for any address), a
port for its own SCP, and roles: ``source`` (may send studies) and/or ``destination`` (receives
results). A destination's ``kind`` says how results reach it: ``dimse`` (C-STORE to its host and
port) or ``dicomweb`` (STOW-RS to its DICOMweb base URL, :mod:`dicom_node.stow`; a DICOMweb-only
destination needs no AE title). ``tls`` marks a peer that talks DICOM over TLS (PS3.15 Annex B): a source must
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
from dicom_node.index.models import AuditEntry, Peer, PeerAETitle, PeerDicomWeb
from dicom_node.settings import DicomWebSettings, PeerSettings, format_validation_error

log = logging.getLogger(__name__)

ANY_HOST = "*"
ROLE_SOURCE = "source"
ROLE_DESTINATION = "destination"
KIND_DIMSE = "dimse"
KIND_DICOMWEB = "dicomweb"


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
    dicomweb: DicomWebSettings | None = None
    """The DICOMweb service when results go by STOW-RS (kind ``dicomweb``); ``None``: DIMSE."""

    @property
    def kind(self) -> str:
        """``dicomweb`` when results go by STOW-RS, else ``dimse``."""
        return KIND_DIMSE if self.dicomweb is None else KIND_DICOMWEB

    @classmethod
    def from_settings(cls, peer: PeerSettings) -> PeerInfo:
        """From a validated settings entry."""
        return cls(
            name=peer.name, ae_titles=peer.ae_titles, host=peer.host, port=peer.port, roles=peer.roles,
            tls=peer.tls, tls_verify=peer.tls_verify, dicomweb=peer.dicomweb,
        )

    @classmethod
    def from_row(cls, row: Peer, dicomweb: PeerDicomWeb | None = None) -> PeerInfo:
        """From an ORM row (its AE titles loaded) and its DICOMweb row, if any."""
        return cls(
            name=row.name,
            ae_titles=tuple(t.ae_title for t in row.ae_titles),
            host=row.host,
            port=row.port,
            roles=tuple(sorted(row.role_set)),
            tls=bool(row.tls),
            tls_verify=bool(row.tls_verify),
            dicomweb=None if dicomweb is None else _dicomweb_from_row(dicomweb),
        )

    def as_dict(self) -> dict[str, Any]:
        """The YAML/JSON form (the same fields as a ``peers:`` entry of the settings).

        A DICOMweb destination's password or token is never in it: only where the node reads
        it (``secret_env`` / ``secret_file``).
        """
        data: dict[str, Any] = {
            "name": self.name,
            "ae_titles": list(self.ae_titles),
            "host": self.host,
            "port": self.port,
            "roles": list(self.roles),
            "tls": self.tls,
            "tls_verify": self.tls_verify,
        }
        if self.dicomweb is not None:
            data["kind"] = KIND_DICOMWEB
            data["dicomweb"] = self.dicomweb.model_dump(mode="json", exclude_defaults=True)
        return data


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
            rows = list(session.scalars(select(Peer).options(selectinload(Peer.ae_titles)).order_by(Peer.name)))
            services = _dicomweb_rows(session, [row.id for row in rows])
            return [PeerInfo.from_row(row, services.get(row.id)) for row in rows]

    def get(self, name: str) -> PeerInfo | None:
        """One peer by name."""
        with self._factory() as session:
            row = self._row(session, name)
            return None if row is None else _info(session, row)

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
            peer = None if row is None else _info(session, row)
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
            detail = _info(session, row).as_dict()
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
                    add_entry(session, actor=actor, action="peer.remove", detail={"name": row.name})
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
        if row is not None and _info(session, row) == peer:
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
        _store_dicomweb(session, row.id, peer.dicomweb)
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


def describe_dicomweb(service: DicomWebSettings) -> str:
    """One line for ``fpe-node peers list``: URL, authentication and where its secret is read
    (never the secret itself)."""
    parts = [f"dicomweb {service.url}", f"auth {service.auth}"]
    if service.username is not None:
        parts.append(f"user {service.username}")
    if service.secret_env is not None:
        parts.append(f"secret from ${service.secret_env}")
    if service.secret_file is not None:
        parts.append(f"secret from {service.secret_file}")
    if service.client_cert is not None:
        parts.append(f"client cert {service.client_cert}")
    if service.ca_bundle is not None:
        parts.append(f"CA {service.ca_bundle}")
    if not service.verify_tls:
        parts.append("TLS NOT VERIFIED")
    return ", ".join(parts)


# -- DICOMweb services (table peer_dicomweb) ---------------------------------------------------
def _dicomweb_rows(session: Session, peer_ids: Sequence[int]) -> dict[int, PeerDicomWeb]:
    if not peer_ids:
        return {}
    rows = session.scalars(select(PeerDicomWeb).where(PeerDicomWeb.peer_pk.in_(list(peer_ids))))
    return {row.peer_pk: row for row in rows}


def _info(session: Session, row: Peer) -> PeerInfo:
    return PeerInfo.from_row(row, _dicomweb_rows(session, [row.id]).get(row.id))


def _dicomweb_from_row(row: PeerDicomWeb) -> DicomWebSettings:
    fields = {
        "url": row.url, "auth": row.auth, "username": row.username, "secret_env": row.secret_env,
        "secret_file": row.secret_file, "client_cert": row.client_cert, "client_key": row.client_key,
        "ca_bundle": row.ca_bundle, "verify_tls": row.verify_tls,
    }
    return DicomWebSettings(**{key: value for key, value in fields.items() if value is not None})


def _store_dicomweb(session: Session, peer_pk: int, service: DicomWebSettings | None) -> None:
    """Write (or remove) a peer's DICOMweb row; secrets are references, never values."""
    session.execute(delete(PeerDicomWeb).where(PeerDicomWeb.peer_pk == peer_pk))
    if service is None:
        return

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    session.add(PeerDicomWeb(
        peer_pk=peer_pk, url=service.url, auth=service.auth, username=service.username,
        secret_env=service.secret_env, secret_file=text(service.secret_file), client_cert=text(service.client_cert),
        client_key=text(service.client_key), ca_bundle=text(service.ca_bundle), verify_tls=service.verify_tls,
    ))


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
