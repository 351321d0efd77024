"""
The data plane: what moves a session's bytes once both of its legs are ready.

Two implementations of one interface (L{IPump}):

  - L{SocketPump}, for plain TCP legs: it takes both sockets over from Twisted's transports and
    forwards with its own reactor descriptors.  A read goes into the thread's read buffer
    (L{_Scratch}: no allocation per read, no buffer per session) and is sent on at once with one
    C{send}; only when the peer's socket buffer is full is the rest copied out and kept (at most
    one read) and the peer registered for writability, and the source stops reading until the
    peer has drained, so a session never holds more than one read per direction.  A FIN is passed on with
    C{shutdown(SHUT_WR)} once what came before it is sent; a reset (a read or send error, or an
    end of input while the socket has an error pending) resets the other leg too
    (C{SO_LINGER {1, 0}} then close), so a truncated stream never looks complete.  Twisted's
    per-write buffering (a write queued, sent a reactor turn later after two C{epoll_ctl}
    calls) is what this saves.  Once a read fills the buffer (bulk), that direction moves its
    bytes with C{os.splice} through a pipe instead (no copy through user space; about half the
    CPU per byte on loopback); pipes come from a small pool (L{PIPES}, at most L{MAX_PIPES}
    open), are held by a leg only while a slow peer has not taken their bytes, and a pipe with
    an aborted session's bytes is closed, never pooled.
  - L{TransportPump}, for legs with TLS (or anything that is not a plain socket): Twisted's
    transports, each the other's streaming producer; the relay still hears their endings.

Rate limits (L{wingate_map.relay._ratelimit.Limiter}, one per direction) plug into both: the source
reads only as many bytes as the limit allows now and otherwise stops reading until it allows
more, so bytes wait in the kernel, not here.

Taking a transport over (L{take_over}): it is paused and unregistered from the reactor, its
socket is used directly, and whatever it still had buffered is sent first.  Its protocol then
never hears C{connectionLost}: the session's bookkeeping is driven by the pump's calls to its
owner (L{IPumpOwner}).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    ITCPTransport,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import Attribute, Interface, implementer

from ._accept import AcceptedSocket
from ._poller import READ, WRITE, ReactorDescriptors
from ._ratelimit import Limiter, Throttle
from ._tcp_internals import unsent as _unsent
from ._tcp_internals import write_closed

#: The most bytes read at once (and so held per direction when the peer is slow).
READ_SIZE = 256 * 1024

#: splice: a direction switches to it after a read fills READ_SIZE (bulk); each move goes
#: through a pipe of PIPE_SIZE taken from a small pool only for the move (kept by the leg only
#: while its peer is too slow to take all of it), and never more than MAX_PIPES at once (each
#: is two file descriptors): beyond that, reads go through user space.
PIPE_SIZE = READ_SIZE
MAX_PIPES = 64
_KEEP_PIPES = 8
_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
CLIENT = "client"
DESTINATION = "destination"


class _Pipes:
    """
    The process's pool of pipes for splice: a pipe is taken for one move and given back empty
    at once, or kept by a leg while it still holds bytes for a slow peer; a pipe with an
    aborted session's bytes in it is closed, never given back.

    @ivar open: how many pipes are open (in the pool or held by a leg).
    """

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []
        self.open = 0

    def get(self) -> tuple[int, int] | None:
        """
        An empty pipe (read end, write end), or None when MAX_PIPES are open.
        """
        if self.free:
            return self.free.pop()
        if self.open >= MAX_PIPES:
            return None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default size (64 KiB) works too, in smaller moves
        self.open += 1
        return (r, w)

    def put(self, pipe: tuple[int, int]) -> None:
        """
        Give an empty pipe back.
        """
        if len(self.free) < _KEEP_PIPES:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """
        Close a pipe (it may hold bytes that must go nowhere).
        """
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1


PIPES = _Pipes()


class _Scratch(threading.local):
    """
    The read buffer of the pumps running in a thread (a reactor runs in one): a read is sent on
    from it at once, and what the peer does not take is copied out before the read returns, so
    every session of every service in the thread shares it, an idle session holds none of it,
    and a read allocates nothing.  (Per thread, not per process: C{recv_into} lets go of the
    GIL, so another thread's reactor must not read into the same bytes.)  Allocated with the
    thread's first pump: a fixed READ_SIZE per thread that pumps, not memory that grows with
    the first large read.
    """

    view: memoryview | None = None  # (a class default: every thread starts without one)

    def get(self) -> memoryview:
        """
        This thread's buffer (READ_SIZE bytes).
        """
        view = self.view
        if view is None:
            view = self.view = memoryview(bytearray(READ_SIZE))
        return view


_SCRATCH = _Scratch()


class IPump(Interface):
    """
    Moves a wired session's bytes both ways and keeps its byte counts.
    """

    last_activity = Attribute("When a byte last moved (the clock's seconds), for the idle timeout.")

    def start(early: bytes, client_eof: bool) -> None:
        """
        Begin relaying: C{early} client bytes go to the destination first; C{client_eof}: the
        client already finished sending (its FIN is passed on).
        """

    def held() -> int:
        """
        How many bytes the relay holds now (read but not yet sent on).
        """

    def abort() -> None:
        """
        End the session now: both legs reset, nothing buffered is sent.
        """


class IPumpOwner(Interface):
    """
    What a L{SocketPump} tells the session about (it owns the sockets, so nobody else can).
    """

    def pump_eof(side: str) -> None:
        """
        C{side} (L{CLIENT} or L{DESTINATION}) finished sending (a FIN); passed on already.
        """

    def pump_ended(reset_by: str | None) -> None:
        """
        Both sockets are closed: the session is over.  C{reset_by}: the side whose reset ended
        it (L{CLIENT} or L{DESTINATION}), or None for an orderly end or an L{IPump.abort}.
        """


def _is_again(error: OSError) -> bool:
    return isinstance(error, (BlockingIOError, InterruptedError)) or error.errno in _AGAIN


def _tcp_transport(transport: Any) -> FileDescriptor | AcceptedSocket | None:
    """
    The TCP connection under C{transport} (itself, or under protocol wrappers such as a
    worker's reset-on-death layer): a Twisted TCP transport or a lean accepted socket
    (relay._accept), or None.
    """
    for _ in range(4):
        if type(transport) is AcceptedSocket:
            return transport
        if isinstance(transport, FileDescriptor) and ITCPTransport.providedBy(transport):
            return transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            return None  # TLS: its bytes are not the socket's
        transport = transport.__dict__.get("transport") if hasattr(transport, "__dict__") else None
        if transport is None:
            return None
    return None


def take_over(reactor: Any, client: Any, destination: Any) -> tuple[socket.socket, socket.socket, bytes, bytes] | None:
    """
    Take both legs' sockets from their Twisted transports, if both are plain TCP connections on
    a reactor with file descriptors: (client socket, destination socket, bytes still to send to
    the client, bytes still to send to the destination), or None (then nothing was touched).
    """
    if not IReactorFDSet.providedBy(reactor):
        return None
    legs = [_tcp_transport(client), _tcp_transport(destination)]
    taken: list[Any] = []
    for leg in legs:
        if type(leg) is AcceptedSocket:
            # Accepted lean: never registered, nothing buffered; handed on below.
            if leg.socket is None or leg.disconnecting:
                return None
            taken.append((leg, b""))
            continue
        if leg is None or not leg.connected or leg.disconnecting or leg.disconnected or write_closed(leg):
            return None
        if not isinstance(getattr(leg, "socket", None), socket.socket) or leg.producer is not None:
            return None
        unsent = _unsent(leg)
        if unsent is None:
            return None
        taken.append((leg, unsent))
    (c, c_unsent), (d, d_unsent) = taken
    c_socket, d_socket = c.socket, d.socket
    for leg, _ in taken:
        if type(leg) is AcceptedSocket:
            leg.take()
        else:
            leg.stopReading()
            leg.stopWriting()
    return c_socket, d_socket, c_unsent, d_unsent


@implementer(IReadDescriptor, IWriteDescriptor, IHalfCloseableDescriptor)
class _Leg:
    """
    One socket of a L{SocketPump}: reads it (forwarding to the other leg) and writes what the
    other leg read that did not fit.  The reactor keeps one object per file descriptor, so the
    same object does both.
    """

    __slots__ = (
        "pump", "side", "sock", "fd", "peer", "out", "reading", "writing", "mask", "read_done", "shut", "shut_pending", "limiter",
        "wake", "splicing", "pipe", "piped", "__weakref__",
    )

    def __init__(self, pump: "SocketPump", side: str, sock: socket.socket, limiter: Limiter | None) -> None:
        self.pump = pump
        self.side = side
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.peer: _Leg = self
        self.out: Any = b""  # bytes (or a memoryview) still to send to this socket
        self.reading = False
        self.writing = False
        self.mask = 0  # what it is registered for (poller.READ | poller.WRITE), see SocketPump._sync
        self.read_done = False  # end of input seen
        self.shut = False  # our FIN sent (shutdown(SHUT_WR))
        self.shut_pending = False  # send it once self.out is out
        self.limiter = limiter  # the rate limit on what this leg reads
        self.wake: Any = None  # the call that resumes reading once the limit allows it
        self.splicing = False  # this leg's reads are spliced (they filled the buffer once)
        self.pipe: tuple[int, int] | None = None  # a pipe holding bytes still to send to this socket
        self.piped = 0  # how many

    # -- the reactor's side ---------------------------------------------------------------------

    def fileno(self) -> int:
        """
        The socket's file descriptor, -1 once it is closed.
        """
        return self.fd

    def logPrefix(self) -> str:
        """
        How the reactor names this descriptor in its log.
        """
        return f"wingatemap-pump-{self.side}"

    def doRead(self) -> None:
        """
        The socket is readable: read one chunk (as much as the rate limit allows) and send it on.
        """
        sock = self.sock
        if sock is None or not self.reading:
            return  # closed or paused: an event left over from before
        size = READ_SIZE
        limiter = self.limiter
        if limiter is not None:
            size = min(size, limiter.available())
            if size <= 0:
                self.pump._wait_for_tokens(self)
                return
        pump = self.pump
        # Bulk: the bytes go through a pipe, in the kernel (no pipe free: through user space).
        pipe = PIPES.get() if self.splicing else None
        if pipe is not None:
            try:
                # Into an empty pipe: EAGAIN can only mean the socket has nothing.
                n = _SPLICE(self.fd, pipe[1], size, flags=_SPLICE_FLAGS)  # type: ignore[misc]
            except OSError as e:
                PIPES.put(pipe)
                if not _is_again(e):
                    pump._reset(self)
                return
            if not n:
                PIPES.put(pipe)
        else:
            # Into the thread's read buffer (see _Scratch): nothing of it is kept past this call.
            buffer = pump.buffer
            try:
                n = sock.recv_into(buffer, size)
            except OSError as e:
                if not _is_again(e):
                    pump._reset(self)
                return
        if not n:
            pump._eof(self)
            return
        # Counted (before it is passed on: a failure there ends the session and reports the
        # counts), taken from the rate limit, and the activity noted.
        if limiter is not None:
            limiter.take(n)
        if pump.track_idle:
            pump.last_activity = pump.clock.seconds()
        if self.side is CLIENT:
            pump.session.bytes_from_client += n
        else:
            pump.session.bytes_to_client += n
        if pipe is not None:
            pump._splice_on(self, pipe, n)
            return
        peer = self.peer
        try:
            sent = peer.sock.send(buffer[:n])  # type: ignore[union-attr]
        except OSError as e:
            if not _is_again(e):
                pump._reset(peer)
                return
            sent = 0
        if sent < n:
            # The peer is slow: keep a copy of the rest (the buffer is the next read's, maybe
            # another session's), stop reading until it is out.
            peer.out = buffer[sent:n].tobytes()
            pump._set_writing(peer, True)
            pump._set_reading(self, False)
        if n == READ_SIZE and _SPLICE is not None:
            self.splicing = True  # bulk: move the next reads in the kernel

    def doWrite(self) -> None:
        """
        The socket can take more: send what is kept for it; once it is all out, pass on a
        pending FIN and let the other leg read again.
        """
        if self.writing:
            self.pump._flush(self)

    def readConnectionLost(self, reason: Any) -> None:
        """
        The reactor saw the end of input (a hang-up with nothing left to read) and stopped
        reading.  Only Twisted's reactor says this, also for a reset it polled while the kernel
        was still handling it (EPOLLERR without EPOLLIN, see
        L{wingate_map.relay._protocol.pending_socket_error}): the socket's pending error tells
        a reset from a FIN.  (A FIN read by C{recv} needs no such check: C{recv} reports a
        pending error before an end of input.)
        """
        self.reading = False
        self.mask &= ~READ
        sock = self.sock
        if sock is None:
            return
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            error = errno.EBADF
        if error:
            self.pump._reset(self)
        else:
            self.pump._eof(self)

    def writeConnectionLost(self, reason: Any) -> None:
        """
        Never called for a socket (the reactor reports hang-ups as lost connections).
        """

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor gave up on this descriptor (an error or hang-up while only writing): it is
        unregistered already; a reset ends the session.
        """
        self.reading = self.writing = False
        self.mask = 0
        if self.sock is None:
            return
        self.pump._reset(self)


@implementer(IPump)
class SocketPump:
    """
    Relays between two plain TCP sockets with the reactor's file-descriptor API (see the
    module's docstring).

    @ivar session: the L{wingate_map.sessions.Session} whose byte counts it keeps.
    """

    __slots__ = ("fds", "clock", "session", "owner", "track_idle", "lingers", "last_activity", "ended", "_reset_by", "client", "destination", "buffer")

    def __init__(
        self,
        reactor: Any,
        client: socket.socket,
        destination: socket.socket,
        session: Any,
        owner: IPumpOwner,
        client_unsent: bytes = b"",
        destination_unsent: bytes = b"",
        limits: tuple[Limiter | None, Limiter | None] = (None, None),
        track_idle: bool = False,
        fds: Any = None,
        connect: Any = None,
        lingers: bool = True,
    ) -> None:
        """
        @param reactor: the clock (and, without C{fds}, where descriptors are registered).
        @param limits: the rate limits on what the client sends and on what the destination
            sends (None: unlimited).
        @param track_idle: keep L{last_activity} (one clock read per chunk).
        @param fds: where the legs are registered (L{wingate_map.relay._poller.IDescriptors}),
            by default the reactor's own C{IReactorFDSet}.
        @param connect: the hand-started connect that made C{destination}
            (L{wingate_map.relay._connect.DirectConnect}), still registered: its registration
            becomes the destination leg's (a modify, not a delete and an add).
        @param lingers: the sockets may be set to reset on close (a worker's, see
            L{_close}); False: they are not, and an orderly close needs no C{setsockopt}.
        """
        self.fds = fds if fds is not None else ReactorDescriptors(reactor)
        self.buffer = _SCRATCH.get()  # this thread's: the pump runs in its reactor's
        self.clock: IReactorTime = reactor
        self.session = session
        self.owner = owner
        self.track_idle = track_idle
        self.lingers = lingers
        self.last_activity = reactor.seconds()
        self.ended = False
        self._reset_by: str | None = None
        c = _Leg(self, CLIENT, client, limits[0])
        d = _Leg(self, DESTINATION, destination, limits[1])
        c.peer, d.peer = d, c
        c.out, d.out = client_unsent, destination_unsent
        self.client, self.destination = c, d
        if connect is not None and connect.mask:
            self.fds.hand_over(connect, d, d.fd, connect.mask, connect.mask)
            d.mask, connect.mask = connect.mask, 0

    # -- IPump --------------------------------------------------------------------------------

    def start(self, early: bytes = b"", client_eof: bool = False) -> None:
        """
        Send what is pending to each leg, then read both (see L{IPump.start}).
        """
        c, d = self.client, self.destination
        if early:
            self.session.bytes_from_client += len(early)
            d.out = bytes(d.out) + early if d.out else early
        if client_eof:
            c.read_done = True
            d.shut_pending = True
        for leg in (c, d):
            if leg.out or leg.shut_pending:
                self._flush(leg)  # sends now, or registers for writability
                if self.ended:
                    return
        self._update_reading(c)
        self._update_reading(d)

    def held(self) -> int:
        """
        Bytes read but not yet sent on (at most one read per direction).
        """
        return len(self.client.out) + len(self.destination.out) + self.client.piped + self.destination.piped

    def abort(self) -> None:
        """
        Reset both legs now and end (see L{IPump.abort}).
        """
        if not self.ended:
            self._close(self.client, reset=True)
            self._close(self.destination, reset=True)
            self._finish()

    # -- registration ---------------------------------------------------------------------------

    def _set_reading(self, leg: _Leg, on: bool) -> None:
        if on != leg.reading:
            leg.reading = on
            self._sync(leg)

    def _set_writing(self, leg: _Leg, on: bool) -> None:
        if on != leg.writing:
            leg.writing = on
            self._sync(leg)

    def _sync(self, leg: _Leg) -> None:
        """
        Register C{leg} for what it waits for now (one change of interest: one call).
        """
        mask = (READ if leg.reading else 0) | (WRITE if leg.writing else 0)
        if mask != leg.mask:
            self.fds.set(leg, leg.fd, leg.mask, mask)
            leg.mask = mask

    def _update_reading(self, leg: _Leg) -> None:
        """
        Read C{leg} unless its input is done, its peer still holds bytes, or the rate limit
        has it waiting.
        """
        peer = leg.peer
        self._set_reading(leg, not leg.read_done and not peer.out and not peer.piped and leg.wake is None and leg.sock is not None)

    def _wait_for_tokens(self, leg: _Leg) -> None:
        """
        The rate limit allows nothing now: stop reading C{leg} until it allows a chunk.
        """
        assert leg.limiter is not None
        self._set_reading(leg, False)
        delay = leg.limiter.delay_for(min(READ_SIZE, int(leg.limiter.burst)))
        leg.wake = self.clock.callLater(max(delay, 0.001), self._tokens_ready, leg)

    def _tokens_ready(self, leg: _Leg) -> None:
        leg.wake = None
        if not self.ended:
            self._update_reading(leg)

    def _flush(self, leg: _Leg) -> None:
        """
        Send what is kept for C{leg}; once it is all out, pass on a pending FIN and let the
        other leg read again.
        """
        sock = leg.sock
        if sock is None:
            return
        if leg.piped:
            try:
                sent = _SPLICE(leg.pipe[0], leg.fd, leg.piped, flags=_SPLICE_FLAGS)  # type: ignore[index,misc]
            except OSError as e:
                if not _is_again(e):
                    self._reset(leg)
                return
            leg.piped -= sent
            if leg.piped:
                self._set_writing(leg, True)
                return
            PIPES.put(leg.pipe)  # type: ignore[arg-type]
            leg.pipe = None
        out = leg.out
        if out:
            try:
                sent = sock.send(out)
            except OSError as e:
                if not _is_again(e):
                    self._reset(leg)
                return
            if sent < len(out):
                leg.out = memoryview(out)[sent:]  # a view of what it keeps: no copy per send
                self._set_writing(leg, True)
                return
            leg.out = b""
        self._set_writing(leg, False)
        if leg.shut_pending:
            self._shut(leg)
        elif leg.peer.sock is not None:
            self._update_reading(leg.peer)

    def _splice_on(self, leg: _Leg, pipe: tuple[int, int], n: int) -> None:
        """
        C{leg} spliced C{n} bytes into C{pipe}: move them on to its peer, in the kernel.
        """
        peer = leg.peer
        try:
            sent = _SPLICE(pipe[0], peer.fd, n, flags=_SPLICE_FLAGS)  # type: ignore[misc]
        except OSError as e:
            if not _is_again(e):
                PIPES.discard(pipe)
                self._reset(peer)
                return
            sent = 0
        if sent < n:
            # The peer is slow: it keeps the pipe with the rest; stop reading until it is out.
            peer.pipe, peer.piped = pipe, n - sent
            self._set_writing(peer, True)
            self._set_reading(leg, False)
        else:
            PIPES.put(pipe)

    # -- endings --------------------------------------------------------------------------------

    def _eof(self, leg: _Leg) -> None:
        """
        C{leg} sent its FIN.
        """
        leg.read_done = True
        self._set_reading(leg, False)
        if leg.wake is not None:
            leg.wake.cancel()
            leg.wake = None
        self.owner.pump_eof(leg.side)
        if self.ended:
            return
        peer = leg.peer
        if peer.out or peer.piped:
            peer.shut_pending = True
        else:
            self._shut(peer)

    def _shut(self, leg: _Leg) -> None:
        """
        Send C{leg} our FIN (all its bytes are out); end once both directions are done.
        """
        leg.shut_pending = False
        peer = leg.peer
        leg.shut = True
        if leg.read_done and peer.shut and peer.read_done:
            # The last FIN: both sockets close now, and the close sends it (after any bytes
            # still in the kernel; nothing is left unread on either: both inputs ended).
            self._close(self.client, reset=False)
            self._close(self.destination, reset=False)
            self._finish()
            return
        try:
            leg.sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError:
            self._reset(leg)

    def _reset(self, leg: _Leg) -> None:
        """
        C{leg} was reset (or failed): reset the other one too and end.
        """
        if self.ended:
            return
        self._reset_by = leg.side
        self._close(leg.peer, reset=True)
        self._close(leg, reset=True)
        self._finish()

    def _close(self, leg: _Leg, reset: bool) -> None:
        """
        Unregister C{leg}, then close its socket: with a reset (C{SO_LINGER {1, 0}}), or in
        order (linger cleared if it may be set: a worker sets it to reset if it dies).
        """
        sock = leg.sock
        if sock is None:
            return
        leg.reading = leg.writing = False
        self._sync(leg)  # unregistered before the socket closes
        if leg.wake is not None:
            if leg.wake.active():
                leg.wake.cancel()
            leg.wake = None
        leg.sock = None
        leg.fd = -1
        leg.out = b""
        if leg.pipe is not None:
            PIPES.discard(leg.pipe)  # it may hold bytes: never back to the pool
            leg.pipe, leg.piped = None, 0
        if reset or self.lingers:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if reset else _LINGER_OFF)
            except OSError:
                pass
        sock.close()

    def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.owner.pump_ended(self._reset_by)


@implementer(IPushProducer)
class _Gate:
    """
    A transport as a streaming producer paused for two reasons: its consumer is full, or the
    rate limit.  It reads again only when neither holds.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.full = False
        self.limited = False

    def _apply(self, was_paused: bool) -> None:
        paused = self.full or self.limited
        if paused and not was_paused:
            self.transport.pauseProducing()
        elif was_paused and not paused:
            self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        """
        The consumer is full.
        """
        was, self.full = self.full or self.limited, True
        self._apply(was)

    def resumeProducing(self) -> None:
        """
        The consumer drained.
        """
        was, self.full = self.full or self.limited, False
        self._apply(was)

    def limit(self, on: bool) -> None:
        """
        The rate limit holds (C{on}) or allows more.
        """
        was, self.limited = self.full or self.limited, on
        self._apply(was)

    def stopProducing(self) -> None:
        """
        The consumer is gone: so is the transport.
        """
        self.transport.stopProducing()


@implementer(IPump)
class TransportPump:
    """
    Relays between two Twisted transports (TLS legs, test transports): each is the other's
    streaming producer, so a slow reader pauses the fast writer.  The relay feeds it what each
    leg receives (L{from_client}, L{from_destination}) and handles the legs' endings itself.
    With a rate limit, a direction goes through a L{Throttle}, which holds at most one read.
    """

    def __init__(self, clock: IReactorTime, client: Any, destination: Any, session: Any, limits: tuple[Limiter | None, Limiter | None] = (None, None), track_idle: bool = False) -> None:
        self.clock = clock
        self.client = client
        self.destination = destination
        self.session = session
        self.track_idle = track_idle
        self.last_activity = clock.seconds()
        up, down = limits
        self._client_producer: Any = client
        self._destination_producer: Any = destination
        self._throttles: dict[str, Throttle] = {}
        self._up: Any = destination.write
        self._down: Any = client.write
        if up is not None:
            gate = self._client_producer = _Gate(client)
            self._up = self._throttle(CLIENT, up, destination.write, gate)
        if down is not None:
            gate = self._destination_producer = _Gate(destination)
            self._down = self._throttle(DESTINATION, down, client.write, gate)

    def _throttle(self, side: str, limiter: Limiter, write: Any, gate: _Gate) -> Any:
        throttle = self._throttles[side] = Throttle(limiter, self.clock, write, lambda: gate.limit(True), lambda: gate.limit(False))
        return throttle.write

    def after_sent(self, side: str, action: Any) -> None:
        """
        Call C{action} once everything C{side} sent has been passed on (at once, unless the
        rate limit still holds some): an end of stream must follow the bytes before it, and a
        TLS leg can deliver both in one go.
        """
        throttle = self._throttles.get(side)
        if throttle is None:
            action()
        else:
            throttle.when_empty(action)

    def start(self, early: bytes = b"", client_eof: bool = False) -> None:
        """
        Register each transport as the other's producer and let the client read (see
        L{IPump.start}).
        """
        if early:
            self.session.bytes_from_client += len(early)
            self.destination.write(early)
        self.client.registerProducer(self._destination_producer, True)
        if client_eof:
            self.destination.loseWriteConnection()
        else:
            self.destination.registerProducer(self._client_producer, True)
            self.client.resumeProducing()

    def from_client(self, data: bytes) -> None:
        """
        The client sent C{data}: count it and pass it on.
        """
        self.session.bytes_from_client += len(data)
        if self.track_idle:
            self.last_activity = self.clock.seconds()
        self._up(data)

    def from_destination(self, data: bytes) -> None:
        """
        The destination sent C{data}: count it and pass it on.
        """
        self.session.bytes_to_client += len(data)
        if self.track_idle:
            self.last_activity = self.clock.seconds()
        self._down(data)

    def held(self) -> int:
        """
        Bytes held by the rate limit (the transports' own buffers are bounded by flow control).
        """
        return sum(t.held for t in self._throttles.values())

    def stop(self) -> None:
        """
        The session is ending: drop what the rate limit holds and cancel its wake-ups.
        """
        for throttle in self._throttles.values():
            throttle.stop()

    def abort(self) -> None:
        """
        Reset both transports (see L{IPump.abort}); the relay hears their endings.
        """
        self.stop()
        for transport in (self.destination, self.client):
            transport.unregisterProducer()
            transport.abortConnection()
