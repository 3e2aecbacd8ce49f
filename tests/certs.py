"""Certificates made in the test with ``cryptography``: a CA, server and client certificates.

``make_pki(folder)`` writes a small PKI as PEM files and returns their paths::

    pki = make_pki(tmp_path / "pki")
    pki.ca                 # the site CA certificate (the CA bundle)
    pki.server.cert/.key   # for 127.0.0.1 and localhost, signed by the CA (serverAuth + clientAuth)
    pki.client.cert/.key   # a sender's certificate, signed by the CA
    pki.expired.cert/.key  # signed by the CA, expired yesterday
    pki.rogue.cert/.key    # signed by another CA (untrusted); pki.rogue_ca is that CA

Keys are EC P-256 (fast to make); ``issue(...)`` makes any other leaf certificate, e.g. with an
encrypted key. Reusable by any test that needs TLS (DICOM, syslog, HTTPS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files (the key encrypted when a password was given)."""

    cert: Path
    key: Path
    password: str | None = None


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file and its key (kept in memory to sign)."""

    cert_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class PKI:
    """The files of :func:`make_pki`."""

    ca: Path
    server: Issued
    client: Issued
    expired: Issued
    rogue: Issued
    rogue_ca: Path
    authority: Authority


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fpe-node tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption() if password is None else serialization.BestAvailableEncryption(password.encode())
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_authority(folder: Path, name: str = "Test CA") -> Authority:
    """A self-signed CA certificate written to ``folder/<name>.pem``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name.replace(' ', '_').lower()}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(path, certificate, key)


def issue(
    authority: Authority,
    folder: Path,
    name: str,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    valid_days: tuple[float, float] = (-1, 30),
    password: str | None = None,
) -> Issued:
    """A leaf certificate for ``hosts`` (subject alternative names) signed by ``authority``.

    ``valid_days`` is (not before, not after) in days from now: ``(-3, -1)`` is expired.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_days[0] * _DAY)
        .not_valid_after(now + valid_days[1] * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
        .sign(authority.key, hashes.SHA256())
    )
    stem = name.replace(" ", "_").lower()
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key, password))
    key_path.chmod(0o600)
    return Issued(cert_path, key_path, password)


def make_pki(folder: Path) -> PKI:
    """A CA with server, client and expired certificates, and a second (untrusted) CA's client."""
    authority = make_authority(folder, "Test CA")
    rogue_authority = make_authority(folder, "Rogue CA")
    return PKI(
        ca=authority.cert_path,
        server=issue(authority, folder, "fpe-node"),
        client=issue(authority, folder, "sender"),
        expired=issue(authority, folder, "expired sender", valid_days=(-3, -1)),
        rogue=issue(rogue_authority, folder, "rogue sender"),
        rogue_ca=rogue_authority.cert_path,
        authority=authority,
    )
