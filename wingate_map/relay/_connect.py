"""
The lean connect path (issue 11 item 3): a destination reached by a non-blocking C{connect_ex}
started by hand, its socket handed straight to the socket pump.

For the common case, a plain TCP destination given as an IP literal (no endpoint string, no
TLS; a PROXY header is fine: the pump sends it first) with a plain TCP client leg and the
socket pump on, the relay needs no Twisted transport, protocol, connector or endpoint for the
destination leg: L{DirectConnect} creates the socket, starts C{connect_ex} and registers for
writability on the reactor; on writability C{SO_ERROR} says how the connect ended.  Success
hands the socket to the pump; a failure (a refusal, an unreachable network) is reported with
the same Twisted error a C{connectTCP} would have given, so the relay's connect-failed path,
failover, health reporting and log lines are those of the endpoint path.  The connect timeout
stays the relay's (it cancels the Deferred, which closes the socket).  Anything else keeps the
endpoint path (L{direct_route} says which).

In a worker process the socket gets C{SO_LINGER {1, 0}} at once (the worker's
reset-on-death behaviour: if the worker dies, the kernel resets the connection); the pump
clears it before an orderly close.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError, getConnectError
from twisted.internet.interfaces import IReactorFDSet, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from ._destinations import StandardEndpointFactory, _ip_version
from ._pump import _LINGER_RESET, _tcp_transport, take_over

_STARTED = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)


@frozen
class Route:
    """
    Where and how to connect by hand: the reactor to register with, the socket family, the
    address, and whether the socket resets if this (worker) process dies.
    """

    reactor: Any
    family: int
    address: tuple[Any, ...]
    reset_on_death: bool


@frozen
class DirectLeg:
    """
    A connected destination socket, and the bytes to send it before anything else (a PROXY
    header); what the Deferred of L{connect_direct} fires with.
    """

    sock: socket.socket
    preamble: bytes

    def close(self) -> None:
        """
        Close the socket (a reset if it lingers so).
        """
        self.sock.close()


def _reset_on_death(reactor: Any) -> bool:
    # A worker's endpoints connect through its reset-on-death reactor wrapper, which says so
    # (the relay does not import the service package: the service imports the relay).
    return getattr(reactor, "resets_on_death", False) is True


def direct_route(reactor: Any, endpoints: Any, destination: Any, client_transport: Any) -> Route | None:
    """
    The L{Route} to C{destination} if it can be connected by hand (see the module's
    docstring), else None (the endpoint path).

    @param reactor: the session's reactor (the runtime's clock).
    @param endpoints: the runtime's destination endpoint factory; only the standard one has
        the behaviour this path reproduces.
    @param client_transport: the client leg's transport; it must be a plain TCP connection the
        pump can take over.
    """
    if type(endpoints) is not StandardEndpointFactory or destination.endpoint is not None or destination.tls is not None:
        return None
    host, port = destination.host, destination.port
    if host is None or port is None:
        return None
    version = _ip_version(host)
    if version is None or not IReactorFDSet.providedBy(reactor) or _tcp_transport(client_transport) is None:
        return None
    if version == 4:
        return Route(reactor, socket.AF_INET, (host, port), _reset_on_death(endpoints._reactor))
    return Route(reactor, socket.AF_INET6, (host, port, 0, 0), _reset_on_death(endpoints._reactor))


@implementer(IWriteDescriptor)
class DirectConnect:
    """
    One non-blocking connect in progress, registered for writability; C{deferred} fires with a
    L{DirectLeg} once connected, or fails with Twisted's connect error (or
    L{ConnectingCancelledError} when cancelled: the socket is closed).
    """

    __slots__ = ("reactor", "sock", "fd", "preamble", "deferred", "address")

    def __init__(self, route: Route, preamble: bytes) -> None:
        self.reactor = route.reactor
        self.preamble = preamble
        self.address = route.address
        self.deferred: Deferred[DirectLeg] = Deferred(self._cancel)
        sock = self.sock = socket.socket(route.family, socket.SOCK_STREAM)
        self.fd = sock.fileno()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if route.reset_on_death:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        result = sock.connect_ex(route.address)
        if result not in _STARTED:
            # Failed at once: reported a reactor turn later, as connectTCP does.
            self.reactor.callLater(0, self._failed, result)
            return
        self.reactor.addWriter(self)

    def fileno(self) -> int:
        """
        The socket's file descriptor, -1 once it is closed or handed on.
        """
        return self.fd

    def logPrefix(self) -> str:
        """
        How the reactor names this descriptor in its log.
        """
        return "wingatemap-connect"

    def doWrite(self) -> None:
        """
        Writable: the connect is over; SO_ERROR says how.
        """
        self.reactor.removeWriter(self)
        sock = self.sock
        if sock is None:
            return
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._failed(error)
            return
        self.sock, self.fd = None, -1
        self.deferred.callback(DirectLeg(sock, self.preamble))

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor saw an error or hang-up (a refused connect): it has unregistered us.
        """
        sock = self.sock
        if sock is None:
            return
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            error = e.errno or errno.ECONNREFUSED
        self._failed(error or errno.ECONNREFUSED)

    def _close(self) -> None:
        sock, self.sock, self.fd = self.sock, None, -1
        if sock is not None:
            sock.close()

    def _failed(self, error: int) -> None:
        if self.sock is None:
            return
        self._close()
        self.deferred.errback(Failure(getConnectError((error, os.strerror(error)))))

    def _cancel(self, deferred: Deferred[DirectLeg]) -> None:
        if self.sock is None:
            return
        self.reactor.removeWriter(self)  # unregistered before the socket closes
        self._close()
        host, port = self.address[0], self.address[1]
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        deferred.errback(ConnectingCancelledError(address))


def connect_direct(route: Route, preamble: bytes = b"") -> Deferred[DirectLeg]:
    """
    Start connecting by hand along C{route}; see L{DirectConnect}.
    """
    return DirectConnect(route, preamble).deferred


def take_client(reactor: Any, client_transport: Any, leg: DirectLeg) -> tuple[socket.socket, socket.socket, bytes, bytes] | None:
    """
    Take the client's socket from its transport (as L{take_over} does for two transports) and
    pair it with the hand-connected destination: (client socket, destination socket, bytes
    still to send to the client, bytes to send to the destination first), or None if the
    client leg cannot be taken over (then nothing was touched).
    """
    # take_over checks and takes each leg it is given; given the client twice, it takes it
    # (twice: stopping a stopped transport is harmless) and nothing else.
    taken = take_over(reactor, client_transport, client_transport)
    if taken is None:
        return None
    client_socket, _, client_unsent, _ = taken
    return client_socket, leg.sock, client_unsent, leg.preamble
