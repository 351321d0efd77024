"""
The one place wingatemap uses pyOpenSSL's private bindings (C{OpenSSL._util}), and why.

When a destination's certificate fails verification, operators need OpenSSL's reason
("certificate has expired", "unable to get local issuer certificate"...), not just "certificate
verify failed".  pyOpenSSL has no public call for either half of it: the verification result of
a connection (C{SSL_get_verify_result}) or the words for a result code
(C{X509_verify_cert_error_string}); C{Connection.set_verify} would give the code through a
callback, but not the words, and would replace the callback Twisted installs.  So both are read
through the private cffi bindings, and pyproject.toml pins pyOpenSSL below its next major
version.  Every call is guarded: if the bindings change, the reason degrades to a generic
sentence, it never fails a connection.
"""

from __future__ import annotations

from typing import Any


def verify_result(connection: Any) -> int:
    """
    OpenSSL's X509 verification result code for a pyOpenSSL connection (0 = ok or unknown).
    """
    try:
        from OpenSSL._util import lib

        return int(lib.SSL_get_verify_result(connection._ssl))
    except Exception:
        return 0


def verify_error_text(errno: int) -> str:
    """
    OpenSSL's words for an X509 verification error code.
    """
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:
        return f"certificate verification error {errno}"
