"""
TLS: the settings of a TLS listener or destination (L{ServerTls}, L{ClientTls}) and their
certificate files, the OpenSSL contexts and connection creators built from them, why a
handshake failed in words, and TLS connections that can half-close.

Private modules: C{_tls} (settings, contexts, failure descriptions), C{_halfclose} (the
half-closeable TLS protocol; loaded only when a TLS connection is made), C{_openssl} (the one
place that uses pyOpenSSL's private bindings, and why).
"""

from ._tls import (
    TLS_VERSIONS,
    ClientTls,
    ServerTls,
    check_pair,
    client_creator,
    describe_tls_failure,
    half_close_tls_factory,
    load_certificates,
    load_private_key,
    server_options,
    subject_common_name,
)

__all__ = [
    "TLS_VERSIONS",
    "ClientTls",
    "ServerTls",
    "check_pair",
    "client_creator",
    "describe_tls_failure",
    "half_close_tls_factory",
    "load_certificates",
    "load_private_key",
    "server_options",
    "subject_common_name",
]
