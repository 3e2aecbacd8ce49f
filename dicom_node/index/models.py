"""ORM models of the index: what the node received, who may talk to it, what changed.

The hierarchy follows the DICOM information model (PS3.3 section A.1.2, Patient - Study -
Series - Instance). Only the attributes routing, completion and reporting need are kept;
the files on disk stay the reference.

Patient names are never stored in clear; the index keeps the Patient ID (PS3.3 C.7.1.1,
needed to group studies of one patient) and its issuer.

Every timestamp is a timezone-aware UTC datetime (:func:`dicom_node.index.base.utcnow`).
"""

from __future__ import annotations

import datetime as dt

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false, true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from dicom_node.index.base import UID, AETitle, Base, IntPK, Timestamp, utcnow

# Study states written by dicom_node.lifecycle; the index stores them as plain strings so
# later issues can add states without a migration.
STATE_RECEIVED = "received"


class Patient(Base):
    """A patient as the senders identify it: Patient ID plus its issuer (PS3.3 C.7.1.1).

    ``issuer`` is ``""`` when the sender gave no Issuer of Patient ID (0010,0021), so the
    unique constraint also works on databases that treat NULLs as distinct.
    """

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_patient_id_issuer"),)

    id: Mapped[IntPK]
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name_hash: Mapped[str | None] = mapped_column(String(16), default=None)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """One study (Study Instance UID, PS3.3 C.7.2.1) and its place in the node's life cycle."""

    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_state", "state"),
        Index("ix_study_last_received_at", "last_received_at"),
    )

    id: Mapped[IntPK]
    study_uid: Mapped[UID] = mapped_column(unique=True)
    patient_pk: Mapped[int | None] = mapped_column(
        ForeignKey("patient.id", ondelete="SET NULL"), index=True, default=None
    )
    acquired_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    """StudyDate + StudyTime (naive local scanner time, stored as given)."""
    accession: Mapped[str | None] = mapped_column(String(16), default=None)
    description: Mapped[str | None] = mapped_column(String(64), default=None)
    modalities: Mapped[str] = mapped_column(String(64), default="")
    """Modalities of its series, backslash-separated and sorted, e.g. ``CT\\SR``."""
    state: Mapped[str] = mapped_column(String(32), default=STATE_RECEIVED)
    state_reason: Mapped[str | None] = mapped_column(Text, default=None)
    first_received_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    last_received_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    calling_ae: Mapped[AETitle | None] = mapped_column(default=None)
    """Calling AE title of the association that brought its latest instance."""

    patient: Mapped[Patient | None] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )
    events: Mapped[list[StudyEvent]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True, order_by="StudyEvent.id"
    )


class Series(Base):
    """One series (Series Instance UID, PS3.3 C.7.3.1) with the tags series selection reads."""

    __tablename__ = "series"

    id: Mapped[IntPK]
    series_uid: Mapped[UID] = mapped_column(unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    description: Mapped[str | None] = mapped_column(String(64), default=None)
    number: Mapped[int | None] = mapped_column(Integer, default=None)
    manufacturer: Mapped[str | None] = mapped_column(String(64), default=None)
    image_type: Mapped[str | None] = mapped_column(String(160), default=None)
    """ImageType (0008,0008) of its first instance, backslash-separated."""
    body_part: Mapped[str | None] = mapped_column(String(16), default=None)
    frame_of_reference_uid: Mapped[UID | None] = mapped_column(default=None)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    complete_at: Mapped[Timestamp | None] = mapped_column(default=None)
    """When the series went quiet (written by dicom_node.completion); NULL while receiving."""

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", cascade="all, delete-orphan", passive_deletes=True
    )


class Instance(Base):
    """One stored composite instance (SOP Instance UID, PS3.3 C.12.1) and its file."""

    __tablename__ = "instance"

    id: Mapped[IntPK]
    sop_instance_uid: Mapped[UID] = mapped_column(unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[UID]
    transfer_syntax_uid: Mapped[UID]
    instance_number: Mapped[int | None] = mapped_column(Integer, default=None)
    path: Mapped[str] = mapped_column(String(255))
    """File path relative to ``storage.data_dir`` (``dicom/<study>/<series>/<sop>.dcm``)."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the data set as received (without the file meta group), for the duplicate rule."""
    received_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    calling_ae: Mapped[AETitle | None] = mapped_column(default=None)
    quarantine_reason: Mapped[str | None] = mapped_column(Text, default=None)
    """Why the stored file failed the later check (dicom_node.validation.deep_check); a
    quarantined instance is kept and shown but never part of a case. NULL: not quarantined."""
    header: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    """The instance's header as the C-STORE handler parsed it (``inference.dicom_headers.header_to_json``):
    what completion's readiness and the worker's planning read instead of the file. NULL in rows
    indexed before it existed: filled from the file the first time it is needed."""

    series: Mapped[Series] = relationship(back_populates="instances")


class Peer(Base):
    """A remote system: where it may connect from, where it listens, what it may do."""

    __tablename__ = "peer"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(String(64), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="*")
    """Host name or IP address; ``*`` accepts associations from any address."""
    port: Mapped[int | None] = mapped_column(Integer, default=None)
    roles: Mapped[str] = mapped_column(String(64), default="source")
    """Comma-separated roles: ``source`` (may send to the node), ``destination`` (receives results)."""
    created_at: Mapped[Timestamp] = mapped_column(default=utcnow)
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """DICOM over TLS (PS3.15 Annex B): a source must use the TLS listener, a destination is sent to over TLS."""
    tls_verify: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    """Verify a TLS destination's certificate and host name (False: an explicit, logged opt-out)."""

    ae_titles: Mapped[list[PeerAETitle]] = relationship(
        back_populates="peer", cascade="all, delete-orphan", passive_deletes=True, order_by="PeerAETitle.id"
    )

    @property
    def role_set(self) -> frozenset[str]:
        """The roles as a set."""
        return frozenset(role for role in self.roles.split(",") if role)


class PeerAETitle(Base):
    """One AE title a peer uses; a PACS often sends from another title than it queries with."""

    __tablename__ = "peer_ae_title"

    id: Mapped[IntPK]
    peer_pk: Mapped[int] = mapped_column(ForeignKey("peer.id", ondelete="CASCADE"), index=True)
    ae_title: Mapped[AETitle] = mapped_column(unique=True)

    peer: Mapped[Peer] = relationship(back_populates="ae_titles")


class PeerDicomWeb(Base):
    """The DICOMweb service of a peer whose results go by STOW-RS (peer kind ``dicomweb``).

    Passwords and tokens are never stored: ``secret_env`` / ``secret_file`` name where the
    node reads them at each delivery (see :class:`dicom_node.settings.DicomWebSettings`).
    """

    __tablename__ = "peer_dicomweb"

    id: Mapped[IntPK]
    peer_pk: Mapped[int] = mapped_column(ForeignKey("peer.id", ondelete="CASCADE"), unique=True)
    url: Mapped[str] = mapped_column(String(1024))
    """Base URL of the service; STOW-RS posts to ``{url}/studies`` (PS3.18 10.5)."""
    auth: Mapped[str] = mapped_column(String(32), default="none")
    username: Mapped[str | None] = mapped_column(String(255), default=None)
    secret_env: Mapped[str | None] = mapped_column(String(255), default=None)
    secret_file: Mapped[str | None] = mapped_column(String(1024), default=None)
    client_cert: Mapped[str | None] = mapped_column(String(1024), default=None)
    client_key: Mapped[str | None] = mapped_column(String(1024), default=None)
    ca_bundle: Mapped[str | None] = mapped_column(String(1024), default=None)
    verify_tls: Mapped[bool] = mapped_column(Boolean, default=True)


class AuditEntry(Base):
    """An audited event and who caused it: administrative changes (peers, users, settings), logins,
    queries, instances received and results sent, node start and stop.

    ``action`` names the event (``peer.add``, ``dicom.instances_received``, ...); the table of
    actions and the PS3.15 A.5 message each becomes is :data:`dicom_node.atna.EVENTS`; ``source``
    says from where.
    """

    __tablename__ = "audit_entry"

    id: Mapped[IntPK]
    at: Mapped[Timestamp] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    """``<command> (<OS user>)``, e.g. ``fpe-node peers add (alice)``, ``startup``, or the console/API user name."""
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    """JSON text describing the change."""
    source: Mapped[str | None] = mapped_column(String(255), default=None)
    """From where: the client address of a console or REST request, ``local`` for a command run on
    the node's shell; NULL for entries written before migration 0400."""


class AuditExportCursor(Base):
    """How far an exporter (``dicom_node.atna``) has delivered the audit table: the last entry id
    a collector has taken. Advanced only after a send; one row per exporter ``name``."""

    __tablename__ = "audit_export_cursor"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[Timestamp] = mapped_column(default=utcnow)


class StudyEvent(Base):
    """One entry of a study's timeline: it entered ``state`` at ``at``."""

    __tablename__ = "study_event"

    id: Mapped[IntPK]
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    at: Mapped[Timestamp] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text, default=None)

    study: Mapped[Study] = relationship(back_populates="events")
