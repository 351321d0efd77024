"""
The socket pump (wingate_map.relay._pump.SocketPump), driven by hand on real socket pairs with an
in-memory reactor: its flow control (a slow reader stops the source, at most one read held),
half-close in both directions (passed on once the bytes before it are out), resets passed on as
resets (also when the reactor reports one as an end of input), rate limits by flow control,
descriptors unregistered before their sockets close, and stale events after the end ignored.
Then through a real service: plain TCP sessions are relayed by the pump, a worker's
reset-on-death linger still closes in order, and a PROXY header the destination transport had
not sent yet is sent first.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from zope.interface.verify import verifyObject

from wingate_map.relay import _pump as pump_module
from wingate_map.relay._pump import CLIENT, DESTINATION, PIPES, READ_SIZE, IPump, SocketPump, TransportPump
from wingate_map.relay._ratelimit import Limiter, TokenBucket
from wingate_map.sessions import Session
from wingate_map.testing import FakeTransport

from .helpers import Peer, PeerFactory, free_port, mapping_config, relay_of, start_service, wait_for

LINGER_RESET = struct.pack("ii", 1, 0)


class Owner:
    """
    Records what the pump reports to its session.
    """

    def __init__(self) -> None:
        self.eofs: list[str] = []
        self.ended: list[str | None] = []

    def pump_eof(self, side: str) -> None:
        self.eofs.append(side)

    def pump_ended(self, reset_by: str | None) -> None:
        self.ended.append(reset_by)


class CheckingReactor(MemoryReactorClock):
    """
    An in-memory reactor that checks a descriptor's socket is still open when it is removed.
    """

    def _assert_open(self, leg) -> None:
        fd = leg.fileno()
        assert fd != -1, "removed after its socket was closed"
        os.fstat(fd)

    def removeReader(self, reader):
        if reader in self.readers:
            self._assert_open(reader)
        super().removeReader(reader)

    def removeWriter(self, writer):
        if writer in self.writers:
            self._assert_open(writer)
        super().removeWriter(writer)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """
    Two ends of a real loopback TCP connection (resets need TCP), both non-blocking.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


def session() -> Session:
    return Session(id="s1", mapping="m", client_ip="127.0.0.1", client_port=1, local_ip="127.0.0.1", local_port=2, started=0.0)


def make_pump(limits=(None, None), linger=False):
    """
    A pump between a client and a destination: returns (pump, reactor, owner, the client's own
    end, the destination's own end).
    """
    client, client_leg = tcp_pair()
    destination, destination_leg = tcp_pair()
    if linger:  # as a worker sets it on every socket
        for s in (client_leg, destination_leg):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    reactor, owner = CheckingReactor(), Owner()
    pump = SocketPump(reactor, client_leg, destination_leg, session(), owner, limits=limits)
    return pump, reactor, owner, client, destination


def drain(sock: socket.socket) -> bytes:
    """
    Everything readable on C{sock} now (b"" also at its end).
    """
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def at_end(sock: socket.socket) -> bool:
    """
    Whether C{sock} has a clean end of input now (a FIN).
    """
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


def run(reactor, limit: int = 10_000) -> None:
    """
    Deliver readiness to the pump's registered descriptors until nothing more happens (a
    descriptor registered for writing is told it can write; one for reading, that it can read,
    which may find nothing: EAGAIN).
    """
    for _ in range(limit):
        before = (set(reactor.readers), set(reactor.writers))
        for leg in list(reactor.writers):
            leg.doWrite()
        for leg in list(reactor.readers):
            leg.doRead()
        if (set(reactor.readers), set(reactor.writers)) == before and not reactor.writers:
            return


def test_the_pumps_provide_their_interfaces():
    """
    Both data planes provide IPump; a socket pump's legs are the reactor's read and write
    descriptors.
    """
    pump, reactor, owner, client, destination = make_pump()
    verifyObject(IPump, pump)
    for leg in (pump.client, pump.destination):
        verifyObject(IReadDescriptor, leg)
        verifyObject(IWriteDescriptor, leg)
    pump.abort()
    verifyObject(IPump, TransportPump(reactor, FakeTransport(), FakeTransport(), session()))


def test_bytes_flow_both_ways_and_are_counted():
    """
    What each side sends reaches the other at once (one send per read) and is counted exactly.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start(b"early ")
    assert {pump.client, pump.destination} == set(reactor.readers)
    client.sendall(b"hello")
    pump.client.doRead()
    assert drain(destination) == b"early hello"
    destination.sendall(b"welcome!")
    pump.destination.doRead()
    assert drain(client) == b"welcome!"
    assert (pump.session.bytes_from_client, pump.session.bytes_to_client) == (11, 8)
    assert not reactor.writers and owner.ended == []


def test_slow_reader_stops_the_source_and_at_most_one_read_is_held():
    """
    While the destination does not read, the client's bytes wait in the kernel: the pump holds
    at most one read, stops reading the client, and reads it again once the destination drained.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    sent = 0
    payload = b"x" * 65536
    for _ in range(200):  # until the client's own socket is full too
        try:
            sent += client.send(payload)
        except BlockingIOError:
            break
        if pump.client in reactor.readers:
            pump.client.doRead()
        assert pump.held() <= READ_SIZE
    assert pump.client not in reactor.readers, "the client is still read while the destination is full"
    assert pump.destination in reactor.writers
    assert 0 < pump.held() <= READ_SIZE
    received = 0
    for _ in range(10_000):
        received += len(drain(destination))
        run(reactor, 1)
        if received == sent:
            break
    assert received == sent == pump.session.bytes_from_client
    assert pump.held() == 0 and pump.client in reactor.readers and not reactor.writers


def test_half_close_is_passed_on_and_the_other_direction_keeps_flowing():
    """
    The client's FIN reaches the destination as a FIN while the destination keeps answering;
    the destination's FIN then ends the session in order (FINs, no resets).
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    pump.client.doRead()
    pump.client.doRead()
    assert owner.eofs == [CLIENT]
    assert drain(destination) == b"request" and at_end(destination)
    assert pump.client not in reactor.readers
    destination.sendall(b"answer after the client's FIN")
    pump.destination.doRead()
    assert drain(client) == b"answer after the client's FIN"
    destination.shutdown(socket.SHUT_WR)
    pump.destination.doRead()
    assert owner.eofs == [CLIENT, DESTINATION] and owner.ended == [None]
    assert at_end(client)
    assert not reactor.readers and not reactor.writers
    assert pump.client.fileno() == pump.destination.fileno() == -1


def test_a_fin_waits_for_the_bytes_before_it():
    """
    A client that sent its first bytes and its FIN before the destination was ready: the FIN
    reaches the destination only after every one of those bytes, however slowly it reads.
    """
    pump, reactor, owner, client, destination = make_pump()
    early = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than the socket buffers hold
    pump.start(early, client_eof=True)
    assert pump.destination in reactor.writers, "the early bytes all fitted: the test proves nothing"
    received = b""
    for _ in range(10_000):
        received += drain(destination)
        run(reactor, 1)
        if len(received) == len(early):
            break
    assert received == early and at_end(destination)


def test_linger_set_by_a_worker_still_closes_in_order():
    """
    A worker's sockets are set to reset if the worker dies; an orderly end still delivers every
    byte and a FIN (the pump clears it before closing), also the bytes still in the kernel's
    buffers, not yet read by a slow client, when the session ends.
    """
    pump, reactor, owner, client, destination = make_pump(linger=True)
    pump.start()
    answer = bytes(range(256)) * 4096  # 1 MiB, more than the client's receive buffer
    sent = 0
    for _ in range(10_000):
        if sent < len(answer):
            try:
                sent += destination.send(answer[sent : sent + 65536])
            except BlockingIOError:
                pass
        run(reactor, 1)
        if sent == len(answer) and not pump.held():
            break
    assert sent == len(answer) and not pump.held(), "the answer does not fit the kernel's buffers"
    destination.shutdown(socket.SHUT_WR)
    client.shutdown(socket.SHUT_WR)
    run(reactor)
    assert owner.ended == [None], "the session did not end before the client read"
    received = b""
    for _ in range(10_000):
        chunk = drain(client)
        received += chunk
        if len(received) >= len(answer):
            break
    assert received == answer and at_end(client)
    assert at_end(destination)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def _was_reset(sock: socket.socket) -> bool:
    try:
        sock.recv(65536)
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
    return False


def _wait_for_error(sock: socket.socket) -> None:
    for _ in range(100_000):
        # (TCP_INFO, not SO_ERROR: reading SO_ERROR clears it)
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7:  # TCP_CLOSE
            return
    raise AssertionError("no reset arrived")


@pytest.mark.parametrize("reported_as_end", [False, True])
def test_a_client_reset_reaches_the_destination_as_a_reset(reported_as_end):
    """
    A client that resets its connection makes the destination's connection reset too, also
    when the reactor reports the reset as an end of input (the pump asks the socket).
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    client.sendall(b"partial")
    pump.client.doRead()
    assert drain(destination) == b"partial"
    _reset(client)
    _wait_for_error(pump.client.sock)
    if reported_as_end:
        reactor.removeReader(pump.client)  # what the reactor does before telling it
        pump.client.readConnectionLost(None)
    else:
        pump.client.doRead()
    assert owner.ended == [CLIENT] and owner.eofs == []
    assert _was_reset(destination)


def test_a_destination_reset_reaches_the_client_as_a_reset():
    """
    A destination that resets makes the client's connection reset, never a clean end.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    _reset(destination)
    _wait_for_error(pump.destination.sock)
    pump.destination.doRead()
    assert owner.ended == [DESTINATION]
    assert _was_reset(client)


def test_abort_resets_both_and_stale_events_are_ignored():
    """
    Aborting (a kill, the idle timeout) resets both connections; readiness reported afterwards
    (a stale event, or one for a reused descriptor number) does nothing.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    pump.abort()
    assert owner.ended == [None]
    assert _was_reset(client) and _was_reset(destination)
    assert not reactor.readers and not reactor.writers
    pump.client.doRead()
    pump.destination.doWrite()
    pump.client.connectionLost(None)
    pump.abort()
    assert owner.ended == [None]


def test_a_read_event_while_paused_reads_nothing():
    """
    A read event already fetched from the poller for a leg that has since been paused (its peer
    is full) is ignored: the pump never holds more than one read.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    reactor.removeReader(pump.client)
    pump.client.reading = False
    client.sendall(b"z" * 1000)
    pump.client.doRead()
    assert pump.session.bytes_from_client == 0


def send_some(sock: socket.socket, data: bytes) -> int:
    """
    Send as much of C{data} as C{sock} takes now (it is non-blocking): how many bytes.
    """
    sent = 0
    for _ in range(1000):
        try:
            n = sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            break
        sent += n
        if sent == len(data):
            break
    return sent


def finish_sending(reactor, client: socket.socket, destination: socket.socket, payload: bytes, sent: int) -> bytes:
    """
    Send the rest of C{payload} (C{sent} bytes of it are sent) from C{client} while the pump
    runs and C{destination} reads: everything C{destination} receives (bounded).
    """
    received = b""
    for _ in range(10_000):
        received += drain(destination)
        sent += send_some(client, payload[sent:])
        run(reactor, 1)
        if len(received) >= len(payload):
            break
    return received


def test_what_a_slow_peer_did_not_take_survives_another_sessions_read():
    """
    Every pump in a thread reads into one shared buffer, so an idle session holds none: the
    part of a read its destination had no room for becomes the session's own copy.  Another
    session's read right after (into the same buffer) leaves it intact: the slow destination
    gets exactly its client's bytes, the other one exactly its own.
    """
    slow, reactor, _, slow_client, slow_destination = make_pump()
    other, other_reactor, _, other_client, other_destination = make_pump()
    assert slow.buffer is other.buffer
    slow.start()
    other.start()
    slow.destination.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    slow_destination.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    payload = os.urandom(4 * 65536)
    sent = send_some(slow_client, payload)
    slow.client.doRead()
    kept = slow.held()
    assert kept > 0, "the destination took the whole read: the test proves nothing"
    noise = b"\xff" * READ_SIZE
    noise_sent = send_some(other_client, noise)
    other.client.doRead()
    assert other.session.bytes_from_client >= slow.session.bytes_from_client, "the other read does not reach the kept bytes"
    assert finish_sending(reactor, slow_client, slow_destination, payload, sent) == payload
    assert finish_sending(other_reactor, other_client, other_destination, noise, noise_sent) == noise
    assert (slow.session.bytes_from_client, other.session.bytes_from_client) == (len(payload), len(noise))


def test_each_thread_has_its_own_read_buffer():
    """
    Pumps running in another thread (another reactor's) read into a buffer of their own:
    C{recv_into} lets go of the GIL, so two threads must never read into the same bytes.
    """
    here, _, _, _, _ = make_pump()
    there: list = []
    thread = threading.Thread(target=lambda: there.append(make_pump()[0]))
    thread.start()
    thread.join(30)
    assert there and there[0].buffer is not here.buffer
    assert make_pump()[0].buffer is here.buffer
    for pump in (here, there[0]):
        pump.abort()


def test_rate_limit_stops_reading_until_tokens_come():
    """
    With a rate limit, the pump reads only what the limit allows and then stops reading the
    source (its bytes wait in the kernel) until the bucket has refilled.
    """
    clock = CheckingReactor()
    bucket = TokenBucket(100_000, burst=20_000, clock=clock)
    client, client_leg = tcp_pair()
    destination, destination_leg = tcp_pair()
    owner = Owner()
    pump = SocketPump(clock, client_leg, destination_leg, session(), owner, limits=(Limiter([bucket]), None))
    pump.start()
    client.sendall(b"q" * 100_000)
    pump.client.doRead()
    assert pump.session.bytes_from_client == 20_000
    pump.client.doRead()
    assert pump.client not in clock.readers and pump.session.bytes_from_client == 20_000
    assert pump.held() == 0
    clock.advance(0.2)
    assert pump.client in clock.readers
    pump.client.doRead()
    assert pump.session.bytes_from_client == 40_000
    assert len(drain(destination)) == 40_000
    pump.abort()
    assert not clock.getDelayedCalls()


# -- through a service ----------------------------------------------------------------------------


def reactor():
    from twisted.internet import reactor as r

    return r


@pytest_twisted.inlineCallbacks
def test_plain_sessions_are_relayed_by_the_pump_with_a_proxy_header_first():
    """
    A plain TCP session is relayed by the socket pump; a PROXY header the destination leg had
    not sent yet when the pump took over arrives first, before the client's bytes.
    """
    servers = PeerFactory(payload=b"from the server", half_close=False, close_on_eof=False)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    dest = server_port.getHost().port
    port = free_port()
    service, sink = start_service(mapping_config(port, f'{{ host = "127.0.0.1", port = {dest}, proxy_protocol = "v1" }}'))
    try:
        client = Peer(payload=b"from the client", half_close=False, close_on_eof=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        server = yield servers.next_peer(0)
        yield client.when_received(15)
        [live] = service.sessions.live()
        assert type(relay_of(live)._pump) is SocketPump
        yield wait_for(lambda: server.first_bytes.endswith(b"\r\nfrom the client"))
        assert server.first_bytes.startswith(b"PROXY TCP4 127.0.0.1 ")
        client.transport.loseConnection()
        yield server.eof
        server.transport.loseConnection()
        [event] = yield sink.disconnects(1)
        assert event["bytes_from_client"] == 15 and event["bytes_to_client"] == 15
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_idle_timeout_counts_the_pumps_traffic():
    """
    A session relayed by the pump stays up while bytes move (here for longer than its idle
    timeout) and is closed, with resets, once nothing has moved for idle_timeout seconds.
    """
    servers = PeerFactory(half_close=False, close_on_eof=False)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)], "idle_timeout = 1.5"))
    try:
        client = Peer(half_close=False, close_on_eof=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        server = yield servers.next_peer(0)
        [live] = service.sessions.live()
        yield wait_for(lambda: relay_of(live)._pump is not None)
        assert type(relay_of(live)._pump) is SocketPump
        for tick in range(40):  # 2 s of traffic, a byte every 50 ms
            client.transport.write(b"t")
            yield server.when_received(tick + 1).addTimeout(10, reactor())
            assert service.sessions.live() == [live], "closed as idle while bytes were moving"
            yield task.deferLater(reactor(), 0.05, lambda: None)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "idle-timeout" and event["bytes_from_client"] == 40
        reason = yield client.lost
        assert isinstance(reason, ConnectionLost)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def _pump_bulk(pump, reactor, client, destination, payload: bytes) -> tuple[bytes, int]:
    """
    Send C{payload} from the client while the destination reads slowly: (what arrived, the
    most bytes a pipe held for the destination at once).
    """
    sent, received, most_piped = 0, b"", 0
    for _ in range(200_000):
        for _ in range(16):  # fill the kernel's buffers, so reads fill the pump's
            if sent == len(payload):
                break
            try:
                sent += client.send(payload[sent : sent + 65536])
            except BlockingIOError:
                break
        run(reactor, 1)
        try:
            received += destination.recv(32768)  # a slow reader: the pump's moves fall short
        except BlockingIOError:
            pass
        assert pump.held() <= READ_SIZE
        most_piped = max(most_piped, pump.destination.piped)
        if len(received) == len(payload):
            break
    return received, most_piped


def test_bulk_is_spliced_through_pooled_pipes():
    """
    Once a read fills the buffer, a direction's bytes move through a pipe in the kernel (bytes
    intact and counted); a pipe is held only while a slow peer has not taken its bytes, and
    given back to the pool after.
    """
    pump, reactor, owner, client, destination = make_pump()
    open_before = PIPES.open
    pump.start()
    # Small buffers towards the destination, so the pump's moves there fall short.
    pump.destination.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    destination.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    payload = os.urandom(8 * READ_SIZE)
    received, most_piped = _pump_bulk(pump, reactor, client, destination, payload)
    assert received == payload and pump.session.bytes_from_client == len(payload)
    assert pump.client.splicing and most_piped > 0
    assert pump.destination.pipe is None and PIPES.open - open_before <= len(PIPES.free)
    client.shutdown(socket.SHUT_WR)
    run(reactor)
    assert at_end(destination) and owner.eofs == [CLIENT]


def test_a_reset_never_returns_a_pipe_with_bytes():
    """
    A session reset while a pipe holds bytes for its slow peer closes that pipe: it never goes
    back to the pool with another session's bytes.
    """
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    pump.client.splicing = True
    for _ in range(1000):
        try:
            client.send(b"s" * 65536)
        except BlockingIOError:
            break
        if pump.client in reactor.readers:
            pump.client.doRead()
        if pump.destination.pipe is not None:
            break
    pipe = pump.destination.pipe
    assert pipe is not None and pump.destination.piped > 0, "the destination took everything"
    before = PIPES.open
    pump.abort()
    assert PIPES.open == before - 1 and pipe not in PIPES.free
    with pytest.raises(OSError):
        os.fstat(pipe[0])


def test_without_a_free_pipe_reads_go_through_user_space(monkeypatch):
    """
    With MAX_PIPES pipes open (each is two file descriptors), a spliced direction reads with
    recv instead: it never waits for a pipe.
    """
    monkeypatch.setattr(PIPES, "open", pump_module.MAX_PIPES)
    monkeypatch.setattr(PIPES, "free", [])
    pump, reactor, owner, client, destination = make_pump()
    pump.start()
    pump.client.splicing = True
    client.sendall(b"no pipe")
    pump.client.doRead()
    assert drain(destination) == b"no pipe"


@pytest.mark.parametrize("lingers", [True, False])
def test_an_orderly_close_clears_the_linger_only_where_sockets_may_have_it(lingers):
    """
    A pump whose sockets may be set to reset on close (a worker's) clears that before an
    orderly close, so both ends get FINs; one told they are not (a primary's) saves the two
    calls, so a socket that did linger would be reset: the service must say which it is
    (next test).
    """
    client, client_leg = tcp_pair()
    destination, destination_leg = tcp_pair()
    for s in (client_leg, destination_leg):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    reactor, owner = CheckingReactor(), Owner()
    pump = SocketPump(reactor, client_leg, destination_leg, session(), owner, lingers=lingers)
    pump.start()
    client.shutdown(socket.SHUT_WR)
    destination.shutdown(socket.SHUT_WR)
    run(reactor)
    assert owner.ended == [None]
    if lingers:
        assert at_end(client) and at_end(destination)
    else:  # the side that had not had its FIN yet is reset instead
        for s in (client, destination):
            _wait_for_error(s)
        assert _was_reset(client) or _was_reset(destination)


@pytest_twisted.inlineCallbacks
def test_only_a_workers_sessions_are_told_their_sockets_linger():
    """
    A primary's sockets never linger (its pumps skip clearing it); a worker's, set to reset if
    the worker dies, do (its pumps clear it before an orderly close).
    """
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", free_port())]))
    try:
        [factory] = service.factories.values()
        assert factory.runtime.sockets_linger is False
        service.worker_index = 1  # what a worker's runtime is built with
        _, factories, _ = service._build(service.config)
        assert [f.runtime.sockets_linger for f in factories.values()] == [True]
    finally:
        service.worker_index = 0
        yield service.stopService()
