"""
How to reach a destination: building the client endpoint for it.

Host names are resolved at every connection (L{HostnameEndpoint}: IPv4 and IPv6, Happy
Eyeballs), never only at start; IP addresses are connected to directly.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import ClientFactory
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from ..config import Destination
from ..interfaces import IDestinationEndpointFactory
from ..tls import client_creator, half_close_tls_factory


@implementer(IDestinationEndpointFactory)
class StandardEndpointFactory:
    """
    Plain TCP to C{host}:C{port} through L{HostnameEndpoint}, or any Twisted client endpoint
    string given as C{endpoint}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._creators: dict[Destination, Any] = {}

    def _creator(self, destination: Destination) -> Any:
        # Built once per destination (certificates are read at start, and again on reload).
        creator = self._creators.get(destination)
        if creator is None:
            assert destination.tls is not None
            host = destination.host or destination.tls.server_name or ""
            creator = self._creators[destination] = client_creator(host, destination.tls)
        return creator

    def _tcp_endpoint(self, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        # An IP address needs no resolution: connect straight to it.  (HostnameEndpoint would
        # send even a literal through the thread-pool resolver, which halves the connection
        # rate.)  Names go through HostnameEndpoint, resolved at every connection.
        if _ip_version(host) is None:
            return HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        return _DirectTCPEndpoint(self._reactor, host, port, timeout)

    def endpoint_for_destination(self, destination: Destination, timeout: float, preamble: bytes = b"") -> IStreamClientEndpoint:
        """
        See L{IDestinationEndpointFactory.endpoint_for_destination}.
        """
        if destination.endpoint is not None:
            inner = clientFromString(self._reactor, destination.endpoint)
        else:
            assert destination.host is not None and destination.port is not None
            inner = self._tcp_endpoint(destination.host, destination.port, timeout)
        if destination.tls is not None:
            return _TLSEndpoint(inner, self._creator(destination), preamble)
        if preamble:
            return _PreambleEndpoint(inner, preamble)
        return inner


@functools.lru_cache(maxsize=1024)
def _ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


class _OneShotFactory(ClientFactory):
    """
    Builds the caller's protocol itself (no wrapper protocol in the data path) and fires the
    connect Deferred once that protocol's connectionMade has run.
    """

    noisy = False

    def __init__(self, wrapped: Any, deferred: Deferred[Any]) -> None:
        self._wrapped = wrapped
        self._deferred = deferred

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._wrapped.buildProtocol(addr)
        make_connection = protocol.makeConnection
        deferred = self._deferred

        def made(transport: Any) -> None:
            make_connection(transport)
            del protocol.makeConnection
            deferred.callback(protocol)

        protocol.makeConnection = made
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self._deferred.called:
            self._deferred.errback(reason)


class _DirectTCPEndpoint:
    """
    A TCP connection straight to an IP address with C{reactor.connectTCP}: what
    TCP4ClientEndpoint does, minus the wrapper protocol that would sit in the data path of
    every relayed connection.  Cancelling stops the attempt.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        connector: list[Any] = []

        def cancel(d: Deferred[Any]) -> None:
            connector[0].stopConnecting()
            if not d.called:
                d.errback(ConnectingCancelledError(connector[0].getDestination()))

        d: Deferred[Any] = Deferred(cancel)
        connector.append(self._reactor.connectTCP(self._host, self._port, _OneShotFactory(factory, d), timeout=self._timeout))
        return d


class _TLSEndpoint:
    """
    TLS (with half-close) over another endpoint; the plaintext preamble goes first.
    """

    def __init__(self, inner: Any, creator: Any, preamble: bytes) -> None:
        self._inner = inner
        self._creator = creator
        self._preamble = preamble

    def connect(self, factory: Any) -> Any:
        wrapper = half_close_tls_factory(self._creator, True, factory, self._preamble)
        return self._inner.connect(wrapper).addCallback(lambda tls: tls.wrappedProtocol)


class _PreambleEndpoint:
    """
    Writes a preamble (a PROXY header) as soon as the connection is made.
    """

    def __init__(self, inner: Any, preamble: bytes) -> None:
        self._inner = inner
        self._preamble = preamble

    def connect(self, factory: Any) -> Any:
        def written(protocol: Any) -> Any:
            protocol.transport.write(self._preamble)
            return protocol

        return self._inner.connect(factory).addCallback(written)
