"""
The lean accept: a listening port whose plain connections are not Twisted transports until
they need to be.

Twisted's C{tcp.Port} wraps every accepted socket in a C{tcp.Server}: a FileDescriptor
registered for reading at once (epoll ADD), address objects, a log prefix.  A plain mapping's
relay pauses it straight away (epoll DEL), asks two C{setsockopt}s, decides, and then hands
the socket to the socket pump, which registers it itself: the Server never reads a byte.
L{ListeningPort} builds an L{AcceptedSocket} instead for the connections that qualify (see
L{lean_accept}): a small object holding the socket and the peer's address, never registered
with the reactor.  The kernel holds the client's bytes until the pump takes the socket (as
before: no byte is read before the session is allowed).  Where a session turns out to need a
real transport after all (its destination speaks TLS, so L{TransportPump} relays it), the
relay L{promote}s it to a C{tcp.Server} on the same socket.

Which connections are lean (decided per connection by the relay: a reload may change the
mapping behind an open port): no TLS listener (the handshake needs Twisted's TLS transport),
no PROXY header from clients and no C{peek_sni} (both read the client's first bytes before
deciding), and the socket pump on (otherwise every session relays through Twisted's
transports).  Everything else gets a C{tcp.Server}, exactly as from C{reactor.listenTCP}.

TCP_NODELAY and SO_KEEPALIVE are set once on the listening socket: Linux copies both to every
accepted socket (tests/test_lean_accept.py checks it), which saves two C{setsockopt}s a
connection.

L{ListeningPort.doRead} accepts as C{Port.doRead} does, for less per connection: the accepted
socket object is built from the listening socket's family and type as read once (Python's
C{socket.accept} reads both, as enums, for every connection: about 2 µs), and no log buffering
is set up around the loop (about 1.5 µs a wake); an accept error other than "none waiting" is
left to C{Port.doRead}, which recovers from it (C{EMFILE}) and logs it.

This module imports C{twisted.internet.tcp}'s C{Port} and C{Server} (classes Twisted does not
document for end users): L{ListeningPort} relies on C{Port.doRead} (for accept errors) calling
the class attribute C{transport} as C{transport(socket, protocol, address, port, sessionno,
reactor)}, on C{Port._buildAddr}, C{numberAccepts}, C{sessionno} and C{_realPortNumber};
pyproject.toml pins Twisted below its next major version.  It also calls the listening socket's
C{_accept} (what C{socket.accept} itself calls: the new descriptor and the peer's address),
the only way to accept without C{socket.accept}'s per-connection enum conversions.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.tcp import Port, Server
from twisted.python.failure import Failure

_LINGER_RESET = struct.pack("ii", 1, 0)


def _host(address: tuple[Any, ...]) -> tuple[str, int]:
    """
    (host, port) of a socket address; an IPv4-mapped IPv6 host as its IPv4 address.
    """
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return host, address[1]


def _sockname(sock: socket.socket) -> tuple[Any, ...]:
    """
    C{sock}'s local address as Twisted's transports give it (an IPv6 scope by name).
    """
    address = sock.getsockname()
    if len(address) == 4:
        host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        address = (host,) + tuple(address[1:])
    return address


def _address_object(address: tuple[Any, ...]) -> Any:
    if len(address) == 2:
        return IPv4Address("TCP", *address)
    return IPv6Address("TCP", *address)


class AcceptedSocket:
    """
    An accepted connection of a plain mapping, before the socket pump takes it: what the relay
    uses of a transport until then, and nothing registered with the reactor.

    Closing it (L{loseConnection}: a FIN; L{abortConnection}: a reset) tells the protocol
    C{connectionLost} a reactor turn later, once, as Twisted's transports do.

    @ivar peer: the client's (host, port).
    @ivar client: the address the port accepted from (as C{tcp.Server} takes it).
    @ivar socket: the connected socket; None once the pump (or a promotion) has it or it is closed.
    """

    __slots__ = ("socket", "protocol", "client", "peer", "server", "sessionno", "reactor", "connected", "disconnecting", "disconnected")

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...], server: "ListeningPort", sessionno: int, reactor: Any) -> None:
        sock.setblocking(False)  # accepted blocking (Python's accept); the pump needs it not
        self.socket: socket.socket | None = sock
        self.protocol = protocol
        self.client = client
        self.peer = _host(client)
        self.server = server
        self.sessionno = sessionno
        self.reactor = reactor
        self.connected = 1
        self.disconnecting = False
        self.disconnected = False

    # -- addresses ---------------------------------------------------------------------------

    def local(self) -> tuple[str, int]:
        """
        This side's (host, port): the port's bound address, or (on a wildcard address) the
        socket's own.
        """
        bound = self.server.local
        if bound is not None:
            return bound
        return _host(_sockname(self.socket)) if self.socket is not None else ("", 0)

    def getPeer(self) -> Any:
        """
        The client's address, as Twisted's transports give it.
        """
        return _address_object(self.client)

    def getHost(self) -> Any:
        """
        This side's address, as Twisted's transports give it.
        """
        if self.server.local is not None:
            return self.server.local_address
        return _address_object(_sockname(self.socket)) if self.socket is not None else None

    def getHandle(self) -> Any:
        """
        The socket (None once it was handed on or closed).
        """
        return self.socket

    def fileno(self) -> int:
        """
        The socket's file descriptor, -1 once it was handed on or closed.
        """
        return self.socket.fileno() if self.socket is not None else -1

    # -- producer and consumer: nothing is read or written here --------------------------------

    def pauseProducing(self) -> None:
        """
        Nothing to pause: the socket is not read until the pump takes it.
        """

    def stopProducing(self) -> None:
        """
        Stop: close the connection (as a transport's C{stopProducing} does).
        """
        self.loseConnection()

    def unregisterProducer(self) -> None:
        """
        No producer is ever registered here.
        """

    def resumeProducing(self) -> None:
        """
        Reading wanted after all (not expected for a lean connection): become a real
        transport that reads.
        """
        server = promote(self)
        if server is not None:
            server.startReading()

    # -- endings -----------------------------------------------------------------------------

    def loseConnection(self) -> None:
        """
        Close in order (a FIN); the protocol hears C{connectionLost(ConnectionDone)} a reactor
        turn later.
        """
        self._close(True)

    def abortConnection(self) -> None:
        """
        Close with a reset; the protocol hears C{connectionLost(ConnectionAborted)} a reactor
        turn later.
        """
        self._close(False)

    def _close(self, orderly: bool) -> None:
        if self.disconnecting or self.socket is None:
            return
        self.disconnecting = True
        self.reactor.callLater(0, self._lost, orderly)

    def _lost(self, orderly: bool) -> None:
        sock, self.socket = self.socket, None
        if sock is None:  # taken meanwhile (not expected)
            return
        try:
            if orderly:
                sock.shutdown(socket.SHUT_RDWR)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        sock.close()
        self.connected = 0
        self.disconnected = True
        protocol, self.protocol = self.protocol, None
        protocol.connectionLost(Failure(ConnectionDone() if orderly else ConnectionAborted()))

    def take(self) -> socket.socket | None:
        """
        Hand the socket on (to the socket pump, which closes it): this object lets it go.
        None if it is closed or closing.
        """
        if self.disconnecting or self.socket is None:
            return None
        sock, self.socket = self.socket, None
        self.connected = 0
        self.protocol = None
        return sock


def lean_of(transport: Any) -> AcceptedSocket | None:
    """
    The L{AcceptedSocket} a relay's C{transport} is (itself, or under a worker's
    reset-on-death wrapper), or None.
    """
    if type(transport) is AcceptedSocket:
        return transport
    inner = getattr(transport, "__dict__", None)
    inner = inner.get("transport") if inner is not None else None
    return inner if type(inner) is AcceptedSocket else None


def promote(lean: AcceptedSocket) -> Any:
    """
    Make C{lean} a real C{tcp.Server} on the same socket, not reading yet (the relay resumes
    it), and give it to the protocol the port built (the relay, or its wrapper) as its
    transport.  Returns the server, or None if C{lean} is already closed or handed on.
    """
    protocol = lean.protocol
    sock = lean.take()
    if sock is None:
        return None
    server = Server(sock, protocol, lean.client, lean.server, lean.sessionno, lean.reactor)
    server.stopReading()
    protocol.transport = server
    return server


def real_transport(transport: Any) -> Any:
    """
    C{transport}, promoted (see L{promote}) if it is an L{AcceptedSocket} or is over one: what
    a session that relays through Twisted's transports uses.
    """
    lean = lean_of(transport)
    if lean is None:
        return transport
    server = promote(lean)
    if transport is lean:
        return server
    return transport  # a wrapper: its transport is the server now


def _connection(sock: socket.socket, protocol: Any, client: tuple[Any, ...], port: "ListeningPort", sessionno: int, reactor: Any) -> Any:
    """
    What L{ListeningPort} wraps an accepted socket in: an L{AcceptedSocket} if the relay says
    the connection is lean (C{lean_accept}), else Twisted's C{tcp.Server}.
    """
    relay = getattr(protocol, "wrappedProtocol", protocol)  # a worker's reset-on-death wrapper
    wants = getattr(relay, "lean_accept", None)
    if wants is not None and wants():
        return AcceptedSocket(sock, protocol, client, port, sessionno, reactor)
    return Server(sock, protocol, client, port, sessionno, reactor)


class ListeningPort(Port):
    """
    A listening TCP port (as from C{reactor.listenTCP}) whose plain connections are accepted
    lean (see the module's docstring), with TCP_NODELAY and SO_KEEPALIVE set once on the
    listening socket for every accepted one.

    @ivar local: the bound (host, port) when the address is not a wildcard, else None.
    @ivar local_address: the same as Twisted's address object.
    """

    transport = staticmethod(_connection)

    local: tuple[str, int] | None = None
    local_address: Any = None
    _accepts_as: tuple[int, int, int] = (0, 0, 0)  # the accepted sockets' family, type, proto

    def createInternetSocket(self) -> socket.socket:
        """
        The listening socket, with the options accepted sockets inherit.
        """
        sock = super().createInternetSocket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def startListening(self) -> None:
        """
        Listen, and note the bound address for L{AcceptedSocket.local}.
        """
        super().startListening()
        listening = self.socket
        self._accepts_as = (int(listening.family), int(listening.type), listening.proto)
        address = _sockname(listening)
        host = address[0]
        if host not in ("0.0.0.0", "::"):
            self.local = _host(address)
            self.local_address = _address_object(address)

    def doRead(self) -> None:
        """
        Accept the connections waiting (up to C{numberAccepts}, adapted as C{Port.doRead}
        adapts it) and give each to a protocol of the factory, as C{Port.doRead} does (see the
        module's docstring for what it saves); an accept error other than "none waiting" is
        handled by C{Port.doRead}.
        """
        try:
            family, kind, proto = self._accepts_as
            accept = self.socket._accept
            limit = self.numberAccepts
            accepted = 0
            while accepted < limit:
                try:
                    fd, address = accept()
                except BlockingIOError:
                    break
                except OSError:
                    # EMFILE, EPERM, ECONNABORTED...: Twisted's loop recovers and logs.
                    Port.doRead(self)
                    return
                accepted += 1
                sock = socket.socket(family, kind, proto, fileno=fd)
                if len(address) == 4:  # IPv6: the scope by name, as Port.doRead gives it
                    host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
                    address = (host,) + tuple(address[1:])
                protocol = self.factory.buildProtocol(self._buildAddr(address))
                if protocol is None:
                    sock.close()
                    continue
                number = self.sessionno
                self.sessionno = number + 1
                protocol.makeConnection(self.transport(sock, protocol, address, self, number, self.reactor))
            if accepted == limit:
                self.numberAccepts = limit + 20  # more may be waiting next time
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            self._logger.failure("mapping port {port}: accepting connections failed", port=self._realPortNumber)
