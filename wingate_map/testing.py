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
from .policy import IdentityResolver
from .interfaces import IDestinationEndpointFactory, IEventSink, IRuleService
from .relay import MappingRuntime, RelayFactory, RelayProtocol
from .values import ClientInfo, Decision
from .policy import MappingRuleService
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


# --- the cluster store, in memory -----------------------------------------------------------
# (Imports kept with the section: the rest of this module does not need them.)

import json as _json  # noqa: E402
import secrets as _secrets  # noqa: E402
from typing import Callable, Iterable  # noqa: E402

from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred  # noqa: E402
from twisted.internet.task import LoopingCall  # noqa: E402

from .cluster import ClusterUnavailable, KillTimeout, NodeNameTaken  # noqa: E402
from .cluster._state import DOWN, UP, StoreBase  # noqa: E402
from .interfaces import IClusterStore  # noqa: E402


@define
class FakeClusterBackend:
    """
    The shared state of a cluster, in memory, on a L{Clock}: what Redis holds for
    L{RedisClusterStore}.  Several L{FakeClusterStore}s (gateways) share one backend.
    L{stop} and L{start} play Redis going away and coming back (by default without its data,
    as a server without persistence restarts).
    """

    clock: Clock = field(factory=Clock)
    up: bool = True
    instance: str = field(factory=lambda: _secrets.token_hex(8))
    nodes: dict[str, tuple[str, float]] = field(factory=dict)
    logins: dict[str, tuple[str, float]] = field(factory=dict)
    counts: dict[tuple[str, str], dict[str, str]] = field(factory=dict)
    directory: dict[str, tuple[dict[str, dict[str, Any]], float]] = field(factory=dict)
    streams: dict[str, list[dict[str, Any]]] = field(factory=dict)
    stores: list["FakeClusterStore"] = field(factory=list)

    def alive(self, node: str) -> bool:
        """
        Whether C{node}'s registration has not expired.
        """
        entry = self.nodes.get(node)
        return entry is not None and entry[1] > self.clock.seconds()

    def live_logins(self) -> dict[str, tuple[str, float]]:
        """
        The unexpired logins: client address -> (user, expiry).
        """
        now = self.clock.seconds()
        return {ip: entry for ip, entry in self.logins.items() if entry[1] > now}

    def stop(self) -> None:
        """
        The shared store goes away: every gateway's link goes down.
        """
        self.up = False
        for store in list(self.stores):
            store._link_lost()

    def start(self, lose_data: bool = True) -> None:
        """
        The shared store is back (empty unless C{lose_data} is false); gateways reconnect.
        """
        if lose_data:
            self.instance = _secrets.token_hex(8)
            for table in (self.nodes, self.logins, self.counts, self.directory, self.streams):
                table.clear()
        self.up = True
        for store in list(self.stores):
            store._link_back()


@implementer(IClusterStore)
class FakeClusterStore(StoreBase):
    """
    L{IClusterStore} in memory on a L{FakeClusterBackend}: the same contract as the Redis store
    (tests/test_cluster_store.py checks both), with every change visible at once and time on
    the backend's clock.  The constructor takes the Redis store's arguments that matter here.
    """

    def __init__(
        self,
        backend: FakeClusterBackend,
        node: str,
        node_ttl: float = 15.0,
        events_stream: str | None = None,
        events_maxlen: int = 1_000_000,
        *,
        sessions: Callable[[], Iterable[dict[str, Any]]] | None = None,
        on_kill: Callable[[str], Any] | None = None,
        kill_timeout: float = 5.0,
        event_buffer: int = 10_000,
        resync_interval: float = 30.0,
    ) -> None:
        self.backend = backend
        self.clock = backend.clock
        self._init_common(
            self.clock, node, node_ttl, events_stream, events_maxlen, event_buffer, sessions, on_kill,
            kill_timeout, resync_interval,
        )
        self._token = _secrets.token_hex(8)
        self._heartbeat: LoopingCall | None = None

    def _up(self) -> bool:
        return self.backend.up and self._link.state == UP

    # lifecycle

    def start(self) -> Deferred[None]:
        """
        See L{IClusterStore.start}.
        """
        if self.backend.up and not self._register():
            return _failed(NodeNameTaken(self.node))
        self.backend.stores.append(self)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.clock
        self._heartbeat.start(self.node_ttl / 3, now=False)
        if not self.backend.up:
            return _failed(ClusterUnavailable("cluster.redis: the fake backend is down"))
        self._link_back()
        return succeed(None)

    def stop(self, deregister: bool = True) -> Deferred[None]:
        """
        See L{IClusterStore.stop}.
        """
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self in self.backend.stores:
            self.backend.stores.remove(self)
        if deregister and self._up():
            self._flush()
            if self.backend.nodes.get(self.node, ("",))[0] == self._token:
                del self.backend.nodes[self.node]
            self._sweep()
        self._link.set(DOWN, "stopped")
        return succeed(None)

    def _register(self) -> bool:
        entry = self.backend.nodes.get(self.node)
        if entry is not None and entry[0] != self._token and self.backend.alive(self.node):
            return False
        self.backend.nodes[self.node] = (self._token, self.clock.seconds() + self.node_ttl)
        return True

    def _link_lost(self) -> None:
        self._link.set(DOWN, "connection lost")

    def _link_back(self) -> None:
        if not self._register():
            self._link.set(DOWN, "node name taken")
            return
        lost_data = self._instance is not None and self._instance != self.backend.instance
        self._instance = self.backend.instance
        unsent, self._counts.unsent_releases = self._counts.unsent_releases, {}
        for session_id, pair in unsent.items():
            self.backend.counts.get(pair, {}).pop(session_id, None)
        for pair, sessions in self._counts.pairs().items():
            for session_id in sessions:
                self.backend.counts.setdefault(pair, {})[session_id] = self.node
        now = self.clock.seconds()
        logins, self._unsent_logins = self._unsent_logins, {}
        for client_ip, (user, expires) in logins.items():
            self._share_login(client_ip, user, max(0.0, expires - now))
        if lost_data:
            for client_ip, (user, expires) in self._logins.snapshot().items():
                self.backend.logins.setdefault(client_ip, (user, expires))
        self._publish_from_source()
        self._link.set(UP)
        self._resync()
        self._flush()

    def _beat(self) -> None:
        if not self.backend.up:
            return
        if self._link.state != UP:
            self._link_back()
            return
        if not self._register():
            self._link.set(DOWN, "node registration lost")
            return
        self._publish_from_source()
        self._sweep()
        if self.clock.seconds() - self._last_resync >= self.resync_interval:
            self._resync()

    def _sweep(self) -> None:
        for node in [n for n in self.backend.nodes if not self.backend.alive(n)]:
            del self.backend.nodes[node]
        for node in [n for n in self.backend.directory if not self.backend.alive(n)]:
            del self.backend.directory[node]
        for members in self.backend.counts.values():
            for session_id in [s for s, n in members.items() if not self.backend.alive(n)]:
                del members[session_id]

    # logins

    def _write_login(self, client_ip: str, user: str | None, ttl: float) -> Deferred[bool]:
        if not self._up():
            self._unsent_logins[client_ip] = (user, self.clock.seconds() + ttl)
            return succeed(False)
        self._share_login(client_ip, user, ttl)
        return succeed(True)

    def _share_login(self, client_ip: str, user: str | None, ttl: float) -> None:
        if user is None or ttl <= 0:
            self.backend.logins.pop(client_ip, None)
        else:
            self.backend.logins[client_ip] = (user, self.clock.seconds() + ttl)
        for store in self.backend.stores:
            if store._link.state == UP:
                store._logins.apply(client_ip, user, ttl)

    def _resync(self) -> None:
        self._last_resync = self.clock.seconds()
        now = self.clock.seconds()
        self._logins.begin_resync()
        self._logins.replace((ip, user, expires - now) for ip, (user, expires) in self.backend.live_logins().items())

    # cluster limits

    def acquire(self, mapping: str, client_ip: str, limit: int, session_id: str) -> Deferred[bool]:
        """
        See L{IClusterStore.acquire}.
        """
        if not self._up():
            return _failed(ClusterUnavailable("cluster link is down"))
        members = self.backend.counts.setdefault((mapping, client_ip), {})
        for other in [s for s, n in members.items() if not self.backend.alive(n)]:
            del members[other]
        if len([s for s in members if s != session_id]) >= limit:
            return succeed(False)
        members[session_id] = self.node
        self._counts.held[session_id] = (mapping, client_ip)
        return succeed(True)

    def hold(self, mapping: str, client_ip: str, session_id: str) -> None:
        """
        See L{IClusterStore.hold}.
        """
        self._counts.held[session_id] = (mapping, client_ip)
        if self._up():
            self.backend.counts.setdefault((mapping, client_ip), {})[session_id] = self.node

    def release(self, session_id: str) -> None:
        """
        See L{IClusterStore.release}.
        """
        pair = self._counts.held.pop(session_id, None)
        if pair is None:
            return
        if self._up():
            self.backend.counts.get(pair, {}).pop(session_id, None)
        else:
            self._counts.unsent_releases[session_id] = pair

    # session directory and kill

    def _publish_from_source(self) -> None:
        if self.sessions_source is not None:
            self.publish_sessions(self.sessions_source())
        elif self.node in self.backend.directory:
            sessions = self.backend.directory[self.node][0]
            self.backend.directory[self.node] = (sessions, self.clock.seconds() + self.node_ttl)

    def publish_sessions(self, sessions: Iterable[dict[str, Any]]) -> Deferred[None]:
        """
        See L{IClusterStore.publish_sessions}.
        """
        if not self.backend.up:
            return _failed(ClusterUnavailable("cluster link is down"))
        snapshot = {s["session"]: dict(s) for s in sessions}
        self.backend.directory[self.node] = (snapshot, self.clock.seconds() + self.node_ttl)
        return succeed(None)

    def cluster_sessions(self) -> Deferred[list[dict[str, Any]]]:
        """
        See L{IClusterStore.cluster_sessions}.
        """
        if not self._up():
            return _failed(ClusterUnavailable("cluster link is down"))
        found = []
        for node, (sessions, expires) in self.backend.directory.items():
            if self.backend.alive(node) and expires > self.clock.seconds():
                found.extend(dict(s, node=node) for s in sessions.values())
        return succeed(found)

    @inlineCallbacks
    def kill(self, session_id: str) -> Any:
        """
        See L{IClusterStore.kill}.
        """
        if self.on_kill is not None and (yield maybeDeferred(self.on_kill, session_id)):
            return True
        if not self._up():
            raise ClusterUnavailable("cluster link is down: cannot reach the other gateways")
        others = [s for s in self.backend.stores if s is not self and s._link.state == UP]
        answers = [maybeDeferred(s.on_kill, session_id) if s.on_kill is not None else succeed(False) for s in others]
        done: Deferred[bool] = Deferred()
        timer = self.clock.callLater(self.kill_timeout, lambda: done.called or done.errback(KillTimeout(session_id, self.kill_timeout)))

        def answered(ok: Any) -> None:
            if ok and not done.called:
                timer.cancel()
                done.callback(True)

        for answer in answers:
            answer.addCallback(answered).addErrback(lambda _: None)

        def all_answered(_: Any) -> None:
            if not done.called:
                timer.cancel()
                done.callback(False)

        gatherResults(answers, consumeErrors=True).addBoth(all_answered)
        return (yield done)

    # events

    def _events_added(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._up() or self.events_stream is None:
            return
        stream = self.backend.streams.setdefault(self.events_stream, [])
        stream.extend(_json.loads(entry) for entry in self._events.take(len(self._events.pending)))
        del stream[: max(0, len(stream) - self.events_maxlen)]
        self._events.written()

    def recent_events(self, count: int) -> Deferred[list[dict[str, Any]]]:
        """
        See L{IClusterStore.recent_events}.
        """
        if not self._up():
            return _failed(ClusterUnavailable("cluster link is down"))
        return succeed(list(self.backend.streams.get(self.events_stream or "", [])[-count:]))

    def events_length(self) -> Deferred[int]:
        """
        See L{IClusterStore.events_length}.
        """
        if not self._up():
            return _failed(ClusterUnavailable("cluster link is down"))
        return succeed(len(self.backend.streams.get(self.events_stream or "", [])))


def _failed(error: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d
