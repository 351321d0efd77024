"""
In-memory test helpers for wingatemap and for applications that embed it.

L{RelayHarness} runs one mapping's relay with no sockets and no global reactor: a client
connection is a L{FakeTransport}, destinations are reached through L{FakeEndpoints} (each connect
attempt waits for the test to make it succeed or fail), time is a L{Clock}, and every event lands
in a L{RecordingSink}.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import Destination, Mapping
from .events import EventHub
from .identity import IdentityResolver
from .interfaces import IDestinationEndpointFactory, IEventSink, IRuleService
from .relay import MappingRuntime, RelayFactory, RelayProtocol
from .rules import ClientInfo, Decision, MappingRuleService
from .sessions import SessionRegistry


class FakeTransport(StringTransport):
    """
    A TCP-like in-memory transport: records half-close, abort and socket options.
    """

    def __init__(self, host: Any = None, peer: Any = None) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.write_closed = False
        self.aborted = False
        self.keepalive = False
        self.nodelay = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        # Real TCP transports allow this with no producer registered; so does this one.
        if self.producer is not None:
            super().unregisterProducer()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = bool(enabled)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = bool(enabled)


@define
class ConnectAttempt:
    """
    One connection attempt to a destination, waiting for the test to decide how it ends.
    """

    destination: Destination
    timeout: float
    factory: IProtocolFactory
    deferred: Deferred[Any]
    protocol: Any = None
    transport: FakeTransport | None = None
    preamble: bytes = b""

    def succeed(self) -> Any:
        """
        The destination accepted: connect a L{FakeTransport} (the preamble, if any, written
        first) and fire the attempt.  For a TLS destination, call L{handshake} next.
        """
        self.protocol = self.factory.buildProtocol(None)
        self.transport = FakeTransport(
            host=IPv4Address("TCP", "127.0.0.1", 40000), peer=IPv4Address("TCP", "192.0.2.10", 80)
        )
        self.transport.write(self.preamble)
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)
        return self.protocol

    def handshake(self) -> None:
        """
        The destination's TLS handshake completed.
        """
        self.protocol.handshakeCompleted()

    def fail(self, reason: BaseException | None = None) -> None:
        """
        The destination refused (or failed with C{reason}).
        """
        self.deferred.errback(Failure(reason or ConnectionRefusedError("refused")))

    def close(self, clean: bool = True) -> None:
        """
        The destination leg is gone (cleanly, or by a reset).
        """
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))


@implementer(IDestinationEndpointFactory)
@define
class FakeEndpoints:
    """
    Records every connection attempt; the test ends each with L{ConnectAttempt.succeed} or
    L{ConnectAttempt.fail}.
    """

    attempts: list[ConnectAttempt] = field(factory=list)

    def endpoint_for_destination(self, destination: Destination, timeout: float, preamble: bytes = b"") -> Any:
        """
        See L{IDestinationEndpointFactory.endpoint_for_destination}.
        """
        owner = self

        class _Endpoint:
            def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                owner.attempts.append(ConnectAttempt(destination, timeout, factory, d, preamble=preamble))
                return d

        return _Endpoint()


@implementer(IEventSink)
@define
class RecordingSink:
    """
    Keeps every event; set C{allow} to C{False} (or a Deferred) to veto ClientConnect.
    """

    events: list[dict[str, Any]] = field(factory=list)
    allow: Any = True
    _waiters: list[tuple[int, Deferred[list[dict[str, Any]]]]] = field(factory=list)

    def client_connect(self, event: dict[str, Any]) -> Any:
        """
        Record ClientConnect and answer C{allow}.
        """
        self.events.append(event)
        return self.allow

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Record ClientDisconnect.
        """
        self.events.append(event)
        done = self.of("ClientDisconnect")
        for waiter in list(self._waiters):
            if len(done) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(done)

    def disconnects(self, count: int = 1) -> Deferred[list[dict[str, Any]]]:
        """
        A Deferred firing with the ClientDisconnect events once C{count} have been recorded.
        """
        done = self.of("ClientDisconnect")
        if len(done) >= count:
            return succeed(done)
        d: Deferred[list[dict[str, Any]]] = Deferred()
        self._waiters.append((count, d))
        return d

    def of(self, name: str) -> list[dict[str, Any]]:
        """
        The recorded events called C{name}.
        """
        return [e for e in self.events if e["event"] == name]


@implementer(IRuleService)
@define
class StaticRuleService:
    """
    A rule service that gives every client the same decision.
    """

    decision: Decision

    def decide(self, client: ClientInfo) -> Deferred[Decision]:
        """
        See L{IRuleService.decide}.
        """
        return succeed(self.decision)


@define
class RelayHarness:
    """
    One mapping's relay in memory: call L{accept} for each client.
    """

    mapping: Mapping
    clock: Clock = field(factory=Clock)
    endpoints: FakeEndpoints = field(factory=FakeEndpoints)
    sink: RecordingSink = field(factory=RecordingSink)
    sessions: SessionRegistry = field(factory=SessionRegistry)
    rules: Any = None
    factory: RelayFactory = field(init=False)

    def __attrs_post_init__(self) -> None:
        rules = self.rules or MappingRuleService(self.mapping, IdentityResolver())
        runtime = MappingRuntime(
            mapping=self.mapping,
            rules=rules,
            endpoints=self.endpoints,
            events=EventHub([self.sink]),
            sessions=self.sessions,
            clock=self.clock,
        )
        self.factory = RelayFactory(runtime)

    def accept(self, client_ip: str = "127.0.0.5", client_port: int = 50000) -> tuple[RelayProtocol, FakeTransport]:
        """
        A client connects to the mapping: its protocol and transport.
        """
        peer = IPv4Address("TCP", client_ip, client_port)
        protocol = self.factory.buildProtocol(peer)
        transport = FakeTransport(host=IPv4Address("TCP", "127.0.0.1", self.mapping.port), peer=peer)
        protocol.makeConnection(transport)
        return protocol, transport


def simple_mapping(*destinations: Destination, **kwargs: Any) -> Mapping:
    """
    A mapping on port 8080 with C{destinations} as its default.
    """
    kwargs.setdefault("name", "test")
    kwargs.setdefault("port", 8080)
    return Mapping(default=tuple(destinations), **kwargs)
