"""
The lean accept (wingate_map.relay._accept): a plain mapping's connections are accepted without
a Twisted transport, not registered with the reactor, and not read until the session is allowed;
their socket goes to the socket pump, or (a TLS destination) is promoted to a real transport.
TCP_NODELAY and SO_KEEPALIVE come from the listening socket.  Over real loopback sockets.
"""

from __future__ import annotations

import socket
import struct

import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Server

from wingate_map.relay import ListeningPort
from wingate_map.relay._accept import AcceptedSocket, lean_of, promote, real_transport
from wingate_map.service._workers import ResetOnDeathFactory

from .helpers import Peer, PeerFactory, free_port, mapping_config, relay_of, start_service, wait_for


def reactor():
    from twisted.internet import reactor as r

    return r


def connect(port, peer):
    return connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), peer)


def listen(factory):
    return TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(factory)


class _Lean(Protocol):
    """
    A protocol that asks to be accepted lean (as a plain mapping's relay does) and records
    how its connection ends.
    """

    def __init__(self, lean: bool = True) -> None:
        self.lean = lean
        self.made: defer.Deferred[None] = defer.Deferred()
        self.reasons: list = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def lean_accept(self) -> bool:
        return self.lean

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason) -> None:
        self.reasons.append(reason)
        if not self.lost.called:
            self.lost.callback(None)


class _Factory(Factory):
    """
    Builds L{_Lean} protocols and keeps them in C{built}.
    """

    def __init__(self, lean: bool = True) -> None:
        self.lean = lean
        self.built: list[_Lean] = []

    def buildProtocol(self, addr):
        protocol = _Lean(self.lean)
        protocol.factory = self
        self.built.append(protocol)
        return protocol


def _listening(factory, interface="127.0.0.1"):
    port = ListeningPort(0, factory, 50, interface, reactor())
    port.startListening()
    return port


def _peek(sock: socket.socket) -> bytes:
    """
    What waits unread in C{sock}'s receive queue (left there).
    """
    try:
        return sock.recv(64, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


def _client(port, host: str = "127.0.0.1") -> socket.socket:
    """
    A blocking client socket connected to C{port} on C{host}.
    """
    client = socket.create_connection((host, port.getHost().port), timeout=20)
    return client


@defer.inlineCallbacks
def _accepted(lean: bool = True, wrap=lambda factory: factory, host: str = "127.0.0.1"):
    """
    A L{ListeningPort} on C{host} serving L{_Lean} protocols (through C{wrap}) and one client
    connected to it: (port, client socket, the accepted protocol).
    """
    factory = _Factory(lean)
    port = _listening(wrap(factory), host)
    client = _client(port, host)
    try:
        yield wait_for(lambda: factory.built and factory.built[0].transport is not None)
    except BaseException:
        client.close()
        yield port.stopListening()
        raise
    return port, client, factory.built[0]


@pytest_twisted.inlineCallbacks
def test_accepted_sockets_inherit_nodelay_and_keepalive_from_the_listening_socket():
    """
    Linux copies TCP_NODELAY and SO_KEEPALIVE from a listening socket to the sockets it
    accepts: set once on the listener, every client leg has them without a setsockopt.
    """
    port, client, protocol = yield _accepted()
    try:
        accepted = protocol.transport.getHandle()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_lean_connection_is_not_registered_and_closes_in_order_once():
    """
    A lean connection is an L{AcceptedSocket} the reactor does not watch (the client's bytes
    wait in the kernel); loseConnection sends a FIN and tells the protocol ConnectionDone once,
    a reactor turn later, even if asked twice or aborted after.
    """
    port, client, protocol = yield _accepted()
    try:
        lean = protocol.transport
        assert type(lean) is AcceptedSocket and lean_of(lean) is lean
        assert lean not in reactor().getReaders() and lean not in reactor().getWriters()
        assert lean.peer == client.getsockname() and lean.local() == client.getpeername()
        assert (lean.getPeer().host, lean.getPeer().port) == client.getsockname()
        assert (lean.getHost().host, lean.getHost().port) == client.getpeername()
        client.sendall(b"held")
        yield wait_for(lambda: _peek(lean.socket) == b"held")  # in the kernel: not read
        lean.loseConnection()
        lean.loseConnection()
        lean.abortConnection()
        assert protocol.reasons == []  # a reactor turn later, as Twisted's transports do
        yield protocol.lost
        assert len(protocol.reasons) == 1 and protocol.reasons[0].check(ConnectionDone)
        assert lean.fileno() == -1 and lean.getHandle() is None
        client.settimeout(20)
        try:
            data = client.recv(16)
        except ConnectionResetError:
            data = None  # unread bytes make Linux reset after the FIN, as for tcp.Server
        assert data in (b"", None)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_lean_addresses_over_ipv6_and_on_a_wildcard_address():
    """
    The peer's and this side's addresses of a lean connection are what Twisted's transports
    give, over IPv6 and on a wildcard listener (where this side's address is the socket's own).
    """
    for host, connect_to in (("::1", "::1"), ("0.0.0.0", "127.0.0.1")):
        factory = _Factory()
        port = _listening(factory, host)
        client = _client(port, connect_to)
        try:
            yield wait_for(lambda: factory.built and factory.built[0].transport is not None)
            lean = factory.built[0].transport
            assert type(lean) is AcceptedSocket
            assert lean.peer == client.getsockname()[:2] and lean.local() == client.getpeername()[:2]
            assert (lean.getPeer().host, lean.getPeer().port) == lean.peer
            assert (lean.getHost().host, lean.getHost().port) == lean.local()
            assert (port.local is None) == (host == "0.0.0.0")
            lean.loseConnection()
            yield factory.built[0].lost
        finally:
            client.close()
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_aborting_a_lean_connection_resets_it():
    """
    abortConnection resets the connection (the client sees ECONNRESET) and tells the protocol
    ConnectionAborted once.
    """
    port, client, protocol = yield _accepted()
    try:
        protocol.transport.abortConnection()
        protocol.transport.loseConnection()
        yield protocol.lost
        assert len(protocol.reasons) == 1 and protocol.reasons[0].check(ConnectionAborted)
        client.settimeout(20)
        try:
            client.recv(16)
            reset = False
        except ConnectionResetError:
            reset = True
        assert reset
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_connections_that_are_not_lean_get_twisted_transports():
    """
    A protocol that does not ask for the lean accept (TLS, PROXY header, peek_sni, the socket
    pump off) gets Twisted's tcp.Server, reading, as from listenTCP.
    """
    port, client, protocol = yield _accepted(lean=False)
    try:
        transport = protocol.transport
        assert type(transport) is Server and lean_of(transport) is None
        assert real_transport(transport) is transport
        assert transport in reactor().getReaders()
        transport.loseConnection()
        yield protocol.lost
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_promotion_gives_the_protocol_a_real_transport_on_the_same_socket():
    """
    Promoting a lean connection (a session relayed through Twisted's transports) gives the
    protocol a tcp.Server on the same socket, paused until the relay resumes it; under a
    worker's reset-on-death wrapper the wrapper's transport is replaced.
    """
    port, client, protocol = yield _accepted(wrap=ResetOnDeathFactory)
    try:
        wrapper = protocol.transport
        lean = lean_of(wrapper)
        assert lean is not None and wrapper is not lean
        # The wrapper set the reset linger on the lean socket at once.
        assert struct.unpack("ii", lean.socket.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
        fd = lean.fileno()
        assert real_transport(wrapper) is wrapper
        server = wrapper.transport
        assert type(server) is Server and server.fileno() == fd
        assert server not in reactor().getReaders()  # paused
        assert promote(lean) is None  # handed on: once
        server.resumeProducing()
        client.sendall(b"now")
        received = []
        protocol.dataReceived = received.append
        yield wait_for(lambda: received == [b"now"])
        wrapper.loseConnection()
        yield protocol.lost
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_workers_listening_factory_keeps_no_session_the_pump_took():
    """
    A worker's reset-on-death wrapper never hears connectionLost for a connection whose socket
    the pump took; its listening factory must not keep such wrappers (every ended session
    would stay in memory for the worker's life).
    """
    port, client, protocol = yield _accepted(wrap=ResetOnDeathFactory)
    wrapping = port.factory
    try:
        sock = lean_of(protocol.transport).take()  # what the pump does
        sock.close()
        assert not getattr(wrapping, "protocols", None)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_plain_session_is_accepted_lean_and_read_only_once_allowed():
    """
    Through the service: a plain mapping's client is accepted lean, nothing it sent is read
    while ClientConnect is undecided (the bytes wait in the kernel, the socket is not watched),
    and once allowed the pump takes the socket and relays them.
    """
    servers = PeerFactory(payload=b"answer")
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    allow = sink.allow = defer.Deferred()
    try:
        client = Peer(payload=b"question")
        yield connect(port, client)
        yield wait_for(lambda: len(sink.of("ClientConnect")) == 1)
        [session] = service.sessions.live()
        relay = relay_of(session)
        lean = lean_of(relay.transport)
        assert lean is not None and lean not in reactor().getReaders()
        yield wait_for(lambda: _peek(lean.socket) == b"question")
        assert servers.peers == []
        allow.callback(True)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert servers.peers[0].digest.digest() == __import__("hashlib").sha256(b"question").digest()
        assert (event["bytes_from_client"], event["bytes_to_client"]) == (8, 6)
        assert lean.socket is None  # handed to the pump
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_lean_session_killed_while_being_decided_ends_once_with_a_reset():
    """
    Killed (admin, shutdown) while ClientConnect is undecided, a lean session ends with exactly
    one ClientDisconnect and the client sees the connection reset.
    """
    server_port = yield listen(PeerFactory())
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    allow = sink.allow = defer.Deferred()
    try:
        client = Peer()
        yield connect(port, client)
        yield wait_for(lambda: len(sink.of("ClientConnect")) == 1)
        [session] = service.sessions.live()
        assert lean_of(relay_of(session).transport) is not None
        assert service.sessions.kill(session.id)
        allow.callback(True)
        reason = yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "killed"
        assert not isinstance(reason, ConnectionDone)
        assert len(sink.of("ClientDisconnect")) == 1 and service.sessions.live() == []
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_refused_lean_session_is_closed_with_both_events():
    """
    A session a sink refuses is closed in order (a FIN), with one ClientConnect and one
    ClientDisconnect.
    """
    server_port = yield listen(PeerFactory())
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    sink.allow = False
    try:
        client = Peer()
        yield connect(port, client)
        reason = yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "blocked"
        assert isinstance(reason, ConnectionDone)
        assert len(sink.of("ClientConnect")) == 1
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_peek_sni_mapping_is_not_accepted_lean():
    """
    A mapping that reads the client before deciding (peek_sni) keeps Twisted's transport.
    """
    server_port = yield listen(PeerFactory())
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)], "peek_sni = true\npeek_timeout = 30"))
    try:
        client = Peer(payload=b"not a ClientHello", half_close=False, close_on_eof=False)
        yield connect(port, client)
        yield wait_for(lambda: len(service.sessions.live()) == 1)
        relay = relay_of(service.sessions.live()[0])
        assert lean_of(relay.transport) is None and not relay.lean_accept()
        client.transport.loseConnection()
        yield sink.disconnects(1)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def test_which_mappings_are_accepted_lean():
    """
    Only a mapping that reads nothing of the client before deciding is accepted lean: not one
    with a TLS listener, a PROXY header from clients or peek_sni, nor with the socket pump off.
    """
    import attrs

    from wingate_map.config import Destination
    from wingate_map.relay import RelayProtocol
    from wingate_map.testing import RelayHarness, simple_mapping

    def lean(mapping, socket_pump=True):
        runtime = RelayHarness(mapping).factory.runtime
        runtime.socket_pump = socket_pump
        return RelayProtocol(runtime).lean_accept()

    plain = simple_mapping(Destination(host="127.0.0.1", port=9))
    assert lean(plain)
    assert not lean(plain, socket_pump=False)
    assert not lean(attrs.evolve(plain, proxy_protocol=True))
    assert not lean(attrs.evolve(plain, peek_sni=True))
    assert not lean(attrs.evolve(plain, tls=object()))


@pytest_twisted.inlineCallbacks
def test_a_burst_is_accepted_in_one_read_as_twisted_does():
    """
    The port's own accept loop takes every connection waiting in one read, each with its own
    protocol and session number in order and a socket of the listener's family and type, and
    adapts how many it tries next time as C{Port.doRead} does.
    """
    factory = _Factory()
    port = _listening(factory)
    port.stopReading()  # accepted only by the doRead calls below
    clients = [_client(port) for _ in range(3)]
    try:
        port.numberAccepts = 100
        port.doRead()
        assert [p.transport.sessionno for p in factory.built] == [0, 1, 2]
        assert {p.transport.peer for p in factory.built} == {c.getsockname() for c in clients}
        for protocol in factory.built:
            sock = protocol.transport.socket
            assert (sock.family, sock.type, sock.gettimeout()) == (socket.AF_INET, socket.SOCK_STREAM, 0.0)
        assert port.numberAccepts == 3
        port.doRead()  # nothing waiting
        assert len(factory.built) == 3 and port.numberAccepts == 1
        clients.append(_client(port))
        port.doRead()
        assert len(factory.built) == 4 and port.numberAccepts == 21  # its limit (1) reached: 20 more
    finally:
        for c in clients:
            c.close()
        for protocol in factory.built:
            protocol.transport.abortConnection()
        yield port.stopListening()


class _FailingOnce:
    """
    A listening socket whose next C{_accept} fails with C{errno}; everything else is the real
    socket's.
    """

    def __init__(self, sock: socket.socket, errno: int) -> None:
        self._sock = sock
        self._errno = errno

    def _accept(self):
        if self._errno:
            errno, self._errno = self._errno, 0
            raise OSError(errno, "failing once")
        return self._sock._accept()

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest_twisted.inlineCallbacks
def test_an_accept_error_is_left_to_twisted():
    """
    An accept that fails otherwise than "none waiting" (here EPERM, which Netfilter can cause)
    is handled by C{Port.doRead}: the connection waiting is accepted all the same.
    """
    import errno

    factory = _Factory()
    port = _listening(factory)
    port.stopReading()
    client = _client(port)
    real = port.socket
    try:
        port.socket = _FailingOnce(real, errno.EPERM)
        port.doRead()
        assert len(factory.built) == 1 and factory.built[0].transport.peer == client.getsockname()
    finally:
        port.socket = real
        client.close()
        for protocol in factory.built:
            protocol.transport.abortConnection()
        yield port.stopListening()
