"""
TLS on both legs: option building and an in-memory handshake, configuration errors, and real
sockets with certificates made at test time (success, each failure and its reason,
verify = false, mutual TLS, chained instances, half-close over TLS).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from wingate_map.config import parse_config
from wingate_map.errors import ConfigError
from wingate_map.tls import (
    ClientTls,
    ServerTls,
    client_creator,
    half_close_tls_factory,
    load_certificates,
    load_private_key,
    server_options,
    subject_common_name,
)

from .helpers import Peer, PeerFactory, free_port, half_close_exchange, start_service, wait_for
from .pki import PKI
from .test_integration import connect, listen, reactor

MB = 1024 * 1024


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Recorder(protocol.Protocol):
    """
    Records what happens on one side of an in-memory TLS connection.
    """

    def __init__(self):
        self.data = b""
        self.handshake = False
        self.eof = False
        self.lost = None

    def handshakeCompleted(self):
        self.handshake = True

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.lost = reason


def in_memory(server_tls: ServerTls, host: str, client_tls: ClientTls):
    servers, clients = [], []
    server_factory = half_close_tls_factory(server_options(server_tls), False, protocol.Factory.forProtocol(Recorder))
    client_factory = half_close_tls_factory(client_creator(host, client_tls), True, protocol.Factory.forProtocol(Recorder))

    def make_server():
        p = server_factory.buildProtocol(None)
        servers.append(p.wrappedProtocol)
        return p

    def make_client():
        p = client_factory.buildProtocol(None)
        clients.append(p.wrappedProtocol)
        return p

    client, server, pump = connectedServerAndClient(make_server, make_client)
    pump.flush()
    # The TLS wrappers drop their wrapped protocol when the connection is lost: keep ours.
    client.recorder, server.recorder = clients[0], servers[0]
    return client, server, pump


def test_in_memory_handshake_and_half_close(pki):
    """
    A verified handshake with a client certificate completes in memory; the server sees the
    client's CN; data flows; a close_notify from either side is a half-close the other side
    can still answer after.
    """
    cert, key = pki.server()
    alice_cert, alice_key = pki.client("alice")
    client, server, pump = in_memory(
        ServerTls(cert=cert, key=key, client_ca=pki.ca),
        "localhost",
        ClientTls(ca=pki.ca, client_cert=alice_cert, client_key=alice_key),
    )
    inner_client, inner_server = client.recorder, server.recorder
    assert inner_client.handshake and inner_server.handshake
    assert subject_common_name(server.getPeerCertificate()) == "alice"
    client.write(b"request")
    client.loseWriteConnection()
    pump.flush()
    assert inner_server.data == b"request" and inner_server.eof
    assert inner_server.lost is None
    server.write(b"answer after EOF")
    server.loseWriteConnection()
    pump.flush()
    assert inner_client.data == b"answer after EOF" and inner_client.eof
    pump.flush()
    assert inner_client.lost is not None and inner_server.lost is not None  # both halves done: closed


@pytest.mark.parametrize(
    "names, host, client_settings, expect",
    [
        (("localhost",), "localhost", {}, True),
        (("localhost",), "otherhost", {}, False),
        (("localhost",), "127.0.0.1", {"server_name": "localhost"}, True),
        (("otherhost",), "localhost", {"verify": False}, True),
    ],
)
def test_client_options_trust_and_sni(pki, names, host, client_settings, expect):
    """
    The destination's certificate is checked against ca and server_name (default: host);
    verify = false skips the check.
    """
    cert, key = pki.server(names=names)
    client, server, pump = in_memory(ServerTls(cert=cert, key=key), host, ClientTls(ca=pki.ca, **client_settings))
    assert client.recorder.handshake is expect


def test_unknown_ca_fails_and_system_store_is_default(pki):
    """
    A server certificate from a CA the client does not trust fails; with no ca the system
    trust store is used (which does not know our private CA either).
    """
    cert, key = pki.unknown_ca()
    client, _, _ = in_memory(ServerTls(cert=cert, key=key), "localhost", ClientTls(ca=pki.ca))
    assert not client.recorder.handshake
    cert, key = pki.server()
    client, _, _ = in_memory(ServerTls(cert=cert, key=key), "localhost", ClientTls())
    assert not client.recorder.handshake


def test_min_tls(pki):
    """
    A listener with min_tls = 1.3 refuses a client that offers at most TLS 1.2.
    """
    from OpenSSL import SSL
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    cert, key = pki.server()

    @implementer(IOpenSSLClientConnectionCreator)
    class TLS12Only:
        def clientConnectionForTLS(self, tls_protocol):
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            connection = SSL.Connection(context, None)
            connection.set_app_data(tls_protocol)
            return connection

    creator = TLS12Only()
    server_factory = half_close_tls_factory(server_options(ServerTls(cert=cert, key=key, min_tls="1.3")), False, protocol.Factory.forProtocol(Recorder))
    client_factory = half_close_tls_factory(creator, True, protocol.Factory.forProtocol(Recorder))
    made = []

    def make_client():
        p = client_factory.buildProtocol(None)
        made.append(p.wrappedProtocol)
        return p

    connectedServerAndClient(lambda: server_factory.buildProtocol(None), make_client)
    assert not made[0].handshake


def test_server_declines_alpn_instead_of_failing(pki):
    """
    A client offering ALPN protocols the relay does not speak (curl offers h2, http/1.1) still
    completes the handshake, with no protocol negotiated.
    """
    cert, key = pki.server()
    creator = client_creator("localhost", ClientTls(ca=pki.ca))
    inner = creator._inner
    original = inner._createConnection

    def offering(tls_protocol):
        connection = original(tls_protocol)
        connection.set_alpn_protos([b"h2", b"http/1.1"])
        return connection

    inner._createConnection = offering
    server_factory = half_close_tls_factory(server_options(ServerTls(cert=cert, key=key)), False, protocol.Factory.forProtocol(Recorder))
    client_factory = half_close_tls_factory(creator, True, protocol.Factory.forProtocol(Recorder))
    client, server, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None))
    pump.flush()
    assert client.wrappedProtocol.handshake and server.negotiatedProtocol is None


# -- configuration ---------------------------------------------------------------------------


def config_problems(text):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [str(p) for p in info.value.problems]


def test_config_errors(pki, tmp_path):
    """
    Unreadable or mismatched certificate and key, a CA file with no certificate, min_tls out
    of range and TLS keys without tls = true are errors at load time naming the key.
    """
    cert, key = pki.server()
    other_cert, other_key = pki.client("bob")
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    problems = config_problems(
        f"""
[mappings.a]
port = 1
tls = {{ cert = "{cert}", key = "{other_key}" }}
[mappings.b]
port = 2
tls = {{ cert = "{tmp_path}/missing.pem" }}
[mappings.c]
port = 3
tls = {{ cert = "{cert}", key = "{key}", client_ca = "{empty}", min_tls = "1.1" }}
[mappings.d]
port = 4
default = {{ host = "a", port = 1, ca = "{pki.ca}" }}
[mappings.e]
port = 5
default = {{ host = "a", port = 1, tls = true, ca = "{empty}", min_tls = "2" }}
"""
    )
    assert f"mappings.a.tls.cert: the key in {other_key} does not match the certificate in {cert}" in problems
    assert f"mappings.b.tls.cert: cannot read {tmp_path}/missing.pem: No such file or directory" in problems
    assert f"mappings.c.tls.client_ca: {empty} contains no PEM certificate" in problems
    assert 'mappings.c.tls.min_tls: "1.1" is not allowed; expected one of "1.2", "1.3"' in problems
    assert "mappings.d.default.ca: is only allowed with tls = true" in problems
    assert f"mappings.e.default.ca: {empty} contains no PEM certificate" in problems
    assert 'mappings.e.default.min_tls: "2" is not allowed; expected one of "1.2", "1.3"' in problems


def test_verify_false_and_expired_are_warned(pki):
    """
    verify = false and an expired listener certificate are allowed, with a warning.
    """
    cert, key = pki.server(label="old", expired=True)
    config = parse_config(
        f'[mappings.a]\nport = 1\ntls = {{ cert = "{cert}", key = "{key}" }}\n'
        f'default = {{ host = "a", port = 1, tls = true, verify = false }}\n'
    )
    warnings = [str(w) for w in config.warnings]
    assert any(w.startswith("mappings.a.default.verify: false: the destination's certificate and name are NOT checked") for w in warnings)
    assert any(w.startswith(f"mappings.a.tls.cert: the certificate in {cert} expired on") for w in warnings)


def test_key_in_cert_file_and_chain(pki, tmp_path):
    """
    The key may sit in the certificate file, and a chain after the certificate is kept.
    """
    cert, key = pki.server()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(open(cert, "rb").read() + open(pki.ca, "rb").read() + open(key, "rb").read())
    config = parse_config(f'[mappings.a]\nport = 1\ntls = {{ cert = "{combined}" }}\n')
    assert config.mappings[0].tls.key == str(combined)
    assert len(load_certificates(str(combined))) == 2
    assert load_private_key(str(combined)) is not None


# -- real sockets -----------------------------------------------------------------------------


def tls_destination_config(port, server_port, **options):
    """
    One mapping on 127.0.0.1:C{port} with a TLS destination at C{server_port}.
    """
    settings = ", ".join(f"{k} = {v!r}".replace("'", '"').replace("True", "true").replace("False", "false") for k, v in options.items())
    return (
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\n'
        f'default = {{ host = "127.0.0.1", port = {server_port}, tls = true, {settings} }}\n'
    )


@defer.inlineCallbacks
def tls_server(cert, key, **peer):
    """
    A plain Twisted TLS server (not wingatemap's TLS code) with a Peer behind it.
    """
    from OpenSSL import crypto

    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(load_private_key(key)),
        certificate=crypto.X509.from_cryptography(load_certificates(cert)[0]),
    )
    peers = PeerFactory(**peer)
    port = yield listen(TLSMemoryBIOFactory(options, False, peers))
    return port, peers


@pytest_twisted.inlineCallbacks
def test_tls_destination_carries_data(pki):
    """
    A mapping with a verified TLS destination carries 1 MB each way intact.
    """
    cert, key = pki.server()
    down = os.urandom(MB)
    server_port, servers = yield tls_server(cert, key, payload=down, half_close=False)
    port = free_port()
    service, sink = start_service(tls_destination_config(port, server_port.getHost().port, ca=pki.ca, server_name="localhost"))
    try:
        up = os.urandom(MB)
        client = Peer(payload=up, half_close=False, close_on_eof=False)
        yield connect(port, client)
        server = yield servers.next_peer(0)
        yield server.when_received(MB)
        yield client.when_received(MB)
        assert hashlib.sha256(up).hexdigest() == server.digest.hexdigest()
        assert hashlib.sha256(down).hexdigest() == client.digest.hexdigest()
        client.transport.loseConnection()
        [event] = yield sink.disconnects(1)
        assert event["bytes_from_client"] == MB and event["bytes_to_client"] == MB
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("wrong-name", "certificate name mismatch: the certificate is not valid for localhost"),
        ("expired", "certificate verification failed: certificate has expired"),
        ("unknown-ca", "certificate verification failed: unable to get local issuer certificate"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_tls_destination_failures(pki, kind, message, caplog_twisted):
    """
    A destination whose certificate has the wrong name, has expired or comes from an unknown
    CA: the session ends with tls-failed, the log says why, and not one client byte reaches
    the destination.
    """
    if kind == "wrong-name":
        cert, key = pki.server(names=("elsewhere.example",))
    elif kind == "expired":
        cert, key = pki.server(label="expired", expired=True)
    else:
        cert, key = pki.unknown_ca()
    server_port, servers = yield tls_server(cert, key, payload=b"", half_close=False)
    port = free_port()
    service, sink = start_service(tls_destination_config(port, server_port.getHost().port, ca=pki.ca, server_name="localhost"))
    try:
        client = Peer(payload=b"secret data that must not leak", half_close=False)
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "tls-failed" and event["bytes_from_client"] == 0
        assert all(p.received == 0 for p in servers.peers)
        assert any(message in line for line in caplog_twisted), [l for l in caplog_twisted if "TLS" in l]
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_verify_false_reaches_unverifiable_destination(pki):
    """
    verify = false connects to a destination no CA vouches for (and still encrypts).
    """
    cert, key = pki.unknown_ca()
    server_port, servers = yield tls_server(cert, key, payload=b"hello", half_close=False)
    port = free_port()
    service, sink = start_service(tls_destination_config(port, server_port.getHost().port, verify=False))
    try:
        client = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connect(port, client)
        yield client.when_received(5)
        assert client.first_bytes == b"hello"
        client.transport.loseConnection()
        yield sink.disconnects(1)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def chain_config(pki, a_port, b_port, dest_port, tmp_path):
    """
    Two instances: A (plain in, TLS out with alice's certificate) -> B (TLS in requiring a
    client certificate, plain out).
    """
    server_cert, server_key = pki.server()
    alice_cert, alice_key = pki.client("alice")
    a = (
        f'[mappings.out]\nport = {a_port}\nbind = "127.0.0.1"\n'
        f'default = {{ host = "127.0.0.1", port = {b_port}, tls = true, ca = "{pki.ca}", server_name = "localhost", '
        f'client_cert = "{alice_cert}", client_key = "{alice_key}" }}\n'
    )
    b = (
        f'[users.alice]\nlocations = ["10.255.255.1"]\n'
        f'[mappings.in]\nport = {b_port}\nbind = "127.0.0.1"\n'
        f'tls = {{ cert = "{server_cert}", key = "{server_key}", client_ca = "{pki.ca}" }}\n'
        f'[[mappings.in.rules]]\nuser = "alice"\nto = {{ host = "127.0.0.1", port = {dest_port} }}\n'
    )
    return a, b


@pytest_twisted.inlineCallbacks
def test_chained_instances_mtls_20mb(pki, tmp_path):
    """
    Plain in, TLS out -> TLS in with a client certificate, plain out: 20 MB each way arrive
    intact, and the second instance recognises the client certificate as user alice
    (authenticated) on a TLS session.
    """
    down = os.urandom(20 * MB)
    servers = PeerFactory(payload=down)
    dest = yield listen(servers)
    a_port, b_port = free_port(), free_port()
    a_text, b_text = chain_config(pki, a_port, b_port, dest.getHost().port, tmp_path)
    b, b_sink = start_service(b_text)
    a, a_sink = start_service(a_text)
    try:
        up = os.urandom(20 * MB)
        client = Peer(payload=up)
        yield connect(a_port, client)
        yield client.lost
        server = servers.peers[0]
        yield server.lost
        assert hashlib.sha256(up).hexdigest() == server.digest.hexdigest()
        assert hashlib.sha256(down).hexdigest() == client.digest.hexdigest()
        [b_event] = yield b_sink.disconnects(1)
        assert (b_event["user"], b_event["identity"], b_event["tls"], b_event["rule"]) == ("alice", "authenticated", True, 0)
        assert b_event["bytes_from_client"] == 20 * MB and b_event["bytes_to_client"] == 20 * MB
        [a_event] = yield a_sink.disconnects(1)
        assert a_event["tls"] is False and a_event["bytes_to_client"] == 20 * MB
    finally:
        yield a.stopService()
        yield b.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_over_tls_chain(pki, tmp_path):
    """
    Over a TLS leg, a client's FIN is passed on as a half-close: the server sees EOF, answers
    after it, and the answer reaches the client; then the session ends cleanly.
    """
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    a_port, b_port = free_port(), free_port()
    a_text, b_text = chain_config(pki, a_port, b_port, dest.getHost().port, tmp_path)
    b, b_sink = start_service(b_text)
    a, a_sink = start_service(a_text)
    try:
        yield half_close_exchange(lambda peer: connect(a_port, peer), servers)
        [event] = yield b_sink.disconnects(1)
        assert event["reason"] == "client-closed"
    finally:
        yield a.stopService()
        yield b.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_listener_requires_client_certificate(pki, tmp_path, caplog_twisted):
    """
    With client_ca, a client without a certificate never becomes a session, and the failed
    handshake is logged with the peer.
    """
    servers = PeerFactory(payload=b"")
    dest = yield listen(servers)
    b_port = free_port()
    _, b_text = chain_config(pki, 1, b_port, dest.getHost().port, tmp_path)
    b, b_sink = start_service(b_text)
    try:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        creator = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(open(pki.ca, "rb").read()))
        client = Peer(payload=b"x", half_close=False)
        yield connectProtocol(wrapClientTLS(creator, TCP4ClientEndpoint(reactor(), "127.0.0.1", b_port)), client)
        yield client.lost
        assert b_sink.events == [] and servers.peers == []
        assert any("TLS handshake with 127.0.0.1:" in line and "failed" in line for line in caplog_twisted)
    finally:
        yield b.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_reload_rereads_certificates(pki, tmp_path):
    """
    A reload re-reads the listener's certificate files: connections after it are served the
    renewed certificate, while a session opened before it keeps flowing.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    from wingate_map import service_from_file

    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    cert, key = pki.issue("listener", "localhost", ("localhost",))
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f'[service]\ndrain_timeout = 0.5\n[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ntls = {{ cert = "{cert}", key = "{key}" }}\n'
        f'default = {{ host = "127.0.0.1", port = {dest.getHost().port} }}\n'
    )
    service = service_from_file(str(config), reactor=reactor())
    service.startService()
    trust = Certificate.loadPEM(open(pki.ca, "rb").read())

    @defer.inlineCallbacks
    def served_serial():
        client = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connectProtocol(wrapClientTLS(optionsForClientTLS("localhost", trustRoot=trust), TCP4ClientEndpoint(reactor(), "127.0.0.1", port)), client)
        yield wait_for(lambda: bool(client.transport.getPeerCertificate()))
        return client, client.transport.getPeerCertificate().get_serial_number()

    try:
        first, before = yield served_serial()
        pki.issue("listener", "localhost", ("localhost",))  # renewed in place: same paths
        assert service.reload() == []
        second, after = yield served_serial()
        assert after != before
        first.transport.write(b"old session")
        server = servers.peers[0]
        yield server.when_received(11)
        first.transport.loseConnection()
        second.transport.loseConnection()
    finally:
        yield service.stopService()
        yield dest.stopListening()
