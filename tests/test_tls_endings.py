"""
How sessions on a TLS listener end, over real sockets: a client that closes TCP without a TLS
close_notify (what a killed C{openssl s_client} does), every refused session, and a client that
half-closes while its destination is still being chosen or connected.  Each must release the
client's socket and leave the session registry.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from wingate_map.testing import RecordingSink

from .helpers import Peer, PeerFactory, free_port, open_fds, start_service, wait_for
from .pki import PKI
from .test_integration import listen, reactor


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path)


@implementer(IHandshakeListener)
class TLSClient(protocol.Protocol):
    """
    A TLS client whose TCP socket the test can close or half-close behind TLS's back (no
    close_notify), as a killed C{openssl s_client} or a careless client does.

    @ivar handshake: fires once the TLS handshake is done.
    @ivar lost: fires with the reason (an exception) when the connection is gone.
    """

    def __init__(self) -> None:
        self.received = b""
        self.handshake: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(reason.value)

    @property
    def tcp(self):
        """
        The TCP transport under TLS.
        """
        return self.transport.transport


def listener_config(pki, port, destination, extra=""):
    """
    One mapping on 127.0.0.1:C{port} accepting TLS, with C{destination} (TOML lines: its
    default and rules); a short drain so that a leaked session fails a test quickly.
    """
    cert, key = pki.server()
    return (
        "[service]\ndrain_timeout = 1\n"
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\n'
        f'tls = {{ cert = "{cert}", key = "{key}" }}\n'
        f"{destination}\n{extra}\n"
    )


class _NoCloseNotify(TLSMemoryBIOProtocol):
    """
    Twisted's TLS, except that it never sends close_notify: when the listener closes TLS, it
    closes its TCP connection without answering, as curl and openssl s_client do.
    """

    def _shutdownTLS(self):
        pass


class _NoCloseNotifyFactory(TLSMemoryBIOFactory):
    """
    Builds L{_NoCloseNotify} TLS connections.
    """

    protocol = _NoCloseNotify


def tls_connect(pki, port, client):
    """
    Connect C{client} over TLS (verifying the listener against the test CA), with a TLS
    client that never sends close_notify.
    """
    trust = Certificate.loadPEM(open(pki.ca, "rb").read())
    factory = _NoCloseNotifyFactory(optionsForClientTLS("localhost", trustRoot=trust), True, protocol.Factory.forProtocol(lambda: client))
    return TCP4ClientEndpoint(reactor(), "127.0.0.1", port).connect(factory)


@pytest_twisted.inlineCallbacks
def test_clients_closing_without_close_notify_leave_nothing_behind(pki):
    """
    100 TLS clients each send a request and close their TCP connection without a TLS
    close_notify (like a killed openssl s_client): every session ends, the destination sees
    each request followed by a FIN, and no session or file descriptor is left behind.
    """
    servers = PeerFactory(payload=b"", half_close=False)
    dest = yield listen(servers)
    port = free_port()
    service, sink = start_service(listener_config(pki, port, f'default = {{ host = "127.0.0.1", port = {dest.getHost().port} }}'))
    try:
        before = open_fds()
        for batch in range(4):
            clients = [TLSClient() for _ in range(25)]
            yield defer.gatherResults([tls_connect(pki, port, c) for c in clients])
            yield defer.gatherResults([c.handshake for c in clients])
            for c in clients:
                c.transport.write(b"request")
            yield wait_for(lambda: sum(p.received == 7 for p in servers.peers) == 25 * (batch + 1))
            for c in clients:
                c.tcp.loseConnection()
            yield defer.gatherResults([c.lost for c in clients])
        yield wait_for(lambda: len(service.sessions) == 0 and open_fds() <= before, timeout=60)
        events = sink.of("ClientDisconnect")
        assert [e["reason"] for e in events] == ["client-closed"] * 100
        assert all(p.received == 7 and p.eof_seen for p in servers.peers)
    finally:
        yield service.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_without_close_notify_is_passed_on(pki):
    """
    A TLS client sends a request and shuts down the sending side of its TCP connection with
    no close_notify: the destination sees the request and EOF, its answer (sent after that)
    reaches the client, and the session ends once the destination closes too.
    """
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    port = free_port()
    service, sink = start_service(listener_config(pki, port, f'default = {{ host = "127.0.0.1", port = {dest.getHost().port} }}'))
    try:
        client = TLSClient()
        yield tls_connect(pki, port, client)
        yield client.handshake
        client.transport.write(b"request")
        client.tcp.loseWriteConnection()
        server = yield servers.next_peer(0)
        yield server.eof
        assert server.received == 7
        server.transport.write(b"answer after EOF")
        server.transport.loseConnection()
        yield client.lost
        assert client.received == b"answer after EOF"
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "client-closed"
        yield wait_for(lambda: len(service.sessions) == 0)
    finally:
        yield service.stopService()
        yield dest.stopListening()


REFUSALS = {
    "connect-failed": lambda dest: f'default = {{ host = "127.0.0.1", port = {free_port()} }}',
    "no-destination": lambda dest: "",
    "rejected": lambda dest: f'default = {{ host = "127.0.0.1", port = {dest} }}\n[[mappings.m.rules]]\nfrom = ["127.0.0.0/8"]\naction = "reject"',
    "blocked": lambda dest: f'default = {{ host = "127.0.0.1", port = {dest} }}',
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
@pytest_twisted.inlineCallbacks
def test_refused_sessions_release_the_client_at_once(pki, reason):
    """
    A session refused on a TLS listener (connect-failed, no-destination, rejected, blocked)
    is closed at once, even for a client that closes without answering close_notify: its
    socket is released and it leaves the live sessions.
    """
    servers = PeerFactory(payload=b"", half_close=False)
    dest = yield listen(servers)
    port = free_port()
    service, sink = start_service(listener_config(pki, port, REFUSALS[reason](dest.getHost().port)))
    sink.allow = reason != "blocked"
    try:
        before = open_fds()
        clients = [TLSClient() for _ in range(5)]
        yield defer.gatherResults([tls_connect(pki, port, c) for c in clients])
        yield defer.gatherResults([c.lost for c in clients])
        yield wait_for(lambda: len(sink.of("ClientDisconnect")) == 5)
        events = sink.of("ClientDisconnect")
        assert [e["reason"] for e in events] == [reason] * 5
        yield wait_for(lambda: len(service.sessions) == 0 and open_fds() <= before)
        assert servers.peers == []
    finally:
        yield service.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_one_attempt_over_the_client_limit_does_not_lock_the_client_out(pki):
    """
    With max_connections_per_client = 1 on a TLS listener, a second connection while the
    first is live is refused and released at once; once the first has ended, the client is
    served again.
    """
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    port = free_port()
    service, sink = start_service(
        listener_config(pki, port, f'default = {{ host = "127.0.0.1", port = {dest.getHost().port} }}', extra="max_connections_per_client = 1")
    )
    try:
        first = TLSClient()
        yield tls_connect(pki, port, first)
        yield servers.next_peer(0)
        second = TLSClient()
        yield tls_connect(pki, port, second)
        yield second.lost
        first.tcp.loseConnection()
        servers.peers[0].transport.loseConnection()
        yield first.lost
        yield wait_for(lambda: len(service.sessions) == 0)
        third = TLSClient()
        yield tls_connect(pki, port, third)
        yield third.handshake
        yield servers.next_peer(1)
        third.transport.write(b"hello")
        yield servers.peers[1].when_received(5)
        third.tcp.loseConnection()
        servers.peers[1].transport.loseConnection()
        yield third.lost
        yield wait_for(lambda: len(service.sessions) == 0)
    finally:
        yield service.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_while_the_destination_is_chosen(pki):
    """
    A TLS client that sends its request and half-closes (close_notify) right after its
    handshake, while the ClientConnect chain is still deciding, is not closed: the request
    and the half-close reach the destination, and its answer reaches the client.
    """
    from wingate_map.tls import ClientTls, client_creator, half_close_tls_factory

    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    port = free_port()
    service, sink = start_service(listener_config(pki, port, f'default = {{ host = "127.0.0.1", port = {dest.getHost().port} }}'))
    sink.allow = defer.Deferred()
    try:
        client = Peer(payload=b"request")
        factory = half_close_tls_factory(client_creator("localhost", ClientTls(ca=pki.ca)), True, protocol.Factory.forProtocol(lambda: client))
        yield TCP4ClientEndpoint(reactor(), "127.0.0.1", port).connect(factory)
        yield wait_for(lambda: sink.of("ClientConnect") != [])
        sink.allow.callback(True)
        yield wait_for(lambda: servers.peers and servers.peers[0].eof_seen)
        server = servers.peers[0]
        assert server.received == 7
        server.transport.write(b"answer after EOF")
        server.transport.loseWriteConnection()
        yield wait_for(lambda: client.lost.called)
        assert client.first_bytes == b"answer after EOF"
        yield wait_for(lambda: len(service.sessions) == 0)
        assert sink.of("ClientDisconnect")[0]["reason"] == "client-closed"
    finally:
        yield service.stopService()
        yield dest.stopListening()
