"""
A reset stays a reset through the relay, even when the reactor reports it as an end of input.

Twisted's epoll reactor treats an EPOLLERR/EPOLLHUP event without EPOLLIN on a socket it is
reading as a clean end of input (readConnectionLost), and epoll reports exactly that when it
polls a socket while the kernel is still handling the RST that arrived on it (the error is set,
the receive side not yet shut).  Under load about one reset in 10^4 went to the other peer as
a FIN, so a truncated stream looked complete.  The relay now asks the socket (SO_ERROR) before
passing an end of input on.

The race cannot be timed over real sockets, so: the decision is tested in memory; the socket
tests make the reactor's mistake on purpose (the reset arrives while the leg is not being read,
then the leg is told "end of input" exactly as the reactor tells it); and a bounded load test
with the resets coming from another process checks that every one reaches its client as a reset.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from wingate_map.relay._protocol import pending_socket_error
from wingate_map.testing import FakeTransport

from .helpers import Peer, PeerFactory, free_port, mapping_config, relay_of, start_service, wait_for
from .test_relay_unit import connected

TCP_CLOSE = 7  # tcpi_state of a socket that was reset (include/net/tcp_states.h)


def reactor():
    from twisted.internet import reactor as r

    return r


class _Socket:
    """
    Stands for a leg's socket: SO_ERROR answers C{error}.
    """

    def __init__(self, error: int) -> None:
        self.error = error

    def getsockopt(self, level: int, option: int) -> int:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
        return self.error


class _Wrapper:
    """
    Stands for a TLS transport: its handle is no socket; the TCP transport is underneath.
    """

    def __init__(self, transport: object) -> None:
        self.transport = transport

    def getHandle(self) -> object:
        return object()


def _with_socket(transport, error: int):
    transport.getHandle = lambda: _Socket(error)
    return transport


def test_pending_socket_error_reads_the_socket_under_any_wrapper():
    """
    The pending error is read from the socket under the leg's transport, through a TLS layer;
    a transport without a socket, or with a closed one, has none.
    """
    assert pending_socket_error(FakeTransport()) == 0
    reset = _with_socket(FakeTransport(), errno.ECONNRESET)
    assert pending_socket_error(reset) == errno.ECONNRESET
    assert pending_socket_error(_Wrapper(reset)) == errno.ECONNRESET
    assert pending_socket_error(_Wrapper(_with_socket(FakeTransport(), 0))) == 0
    closed = socket.socket()
    closed.close()
    gone = FakeTransport()
    gone.getHandle = lambda: closed
    assert pending_socket_error(gone) == 0


def test_destination_reset_reported_as_end_of_input_resets_the_client():
    """
    When the destination's "end of input" comes with a pending ECONNRESET, the client is
    reset (never sent a FIN), and the session ends destination-closed.
    """
    harness, client, client_t, attempt = connected()
    attempt.protocol.dataReceived(b"partial")
    _with_socket(attempt.transport, errno.ECONNRESET)
    attempt.protocol.readConnectionLost()
    assert not client_t.write_closed
    assert attempt.transport.aborted
    attempt.protocol.connectionLost(Failure(ConnectionAborted()))
    assert client_t.aborted and not client_t.write_closed
    client.connectionLost(Failure(ConnectionLost()))
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "destination-closed" and event["bytes_to_client"] == 7
    assert len(harness.sessions) == 0


def test_destination_end_of_input_without_error_is_still_a_half_close():
    """
    A real FIN from the destination (no pending error) is still passed on as a half-close.
    """
    harness, client, client_t, attempt = connected()
    _with_socket(attempt.transport, 0)
    attempt.protocol.readConnectionLost()
    assert client_t.write_closed and not client_t.aborted and not attempt.transport.aborted


def test_client_reset_reported_as_end_of_input_resets_the_destination():
    """
    When the client's "end of input" comes with a pending ECONNRESET, the destination is
    reset (never sent a FIN), and the session ends client-closed.
    """
    harness, client, client_t, attempt = connected()
    _with_socket(client_t, errno.ECONNRESET)
    client.readConnectionLost()
    assert not attempt.transport.write_closed
    assert client_t.aborted
    client.connectionLost(Failure(ConnectionAborted()))
    assert attempt.transport.aborted and not attempt.transport.write_closed
    attempt.close(clean=False)
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "client-closed"


# -- real sockets ------------------------------------------------------------------------------


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@defer.inlineCallbacks
def _reset_while_unwatched(leg, peer):
    """
    Reset C{peer}'s connection while the reactor is not reading C{leg} (so it sees nothing),
    then tell C{leg} "end of input", as the epoll reactor does for EPOLLERR without EPOLLIN.
    """
    leg.stopReading()
    assert leg not in reactor().getWriters()
    peer.transport.abortConnection()
    yield peer.lost
    yield wait_for(lambda: _tcp_state(leg.getHandle()) == TCP_CLOSE)
    leg.readConnectionLost(Failure(ConnectionDone()))


@pytest_twisted.inlineCallbacks
def test_destination_reset_mistaken_for_end_of_input_reaches_the_client_as_a_reset():
    """
    A destination sends part of an answer and resets; even when the reactor reports that reset
    as an end of input, the client gets a reset (ECONNRESET), never a clean end.
    """
    servers = PeerFactory(payload=b"partial answer", half_close=False, close_on_eof=False)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    # Twisted's transports (as for TLS legs): the socket pump's own check is in test_pump.py.
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]), socket_pump=False)
    try:
        client = Peer(half_close=False, close_on_eof=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        server = yield servers.next_peer(0)
        yield client.when_received(14)
        [session] = service.sessions.live()
        yield _reset_while_unwatched(relay_of(session).peer.transport, server)
        yield wait_for(lambda: client.lost.called or client.eof.called)
        assert not client.eof.called, "the client got a FIN for a destination reset"
        reason = yield client.lost
        assert isinstance(reason, ConnectionLost) and not isinstance(reason, ConnectionAborted)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "destination-closed" and event["bytes_to_client"] == 14
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_reset_mistaken_for_end_of_input_reaches_the_destination_as_a_reset():
    """
    A client sends part of a request and resets; even when the reactor reports that reset as
    an end of input, the destination gets a reset, never a clean end.
    """
    servers = PeerFactory(half_close=False, close_on_eof=False)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    # Twisted's transports (as for TLS legs): the socket pump's own check is in test_pump.py.
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]), socket_pump=False)
    try:
        client = Peer(payload=b"partial request", half_close=False, close_on_eof=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        server = yield servers.next_peer(0)
        yield server.when_received(15)
        [session] = service.sessions.live()
        yield _reset_while_unwatched(relay_of(session).transport, client)
        yield wait_for(lambda: server.lost.called or server.eof.called)
        assert not server.eof.called, "the destination got a FIN for a client reset"
        reason = yield server.lost
        assert isinstance(reason, ConnectionLost) and not isinstance(reason, ConnectionAborted)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "client-closed"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


# -- load --------------------------------------------------------------------------------------

# A destination in its own process (so its resets race the relay's reactor on another CPU):
# every connection that sends a byte gets up to SIZE random bytes back, then a reset.  Prints its port, then one line
# per reset.
_DESTINATION = r"""
import os, socket, struct, sys, threading
size = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
def answer(conn):
    conn.recv(1)  # the client's request: the relay has joined both legs
    conn.setblocking(False)
    try:
        conn.send(os.urandom(size))  # what the socket buffers take at once (a paused reader takes less)
    except OSError:
        pass
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    os.write(1, b"reset\n")  # one write: lines from several threads never interleave
for _ in range(int(sys.argv[2])):
    conn, _ = listener.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
sys.stdin.read()
"""


class _Destination(protocol.ProcessProtocol):
    """
    The destination process: C{port} fires with its port, C{all_reset} after C{count} resets.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.resets = 0
        self.buffer = b""
        self.port: defer.Deferred[int] = defer.Deferred()
        self.all_reset: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if not self.port.called:
                self.port.callback(int(line))
            elif line == b"reset":
                self.resets += 1
                if self.resets == self.count:
                    self.all_reset.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest_twisted.inlineCallbacks
def test_every_reset_under_load_reaches_its_client_as_a_reset():
    """
    300 sessions at once whose destination (another process) sends up to 256 KB and resets,
    read by clients at different speeds (a third only after every reset was sent): every client
    ends with a reset, none with a clean end that would make a truncated answer look complete.
    """
    count = 300
    destination = _Destination(count)
    process = reactor().spawnProcess(destination, sys.executable, [sys.executable, "-c", _DESTINATION, str(256 * 1024), str(count)], env=dict(os.environ))
    service = None
    try:
        dest_port = yield destination.port.addTimeout(30, reactor())
        port = free_port()
        service, sink = start_service(mapping_config(port, [("127.0.0.1", dest_port)]))
        clients = [Peer(payload=b"?", half_close=False, close_on_eof=False, read=i % 3 != 0) for i in range(count)]
        yield defer.gatherResults([connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), c) for c in clients])
        yield destination.all_reset.addTimeout(60, reactor())
        for client in clients[::3]:
            client.transport.resumeProducing()
        yield wait_for(lambda: all(c.lost.called for c in clients), timeout=60)
        clean = [c for c in clients if c.eof.called]
        assert clean == [], f"{len(clean)} of {count} clients got a FIN for a destination reset"
        reasons = [c.lost.result for c in clients]
        assert all(isinstance(r, ConnectionLost) for r in reasons)
        events = yield sink.disconnects(count)
        assert {e["reason"] for e in events} == {"destination-closed"}
    finally:
        if service is not None:
            yield service.stopService()
        process.closeStdin()
        yield destination.ended
