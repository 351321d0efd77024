"""
The lean connect path (wingate_map.relay._connect): plain TCP destinations given as IP literals
are connected by hand (non-blocking connect_ex, writability, SO_ERROR) and their sockets go
straight to the socket pump, over real loopback sockets.  Every test here forbids the endpoint
path (the endpoint factory raises), so each passes only through the hand-made connect: bytes
relayed exactly both ways, half-close, resets, a refusal (connect-failed, failover to the next
destination), a black hole (connect-timeout, socket closed), and a worker's
reset-on-death linger on the new socket.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher

from wingate_map.relay import _destinations, _protocol
from wingate_map.relay._connect import DirectConnect, Route, direct_route, take_client
from wingate_map.service._workers import reset_on_death_reactor

from .helpers import Peer, PeerFactory, free_port, mapping_config, open_fds, start_service, wait_for

MB = 1 << 20


def reactor():
    from twisted.internet import reactor as r

    return r


@pytest.fixture
def no_endpoints(monkeypatch):
    """
    The endpoint path is forbidden: a destination that would go through it fails to connect.
    """

    def forbidden(self, destination, timeout, preamble=b""):
        raise AssertionError("endpoint path used")

    monkeypatch.setattr(_destinations.StandardEndpointFactory, "endpoint_for_destination", forbidden)


@pytest.fixture
def warnings():
    """
    The text of every log event of this test.
    """
    seen: list[str] = []

    def observe(event):
        fmt = event.get("log_format")
        if fmt:
            try:
                seen.append(fmt.format(**event))
            except Exception:
                pass

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


class ConnectOwner:
    """
    Records how a hand-started connect ended (an IConnectOwner).
    """

    def __init__(self):
        self.succeeded = []
        self.failed = []

    def connect_succeeded(self, connect):
        self.succeeded.append(connect)

    def connect_failed(self, failure, timed_out):
        self.failed.append((failure, timed_out))


def connect(port, peer):
    return connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), peer)


def listen(factory):
    return TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(factory)


@pytest_twisted.inlineCallbacks
def test_relays_bytes_exactly_both_ways_with_half_close(no_endpoints, monkeypatch):
    """
    A client and a destination each send megabytes and half-close: each receives exactly
    what the other sent, after the FIN each side still gets the rest, the hand-connected
    socket goes straight to the socket pump, and the byte counts are exact.
    """
    handed = []

    def spy(reactor, client, leg):
        handed.append(leg)
        return take_client(reactor, client, leg)

    monkeypatch.setattr(_protocol, "take_client", spy)
    up, down = os.urandom(3 * MB), os.urandom(2 * MB)
    servers = PeerFactory(payload=down)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=up)
        yield connect(port, client)
        server = yield servers.next_peer(0)
        yield client.lost
        yield server.lost
        [event] = yield sink.disconnects(1)
        assert client.digest.hexdigest() == hashlib.sha256(down).hexdigest()
        assert server.digest.hexdigest() == hashlib.sha256(up).hexdigest()
        assert client.eof.called and server.eof.called
        assert event["bytes_from_client"] == len(up) and event["bytes_to_client"] == len(down)
        assert event["reason"] in ("client-closed", "destination-closed")
        assert len(handed) == 1
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_destination_answers_after_client_half_close(no_endpoints):
    """
    A client sends a request and half-closes at once; the destination sees the FIN, answers
    after it and closes; the client gets the whole answer and a clean end.
    """
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=b"request")
        yield connect(port, client)
        server = yield servers.next_peer(0)
        yield server.eof
        assert server.first_bytes == b"request"
        server.transport.write(b"answer after the FIN")
        server.transport.loseConnection()
        reason = yield client.lost
        assert client.first_bytes == b"answer after the FIN"
        assert isinstance(reason, ConnectionDone)
        [event] = yield sink.disconnects(1)
        assert event["bytes_to_client"] == len(b"answer after the FIN")
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_destination_reset_reaches_client_as_reset(no_endpoints):
    """
    A destination that resets mid-stream makes the client see a reset, not a clean end.
    """
    servers = PeerFactory(payload=b"", half_close=False, reset_after=100_000)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=os.urandom(1 * MB), half_close=False)
        yield connect(port, client)
        reason = yield client.lost
        assert isinstance(reason, ConnectionLost) and not isinstance(reason, ConnectionDone)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "destination-closed"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_refused_destination_is_connect_failed(no_endpoints, warnings):
    """
    A destination that refuses ends the session with connect-failed, logged with the
    refusal; the client is closed and nothing of it is left open.
    """
    dead = free_port()
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", dead)]))
    try:
        client = Peer(payload=b"hello", half_close=False)
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "connect-failed" and event["bytes_from_client"] == 0
        assert any(f"cannot connect to 127.0.0.1:{dead}" in w and "refused" in w for w in warnings), warnings
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_refused_destination_fails_over(no_endpoints):
    """
    With a failover list, a refusing first destination is skipped and the second serves.
    """
    servers = PeerFactory(payload=b"second")
    server_port = yield listen(servers)
    port = free_port()
    dead = free_port()
    second = ("127.0.0.1", server_port.getHost().port)
    service, sink = start_service(mapping_config(port, [("127.0.0.1", dead), second]))
    try:
        client = Peer(payload=b"x")
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert client.first_bytes == b"second"
        assert event["destination"] == f"127.0.0.1:{second[1]}"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_black_holed_destination_is_connect_timeout(no_endpoints):
    """
    A destination that never answers (SYNs dropped: a full accept queue) ends the session with
    connect-timeout after connect_timeout, and the half-open socket is closed.
    """
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())  # fills the accept queue
    port = free_port()
    service, sink = start_service(mapping_config(port, [hole.getsockname()], extra="connect_timeout = 0.5"))
    try:
        before = open_fds()
        client = Peer(payload=b"", half_close=False)
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "connect-timeout"
        yield wait_for(lambda: open_fds() <= before)
    finally:
        yield service.stopService()
        filler.close()
        hole.close()


def test_worker_socket_resets_if_the_worker_dies():
    """
    In a worker (its endpoints on the reset-on-death reactor) the hand-made destination socket
    is set to reset (SO_LINGER {1, 0}) from the start, as the worker's connectTCP wrapper does.
    """
    from wingate_map.config import Destination

    r = reactor()
    endpoints = _destinations.StandardEndpointFactory(reset_on_death_reactor(r))

    class Client:
        pass

    # The client leg here is not a TCP transport: no route; with one (below) a route.
    assert direct_route(r, endpoints, Destination(host="127.0.0.1", port=9), Client()) is None
    # A route asks for the linger exactly when the endpoints connect through a worker's reactor.
    from wingate_map.relay._connect import _reset_on_death

    assert _reset_on_death(endpoints._reactor) and not _reset_on_death(r)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        route = Route(r, socket.AF_INET, listener.getsockname(), True)
        owner = ConnectOwner()
        attempt = DirectConnect(route, b"", owner, 30)
        linger = attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert struct.unpack("ii", linger) == (1, 0)
        attempt.cancel()
        assert attempt.fileno() == -1
        [(failure, timed_out)] = owner.failed
        assert failure.check(ConnectingCancelledError) and not timed_out
    finally:
        listener.close()
