"""
The data plane's poller (wingate_map.relay._poller), driven by hand on real sockets with an
in-memory reactor: events go straight to the registered descriptors, at most C{max_events} per
wake (the rest keep the poller readable), an event for a descriptor unregistered earlier in the
same batch never reaches the socket that took its number, a descriptor that raises is lost
alone, a change of interest is one modify, and the fallback on the reactor's own IReactorFDSet
for reactors that do not poll descriptors.  Then the socket pump and the hand-started connect
on it: the connect's registration becomes the destination leg's with one modify, a refusal and
the connect timeout are reported once with the socket unregistered before it closes, and a
reset polled as an error reaches the other side as a reset.
"""

from __future__ import annotations

import os
import select
import socket

from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from wingate_map.relay._connect import DirectConnect, Route
from wingate_map.relay._poller import READ, WRITE, EpollPoller, IDescriptors, ReactorDescriptors, descriptors_for
from wingate_map.relay._pump import CLIENT, SocketPump

from .test_pump import Owner, _reset, _wait_for_error, _was_reset, at_end, drain, send_some, session, tcp_pair


class Descriptor:
    """
    Records the events it is given; C{on_read} runs on each read event.
    """

    def __init__(self, sock: socket.socket, on_read=None) -> None:
        self.sock = sock
        self.reads = 0
        self.writes = 0
        self.lost: list = []
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self)

    def doWrite(self) -> None:
        self.writes += 1

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class RecordingEpoll:
    """
    An epoll object that records every change of registration.
    """

    def __init__(self, epoll) -> None:
        self.epoll = epoll
        self.calls: list[tuple] = []

    def register(self, fd, mask):
        self.calls.append(("register", fd, mask))
        self.epoll.register(fd, mask)

    def modify(self, fd, mask):
        self.calls.append(("modify", fd, mask))
        self.epoll.modify(fd, mask)

    def unregister(self, fd):
        self.calls.append(("unregister", fd))
        self.epoll.unregister(fd)

    def __getattr__(self, name):
        return getattr(self.epoll, name)


def recording_poller(max_events: int = 256) -> tuple[EpollPoller, MemoryReactorClock, RecordingEpoll]:
    reactor = MemoryReactorClock()
    poller = EpollPoller(reactor, max_events)
    recorder = RecordingEpoll(poller.open())
    poller._epoll = recorder
    return poller, reactor, recorder


def readable(poller: EpollPoller) -> bool:
    """
    Whether the poller's own descriptor is readable (what the reactor waits for).
    """
    return bool(select.select([poller.fileno()], [], [], 0)[0])


def pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(n)]


def test_events_go_straight_to_the_descriptor_and_the_poller_is_one_reader():
    """
    The poller is one reader on the reactor; a readable socket's descriptor is read, a
    writable one's written, by one call of the poller's doRead.
    """
    poller, reactor, recorder = recording_poller()
    verifyObject(IReadDescriptor, poller)
    verifyObject(IDescriptors, poller)
    assert reactor.readers == {poller}
    (a, a_peer), (b, b_peer) = pairs(2)
    reader, writer = Descriptor(a), Descriptor(b)
    poller.set(reader, a.fileno(), 0, READ)
    poller.set(writer, b.fileno(), 0, WRITE)
    a_peer.send(b"x")
    poller.doRead()
    assert (reader.reads, reader.writes, writer.reads, writer.writes) == (1, 0, 0, 1)
    assert reactor.readers == {poller}
    poller.close()
    assert not reactor.readers and poller.fileno() == -1


def test_a_change_of_interest_is_one_modify():
    """
    Reading to writing is one modify (not a delete and an add); unregistering is one call.
    """
    poller, reactor, recorder = recording_poller()
    (a, a_peer), = pairs(1)
    d = Descriptor(a)
    fd = a.fileno()
    poller.set(d, fd, 0, READ)
    poller.set(d, fd, READ, WRITE)
    poller.set(d, fd, WRITE, READ | WRITE)
    poller.set(d, fd, READ | WRITE, 0)
    assert recorder.calls == [("register", fd, READ), ("modify", fd, WRITE), ("modify", fd, READ | WRITE), ("unregister", fd)]
    assert len(poller) == 0


def test_at_most_max_events_per_wake_and_the_rest_keep_it_readable():
    """
    With more ready descriptors than max_events, one wake dispatches max_events of them; the
    poller stays readable, so the reactor comes back (after its timers and other descriptors)
    for the rest.
    """
    poller, reactor, recorder = recording_poller(max_events=2)
    socks = pairs(5)
    descriptors = [Descriptor(a) for a, _ in socks]
    for d, (a, peer) in zip(descriptors, socks):
        poller.set(d, a.fileno(), 0, READ)
        peer.send(b"x")  # level-triggered: stays readable, since nobody reads it
    assert readable(poller)
    poller.doRead()
    assert sum(d.reads for d in descriptors) == 2
    assert readable(poller)
    for _ in range(2):
        poller.doRead()
    assert sum(d.reads for d in descriptors) == 6  # every one served; the first again


def test_an_event_for_a_descriptor_unregistered_in_the_same_batch_is_dropped():
    """
    A descriptor whose handler closes another session's socket and opens a new one on the
    same number: the old socket's event, fetched in the same batch, never reaches the new one.
    """
    poller, reactor, recorder = recording_poller()
    (a, a_peer), (b, b_peer) = pairs(2)
    fresh: list[Descriptor] = []
    keep: list[socket.socket] = []
    handlers: dict[int, Descriptor] = {}

    def replace_other(me: Descriptor) -> None:
        if fresh:
            return
        other = handlers[b.fileno()] if me.sock is a else handlers[a.fileno()]
        number = other.sock.fileno()
        poller.set(other, number, READ, 0)
        other.sock.close()
        new, new_peer = socket.socketpair()
        keep.append(new_peer)
        new_peer.send(b"x")  # readable: an event for it would be delivered
        if new.fileno() != number:  # the new socket takes the freed number
            os.dup2(new.fileno(), number)
            new.close()
            new = socket.socket(fileno=number)
        d = Descriptor(new)
        poller.set(d, number, 0, READ)
        fresh.append(d)

    da, db = Descriptor(a, replace_other), Descriptor(b, replace_other)
    handlers[a.fileno()], handlers[b.fileno()] = da, db
    poller.set(da, a.fileno(), 0, READ)
    poller.set(db, b.fileno(), 0, READ)
    a_peer.send(b"x")
    b_peer.send(b"x")
    poller.doRead()
    assert da.reads + db.reads == 1  # the other's event was dropped
    [d] = fresh
    assert d.reads == 0, "an event of the closed socket reached the one that took its number"
    poller.doRead()
    assert d.reads == 1  # its own events come in the next batch
    d.sock.close()


def test_a_descriptor_that_raises_is_lost_alone():
    """
    A descriptor whose handler raises is unregistered and told it is lost (as the reactor
    does); the others in the batch are still served and the poller stays on the reactor.
    """
    poller, reactor, recorder = recording_poller()
    (a, a_peer), (b, b_peer) = pairs(2)

    def boom(me):
        raise RuntimeError("bug")

    bad, good = Descriptor(a, boom), Descriptor(b)
    poller.set(bad, a.fileno(), 0, READ)
    poller.set(good, b.fileno(), 0, READ)
    a_peer.send(b"x")
    b_peer.send(b"x")
    poller.doRead()
    assert len(bad.lost) == 1 and bad.lost[0].check(RuntimeError)
    assert good.reads == 1 and not good.lost
    assert ("unregister", a.fileno()) in recorder.calls and len(poller) == 1
    assert reactor.readers == {poller}
    poller.doRead()
    assert bad.reads == 1


def test_when_the_reactor_drops_the_poller_every_descriptor_is_lost():
    """
    The reactor disconnects every descriptor when it stops: the poller passes that on to each
    registered descriptor and closes its epoll descriptor.
    """
    poller, reactor, recorder = recording_poller()
    (a, a_peer), (b, b_peer) = pairs(2)
    da, db = Descriptor(a), Descriptor(b)
    poller.set(da, a.fileno(), 0, READ)
    poller.set(db, b.fileno(), 0, WRITE)
    poller.connectionLost(None)
    assert da.lost == [None] and db.lost == [None]
    assert poller.fileno() == -1 and len(poller) == 0


def test_closed_poller_opens_again_at_the_next_registration():
    """
    A stopped service closes its poller; a restarted one registers again on a new epoll.
    """
    poller, reactor, recorder = recording_poller()
    poller.close()
    assert not reactor.readers
    (a, a_peer), = pairs(1)
    poller.set(Descriptor(a), a.fileno(), 0, READ)
    assert reactor.readers == {poller} and poller.fileno() != -1
    poller.close()


def test_the_poller_is_chosen_by_what_the_reactor_can_do():
    """
    A reactor that polls descriptors gets an epoll poller of its own; an in-memory reactor
    the fallback on its IReactorFDSet, which adds and removes readers and writers.
    """
    from twisted.internet import reactor as real

    assert isinstance(descriptors_for(real), EpollPoller)
    memory = MemoryReactorClock()
    fallback = descriptors_for(memory)
    assert isinstance(fallback, ReactorDescriptors)
    verifyObject(IDescriptors, fallback)
    (a, a_peer), = pairs(1)
    d, other = Descriptor(a), Descriptor(a)
    fallback.set(d, a.fileno(), 0, READ | WRITE)
    assert memory.readers == {d} and memory.writers == {d}
    fallback.set(d, a.fileno(), READ | WRITE, READ)
    assert memory.readers == {d} and not memory.writers
    fallback.hand_over(d, other, a.fileno(), READ, WRITE)
    assert not memory.readers and memory.writers == {other}


# -- the pump and the connect on the poller --------------------------------------------------------


def run_poller(poller: EpollPoller, limit: int = 1000) -> None:
    """
    Wake the poller while it has events (bounded).
    """
    for _ in range(limit):
        if not readable(poller):
            return
        poller.doRead()


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


class ConnectOwner:
    """
    Records how a hand-started connect ended.
    """

    def __init__(self) -> None:
        self.succeeded: list = []
        self.failed: list = []

    def connect_succeeded(self, connect) -> None:
        self.succeeded.append(connect)

    def connect_failed(self, failure, timed_out) -> None:
        self.failed.append((failure, timed_out))


def start_connect(reactor, fds, address, preamble: bytes = b"", timeout: float = 30):
    """
    A hand-started connect to C{address} and the owner it reports to.
    """
    owner = ConnectOwner()
    return DirectConnect(Route(reactor, socket.AF_INET, address, False), preamble, owner, timeout, fds), owner


def test_the_connects_registration_becomes_the_pumps_with_one_modify():
    """
    A hand-started connect registers for writability; once connected, the pump's destination
    leg takes its registration over with one modify (to reading), bytes flow both ways, and
    an orderly end unregisters both sockets before they close (FINs both ways).
    """
    poller, reactor, recorder = recording_poller()
    server = listener()
    try:
        connect, owner = start_connect(reactor, poller, server.getsockname(), b"hello ", 30)
        fd = connect.fileno()
        run_poller(poller)
        assert owner.succeeded == [connect] and not owner.failed
        destination, _ = server.accept()
        destination.setblocking(False)
        client, client_leg = tcp_pair()
        pump_owner = Owner()
        pump = SocketPump(reactor, client_leg, connect.sock, session(), pump_owner, b"", connect.preamble, fds=poller, connect=connect)
        pump.start()
        assert [c for c in recorder.calls if c[1] == fd] == [("register", fd, WRITE), ("modify", fd, READ)]
        client.sendall(b"world")
        run_poller(poller)
        destination.sendall(b"answer")
        run_poller(poller)
        assert drain(destination) == b"hello world" and drain(client) == b"answer"
        client.shutdown(socket.SHUT_WR)
        destination.shutdown(socket.SHUT_WR)
        run_poller(poller)
        assert pump_owner.ended == [None] and at_end(client) and at_end(destination)
        assert recorder.calls[-1][0] == "unregister" and len(poller) == 0
        assert [c for c in recorder.calls if c[1] == fd][-1] == ("unregister", fd)
        assert not reactor.getDelayedCalls(), "the connect timeout is still pending"
    finally:
        server.close()


def test_a_refused_connect_is_reported_once_and_unregistered():
    """
    A refusal is reported once, as Twisted's ConnectionRefusedError, with the socket
    unregistered and closed and the timeout cancelled.
    """
    poller, reactor, recorder = recording_poller()
    server = listener()
    address = server.getsockname()
    server.close()  # nothing listens there now: refused
    connect, owner = start_connect(reactor, poller, address)
    fd = connect.fileno()
    run_poller(poller)
    reactor.advance(0)  # (a refusal seen at once is reported a turn later)
    [(failure, timed_out)] = owner.failed
    assert failure.check(ConnectionRefusedError) and not timed_out and not owner.succeeded
    assert connect.fileno() == -1 and len(poller) == 0
    assert ("unregister", fd) in recorder.calls or not any(c[1] == fd for c in recorder.calls)
    assert not reactor.getDelayedCalls()
    connect.cancel()
    assert len(owner.failed) == 1


def test_a_connect_that_never_completes_times_out_once():
    """
    After connect_timeout the connect is reported timed out, its socket unregistered then
    closed; a cancel afterwards reports nothing more.
    """
    poller, reactor, recorder = recording_poller()
    server = listener()
    try:
        connect, owner = start_connect(reactor, poller, server.getsockname(), b"", 5)
        fd = connect.fileno()
        reactor.advance(5)  # the poller is never woken: the connect never completes for us
        [(failure, timed_out)] = owner.failed
        assert timed_out and connect.fileno() == -1
        assert recorder.calls == [("register", fd, WRITE), ("unregister", fd)]
        connect.cancel()
        assert len(owner.failed) == 1
    finally:
        server.close()


def test_a_cancelled_connect_is_reported_cancelled():
    """
    Cancelling (the session ended first) closes the socket and reports
    ConnectingCancelledError, once.
    """
    poller, reactor, recorder = recording_poller()
    server = listener()
    try:
        connect, owner = start_connect(reactor, poller, server.getsockname(), b"", 5)
        connect.cancel()
        connect.cancel()
        [(failure, timed_out)] = owner.failed
        assert failure.check(ConnectingCancelledError) and not timed_out
        assert len(poller) == 0 and not reactor.getDelayedCalls()
    finally:
        server.close()


def test_the_connect_hands_over_on_the_reactors_fdset_too():
    """
    On the fallback (the reactor's IReactorFDSet keys by object), the pump's leg replaces the
    connect as the registered descriptor.
    """
    reactor = MemoryReactorClock()
    server = listener()
    try:
        connect, owner = start_connect(reactor, None, server.getsockname())
        assert reactor.writers == {connect}
        select.select([], [connect.fileno()], [], 10)
        connect.doWrite()
        assert owner.succeeded == [connect]
        destination, _ = server.accept()
        client, client_leg = tcp_pair()
        pump = SocketPump(reactor, client_leg, connect.sock, session(), Owner(), connect=connect)
        pump.start()
        assert reactor.readers == {pump.client, pump.destination} and not reactor.writers
        pump.abort()
        destination.close()
    finally:
        server.close()


def pump_on_poller():
    """
    A started pump between two fresh connections, on a poller: (poller, pump, owner, the
    client's own end, the destination's own end).
    """
    poller, reactor, recorder = recording_poller()
    client, client_leg = tcp_pair()
    destination, destination_leg = tcp_pair()
    owner = Owner()
    pump = SocketPump(reactor, client_leg, destination_leg, session(), owner, fds=poller)
    pump.start()
    return poller, pump, owner, client, destination


def test_a_reset_polled_as_an_error_reaches_the_other_side_as_a_reset():
    """
    On the poller a leg hears an error or hang-up itself and its recv decides: a client's
    reset resets the destination (never a FIN), with no end of input reported.
    """
    poller, pump, owner, client, destination = pump_on_poller()
    client.sendall(b"partial")
    run_poller(poller)
    assert drain(destination) == b"partial"
    _reset(client)
    _wait_for_error(pump.client.sock)
    run_poller(poller)
    assert owner.ended == [CLIENT] and owner.eofs == []
    assert _was_reset(destination) and len(poller) == 0


def test_a_pump_lost_with_the_poller_ends_once_and_closes_both_sockets():
    """
    When the reactor stops and drops the poller, a pump registered on it is told its legs are
    lost: it resets both connections and ends once, although the poller has nothing
    registered any more when the pump unregisters its second leg.
    """
    poller, pump, owner, client, destination = pump_on_poller()
    poller.connectionLost(None)
    assert owner.ended == [CLIENT]
    assert pump.client.fileno() == pump.destination.fileno() == -1
    assert _was_reset(client) and _was_reset(destination)


def test_sessions_read_in_one_batch_each_keep_their_own_bytes():
    """
    The pumps on a poller read into one shared buffer.  Two sessions read in the same batch,
    one of them with no room at its destination for all of its read; then the other reads
    again before that rest is out: each destination still gets exactly its own client's bytes.
    """
    poller, reactor, _ = recording_poller()
    sessions = []
    for _ in range(2):
        client, client_leg = tcp_pair()
        destination, destination_leg = tcp_pair()
        pump = SocketPump(reactor, client_leg, destination_leg, session(), Owner(), fds=poller)
        pump.start()
        sessions.append((pump, client, destination))
    (slow, slow_client, slow_destination), (fast, fast_client, fast_destination) = sessions
    slow.destination.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    slow_destination.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    payload, noise = os.urandom(4 * 65536), b"\xff" * (4 * 65536)
    sent = [send_some(slow_client, payload), send_some(fast_client, noise)]
    poller.doRead()  # one batch: both clients' reads
    assert slow.held() > 0, "the destination took the whole read: the test proves nothing"
    assert fast.session.bytes_from_client > 0, "the other session did not read in the same batch"
    received = [b"", b""]
    for _ in range(10_000):
        for i, (_, client, destination) in enumerate(sessions):
            received[i] += drain(destination)
            sent[i] += send_some(client, (payload, noise)[i][sent[i] :])
        run_poller(poller, 1)
        if received == [payload, noise]:
            break
    assert received == [payload, noise]
    assert (slow.session.bytes_from_client, fast.session.bytes_from_client) == (len(payload), len(noise))
