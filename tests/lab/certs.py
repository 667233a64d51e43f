"""A throw-away certificate authority and server certificates for the mail lab.

``issue(directory)`` writes PEM files for a test CA and three server identities:

- ``localhost``: SANs ``DNS:localhost`` and ``IP:127.0.0.1`` (the lab's default certificate);
- ``mail.lab.test``: a second name, served by SNI;
- ``wrong.example``: a name nobody connects to, for certificate-failure tests (the lab
  serves it to clients that ask for ``mismatch.lab.test`` by SNI).

Clients trust the lab by loading ``LabCertificates.ca``
(``ssl.create_default_context(cafile=...)``).
Keys are EC P-256: generated in milliseconds, accepted by every TLS stack in use here.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SNI_NAME = "mail.lab.test"
WRONG_NAME = "wrong.example"
# A name the lab answers (by SNI) with the certificate for WRONG_NAME: a name mismatch.
MISMATCH_NAME = "mismatch.lab.test"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class LabCertificates:
    """Where ``issue`` wrote the lab's PEM files."""

    directory: Path
    ca: Path
    localhost: KeyPair
    sni: KeyPair
    wrong: KeyPair
    sni_name: str = SNI_NAME
    wrong_name: str = WRONG_NAME
    mismatch_name: str = MISMATCH_NAME


def issue(directory: Path) -> LabCertificates:
    """Create the CA and the three server certificates in ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailroom mail lab CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def server(stem: str, dns_name: str, *, with_loopback_ip: bool = False) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(dns_name)]
        if with_loopback_ip:
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
        cert = (
            _builder(subject, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        pair = KeyPair(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        # Dovecot's master reads keys as root; the test process reads them as itself.
        pair.key.chmod(0o600)
        return pair

    return LabCertificates(
        directory=directory,
        ca=ca_path,
        localhost=server("localhost", "localhost", with_loopback_ip=True),
        sni=server("sni", SNI_NAME),
        wrong=server("wrong", WRONG_NAME),
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
