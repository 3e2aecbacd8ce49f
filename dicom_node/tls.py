"""TLS contexts for DICOM secure transport (PS3.15 Annex B), built and checked once at start-up.

* :func:`server_context`: the TLS listener's context (``network.tls``): the site certificate
  and key, client certificates verified against ``network.tls.ca_bundle`` when asked for.
* :func:`client_contexts`: the contexts used to send to destinations flagged ``tls``
  (``delivery.tls``): one that verifies the server's certificate chain and host name, and one
  for destinations whose verification an administrator switched off.

Policy (both directions): TLS 1.2 or later (``minimum_version``; TLS 1.0/1.1 and SSL never,
as PS3.15 B.10 and later profiles and RFC 8996 require), for TLS 1.2 only ECDHE/DHE key exchange
with AEAD ciphers (AES-GCM, ChaCha20-Poly1305: the BCP 195 / RFC 9325 recommendation),
OpenSSL security level 2 (RSA and DH keys of 2048 bits or more), no compression, no
renegotiation; TLS 1.3 with OpenSSL's default suites.

Every file is checked before OpenSSL sees it, so a bad file stops start-up with a
:class:`~dicom_node.settings.SettingsError` naming the field: an unreadable or non-PEM
certificate, an expired one, a key that is encrypted without a password (or with a wrong one),
a key that is not the certificate's, a CA bundle without certificates.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr

from dicom_node.settings import NetworkTLSSettings, Settings, SettingsError, TLSVersion

log = logging.getLogger(__name__)

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS:@SECLEVEL=2"
"""OpenSSL cipher string for TLS 1.2: forward-secret AEAD suites only (RFC 9325 section 4.2)."""
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class CertificatePair:
    """A certificate chain file, its private key and the key's password (checked)."""

    certificate: Path
    private_key: Path
    password: SecretStr | None


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None


def load_certificates(path: Path, field: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path``.

    Raises
    ------
    SettingsError
        Naming ``field`` when the file is unreadable or holds no PEM certificate.
    """
    data = _read(path, field)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SettingsError(f"{field}: {path} holds no PEM certificate") from None
    return certificates


def _check_validity(certificate: x509.Certificate, path: Path, field: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise SettingsError(f"{field}: the certificate in {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now:
        log.warning("%s: the certificate in %s is not valid before %s", field, path, certificate.not_valid_before_utc)


def check_pair(pair: CertificatePair, prefix: str) -> None:
    """Check a certificate and its key as OpenSSL will use them; errors name ``<prefix>.<field>``.

    Raises
    ------
    SettingsError
        For an unreadable, non-PEM or expired certificate, an unreadable key, a missing or wrong
        password, or a key that does not match the certificate.
    """
    certificate = load_certificates(pair.certificate, f"{prefix}.certificate")[0]
    _check_validity(certificate, pair.certificate, f"{prefix}.certificate")
    data = _read(pair.private_key, f"{prefix}.private_key")
    password = None if pair.password is None else pair.password.get_secret_value().encode()
    encrypted = b"ENCRYPTED" in data
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError:
        if encrypted:
            raise SettingsError(f"{prefix}.private_key_password: {pair.private_key} is encrypted and no password is set") from None
        raise SettingsError(f"{prefix}.private_key_password: set, but {pair.private_key} is not encrypted") from None
    except ValueError:
        if encrypted and password is not None:
            raise SettingsError(f"{prefix}.private_key_password: wrong password for {pair.private_key}") from None
        raise SettingsError(f"{prefix}.private_key: {pair.private_key} holds no readable PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise SettingsError(f"{prefix}.private_key: {pair.private_key} is not the key of {prefix}.certificate ({pair.certificate})")


def _base_context(protocol: ssl._SSLMethod, minimum_version: TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = _VERSIONS[minimum_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _load_pair(context: ssl.SSLContext, pair: CertificatePair, prefix: str) -> None:
    check_pair(pair, prefix)
    password = None if pair.password is None else pair.password.get_secret_value()
    try:
        context.load_cert_chain(pair.certificate, pair.private_key, password=password)
    except ssl.SSLError as exc:
        raise SettingsError(f"{prefix}.certificate: OpenSSL refuses {pair.certificate} with its key: {exc.reason or exc}") from None


def _load_ca(context: ssl.SSLContext, path: Path, field: str) -> None:
    load_certificates(path, field)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise SettingsError(f"{field}: OpenSSL refuses {path}: {exc.reason or exc}") from None


def server_context(tls: NetworkTLSSettings) -> ssl.SSLContext:
    """The TLS listener's context (PS3.15 Annex B; the node is the TLS server).

    Raises
    ------
    SettingsError
        Naming the ``network.tls`` field whose file is bad.
    """
    if tls.certificate is None or tls.private_key is None:
        raise SettingsError("network.tls.certificate and network.tls.private_key are needed to listen with TLS")
    context = _base_context(ssl.PROTOCOL_TLS_SERVER, tls.minimum_version)
    _load_pair(context, CertificatePair(tls.certificate, tls.private_key, tls.private_key_password), "network.tls")
    context.verify_mode = _CLIENT_MODES[tls.client_certificates]
    if tls.ca_bundle is not None and tls.client_certificates != "none":
        _load_ca(context, tls.ca_bundle, "network.tls.ca_bundle")
    return context


class ClientContexts:
    """Contexts for sending: :attr:`verified` checks the chain and host name; :attr:`unverified` does not.

    Built by :func:`client_contexts`; the system trust store (used when no CA bundle is set)
    is loaded at the first use, so a node without TLS destinations never pays for it.
    """

    def __init__(self, verified: ssl.SSLContext, unverified: ssl.SSLContext, *, system_trust: bool) -> None:
        self._verified = verified
        self.unverified = unverified
        self._system_trust = system_trust
        self._lock = threading.Lock()

    @property
    def verified(self) -> ssl.SSLContext:
        """The verifying context (server certificate chain and host name, PS3.15 B)."""
        with self._lock:
            if self._system_trust:
                self._verified.load_default_certs(ssl.Purpose.SERVER_AUTH)
                self._system_trust = False
        return self._verified


def _client_pair(settings: Settings) -> tuple[CertificatePair, str] | None:
    sending = settings.delivery.tls
    if sending.certificate is not None and sending.private_key is not None:
        return CertificatePair(sending.certificate, sending.private_key, sending.private_key_password), "delivery.tls"
    site = settings.network.tls
    if site.certificate is not None and site.private_key is not None:
        return CertificatePair(site.certificate, site.private_key, site.private_key_password), "network.tls"
    return None


def client_contexts(settings: Settings) -> ClientContexts:
    """The contexts used to reach destinations flagged ``tls`` (the node is the TLS client).

    The server's chain is checked against ``delivery.tls.ca_bundle`` (default
    ``network.tls.ca_bundle``, else the system's trust store) and its host name against the
    destination's registered host (:meth:`ssl.SSLContext.wrap_socket` ``server_hostname``).

    Raises
    ------
    SettingsError
        Naming the field whose file is bad.
    """
    sending = settings.delivery.tls
    pair = _client_pair(settings)
    contexts = []
    for _ in range(2):
        context = _base_context(ssl.PROTOCOL_TLS_CLIENT, sending.minimum_version)
        if pair is not None:
            _load_pair(context, *pair)
        contexts.append(context)
    verified, unverified = contexts
    ca_bundle, field = sending.ca_bundle, "delivery.tls.ca_bundle"
    if ca_bundle is None:
        ca_bundle, field = settings.network.tls.ca_bundle, "network.tls.ca_bundle"
    if ca_bundle is not None:
        _load_ca(verified, ca_bundle, field)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return ClientContexts(verified, unverified, system_trust=ca_bundle is None)


HandshakeFailure = Literal["certificate", "no_certificate", "not_tls", "timeout", "handshake"]
"""Kinds of failed handshakes (the front door counts each as its own refusal reason)."""
_NOT_TLS = ("http request", "wrong version number", "unknown protocol", "record layer failure", "packet length too long")


def handshake_failure(exc: BaseException) -> tuple[HandshakeFailure, str]:
    """What kind of handshake failure ``exc`` is and why, in words for the log.

    The words are OpenSSL's reason (a certificate's verification error, an alert the peer sent);
    no patient data can be in them.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).lower().replace("_", " ")
        if reason in _NOT_TLS:
            return "not_tls", f"not a TLS client hello ({reason}; plain DICOM on the TLS port?)"
        if "peer did not return a certificate" in reason:
            return "no_certificate", "no client certificate (network.tls.client_certificates is required)"
        if reason.startswith(("tlsv1 alert", "sslv3 alert")):
            return "handshake", f"the peer ended the handshake: {reason} (does it trust the other side's certificate?)"
        return "handshake", reason
    if isinstance(exc, TimeoutError):
        return "timeout", "handshake not completed in time"
    return "handshake", f"{type(exc).__name__}: {exc}"
