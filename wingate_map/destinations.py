"""
How to reach a destination: building the client endpoint for it.

Host names are resolved at every connection (L{HostnameEndpoint}: IPv4 and IPv6, Happy
Eyeballs), never only at start.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from .config import Destination
from .interfaces import IDestinationEndpointFactory


@implementer(IDestinationEndpointFactory)
class StandardEndpointFactory:
    """
    Plain TCP to C{host}:C{port} through L{HostnameEndpoint}, or any Twisted client endpoint
    string given as C{endpoint}.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def endpoint_for_destination(self, destination: Destination, timeout: float) -> IStreamClientEndpoint:
        """
        See L{IDestinationEndpointFactory.endpoint_for_destination}.
        """
        if destination.endpoint is not None:
            return clientFromString(self._reactor, destination.endpoint)
        assert destination.host is not None and destination.port is not None
        return HostnameEndpoint(self._reactor, destination.host, destination.port, timeout=timeout)
