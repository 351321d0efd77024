"""
The reason logged for a failed TLS handshake names the real cause: with C{verify = false} no
certificate check is blamed, and a TLS alert from the peer (a server that requires a client
certificate, a peer that refuses ours) is said in words.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.test.iosim import connectedServerAndClient

from wingate_map.config._model import ClientTls, ServerTls
from wingate_map.tls import client_creator, describe_tls_failure, half_close_tls_factory, server_options

from .helpers import Peer, free_port, start_service
from .pki import PKI
from .test_end_to_end import wait_port
from .test_integration import connect
from .test_tls import Recorder, tls_destination_config

CERTIFICATE_REQUIRED = 'the server requires a client certificate and none was sent (TLS alert "certificate required"): set client_cert and client_key'


@pytest.fixture
def pki(tmp_path):
    """
    A test CA with its certificates in C{tmp_path}.
    """
    return PKI(tmp_path)


def _failed_handshake(server_tls: ServerTls, client_tls: ClientTls) -> str:
    """
    Connect our TLS client to a TLS server in memory; the reason the client's side gives.
    """
    server_factory = half_close_tls_factory(server_options(server_tls), False, protocol.Factory.forProtocol(Recorder))
    client_factory = half_close_tls_factory(client_creator("localhost", client_tls), True, protocol.Factory.forProtocol(Recorder))
    inner = []

    def make_client():
        p = client_factory.buildProtocol(None)
        inner.append(p.wrappedProtocol)
        return p

    client, _, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None), make_client)
    pump.flush()
    assert inner[0].lost is not None, "the handshake should have failed"
    return describe_tls_failure(client, inner[0].lost)


@pytest.mark.parametrize("verify", [False, True])
def test_server_requiring_client_certificate(pki, verify):
    """
    A destination that requires a client certificate, reached without one: the reason says so
    and what to set, with verify = false too (where OpenSSL's unchecked verdict on the
    server's certificate is not the cause and is not blamed).
    """
    cert, key = pki.server()
    client_tls = ClientTls(ca=pki.ca) if verify else ClientTls(verify=False)
    why = _failed_handshake(ServerTls(cert=cert, key=key, client_ca=pki.ca), client_tls)
    assert why == CERTIFICATE_REQUIRED


def test_server_refusing_our_client_certificate(pki, tmp_path):
    """
    A client certificate the destination does not trust: the reason names the peer's alert.
    """
    cert, key = pki.server()
    (tmp_path / "other").mkdir()
    other = PKI(tmp_path / "other", name="another CA")
    stranger_cert, stranger_key = other.client("stranger")
    why = _failed_handshake(ServerTls(cert=cert, key=key, client_ca=pki.ca), ClientTls(verify=False, client_cert=stranger_cert, client_key=stranger_key))
    assert why == 'the peer refused our certificate (TLS alert "unknown ca")'


def test_verification_still_blamed_when_checked(pki):
    """
    With verify on, an untrusted server certificate is still the reason given.
    """
    cert, key = pki.unknown_ca()
    why = _failed_handshake(ServerTls(cert=cert, key=key), ClientTls(ca=pki.ca))
    assert why.startswith("certificate verification failed: ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest_twisted.inlineCallbacks
def test_openssl_server_requiring_client_certificate(pki, caplog_twisted):
    """
    Against openssl s_server -Verify 1 (a client certificate required) with verify = false and
    no client_cert, the session ends with tls-failed and the log names the missing client
    certificate, not a certificate verification.
    """
    cert, key = pki.server()
    server_port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{server_port}", "-cert", cert, "-key", key, "-CAfile", pki.ca, "-Verify", "1", "-quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    service = None
    try:
        wait_port(server_port)
        port = free_port()
        service, sink = start_service(tls_destination_config(port, server_port, verify=False))
        client = Peer(payload=b"hello", half_close=False)
        yield connect(port, client)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "tls-failed"
        failures = [line for line in caplog_twisted if "TLS with 127.0.0.1:" in line]
        assert failures and all(line.endswith(f"failed: {CERTIFICATE_REQUIRED}") for line in failures), failures
    finally:
        if service is not None:
            yield service.stopService()
        server.kill()
        server.wait()
