"""
A private PKI made at test time: a CA, server certificates (right name, wrong name, expired),
client certificates, and certificates from another (unknown) CA, written as PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, *blocks: bytes) -> str:
    path.write_bytes(b"".join(blocks))
    return str(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class PKI:
    """
    Issues certificates from one private CA into C{directory}.
    """

    def __init__(self, directory: Path, name: str = "wingatemap test CA") -> None:
        self.directory = Path(directory)
        self.ca_key = _key()
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = _write(self.directory / f"{name.replace(' ', '-')}.pem", _cert_pem(self.ca_cert))

    def issue(self, label: str, cn: str, names: tuple[str, ...] = (), client: bool = False, expired: bool = False) -> tuple[str, str]:
        """
        A certificate for C{cn} (with subjectAltNames C{names}: DNS names or IP addresses) and
        its key, as (cert path, key path).
        """
        key = _key()
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        start, end = (NOW - datetime.timedelta(days=10), NOW - datetime.timedelta(days=1)) if expired else (NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=30))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return (
            _write(self.directory / f"{label}.pem", _cert_pem(cert)),
            _write(self.directory / f"{label}.key", _key_pem(key)),
        )

    def server(self, label: str = "server", names: tuple[str, ...] = ("localhost", "127.0.0.1"), expired: bool = False) -> tuple[str, str]:
        return self.issue(label, names[0], names, expired=expired)

    def client(self, cn: str) -> tuple[str, str]:
        return self.issue(f"client-{cn}", cn, client=True)

    def unknown_ca(self, label: str = "unknown-ca", names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[str, str]:
        other = PKI(self.directory, name=f"{label} other CA")
        return other.issue(label, names[0], names)
