"""One frozen, typed settings object for the whole node.

Settings come from, in increasing priority:

1. the bundled defaults ``config/default.yaml``;
2. an optional site YAML file (``fpe-node --config site.yaml ...`` or ``FPENODE_CONFIG``);
3. environment variables ``FPENODE_<SECTION>__<FIELD>`` (nested with ``__``), e.g.
   ``FPENODE_NETWORK__PORT=11113`` or ``FPENODE_STORAGE__DATA_DIR=/srv/fpe``.

Every field is validated at start-up; a bad value stops start-up with a
:class:`SettingsError` whose message names the field (``network.ae_title: ...``).
The object is built once by the entry point and passed down; nothing re-reads it.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from config import DEFAULT_SETTINGS

ENV_PREFIX = "FPENODE_"
ENV_NESTED_DELIMITER = "__"

_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Roots that belong to libraries' examples, never to be used for a site's objects.
FORBIDDEN_UID_ROOTS = ("1.2.826.0.1.3680043.8.498", "1.2.826.0.1.3680043.9.3811", "1.2.840.10008")


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)@")


def redact_url(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` URL replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda match: f"{match.group('head')}***@", text)


class SettingsError(ValueError):
    """A settings value is invalid; the message names each bad field."""


def validate_ae_title(value: str) -> str:
    """Check an Application Entity title (PS3.5 section 6.2, VR AE).

    1 to 16 characters from the default character repertoire, no backslash, no control
    characters, not all spaces. Leading and trailing spaces are not significant and are
    stripped.
    """
    if not isinstance(value, str):
        raise ValueError("AE title must be a string")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if "\\" in value:
        raise ValueError(f"AE title {value!r} contains a backslash")
    if any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value):
        raise ValueError(f"AE title {value!r} contains control or non-ASCII characters")
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title is empty or all spaces")
    return stripped


def _frozen() -> ConfigDict:
    return ConfigDict(frozen=True, extra="forbid")


TLSVersion = Literal["1.2", "1.3"]
"""Lowest TLS version negotiated; TLS 1.0 and 1.1 never are (PS3.15 B.10 and later profiles, RFC 8996)."""


class NetworkTLSSettings(BaseModel):
    """DICOM over TLS, receiving: the secure transport listener (PS3.15 Annex B, PS3.8 section 7.1).

    The certificate, key and CA bundle are read and checked at start-up (``fpe-node serve`` and
    ``fpe-node config check``); a file that cannot be read, a wrong password or a key that is not the
    certificate's stops start-up with a message naming the field (:mod:`dicom_node.tls`).
    """

    model_config = _frozen()

    enabled: bool = Field(False, description="Listen for DICOM over TLS on `port` (PS3.15 Annex B secure transport).")
    port: int = Field(2762, ge=1, le=65535, description="TCP port of the TLS listener (2762: the registered dicom-tls port).")
    plain_listener: bool = Field(
        True, description="Also listen without TLS on network.port; false: TLS only ('instead of' the plain port)."
    )
    certificate: Path | None = Field(
        None, description="The node's certificate (PEM), followed by any intermediate CA certificates; needed when enabled."
    )
    private_key: Path | None = Field(None, description="The certificate's private key (PEM, may be encrypted); needed when enabled.")
    private_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted private_key (a secret: shown as `**********`; best set in the environment)."
    )
    ca_bundle: Path | None = Field(
        None,
        description="CA certificates (PEM) that client certificates must chain to; needed unless client_certificates is none.",
    )
    client_certificates: Literal["none", "optional", "required"] = Field(
        "required",
        description=(
            "Client certificates: required (a sender without a valid one is refused at the handshake), optional "
            "(checked when sent), none (not asked for)."
        ),
    )
    minimum_version: TLSVersion = Field("1.2", description="Lowest TLS version accepted (1.2 or 1.3).")

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "NetworkTLSSettings":
        if not self.enabled:
            return self
        missing = [name for name in ("certificate", "private_key") if getattr(self, name) is None]
        if self.client_certificates != "none" and self.ca_bundle is None:
            missing.append("ca_bundle")
        if missing:
            raise ValueError(
                "TLS is enabled but " + ", ".join(f"network.tls.{name}" for name in missing) + " is not set"
                + (" (client_certificates needs a CA bundle; or set it to none)" if "ca_bundle" in missing else "")
            )
        return self


class NetworkSettings(BaseModel):
    """The node's own DICOM Application Entity (the SCP)."""

    model_config = _frozen()

    ae_title: str = Field("FPENODE", description="Called AE title the node answers to.")
    host: str = Field("0.0.0.0", description="Address to listen on (0.0.0.0: all interfaces).")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the SCP.")
    max_pdu: int = Field(
        4_194_304, ge=0, description=(
            "Maximum PDU length the node advertises, bytes; a larger P-DATA-TF PDU aborts the association "
            "(0: no limit advertised, 64 MiB still enforced)."
        ),
    )
    max_associations: int = Field(32, ge=1, le=1000, description="Concurrent associations accepted.")
    acse_timeout_s: float = Field(30.0, gt=0, description="Association negotiation timeout.")
    dimse_timeout_s: float = Field(60.0, gt=0, description="DIMSE message timeout.")
    network_timeout_s: float = Field(120.0, gt=0, description="Idle association timeout.")
    check_calling_host: bool = Field(
        True, description="Reject a known calling AE title that connects from an address not registered for it."
    )
    associate_rq_timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "A connection must deliver its whole A-ASSOCIATE-RQ this soon after connecting, "
            "or it is closed (the ACSE timeout applies from then on)."
        ),
    )
    max_pending_connections: int = Field(
        64,
        ge=1,
        description=(
            "Connections accepted that have not yet sent their A-ASSOCIATE-RQ, all addresses together; "
            "counted apart from max_associations, so they never use association slots."
        ),
    )
    max_pending_per_address: int = Field(
        8, ge=1, description="Connections not yet associated from one source address at a time."
    )
    connection_rate_per_address: float = Field(
        10.0, gt=0, description="New connections per second from one source address, sustained (token bucket)."
    )
    connection_burst_per_address: int = Field(
        50, ge=1, description="New connections one source address may open at once before the rate applies."
    )
    max_associations_per_peer: int = Field(
        16,
        ge=1,
        description=(
            "Concurrent associations of one registered peer (all its AE titles); keeps one peer, "
            "idle or not, from holding every one of max_associations."
        ),
    )
    max_associate_rq_bytes: int = Field(
        65_536, ge=1024, description="Largest A-ASSOCIATE-RQ PDU accepted, bytes; a larger one is aborted unread."
    )
    max_dataset_bytes: int = Field(
        4_294_967_296,
        ge=1024,
        description="Largest data set one C-STORE may carry as received, bytes; the association is aborted beyond it.",
    )
    max_inflated_bytes: int = Field(
        1_073_741_824,
        ge=1024,
        description=(
            "Largest size a Deflated Explicit VR Little Endian data set may expand to, bytes; "
            "inflated as it arrives, the association is aborted beyond it."
        ),
    )
    accept_unknown_storage: bool = Field(
        True,
        description=(
            "Accept storage of SOP classes the node does not know (private, retired, newer): stored and "
            "indexed, never analysed (like Orthanc's UnknownSopClassAccepted). False: such contexts are refused."
        ),
    )

    tls: NetworkTLSSettings = NetworkTLSSettings()

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: validate_ae_title(v)))

    @model_validator(mode="after")
    def _some_listener(self) -> "NetworkSettings":
        if not self.tls.plain_listener and not self.tls.enabled:
            raise ValueError("network.tls.plain_listener is false but TLS is not enabled: the node would not listen at all")
        if self.tls.enabled and self.tls.plain_listener and self.tls.port == self.port:
            raise ValueError(f"network.tls.port and network.port are both {self.port}")
        return self


class StorageSettings(BaseModel):
    """Where received instances, results and the default SQLite index live."""

    model_config = _frozen()

    data_dir: Path = Field(Path("fpe-node-data"), description="Root of everything the node writes.")
    fsync: bool = Field(True, description="fsync each file and its folder before acknowledging a C-STORE.")

    @property
    def dicom_dir(self) -> Path:
        """Received instances, ``<data_dir>/dicom/<study>/<series>/<sop>.dcm``."""
        return self.data_dir / "dicom"

    @property
    def results_dir(self) -> Path:
        """DICOM objects the node produced, kept until delivered and retained."""
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        """Temporary files (same filesystem as the stores, so rename is atomic)."""
        return self.data_dir / "tmp"


class IndexSettings(BaseModel):
    """The index database."""

    model_config = _frozen()

    url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db. "
            "Empty: SQLite file <data_dir>/index.sqlite3. Its password is never printed "
            "(`config show`, representations and errors show `***`)."
        ),
    )
    echo: bool = Field(False, description="Log SQL statements (debugging only).")

    @field_serializer("url", when_used="json")
    def _url_without_password(self, url: str | None) -> str | None:
        """JSON (``config show``) carries the URL with its password replaced by ``***``."""
        return None if url is None else redact_url(url)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """``repr`` (tracebacks, logs of the settings object) without the password."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" and isinstance(value, str) else value


class CompletionSettings(BaseModel):
    """When a series and a study count as complete (see dicom_node.completion)."""

    model_config = _frozen()

    series_quiet_s: float = Field(8.0, gt=0, description="A series is complete after this long without a new instance.")
    study_timeout_s: float = Field(
        180.0, gt=0, description="A study is forced complete this long after its last instance."
    )
    release_shortens_wait: bool = Field(
        True,
        description=(
            "An association release shortens the quiet period of the series it sent to about 1 s "
            "(at most a quarter of series_quiet_s), so a PACS sending one series per association can go on."
        ),
    )
    live_window_s: float = Field(
        3600.0, ge=0, description="Studies acquired this recently are worked on before older backlog."
    )

    @model_validator(mode="after")
    def _timeout_after_quiet(self) -> "CompletionSettings":
        if self.study_timeout_s < self.series_quiet_s:
            raise ValueError("study_timeout_s must not be shorter than series_quiet_s")
        return self


class RetentionSettings(BaseModel):
    """Purging of processed studies."""

    model_config = _frozen()

    enabled: bool = Field(True, description="Purge processed studies after `days`.")
    days: float = Field(7.0, gt=0, description="Age (since last arrival) after which a processed study is purged.")
    disk_high_watermark_pct: float = Field(
        90.0, gt=0, le=100, description="Above this disk use, oldest processed studies are purged first."
    )
    disk_low_watermark_pct: float = Field(80.0, gt=0, le=100, description="Purging stops below this disk use.")
    check_interval_s: float = Field(300.0, gt=0, description="How often retention runs.")

    @model_validator(mode="after")
    def _low_below_high(self) -> "RetentionSettings":
        if self.disk_low_watermark_pct > self.disk_high_watermark_pct:
            raise ValueError("disk_low_watermark_pct must not exceed disk_high_watermark_pct")
        return self


class UIDSettings(BaseModel):
    """How the node makes new UIDs (PS3.5 section 9)."""

    model_config = _frozen()

    root: str | None = Field(
        None,
        description="Site UID root (digits and dots, at most 40 characters). Empty: UUID-derived 2.25. UIDs.",
    )

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.rstrip(".")
        if not _UID_ROOT_RE.match(value) or len(value) > 40:
            raise ValueError(f"{value!r} is not a UID root (digits and dots, at most 40 characters)")
        if any(value == root or value.startswith(root + ".") for root in FORBIDDEN_UID_ROOTS):
            raise ValueError(f"{value!r} belongs to a library's or the standard's root, not to a site")
        return value


class InferenceSettings(BaseModel):
    """Model and rules used by the worker."""

    model_config = _frozen()

    checkpoint: Path | None = Field(
        None, description="Checkpoint to serve. Empty: deterministic untrained demonstration weights."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: on CUDA the precision the checkpoint was validated in; on a CPU with native bf16 "
        "(AVX512-BF16 or AMX) bf16 when the checkpoint's card records that bf16 changed no decision on its validation "
        "cases (fpe-node evaluate --record-bf16), else fp32. fp32 or bf16 force it (bf16 where the machine has no "
        "native bf16 stops start-up). Every result names the precision used.",
    )
    eligibility_rules: Path | None = Field(None, description="Eligibility YAML. Empty: bundled config/eligibility.yaml.")
    selection_rules: Path | None = Field(None, description="Series selection YAML. Empty: bundled config/selection.yaml.")
    case_window_h: float = Field(
        24.0, ge=0, description="Roles may come from studies of the same patient acquired within this window."
    )
    prefer_pipeline: Literal["MR", "CT"] = Field("MR", description="Pipeline used when both CT and MR are ready.")
    workers: int = Field(
        1,
        ge=0,
        le=16,
        description="Inference worker processes (0: this node only receives and queues studies, e.g. for tests).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Threads for torch on CPU (0: torch's default, one per core); compressed pixel data is decoded on "
        "as many processes (inference.decode), at most the usable cores.",
    )


class LeaseSettings(BaseModel):
    """How long claims last when several processes share the index (see dicom_node.leases).

    A worker renews its job's lease, a sender its outbox rows', the completion receiver the
    ``completion`` lease, every third of the duration; a claim not renewed for the whole
    duration (the process died, hung or lost the index) may be taken by another process.
    """

    model_config = _frozen()

    job_s: float = Field(60.0, ge=1.0, description="Lease of a claimed analysis job; past it another worker may re-claim it.")
    outbox_s: float = Field(120.0, ge=1.0, description="Lease of outbox rows claimed for a delivery attempt.")
    completion_s: float = Field(
        15.0, ge=1.0, description="Lease of the receiver that runs the completion timers (role receiver)."
    )


class ReportSettings(BaseModel):
    """Result objects the node builds."""

    model_config = _frozen()

    sr_for_not_analysed: bool = Field(True, description="Send an SR saying why a study was not analysed.")
    secondary_capture: bool = Field(True, description="Build attention-map secondary captures.")
    multiframe_sc: bool = Field(False, description="One multi-frame true-colour SC instead of single-frame images.")
    summary_capture: bool = Field(
        True,
        description="Also build one summary secondary capture (its own series): the key slices in a row under the "
        "score, the decision and the research-use warning, for a PACS thumbnail or a phone.",
    )
    pdf: bool = Field(False, description="Also build a one-page Encapsulated PDF.")
    parametric_map: bool = Field(
        False,
        description="Also build a Parametric Map of the attention on the primary series (kind pm): viewers such as "
        "OHIF draw it over the series; the SR lists it as evidence.",
    )
    segmentation: bool = Field(
        False,
        description="Also build a Segmentation of the region whose attention is at least half the case maximum "
        "(kind seg), for viewers that draw SEG but not Parametric Maps; the SR lists it as evidence.",
    )
    institution_name: str | None = Field(None, description="InstitutionName written in results (optional).")


class DeliveryTLSSettings(BaseModel):
    """DICOM over TLS, sending: to destinations flagged ``tls`` in the peer registry (PS3.15 Annex B)."""

    model_config = _frozen()

    ca_bundle: Path | None = Field(
        None,
        description=(
            "CA certificates (PEM) a destination's server certificate must chain to. Empty: network.tls.ca_bundle, "
            "or the system's trust store when that is empty too."
        ),
    )
    certificate: Path | None = Field(
        None,
        description=(
            "Client certificate (PEM) the node presents to archives that ask for one. Empty: network.tls.certificate "
            "(with its key and password) when set, else none."
        ),
    )
    private_key: Path | None = Field(None, description="Private key of `certificate` (PEM, may be encrypted).")
    private_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted private_key (a secret: shown as `**********`)."
    )
    minimum_version: TLSVersion = Field("1.2", description="Lowest TLS version offered to destinations (1.2 or 1.3).")

    @model_validator(mode="after")
    def _key_with_certificate(self) -> "DeliveryTLSSettings":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("delivery.tls.certificate and delivery.tls.private_key are set together")
        return self


class DeliverySettings(BaseModel):
    """Sending results back (see dicom_node.outbox)."""

    model_config = _frozen()

    allow_demonstration_results: bool = Field(
        False, description="Send results of untrained demonstration weights to destinations (off: keep them in the node)."
    )
    retry_initial_s: float = Field(5.0, gt=0, description="First retry delay; doubles each attempt.")
    retry_max_s: float = Field(300.0, gt=0, description="Cap on the retry delay.")
    deadline_s: float = Field(86400.0, gt=0, description="After this long without success an item is dead-lettered.")
    calling_ae_title: str | None = Field(None, description="AE title used when sending. Empty: network.ae_title.")
    routing_rules: Path | None = Field(
        None, description="Routing YAML (which results go to which destinations). Empty: every result to every destination."
    )
    scan_interval_s: float = Field(2.0, gt=0, description="How often the outbox looks for due items when not woken.")
    association_timeout_s: float = Field(30.0, gt=0, description="ACSE, DIMSE and network timeout when sending.")
    stow_timeout_s: float = Field(
        60.0, gt=0, description="Connect, read and write timeout of one STOW-RS request to a DICOMweb destination."
    )
    tls: DeliveryTLSSettings = DeliveryTLSSettings()

    @field_validator("calling_ae_title")
    @classmethod
    def _check_ae(cls, value: str | None) -> str | None:
        return None if value in (None, "") else validate_ae_title(value)


DicomWebAuth = Literal["none", "basic", "bearer", "client-certificate"]
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DicomWebSettings(BaseModel):
    """Where and how a DICOMweb destination receives results by STOW-RS (PS3.18 10.5).

    Secrets are never stored here, in the index or in the audit trail: ``secret_env`` names an
    environment variable of ``fpe-node serve`` and ``secret_file`` a file (readable by the node
    only) that holds the password (``basic``) or the token (``bearer``); they are read at each
    delivery, so a rotated secret takes effect without a registry change.
    """

    model_config = _frozen()

    url: str = Field(..., description="Base URL of the DICOMweb service; STOW-RS posts to {url}/studies.")
    auth: DicomWebAuth = Field("none", description="HTTP authentication: none, basic, bearer or client-certificate.")
    username: str | None = Field(None, description="User name of basic authentication.")
    secret_env: str | None = Field(None, description="Environment variable holding the password or token.")
    secret_file: Path | None = Field(None, description="File holding the password or token (first line).")
    client_cert: Path | None = Field(None, description="PEM client certificate (client-certificate authentication).")
    client_key: Path | None = Field(None, description="PEM private key of the client certificate (empty: in client_cert).")
    ca_bundle: Path | None = Field(
        None, description="PEM CA bundle that verifies the server. Empty: delivery.tls.ca_bundle, else "
        "network.tls.ca_bundle, else the system's trust store."
    )
    verify_tls: bool = Field(True, description="Verify the server's certificate and host name (off: warned at each delivery).")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a DICOMweb URL is http:// or https:// with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username/secret_env/secret_file, not in the URL")
        if parts.query or parts.fragment:
            raise ValueError("a DICOMweb base URL has no query or fragment")
        return value.strip().rstrip("/")

    @field_validator("secret_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> "DicomWebSettings":
        secrets = [s for s in (self.secret_env, self.secret_file) if s is not None]
        if len(secrets) > 1:
            raise ValueError("give secret_env or secret_file, not both")
        if self.auth in ("basic", "bearer") and not secrets:
            raise ValueError(f"{self.auth} authentication needs secret_env or secret_file")
        if self.auth not in ("basic", "bearer") and secrets:
            raise ValueError(f"auth {self.auth} takes no password or token")
        if (self.auth == "basic") != (self.username is not None):
            raise ValueError("basic authentication needs a username, and only it takes one")
        if self.auth == "client-certificate" and self.client_cert is None:
            raise ValueError("client-certificate authentication needs client_cert")
        if self.auth != "client-certificate" and (self.client_cert is not None or self.client_key is not None):
            raise ValueError("client_cert and client_key belong to client-certificate authentication")
        if self.auth == "client-certificate" and not self.url.startswith("https://"):
            raise ValueError("client-certificate authentication needs an https:// URL")
        return self


class PeerSettings(BaseModel):
    """A remote system seeded into the peer registry at start-up (managed afterwards by `fpe-node peers`)."""

    model_config = _frozen()

    name: str = Field(..., min_length=1, max_length=64, description="Unique name of the system.")
    ae_titles: tuple[str, ...] = Field((), description="AE titles the system uses (a source or DIMSE destination needs one).")
    host: str = Field("*", description="Host or IP address; '*' accepts any host.")
    port: int | None = Field(None, ge=1, le=65535, description="Port of its SCP (needed for destinations and echo).")
    roles: tuple[Literal["source", "destination"], ...] = Field(("source",), min_length=1)
    kind: Literal["dimse", "dicomweb"] = Field(
        "dimse", description="How results reach it: dimse (C-STORE to host:port) or dicomweb (STOW-RS to dicomweb.url)."
    )
    dicomweb: DicomWebSettings | None = Field(None, description="The DICOMweb service of a dicomweb destination.")
    tls: bool = Field(
        False,
        description=(
            "Source: must use TLS (a plain association from it is rejected); destination: results are sent over TLS."
        ),
    )
    tls_verify: bool = Field(
        True,
        description=(
            "Destination over TLS: verify its certificate and host name against delivery.tls.ca_bundle; false is an "
            "explicit opt-out, logged as a warning at every association."
        ),
    )

    @field_validator("ae_titles")
    @classmethod
    def _check_titles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(validate_ae_title(v) for v in value)

    @model_validator(mode="after")
    def _destination_needs_port(self) -> "PeerSettings":
        if self.kind == "dicomweb" and self.dicomweb is None:
            raise ValueError("a dicomweb peer needs a dicomweb section (url, auth)")
        if self.kind == "dimse" and self.dicomweb is not None:
            raise ValueError("a dicomweb section needs kind: dicomweb")
        if ("source" in self.roles or self.kind == "dimse") and not self.ae_titles:
            raise ValueError("a source or DIMSE peer needs at least one AE title")
        if self.kind == "dimse" and "destination" in self.roles and (self.port is None or self.host == "*"):
            raise ValueError("a destination needs a host (not '*') and a port")
        return self


class AuditSettings(BaseModel):
    """Audit messages (DICOM PS3.15 A.5) sent over syslog to a collector (see dicom_node.atna)."""

    model_config = _frozen()

    enabled: bool = Field(
        False, description="Send every audit table entry as a PS3.15 A.5 audit message to the collector."
    )
    host: str | None = Field(None, description="Collector (audit record repository) host name or address.")
    port: int | None = Field(
        None, ge=1, le=65535,
        description="Collector port. Empty: 514 for udp and tcp (PS3.15 A.7), 6514 for tls (RFC 5425).",
    )
    transport: Literal["udp", "tcp", "tls"] = Field(
        "tls",
        description=(
            "tls: RFC 5425 (PS3.15 A.6); tcp: RFC 6587 octet counting, no encryption; udp: RFC 5426 (PS3.15 A.7), "
            "unacknowledged: a message lost on the way is not sent again."
        ),
    )
    ca_file: Path | None = Field(
        None, description="CA bundle (PEM) the collector's certificate is checked against (tls). Empty: the system's."
    )
    cert_file: Path | None = Field(
        None, description="The node's client certificate (PEM), for collectors that authenticate nodes (tls)."
    )
    key_file: Path | None = Field(None, description="Private key (PEM) of cert_file (tls).")
    source_id: str | None = Field(
        None, max_length=64, description="AuditSourceID of every message. Empty: network.ae_title@host name."
    )
    enterprise_site_id: str | None = Field(
        None, max_length=64, description="AuditEnterpriseSiteID of every message (optional)."
    )
    retry_initial_s: float = Field(1.0, gt=0, description="First wait after the collector could not be reached; doubles.")
    retry_max_s: float = Field(60.0, gt=0, description="Cap on that wait.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the audit table is read for new entries.")
    timeout_s: float = Field(10.0, gt=0, description="Connect and send timeout towards the collector.")

    @model_validator(mode="after")
    def _collector_named(self) -> "AuditSettings":
        if self.enabled and not self.host:
            raise ValueError("host is required when audit is enabled")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def collector_port(self) -> int:
        """The port in use: ``port``, or the transport's default."""
        if self.port is not None:
            return self.port
        return 6514 if self.transport == "tls" else 514


class ConsoleSettings(BaseModel):
    """The web console, REST API, health and metrics endpoints (``dicom_node.web``), served by ``fpe-node serve``."""

    model_config = _frozen()

    enabled: bool = Field(True, description="Serve the console and REST API next to the SCP.")
    host: str = Field(
        "127.0.0.1", description="Address the console listens on (loopback by default; put it behind a TLS proxy to open it)."
    )
    port: int = Field(8470, ge=0, le=65535, description="TCP port of the console and REST API (0: any free port).")
    secure_cookie: bool = Field(
        False,
        description="Mark the session cookie Secure (sent over HTTPS only): set it when the console is behind a TLS proxy.",
    )
    session_idle_min: float = Field(30.0, gt=0, description="A console session ends after this many minutes without a request.")
    session_max_h: float = Field(12.0, gt=0, description="A console session ends this many hours after the login, used or not.")
    lockout_failures: int = Field(
        5, ge=1, description="Failed logins in a row after which an account is locked (`lockout_min` minutes)."
    )
    lockout_min: float = Field(15.0, gt=0, description="Minutes an account stays locked after `lockout_failures` failed logins.")
    password_min_length: int = Field(10, ge=8, le=128, description="Shortest password `fpe-node users add/passwd` and the API accept.")


AlertRule = Literal["dead_letter", "analysis_failed", "disk_high", "no_analysis"]
ALERT_RULES: tuple[AlertRule, ...] = ("dead_letter", "analysis_failed", "disk_high", "no_analysis")
"""Alert rules of :mod:`dicom_node.alerts`."""


def redact_webhook_url(url: str) -> str:
    """``scheme://host/***``: a webhook URL's path and query often carry its secret (Slack, Teams)."""
    head, sep, rest = url.partition("://")
    return f"{head}{sep}{rest.split('/', 1)[0].rsplit('@', 1)[-1]}/***" if sep else "***"


class WebhookChannelSettings(BaseModel):
    """An alert channel posting JSON to a URL."""

    model_config = _frozen()

    name: str = Field(..., min_length=1, max_length=64, description="Name of the channel (shown in the alert log).")
    url: str = Field(
        ..., pattern=r"^https?://", description="URL the alert is POSTed to; shown as scheme://host/*** in `config show`."
    )
    template: Literal["json", "slack", "teams"] = Field(
        "json", description="Payload: json (the alert's fields), slack (Slack incoming webhook), teams (MessageCard)."
    )
    timeout_s: float = Field(5.0, gt=0, description="Connect and read timeout of one attempt.")

    @field_serializer("url", when_used="json")
    def _url_redacted(self, url: str) -> str:
        return redact_webhook_url(url)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """``repr`` without the URL's secret part."""
        for name, value in super().__repr_args__():
            yield name, redact_webhook_url(value) if name == "url" else value


class EmailChannelSettings(BaseModel):
    """An alert channel sending e-mail over SMTP."""

    model_config = _frozen()

    name: str = Field(..., min_length=1, max_length=64, description="Name of the channel (shown in the alert log).")
    host: str = Field(..., min_length=1, description="SMTP server.")
    port: int = Field(25, ge=1, le=65535, description="SMTP port (587 with starttls is usual).")
    starttls: bool = Field(False, description="Upgrade the connection with STARTTLS before logging in or sending.")
    ca_file: Path | None = Field(
        None, description="PEM CA certificates that verify the server's STARTTLS certificate (empty: the system's)."
    )
    username: str | None = Field(None, description="SMTP login user (empty: no login).")
    password: SecretStr | None = Field(None, description="SMTP login password (never printed).")
    sender: str = Field(..., min_length=3, description="From address.")
    recipients: tuple[str, ...] = Field(..., min_length=1, description="To addresses.")
    timeout_s: float = Field(10.0, gt=0, description="Connection timeout of one attempt.")


class AlertSettings(BaseModel):
    """Alerts on dead letters, failed analyses, a full disk and stalled analysis (see dicom_node.alerts)."""

    model_config = _frozen()

    enabled: bool = Field(True, description="Evaluate the alert rules (nothing is sent without a channel).")
    check_interval_s: float = Field(60.0, gt=0, description="How often the rules are evaluated.")
    rules: tuple[AlertRule, ...] = Field(
        ALERT_RULES, description="Rules evaluated: dead_letter, analysis_failed, disk_high, no_analysis."
    )
    webhooks: tuple[WebhookChannelSettings, ...] = Field((), description="Webhook channels (name, url, template, timeout_s).")
    emails: tuple[EmailChannelSettings, ...] = Field(
        (), description="E-mail channels (name, host, port, starttls, ca_file, username, password, sender, recipients, timeout_s)."
    )
    rate_limit_s: float = Field(
        900.0, ge=0, description="At most one alert per rule and channel this often; later ones are recorded as suppressed."
    )
    retry_attempts: int = Field(3, ge=1, le=10, description="Attempts to send one alert on one channel.")
    retry_initial_s: float = Field(2.0, ge=0, description="Delay before the second attempt; doubles for each further one.")
    no_analysis_after_s: float = Field(
        3600.0, gt=0,
        description="no_analysis fires when studies whose last instance is older than this still wait and no study was "
        "analysed for this long.",
    )
    include_patient_data: bool = Field(
        False, description="Add Patient ID and Accession Number to alerts (off: UIDs only, no patient data)."
    )


class LoggingSettings(BaseModel):
    """Console logging of `fpe-node serve`."""

    model_config = _frozen()

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """All settings of fpe-node. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
    )

    network: NetworkSettings = NetworkSettings()
    storage: StorageSettings = StorageSettings()
    index: IndexSettings = IndexSettings()
    completion: CompletionSettings = CompletionSettings()
    retention: RetentionSettings = RetentionSettings()
    uid: UIDSettings = UIDSettings()
    inference: InferenceSettings = InferenceSettings()
    reports: ReportSettings = ReportSettings()
    delivery: DeliverySettings = DeliverySettings()
    leases: LeaseSettings = LeaseSettings()
    peers: tuple[PeerSettings, ...] = ()
    console: ConsoleSettings = ConsoleSettings()
    alerts: AlertSettings = AlertSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over YAML (passed as init kwargs).
        environ = _ENVIRON_FOR_LOAD.get()
        if environ is not None:
            env_settings = _MappingEnvSource(settings_cls, environ)
        return (env_settings, init_settings)

    @property
    def index_url(self) -> str:
        """The index URL, defaulting to SQLite inside the data directory."""
        if self.index.url:
            return self.index.url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite3').resolve()}"


_ENVIRON_FOR_LOAD: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "fpenode_environ", default=None
)


class _MappingEnvSource(EnvSettingsSource):
    """Environment source reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._given_environ = {k.lower(): v for k, v in environ.items()}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._given_environ


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping at top level")
    return data


_SECRET_KEY = re.compile(r"(password|secret|token|api_key|private_key)$", re.IGNORECASE)


def redacted(value: Any) -> Any:
    """JSON data with secrets hidden: URL passwords and the values of secret-named keys become ``***``."""
    if isinstance(value, dict):
        return {
            key: "***" if _SECRET_KEY.search(str(key)) and item not in (None, "") and not _masked(item) else redacted(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redacted(item) for item in value]
    return redact_url(value) if isinstance(value, str) else value


def _masked(value: Any) -> bool:
    """Already hidden: pydantic shows a ``SecretStr`` as ``**********``."""
    return isinstance(value, str) and set(value) == {"*"}


def shown_settings(settings: Settings) -> dict[str, Any]:
    """The effective settings as JSON data without secrets (``fpe-node config show``, ``GET /api/v1/settings``)."""
    shown: dict[str, Any] = redacted(json.loads(settings.model_dump_json()))
    return shown


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: ``section.field: message (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(top level)"
        got = err.get("input")
        secret = any("password" in str(part) for part in err["loc"])
        shown = "" if isinstance(got, dict) or secret else f" (got {redact_url(repr(got))})"
        lines.append(f"{field}: {err['msg']}{shown}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the validated settings object.

    Parameters
    ----------
    path:
        Site YAML file merged over the bundled defaults; ``None`` uses ``FPENODE_CONFIG``
        from the environment when set.
    environ:
        Environment to read ``FPENODE_*`` overrides from (default: ``os.environ``).
    overrides:
        Values merged last over the YAML (tests and the CLI use it); the environment still wins.

    Raises
    ------
    SettingsError
        Naming every invalid field.
    """
    env = dict(os.environ if environ is None else environ)
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    data = _read_yaml(DEFAULT_SETTINGS)
    if path is not None:
        data = _deep_merge(data, _read_yaml(Path(path)))
    if overrides:
        data = _deep_merge(data, overrides)
    env_only = {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX) and k.upper() != ENV_PREFIX + "CONFIG"}
    token = _ENVIRON_FOR_LOAD.set(env_only)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None
    finally:
        _ENVIRON_FOR_LOAD.reset(token)
