"""
TLS on both legs: loading and checking certificates and keys (at configuration load time, so a
bad file is an error naming its key), and building Twisted's TLS options for listeners and for
destinations.

Defaults are safe: destinations are verified (chain against the system trust store or C{ca},
and the host name through service_identity) unless C{verify = false} is written out; TLS 1.2
is the minimum unless C{min_tls = "1.3"}.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from attrs import frozen

from ._openssl import verify_error_text, verify_result

TLS_VERSIONS = ("1.2", "1.3")


@frozen
class ServerTls:
    """
    A mapping's C{tls} table: accept TLS clients with C{cert} (the full chain may follow it in
    the same PEM) and C{key}; with C{client_ca}, require and verify a client certificate.
    """

    cert: str
    key: str
    client_ca: str | None = None
    min_tls: str = "1.2"


@frozen
class ClientTls:
    """
    A destination's TLS settings.
    """

    server_name: str | None = None
    ca: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    min_tls: str = "1.2"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_certificates(path: str) -> list[Any]:
    """
    Every certificate in the PEM file at C{path} (cryptography objects).

    @raise ValueError: unreadable, or no certificate in it.
    """
    from cryptography import x509

    try:
        data = _read(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError(f"{path} contains no PEM certificate")
    return certificates


def load_private_key(path: str) -> Any:
    """
    The private key in the PEM file at C{path}.

    @raise ValueError: unreadable, encrypted, or no key in it.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = _read(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if b"PRIVATE KEY-----" not in data:
        raise ValueError(f"{path} contains no PEM private key")
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"{path}: the private key is encrypted; wingatemap needs it unencrypted") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a usable private key ({e})") from None


def _same_public_key(certificate: Any, key: Any) -> bool:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def der(public: Any) -> bytes:
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    return der(certificate.public_key()) == der(key.public_key())


def check_pair(cert_path: str, key_path: str) -> list[str]:
    """
    Problems with a certificate and key pair: unreadable, missing, mismatched, expired.
    (Expiry is a warning-worthy fact, returned with a C{warning:} prefix.)
    """
    problems = []
    try:
        chain = load_certificates(cert_path)
    except ValueError as e:
        return [str(e)]
    try:
        key = load_private_key(key_path)
    except ValueError as e:
        return [str(e)]
    if not _same_public_key(chain[0], key):
        problems.append(f"the key in {key_path} does not match the certificate in {cert_path}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if chain[0].not_valid_after_utc < now:
        problems.append(f"warning: the certificate in {cert_path} expired on {chain[0].not_valid_after_utc:%Y-%m-%d}")
    return problems


def _version(text: str) -> Any:
    from twisted.internet.ssl import TLSVersion

    return TLSVersion.TLSv1_3 if text == "1.3" else TLSVersion.TLSv1_2


def _trust_root(ca: str | None) -> Any:
    from twisted.internet import ssl

    if ca is None:
        return ssl.platformTrust()
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(_pem(c)) for c in load_certificates(ca)])


def _pem(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.PEM)


def server_options(settings: ServerTls) -> Any:
    """
    Twisted server TLS options for a listener (the certificate chain served as given).
    """
    from OpenSSL import crypto
    from twisted.internet import ssl

    chain = load_certificates(settings.cert)
    key = load_private_key(settings.key)
    options: dict[str, Any] = {
        "privateKey": crypto.PKey.from_cryptography_key(key),
        "certificate": crypto.X509.from_cryptography(chain[0]),
        "extraCertChain": [crypto.X509.from_cryptography(c) for c in chain[1:]],
        "raiseMinimumTo": _version(settings.min_tls),
        "requireCertificate": False,
    }
    if settings.client_ca is not None:
        options["verify"] = True
        options["caCerts"] = [crypto.X509.from_cryptography(c) for c in load_certificates(settings.client_ca)]
        options["requireCertificate"] = True
    certificate_options = ssl.CertificateOptions(**options)
    _no_alpn_failure(certificate_options.getContext())
    return certificate_options


def _no_alpn_failure(context: Any) -> None:
    """
    Twisted installs an ALPN callback on every server context that answers a client's ALPN
    offer it does not share (curl offers h2 and http/1.1) with b"", which OpenSSL turns into an
    "internal error" alert.  A relay speaks no application protocol: decline ALPN instead, as
    RFC 7301 allows, and the handshake goes on.
    """
    from OpenSSL import SSL

    context.set_alpn_select_callback(lambda connection, offered: SSL.NO_OVERLAPPING_PROTOCOLS)


def client_creator(host: str, settings: ClientTls) -> Any:
    """
    The client connection creator for a TLS destination at C{host}: SNI and certificate name
    C{server_name} (default C{host}), trust C{ca} (default: the system store), client
    certificate, minimum version; or, with C{verify = false}, SNI and encryption only.
    """
    from twisted.internet import ssl

    name = settings.server_name or host
    client_certificate = None
    if settings.client_cert is not None:
        key_path = settings.client_key or settings.client_cert
        client_certificate = ssl.PrivateCertificate.loadPEM(
            _pem(load_certificates(settings.client_cert)[0]) + _key_pem(load_private_key(key_path))
        )
    if settings.verify:
        creator = ssl.optionsForClientTLS(
            name,
            trustRoot=_trust_root(settings.ca),
            clientCertificate=client_certificate,
            extraCertificateOptions={"raiseMinimumTo": _version(settings.min_tls)},
        )
        return _KeepConnection(creator)
    return _KeepConnection(_UnverifiedCreator(name, client_certificate, settings.min_tls))


CONNECTION_ATTRIBUTE = "wingatemap_tls_connection"


class _KeepConnection:
    """
    Wraps a client connection creator to remember each OpenSSL connection on its TLS protocol,
    so that after a failed handshake we can still ask OpenSSL why verification failed.
    """

    def __init__(self, inner: Any) -> None:
        from zope.interface import directlyProvides

        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

        self._inner = inner
        directlyProvides(self, IOpenSSLClientConnectionCreator)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        try:
            setattr(tlsProtocol, CONNECTION_ATTRIBUTE, connection)
        except AttributeError:
            pass
        return connection


def describe_tls_failure(tls_protocol: Any, reason: Any) -> str:
    """
    Why a TLS handshake failed, in words: the verification error if one was recorded (only
    when the peer's certificate was checked: with C{verify = false} OpenSSL still records one,
    and it is not the cause), the name mismatch from service_identity, the TLS alert the peer
    sent, or OpenSSL's error.
    """
    value = getattr(reason, "value", reason)
    if value is not None and value.__class__.__name__ == "VerificationError":
        wanted = []
        for error in getattr(value, "errors", ()):
            identity = getattr(error, "mismatched_id", None)
            name = getattr(identity, "hostname", None) or getattr(identity, "ip", None)
            wanted.append(name.decode() if isinstance(name, bytes) else str(name))
        return f"certificate name mismatch: the certificate is not valid for {', '.join(wanted) or 'the server name'}"
    connection = getattr(tls_protocol, CONNECTION_ATTRIBUTE, None)
    code = verify_result(connection) if connection is not None and _verifies_peer(connection) else 0
    if code:
        return f"certificate verification failed: {verify_error_text(code)}"
    if value is None:
        return "the connection closed during the TLS handshake"
    name = value.__class__.__name__
    if name == "Error" and getattr(value, "args", None):
        try:
            parts = [p[2] for p in value.args[0] if len(p) >= 3 and p[2]]
            if parts:
                return _alert_text(parts) or "TLS error: " + "; ".join(parts)
        except (TypeError, IndexError):
            pass
    return f"{name}: {value}" if str(value) else name


def _verifies_peer(connection: Any) -> bool:
    """
    Whether this OpenSSL connection checks the peer's certificate (not so with C{verify = false}).
    """
    from OpenSSL import SSL

    try:
        return bool(connection.get_verify_mode() & SSL.VERIFY_PEER)
    except Exception:
        return True


# TLS alerts a peer sends about our certificate (OpenSSL spells them "tlsv1 alert unknown ca",
# "sslv3 alert bad certificate", ...): the peer refused it.
_CERTIFICATE_ALERTS = ("unknown ca", "bad certificate", "certificate unknown", "unsupported certificate", "certificate revoked", "certificate expired", "access denied")


def _alert_text(openssl_reasons: list[str]) -> str | None:
    """
    The TLS alert the peer sent, in words, if OpenSSL's reasons name one.
    """
    for reason in openssl_reasons:
        match = re.search(r"alert (.+)$", reason)
        if match is None:
            continue
        alert = match.group(1)
        if alert == "certificate required":
            return 'the server requires a client certificate and none was sent (TLS alert "certificate required"): set client_cert and client_key'
        if alert in _CERTIFICATE_ALERTS:
            return f'the peer refused our certificate (TLS alert "{alert}")'
        return f'the peer ended the handshake with TLS alert "{alert}"'
    return None


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())


class _UnverifiedCreator:
    """
    TLS without verification (C{verify = false}): still sends SNI, still encrypts.
    """

    def __init__(self, name: str, client_certificate: Any, min_tls: str) -> None:
        from twisted.internet import ssl
        from zope.interface import directlyProvides

        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

        options: dict[str, Any] = {"verify": False, "raiseMinimumTo": _version(min_tls)}
        if client_certificate is not None:
            options["privateKey"] = client_certificate.privateKey.original
            options["certificate"] = client_certificate.original
        self._context = ssl.CertificateOptions(**options).getContext()
        self._name = name.encode("idna") if not _is_ip(name) else None
        directlyProvides(self, IOpenSSLClientConnectionCreator)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._name is not None:
            connection.set_tlsext_host_name(self._name)
        return connection


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def subject_common_name(certificate: Any) -> str | None:
    """
    The subject CN of a pyOpenSSL X509 (as from C{getPeerCertificate}), or L{None}.
    """
    if certificate is None:
        return None
    from cryptography.x509.oid import NameOID

    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def half_close_tls_factory(context: Any, is_client: bool, wrapped: Any, preamble: bytes = b"") -> Any:
    """
    A TLS wrapping factory (server or client side) whose connections support half-close; see
    L{wingate_map.halfclose}.  (Imported here lazily: the configuration checks use this module
    without needing Twisted's TLS machinery.)
    """
    from ._halfclose import HalfCloseTLSFactory

    factory = HalfCloseTLSFactory(context, is_client, wrapped)
    factory.preamble = preamble
    return factory
