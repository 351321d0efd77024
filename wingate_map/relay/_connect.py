"""
The lean connect path (issue 11 item 3): a destination reached by a non-blocking C{connect_ex}
started by hand, its socket handed straight to the socket pump.

For the common case, a plain TCP destination given as an IP literal (no endpoint string, no
TLS; a PROXY header is fine: the pump sends it first) with a plain TCP client leg and the
socket pump on, the relay needs no Twisted transport, protocol, connector or endpoint for the
destination leg: L{DirectConnect} creates the socket (non-blocking in the same call), starts
C{connect_ex} and registers for writability with the data plane's poller; writability means
connected, an error or hang-up event (C{SO_ERROR} says which) a failure (on a reactor's own
descriptor set, which does not tell them apart, C{SO_ERROR} is asked at writability), and the
relay hears it directly (L{IConnectOwner}: no
Deferred, no closures; one timer, the connect timeout).  Success hands the socket, still
registered, to the pump (its registration becomes the destination leg's with one modify); a
failure (a refusal, an unreachable network) is reported with the same Twisted error a
C{connectTCP} would have given, so the relay's connect-failed path, failover, health reporting
and log lines are those of the endpoint path.  Anything else keeps the endpoint path
(L{direct_route} says which).

In a worker process the socket gets C{SO_LINGER {1, 0}} at once (the worker's
reset-on-death behaviour: if the worker dies, the kernel resets the connection); the pump
clears it before an orderly close.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from typing import Any

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectingCancelledError, getConnectError
from twisted.internet.interfaces import IReactorFDSet, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ._destinations import StandardEndpointFactory, _ip_version
from ._poller import WRITE, ReactorDescriptors
from ._pump import _LINGER_RESET, _tcp_transport, take_over

_STARTED = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)
_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
# Parsing an address costs about 2 µs a connect; destinations repeat (the configured ones, or
# the original destinations of intercepted connections: bounded).
_version_of = functools.lru_cache(maxsize=1024)(_ip_version)


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
    version = _version_of(host)
    if version is None or not IReactorFDSet.providedBy(reactor) or _tcp_transport(client_transport) is None:
        return None
    if version == 4:
        return Route(reactor, socket.AF_INET, (host, port), _reset_on_death(endpoints._reactor))
    return Route(reactor, socket.AF_INET6, (host, port, 0, 0), _reset_on_death(endpoints._reactor))


class IConnectOwner(Interface):
    """
    Who a L{DirectConnect} reports to (the relay), once.
    """

    def connect_succeeded(connect: "DirectConnect") -> None:
        """
        Connected: C{connect.sock} is the destination's socket, still registered for
        writability (hand it to the pump with C{connect}, or L{DirectConnect.close} it).
        """

    def connect_failed(failure: Failure, timed_out: bool) -> None:
        """
        Not connected (the socket is closed): Twisted's connect error for C{failure} (what a
        C{connectTCP} would have given), L{ConnectingCancelledError} when cancelled;
        C{timed_out}: the connect timeout ended it.
        """


@implementer(IWriteDescriptor)
class DirectConnect:
    """
    One non-blocking connect in progress, registered for writability with C{fds} (the data
    plane's L{wingate_map.relay._poller.IDescriptors}); it tells its L{IConnectOwner} how it
    ended, directly (no Deferred), after at most C{timeout} seconds.

    @ivar mask: what the socket is registered for (the pump takes the registration over).
    """

    __slots__ = ("reactor", "fds", "sock", "fd", "mask", "preamble", "owner", "address", "timer")

    def __init__(self, route: Route, preamble: bytes, owner: IConnectOwner, timeout: float, fds: Any = None) -> None:
        reactor = self.reactor = route.reactor
        self.fds = fds if fds is not None else ReactorDescriptors(reactor)
        self.preamble = preamble
        self.owner = owner
        self.address = route.address
        self.mask = 0
        # Non-blocking (and close-on-exec) from the start: one call.
        sock = self.sock = socket.socket(route.family, _STREAM)
        self.fd = sock.fileno()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if route.reset_on_death:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        result = sock.connect_ex(route.address)
        if result not in _STARTED:
            # Failed at once: reported a reactor turn later, as connectTCP does.
            self.timer = reactor.callLater(0, self._failed, result)
            return
        self.fds.set(self, self.fd, 0, WRITE)
        self.mask = WRITE
        self.timer = reactor.callLater(timeout, self._expired)

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

    def doRead(self) -> None:
        """
        Never registered for reading: the data plane's poller says this for an error or a
        hang-up (a refused connect); SO_ERROR says which.
        """
        sock = self.sock
        if sock is not None and self.owner is not None:
            self._failed(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED)

    def doWrite(self) -> None:
        """
        Writable (or, from the reactor, maybe an error): the connect is over.  From the data
        plane's poller a failure came as L{doRead} first, so writable means connected; from
        the reactor, SO_ERROR says how it ended.
        """
        sock = self.sock
        if sock is None or self.owner is None:
            return
        if not self.fds.reports_errors:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._failed(error)
                return
        owner, self.owner = self.owner, None
        self.timer.cancel()
        owner.connect_succeeded(self)

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor saw an error or hang-up (a refused connect): it has unregistered us.
        """
        self.mask = 0
        sock = self.sock
        if sock is None:
            return
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            error = e.errno or errno.ECONNREFUSED
        self._failed(error or errno.ECONNREFUSED)

    def close(self) -> None:
        """
        Unregister and close the socket (a reset if it lingers so); nothing is reported.
        """
        self.owner = None
        if self.timer.active():
            self.timer.cancel()
        if self.mask:
            self.fds.set(self, self.fd, self.mask, 0)  # unregistered before the socket closes
            self.mask = 0
        sock, self.sock, self.fd = self.sock, None, -1
        if sock is not None:
            sock.close()

    def _report_failure(self, failure: Failure, timed_out: bool = False) -> None:
        owner = self.owner
        self.close()
        if owner is not None:
            owner.connect_failed(failure, timed_out)

    def _failed(self, error: int) -> None:
        if self.sock is not None:
            self._report_failure(Failure(getConnectError((error, os.strerror(error)))))

    def _expired(self) -> None:
        self._report_failure(Failure(TimeoutError(f"connection to {self.address[0]} port {self.address[1]}")), timed_out=True)

    def cancel(self) -> None:
        """
        Give up (the session ended first): the socket is closed, the owner told
        L{ConnectingCancelledError}.
        """
        if self.sock is None or self.owner is None:
            return
        host, port = self.address[0], self.address[1]
        address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        self._report_failure(Failure(ConnectingCancelledError(address)))


def take_client(reactor: Any, client_transport: Any, connect: DirectConnect) -> tuple[socket.socket, socket.socket, bytes, bytes] | None:
    """
    Take the client's socket from its transport (as L{take_over} does for two transports) and
    pair it with the hand-connected destination: (client socket, destination socket, bytes
    still to send to the client, bytes to send to the destination first), or None if the
    client leg cannot be taken over (then nothing was touched).
    """
    # take_over checks and takes each leg it is given; given the client twice, it takes it
    # (twice: stopping a stopped transport, or taking a lean socket already taken, is harmless)
    # and nothing else.
    taken = take_over(reactor, client_transport, client_transport)
    if taken is None:
        return None
    client_socket, _, client_unsent, _ = taken
    return client_socket, connect.sock, client_unsent, connect.preamble  # type: ignore[return-value]
