"""
The lean connect path (wingate_map.relay._connect): plain TCP destinations given as IP literals
are connected by hand (non-blocking connect_ex, writability, SO_ERROR) and their sockets go
straight to the socket pump, over real loopback sockets.  Every test here forbids the endpoint
path (the endpoint factory raises), so each passes only through the hand-made connect, on the
data plane's poller and on the reactor's own descriptor set: bytes relayed exactly both ways,
half-close, and a worker's reset-on-death linger on the new socket.  Refusals, failover, black
holes and resets run over every connect path in tests/test_integration.py (its connect_path).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectingCancelledError, ConnectionDone

from wingate_map.relay import _destinations, _protocol
from wingate_map.relay._connect import DirectConnect, Route, direct_route, take_client
from wingate_map.relay._poller import ReactorDescriptors
from wingate_map.service._workers import reset_on_death_reactor

from .test_poller import ConnectOwner
from .helpers import Peer, PeerFactory, free_port, mapping_config, start_service

MB = 1 << 20


def reactor():
    from twisted.internet import reactor as r

    return r


@pytest.fixture(params=["poller", "reactor"])
def no_endpoints(request, monkeypatch):
    """
    The endpoint path is forbidden: a destination that would go through it fails to connect.
    Run once with the data plane's poller, once with the reactor's own descriptor set.
    """
    if request.param == "reactor":
        import wingate_map.service._root as root

        monkeypatch.setattr(root, "descriptors_for", ReactorDescriptors)

    def forbidden(self, destination, timeout, preamble=b""):
        raise AssertionError("endpoint path used")

    monkeypatch.setattr(_destinations.StandardEndpointFactory, "endpoint_for_destination", forbidden)


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
