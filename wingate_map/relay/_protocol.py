"""
The relay: a thin Protocol pair joining an accepted client to its destination.

The client's transport is paused at accept (or never read: a plain mapping's client is
accepted lean, relay._accept), the rule service decides, the ClientConnect sinks
allow, the destination is connected (trying each destination of a failover list in turn), and
only then is the client resumed; so no client byte is read before the session is allowed.  Each
transport is registered as the other's streaming producer, so a slow reader pauses the fast
writer and memory stays bounded.  A FIN from either side is passed on as a half-close while the
other direction keeps flowing; the session ends when both directions are done, or at once when
one side resets (the reset is passed on, so a truncated stream never looks complete).
Decisions live behind interfaces (L{IRuleService}, L{IDestinationEndpointFactory},
L{IEventSink}); this module only moves bytes and keeps the session's accounts.

Connection limits count every accepted connection, also one still sending its PROXY header or
doing its TLS handshake (L{Phase.PENDING}); a pending connection over a limit is closed at once.
Limits, C{reject} rules and missing destinations are decided before any ClientConnect handler
runs: a refused session still has both events, but the configured handlers hear neither.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any

from attrs import define, evolve, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IReactorTime
from OpenSSL.SSL import Error as SSLError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Destination, Mapping
from ..events import EventHub
from ..interfaces import IDestinationEndpointFactory, IRuleService
from ..config import format_host_port
from ..network import original_destination
from ..config import LocationSet, client_address
from ._accept import lean_of, real_transport
from ._pump import CLIENT, DESTINATION, IPumpOwner, SocketPump, TransportPump, take_over
from ._connect import DirectConnect, IConnectOwner, direct_route, take_client
from ._proxy_protocol import HEADER_TIMEOUT, ProxyHeaderError, ProxyHeaderReader, build_header
from ..tls import describe_tls_failure, subject_common_name
from ..values import CONNECT, NO_DESTINATION, REJECT, ClientInfo, Decision
from ._sni import ClientHelloReader, HelloResult, server_name
from ..sessions import Session, SessionRegistry

_log = Logger(namespace="wingate_map.relay")  # the name log lines carried before the module moved here

# Client bytes held while the destination gets ready: at most what was in flight when the
# client was paused (one read, one TLS record batch).
_EARLY_LIMIT = 1 << 20


@define
class MappingRuntime:
    """
    Everything the connections of one mapping need; swapped as a whole on reload.
    """

    mapping: Mapping
    rules: IRuleService
    endpoints: IDestinationEndpointFactory
    events: EventHub
    sessions: SessionRegistry
    clock: IReactorTime
    metrics: Any = None
    cluster: Any = None  # wingate_map.cluster.ClusterLimits with [cluster], else None
    # Each destination list's balancer and health (health.DestinationList), by rule index or
    # "default"; a decision whose list is not here is tried in order, without health.
    balancers: dict[Any, Any] = field(factory=dict)
    rate_limits: Any = None  # wingate_map.relay.RateLimits (shared buckets), else None
    socket_pump: bool = True  # plain TCP legs relayed by pump.SocketPump (else Twisted's transports)
    # Where the pump and the hand-started connects register their sockets: the service's
    # poller.EpollPoller for its reactor; None: the reactor's own IReactorFDSet.
    poller: Any = None
    # Whether the sockets may be set to reset if the process dies (a worker's; the service says
    # when they are not): the pump then clears that before an orderly close.
    sockets_linger: bool = True
    proxy_from: LocationSet | None = field(init=False)

    def __attrs_post_init__(self) -> None:
        trusted = self.mapping.proxy_protocol_from
        self.proxy_from = LocationSet(trusted) if trusted is not None else None


def _tune(transport: Any) -> None:
    """
    TCP keepalive (dead peers are found) and no Nagle delay (the relay adds no latency) on a leg.
    """
    for option in ("setTcpKeepAlive", "setTcpNoDelay"):
        setter = getattr(transport, option, None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass


def pending_socket_error(transport: Any) -> int:
    """
    The error pending on the socket under C{transport} (a TCP transport, or TLS over one): an
    errno such as ECONNRESET, or 0 when there is none or no socket to ask.

    A leg told "end of input" asks this before passing a FIN on.  Twisted's epoll reactor
    reports an EPOLLERR/EPOLLHUP event without EPOLLIN on a socket it is reading as a clean end
    of input (C{twisted.internet.posixbase._PollLikeMixin._doReadOrWrite}), and epoll returns
    exactly that when it polls a socket while the kernel is still handling a RST on it: the
    error is already set, the receive side not yet shut.  The socket is still open when
    C{readConnectionLost} runs, and SO_ERROR tells a reset from a FIN.
    """
    for _ in range(4):  # the TCP transport, or the one under a TLS layer
        get_handle = getattr(transport, "getHandle", None)
        getsockopt = getattr(get_handle(), "getsockopt", None) if get_handle is not None else None
        if getsockopt is not None:
            try:
                return getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                return 0
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return 0


def _address(address: Any) -> tuple[str, int]:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return (str(getattr(address, "name", "") or ""), 0)
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return (host, port or 0)


class RelayFactory(Factory):
    """
    Builds a L{RelayProtocol} for every client accepted on one of a mapping's listeners.

    @ivar runtime: the L{MappingRuntime} new connections use; replace it to change what new
        connections get without touching live ones.
    """

    noisy = False

    def __init__(self, runtime: MappingRuntime, intercepting: bool = False) -> None:
        self.runtime = runtime
        self.intercepting = intercepting

    def buildProtocol(self, addr: Any) -> "RelayProtocol":
        protocol = RelayProtocol(self.runtime)
        protocol.factory = self
        return protocol

    def logPrefix(self) -> str:
        return f"wingatemap:{self.runtime.mapping.name}"


@implementer(IHalfCloseableProtocol)
class DestinationProtocol(Protocol):
    """
    The destination leg: everything it receives goes to the client.

    Only IHalfCloseableProtocol here: Twisted's endpoint wrapper (_WrappingProtocol) re-declares
    the wrapped protocol's interfaces one C{directlyProvides} at a time, so a protocol that is
    also an IHandshakeListener silently loses half-close when connected through HostnameEndpoint.
    """

    def __init__(self, relay: "RelayProtocol") -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        _tune(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.relay.destination_data(data)

    def readConnectionLost(self) -> None:
        if pending_socket_error(self.transport):
            # A reset the reactor reported as an end of input: it ends as a reset.
            self.transport.abortConnection()
            return
        self.relay.destination_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.relay.destination_lost(reason)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class TLSDestinationProtocol(DestinationProtocol):
    """
    The destination leg inside our TLS wrapper, which tells it when the handshake is done.
    """

    def handshakeCompleted(self) -> None:
        self.relay.destination_handshake_done()


class _DestinationFactory(Factory):
    noisy = False

    def __init__(self, relay: "RelayProtocol", tls: bool = False) -> None:
        self.relay = relay
        self.tls = tls

    def buildProtocol(self, addr: Any) -> DestinationProtocol:
        return (TLSDestinationProtocol if self.tls else DestinationProtocol)(self.relay)


class Phase(Enum):
    """
    Where a client connection is in its life; L{TRANSITIONS} says where it may go next.
    """

    PENDING = "pending"  # accepted, not a session yet: its PROXY header or TLS handshake is to come
    PEEKING = "peeking"  # a session (peek_sni): reading its TLS ClientHello for the server name
    DECIDING = "deciding"  # a session: the rule service and the limits decide
    ASKING = "asking"  # ClientConnect offered: waiting for the sinks' answer
    CONNECTING = "connecting"  # allowed: connecting a destination (the next one on failure)
    SECURING = "securing"  # the destination's TCP is up: its TLS handshake and verification
    RELAYING = "relaying"  # both legs joined, both directions open
    CLIENT_DONE = "client-done"  # the client sent FIN (passed on); the destination still sends
    DESTINATION_DONE = "destination-done"  # the destination sent FIN (passed on); the client still sends
    CLOSING = "closing"  # over (refused, failed, both directions done, reset, ended): legs closing
    ENDED = "ended"  # ClientDisconnect sent (entering this phase sends it; there is no way out)
    DROPPED = "dropped"  # closed while PENDING: never a session, so no events

    # Phases are looked up in dictionaries several times a connection (TRANSITIONS, _TIMER_OF):
    # hashed by identity in C, not by Enum.__hash__ (a Python call hashing the name).  Members
    # are singletons compared by identity, so this hash agrees with their equality.
    __hash__ = object.__hash__


# The session's lifecycle: for each phase, the inputs it accepts and the phase each leads to.
# RelayProtocol._go performs a transition and refuses (logs, stays) any input not listed here.
# Timers belong to phases (_TIMER_OF), so leaving the phase cancels its timer; leaving PENDING
# stops counting the connection as pending; entering ENDED sends ClientDisconnect, and ENDED
# has no way out, so a session sends exactly one.
_CLOSE = {"killed": Phase.CLOSING, "shutdown": Phase.CLOSING}  # terminate(): kill, reload/stop
_GONE = {"lost": Phase.CLOSING, "reset": Phase.CLOSING}  # a leg closed (cleanly, or by a reset)
_IDLE = {"idle": Phase.CLOSING}  # idle_timeout (its timer runs while bytes may flow)
TRANSITIONS: dict[Phase, dict[str, Phase]] = {
    Phase.PENDING: {
        "accepted": Phase.DECIDING,  # plain TCP, no PROXY header: a session at once
        "header_read": Phase.DECIDING,  # the PROXY header named the client
        "handshake_done": Phase.DECIDING,  # the client's TLS handshake named it
        "dropped": Phase.DROPPED,  # bad or late header, handshake timeout, over a limit
        "lost": Phase.DROPPED,  # closed (or its TLS handshake failed) first
    },
    Phase.DECIDING: {
        "peek": Phase.PEEKING,  # peek_sni: the server name first
        "decided": Phase.ASKING,  # rule and limits known: ClientConnect offered
        "refused": Phase.CLOSING,  # the rule service or a limit check failed (refused ClientConnect)
    },
    Phase.PEEKING: {"peeked": Phase.DECIDING},  # a verdict, the peek timeout, or the client closed
    Phase.ASKING: {
        "allowed": Phase.CONNECTING,
        "refused": Phase.CLOSING,  # limit, reject rule, no destination, a sink's veto, a failure
        "lost": Phase.CLOSING,  # the client left while being decided
        **_CLOSE,  # killed while being decided
    },
    Phase.CONNECTING: {
        "connected": Phase.RELAYING,  # plain destination: legs joined
        "handshaking": Phase.SECURING,  # TLS destination: TCP is up
        "failover": Phase.CONNECTING,  # that destination failed: the next one
        "connect_failed": Phase.CLOSING,  # the last one failed
        **_GONE,
        **_CLOSE,
    },
    Phase.SECURING: {
        "secured": Phase.RELAYING,
        "failover": Phase.CONNECTING,  # its TLS failed: the next destination
        "connect_failed": Phase.CLOSING,  # the last one's TLS failed
        **_GONE,
        **_CLOSE,
    },
    Phase.RELAYING: {"client_eof": Phase.CLIENT_DONE, "destination_eof": Phase.DESTINATION_DONE, **_GONE, **_CLOSE, **_IDLE},
    Phase.CLIENT_DONE: {"destination_eof": Phase.CLOSING, **_GONE, **_CLOSE, **_IDLE},
    Phase.DESTINATION_DONE: {"client_eof": Phase.CLOSING, **_GONE, **_CLOSE, **_IDLE},
    Phase.CLOSING: {"both_done": Phase.ENDED},  # both legs closed, no connection attempt left
    Phase.ENDED: {},
    Phase.DROPPED: {},
}

# The timer each phase owns (the same name: kept across the transition, else cancelled).
_TIMER_OF = {
    Phase.PENDING: "admission",  # HEADER_TIMEOUT for the PROXY header or TLS handshake
    Phase.PEEKING: "peek",  # peek_timeout
    Phase.SECURING: "handshake",  # connect_timeout for the destination's TLS handshake
    Phase.RELAYING: "idle",  # idle_timeout
    Phase.CLIENT_DONE: "idle",
    Phase.DESTINATION_DONE: "idle",
}

# terminate(reason): the input it is.
_TERMINATE_INPUT = {"idle-timeout": "idle", "shutdown": "shutdown"}

# The phases in which the legs are joined and bytes flow.
_JOINED = frozenset((Phase.RELAYING, Phase.CLIENT_DONE, Phase.DESTINATION_DONE))

# The phases a lost leg or terminate() move to CLOSING at once.  Before them (peeking,
# deciding, asking) the session waits for the answer it asked for, which then ends it.
_ENDS_AT_ONCE = frozenset(phase for phase, inputs in TRANSITIONS.items() if "reset" in inputs)


def _fire_timer(relay: "RelayProtocol", expired: Any, args: tuple[Any, ...]) -> None:
    """
    A phase's timer fired (one function for every session: no closure per timer).
    """
    relay._timer = None
    expired(*args)


class IllegalTransition(Exception):
    """
    An input the session's current phase does not accept (see L{TRANSITIONS}); logged, not raised.
    """


@implementer(IHalfCloseableProtocol, IHandshakeListener, IPumpOwner, IConnectOwner)
class RelayProtocol(Protocol):
    """
    The client leg of a session, and the session's owner.

    @ivar phase: where the connection is in its life (L{Phase}); it changes only through
        L{_go}, along L{TRANSITIONS}.
    """

    # Slots, not an instance dict, for the session's state: a live session costs less memory
    # (an instance dict with more than 30 keys no longer shares its key table with the others).
    # An attribute not listed here still works (the base class has a __dict__).
    __slots__ = (
        "runtime", "factory", "connected", "transport", "session", "peer", "_header_reader",
        "_timer", "phase", "_pending", "_decision", "_refusal", "_connecting", "_client_eof",
        "_dest_eof", "_client_lost", "_dest_lost", "_reason", "_first_close", "_pump",
        "_release_limits", "_track_idle", "_early", "_dest_index",
        "_dest_handshake_failure", "_limited", "_original", "_connect_started", "_info", "_peek",
        "_list", "_order", "_try", "_attempt",
    )

    noisy = False

    def __init__(self, runtime: MappingRuntime) -> None:
        # Every attribute is set here, always in this order.
        self.runtime = runtime
        self.factory: Any = None
        self.connected = 0
        self.transport: Any = None
        self.session = None
        self.peer = None
        self._header_reader = None
        self._timer: Any = None  # the current phase's timer (see _TIMER_OF), if it has one
        self.phase = Phase.PENDING
        self._pending: tuple[str, str | None] | None = None  # (mapping, peer) counted while PENDING
        self._decision: Decision | None = None
        self._refusal: str | None = None  # limit, rejected or no-destination: decided before handlers
        self._connecting: Deferred[Any] | DirectConnect | None = None  # cancel() it to give up
        self._client_eof = False
        self._dest_eof = False
        self._client_lost = False
        self._dest_lost = False
        self._reason: str | None = None  # set by whatever ended the session on purpose
        self._first_close: str | None = None  # which side closed first, when nothing else did
        self._pump: Any = None  # the data plane once wired (pump.SocketPump or pump.TransportPump)
        self._release_limits: Any = None  # gives the rate limit's shared buckets back
        self._track_idle = runtime.mapping.idle_timeout > 0
        self._early = b""  # client bytes that arrived before the destination was ready
        self._dest_index = 0
        self._dest_handshake_failure: str | None = None
        self._limited: str | None = None
        self._original: tuple[str, int] | None = None  # the intercepted connection's destination
        self._connect_started = 0.0
        self._info: ClientInfo | None = None  # what the rule service is asked about
        self._peek: ClientHelloReader | None = None  # while PEEKING
        self._list: Any = None  # the decision's health.DestinationList, if the runtime has it
        self._order: Sequence[int] = ()  # the destinations' indexes in the order to try them
        self._try = 0  # the position in _order being tried
        self._attempt: Any = None  # balance.Attempt of the destination being tried or relayed to

    # -- the state machine -------------------------------------------------------------------

    def _go(self, input: str) -> bool:
        """
        Perform the transition named C{input} from the current phase (L{TRANSITIONS}); an
        input the phase does not accept is logged as a failure and changes nothing.

        Leaving a phase cancels its timer (unless the next phase owns the same one) and, for
        PENDING, stops counting the connection as pending; entering ENDED sends ClientDisconnect.

        @return: whether the transition was made.
        """
        old = self.phase
        new = TRANSITIONS[old].get(input)
        if new is None:
            _log.failure(
                "mapping {mapping}: connection in phase {phase} refused input {input}",
                Failure(IllegalTransition(f"{input} in {old.value}")),
                mapping=self.runtime.mapping.name,
                phase=old.value,
                input=input,
            )
            return False
        self.phase = new
        timer = self._timer
        if timer is not None and _TIMER_OF.get(new) != _TIMER_OF.get(old):
            self._timer = None
            timer.cancel()  # a timer clears _timer when it fires: this one is still active
        if self._pending is not None:
            self.runtime.sessions.remove_pending(*self._pending)
            self._pending = None
        if new is Phase.ENDED:
            self._ended()
        return True

    def _start_timer(self, delay: float, expired: Any, *args: Any) -> None:
        """
        Start the current phase's timer: C{expired(*args)} after C{delay} seconds, unless the
        phase is left first.
        """
        self._timer = self.runtime.clock.callLater(delay, _fire_timer, self, expired, args)

    # -- accept and decide -------------------------------------------------------------------

    def lean_accept(self) -> bool:
        """
        Whether this connection may be accepted lean (relay._accept): nothing of it is read
        before the socket pump takes it (no TLS listener, no PROXY header from clients, no
        C{peek_sni}, the socket pump on).
        """
        mapping = self.runtime.mapping
        return mapping.tls is None and not mapping.proxy_protocol and not mapping.peek_sni and self.runtime.socket_pump

    def connectionMade(self) -> None:
        lean = lean_of(self.transport)
        if lean is not None:
            # Accepted lean: not read, the options inherited from the listening socket.
            self._begin("accepted", lean.peer, lean)
            return
        _tune(self.transport)
        mapping = self.runtime.mapping
        if mapping.tls is None and not mapping.proxy_protocol:
            self.transport.pauseProducing()
            self._begin("accepted", _address(self.transport.getPeer()))
            return
        # The client's certificate (its identity) is known only after the TLS handshake; a
        # PROXY header's source address is the client.  Nothing is a session (and nothing is
        # relayed) until then (PENDING), but the connection counts against the limits meanwhile.
        peer_ip, peer_port = _address(self.transport.getPeer())
        trusted = self.runtime.proxy_from
        proxied = mapping.tls is None
        if proxied and trusted is not None and not trusted.contains(client_address(peer_ip)):
            self._drop(peer_ip, peer_port, "peer is not in proxy_protocol_from", "proxy-untrusted")
            return
        # A trusted PROXY sender speaks for many clients: it counts only for the mapping.
        counted = (mapping.name, None if proxied and trusted is not None else peer_ip)
        limited = self._over_limit(counted[1], accepting=True)
        if limited is not None:
            self._drop(peer_ip, peer_port, limited, "limit")
            return
        self._pending = counted
        self.runtime.sessions.add_pending(*counted)
        if proxied:
            self._header_reader = ProxyHeaderReader()
            why, reason = f"no complete PROXY header within {HEADER_TIMEOUT:g}s", "proxy-timeout"
        else:
            why, reason = f"no TLS handshake within {HEADER_TIMEOUT:g}s", "tls-timeout"
        self._start_timer(HEADER_TIMEOUT, self._drop, peer_ip, peer_port, why, reason)

    def handshakeCompleted(self) -> None:
        """
        The client's TLS handshake is done: it is a session now.
        """
        if self.phase is not Phase.PENDING:
            return
        certificate = self.transport.getPeerCertificate() if self.runtime.mapping.tls.client_ca else None
        self.transport.pauseProducing()
        handle = getattr(self.transport, "getHandle", None)
        raw = handle().get_servername() if handle is not None else None
        self._begin("handshake_done", _address(self.transport.getPeer()), tls=True, certificate_cn=subject_common_name(certificate), sni=server_name(raw) if raw else None)

    def _drop(self, peer_ip: str, peer_port: int, why: str, reason: str = "proxy-invalid") -> None:
        """
        Close a connection that will not become a session, logged once and counted.
        """
        self._header_reader = None
        if not self._go("dropped"):
            return
        _log.warn(
            "mapping {mapping}: closed connection from {peer_ip}:{peer_port}: {why}",
            mapping=self.runtime.mapping.name,
            peer_ip=peer_ip,
            peer_port=peer_port,
            why=why,
        )
        if self.runtime.metrics is not None:
            self.runtime.metrics.not_a_session(self.runtime.mapping.name, reason)  # metrics.DROPS
        self.transport.abortConnection()

    def _header_data(self, data: bytes) -> None:
        assert self._header_reader is not None
        peer_ip, peer_port = _address(self.transport.getPeer())
        try:
            found = self._header_reader.feed(data)
        except ProxyHeaderError as e:
            self._drop(peer_ip, peer_port, str(e))
            return
        if found is None:
            return
        header, rest = found
        self._header_reader = None
        self.transport.pauseProducing()
        self._early = rest
        self._begin("header_read", header.source or (peer_ip, peer_port))

    def _begin(self, input: str, client: tuple[str, int], lean: Any = None, tls: bool = False, certificate_cn: str | None = None, sni: str | None = None) -> None:
        """
        The client is known (C{input} told who it is): open the session and ask the rule
        service (after peeking at its ClientHello with C{peek_sni}).  C{lean}: the connection
        was accepted lean (relay._accept.AcceptedSocket).
        """
        self._go(input)
        runtime = self.runtime
        client_ip, client_port = client
        local_ip, local_port = lean.local() if lean is not None else _address(self.transport.getHost())
        local_ip = sys.intern(local_ip)  # a listener's address: one string for all its sessions
        original_dst = None
        if self.factory is not None and self.factory.intercepting:
            # On an intercept port: where the client was really going (before our NAT), or
            # this gateway when it addressed the port here directly.
            self._original = original_destination(self.transport) or (local_ip, local_port)
            original_dst = format_host_port(*self._original)
        self.session = Session(
            id=runtime.sessions.new_id(),
            mapping=runtime.mapping.name,
            client_ip=client_ip,
            client_port=client_port,
            local_ip=local_ip,
            local_port=local_port,
            started=runtime.clock.seconds(),
            tls=tls,
            original_dst=original_dst,
            sni=sni,
        )
        self.session.terminate = self.terminate
        runtime.sessions.add(self.session)
        info = ClientInfo(
            mapping=runtime.mapping.name,
            client_ip=client_ip,
            client_port=client_port,
            local_ip=local_ip,
            local_port=local_port,
            tls=tls,
            certificate_cn=certificate_cn,
            original_dst=original_dst,
            sni=sni,
        )
        if runtime.mapping.peek_sni and not tls:
            self._start_peek(info)
            return
        self._ask(info)

    # -- peek_sni: the server name from the ClientHello, the bytes kept for the destination -----

    def _start_peek(self, info: ClientInfo) -> None:
        """
        Read the client's first bytes until its ClientHello's verdict or C{peek_timeout}; they
        are kept (in C{_early}) and relayed untouched once the destination is connected.
        """
        self._go("peek")
        self._info = info
        self._peek = ClientHelloReader()
        if self._early:  # after a PROXY header
            result = self._peek.feed(self._early)
            if result is not None:
                self._peeked(result)
                return
        self._start_timer(self.runtime.mapping.peek_timeout, self._peek_expired)
        self.transport.resumeProducing()

    def _peek_data(self, data: bytes) -> None:
        assert self._peek is not None
        self._early += data
        result = self._peek.feed(data)
        if result is not None:
            self._peeked(result)

    def _peek_expired(self) -> None:
        if self._peek is not None:
            self._peeked(self._peek.finish())

    def _peeked(self, result: HelloResult) -> None:
        """
        The peek is over (a verdict, the timeout, or the client closed): decide with the
        server name found, if any.
        """
        self._go("peeked")
        self._peek = None
        if not self._client_lost and not self._client_eof:
            self.transport.pauseProducing()
        _log.debug(
            "mapping {mapping}: session {session}: server name {sni} ({verdict}, {count} bytes peeked)",
            mapping=self.runtime.mapping.name,
            session=self.session.id,
            sni=result.server_name,
            verdict=result.reason,
            count=len(self._early),
        )
        self.session.sni = result.server_name
        info, self._info = self._info, None
        assert info is not None
        self._ask(evolve(info, sni=result.server_name))

    def _ask(self, info: ClientInfo) -> None:
        """
        Ask the rule service where the client goes.
        """
        runtime = self.runtime
        # Synchronous answers are used as they come (no Deferred per connection); a rule
        # service or sink may still answer with a Deferred.
        try:
            decision = runtime.rules.decide(info)
        except Exception:
            self._internal_error(Failure())
            return
        if isinstance(decision, Deferred):
            decision.addCallback(self._decided).addErrback(self._internal_error)
            return
        try:
            self._decided(decision)
        except Exception:
            self._internal_error(Failure())

    def _over_limit(self, client_ip: str | None, accepting: bool = False) -> str | None:
        """
        Which connection limit this connection is over, if any.  Every accepted connection
        counts (sessions, and connections still PENDING); C{accepting}: this one is not
        counted yet.
        """
        mapping = self.runtime.mapping
        sessions = self.runtime.sessions
        extra = 1 if accepting else 0
        if mapping.max_connections and sessions.connections(mapping.name) + extra > mapping.max_connections:
            return f"max_connections ({mapping.max_connections}) reached"
        limit = mapping.max_connections_per_client
        if limit and client_ip is not None and sessions.connections(mapping.name, client_ip) + extra > limit:
            return f"max_connections_per_client ({limit}) reached for {client_ip}"
        return None

    def _decided(self, decision: Decision) -> Deferred[None] | None:
        self._decision = decision
        session = self.session
        session.user = decision.identity.user
        session.identity = decision.identity.level
        # Limits, rejections and missing destinations first: a refused session still has its
        # ClientConnect, but no handler hears it (none starts a program for it).
        self._limited = self._over_limit(session.client_ip)
        cluster = self.runtime.cluster
        if self._limited is None and cluster is not None:
            # limits_scope = "cluster": one round trip to the shared store, only for the
            # mappings that ask for it (None: nothing to wait for).
            admitted = cluster.admit(self.runtime.mapping, session)
            if admitted is not None:
                return admitted.addCallback(self._cluster_admitted).addErrback(self._internal_error)
        return self._judge()

    def _cluster_admitted(self, limited: str | None) -> Deferred[None] | None:
        self._limited = limited
        return self._judge()

    def _judge(self) -> Deferred[None] | None:
        """
        Limits are known: decide refusals and offer ClientConnect.
        """
        decision, session = self._decision, self.session
        assert decision is not None and session is not None
        if self._limited is not None:
            self._refusal = "limit"
        else:
            session.rule = decision.rule
            if decision.action == REJECT:
                self._refusal = "rejected"
            elif decision.action == NO_DESTINATION or not decision.destinations:
                self._refusal = "no-destination"
            else:
                self._choose(decision)
                session.destination = str(decision.destinations[self._order[0]])
        self._go("decided")
        allowed = self.runtime.events.client_connect(session.connect_event(self.runtime.clock.seconds()), refused=self._refusal is not None)
        if isinstance(allowed, Deferred):
            return allowed.addCallback(self._allowed)
        self._allowed(allowed)
        return None

    def _choose(self, decision: Decision) -> None:
        """
        The order in which to try the decision's destinations: the balancer's (the chosen one
        first; down ones left out while another is up), or as written for a list the runtime
        does not know (a custom rule service's).
        """
        found = self.runtime.balancers.get(decision.rule)
        if found is not None and found.destinations == decision.destinations:
            self._list = found
            self._order = found.balancer.candidates(self.session.client_ip)
        else:
            self._list = None
            self._order = list(range(len(decision.destinations)))

    def _allowed(self, allowed: bool) -> None:
        if self._reason is not None:
            self._go(_TERMINATE_INPUT.get(self._reason, "killed"))
            self._maybe_finish()
        elif self._client_lost:
            self._go("lost")
            self._maybe_finish()
        elif self._refusal is not None:
            if self._limited is not None:
                _log.info("mapping {mapping}: session {session} refused: {why}", mapping=self.runtime.mapping.name, session=self.session.id, why=self._limited)
            self._refuse(self._refusal)
        elif not allowed:
            self._refuse("blocked")
        else:
            self._connect(0)

    def _internal_error(self, failure: Failure) -> None:
        _log.failure("mapping {mapping}: session {session} failed while choosing a destination", failure, mapping=self.runtime.mapping.name, session=self.session.id)
        if self.phase not in (Phase.DECIDING, Phase.ASKING):
            # After the decision (a failure while connecting or wiring): end it.
            self.terminate("no-destination")
            return
        if self.phase is Phase.DECIDING:
            # Failed before ClientConnect (in the rule service or a limit): no handler has
            # heard of this session, none will.
            self._refusal = "no-destination"
            self.runtime.events.client_connect(self.session.connect_event(self.runtime.clock.seconds()), refused=True)
        self._go("refused")
        if self._client_lost:
            self._maybe_finish()
        else:
            self._refuse("no-destination")

    def _refuse(self, reason: str, input: str = "refused") -> None:
        """
        Not relayed (C{input}: refused, or the last destination failed): close the client.
        """
        if self.phase is not Phase.CLOSING:
            self._go(input)
        self._reason = self._reason or reason
        self.transport.loseConnection()

    # -- connect, with failover --------------------------------------------------------------

    def _connect(self, position: int) -> None:
        """
        Connect the destination at C{position} of the order; each attempt gets
        C{connect_timeout} and is reported to the destination's health.
        """
        assert self._decision is not None
        self._go("failover" if position else "allowed")
        index = self._order[position]
        self._try = position
        destination = self._decision.destinations[index]
        if self._list is not None:
            self._attempt = self._list.balancer.health[index].connecting()
        runtime = self.runtime
        timeout = runtime.mapping.connect_timeout
        timed_out = []
        self._dest_index = index
        self._connect_started = runtime.clock.seconds()
        preamble = b""
        if destination.proxy_protocol:
            session = self.session
            preamble = build_header(
                destination.proxy_protocol,
                (session.client_ip, session.client_port),
                self._original or (session.local_ip, session.local_port),
            )
        try:
            # The common case (plain TCP to an IP literal, both legs for the pump) is connected
            # by hand (relay._connect): it calls connect_succeeded or connect_failed, with its
            # own timeout.  Anything else through the endpoint factory.
            route = direct_route(runtime.clock, runtime.endpoints, destination, self.transport) if runtime.socket_pump else None
            if route is not None:
                self._connecting = DirectConnect(route, preamble, self, timeout, runtime.poller)
                return
            endpoint = runtime.endpoints.endpoint_for_destination(destination, timeout, preamble)
            d = endpoint.connect(_DestinationFactory(self, tls=destination.tls is not None))
        except Exception:
            d = Deferred()
            d.errback()

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = runtime.clock.callLater(timeout, expire)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            self._connecting = None
            return result

        self._connecting = d
        d.addBoth(settled)
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(destination,), errbackArgs=(position, timed_out))
        d.addErrback(self._relay_error)

    def connect_succeeded(self, connect: DirectConnect) -> None:
        """
        The destination connected by hand is connected (see L{IConnectOwner}).
        """
        self._connecting = None
        try:
            assert self._decision is not None
            self._connected(connect, self._decision.destinations[self._dest_index])
        except Exception:
            self._relay_error(Failure())

    def connect_failed(self, failure: Failure, timed_out: bool) -> None:
        """
        The destination connected by hand could not be reached (see L{IConnectOwner}).
        """
        self._connecting = None
        try:
            self._connect_failed(failure, self._try, timed_out)
        except Exception:
            self._relay_error(Failure())

    def _connected(self, protocol: DestinationProtocol | DirectConnect, destination: Destination) -> None:
        direct = isinstance(protocol, DirectConnect)  # connected by hand: a socket, no protocol
        self.peer = None if direct else protocol
        self._dest_lost = self._dest_eof = False
        self.session.destination = str(destination)
        if self._client_lost or self._reason is not None:
            if direct:
                protocol.close()
                self._maybe_finish()
            else:
                protocol.transport.abortConnection()
            return
        if destination.tls is not None:
            # Nothing is relayed until the destination has proven who it is.
            self._go("handshaking")
            self._start_timer(self.runtime.mapping.connect_timeout, self._dest_handshake_timeout)
            return
        if self._attempt is not None:
            self._attempt.succeeded()
        self._wire("connected", protocol if direct else None)

    def destination_handshake_done(self) -> None:
        """
        The TLS handshake with the destination (and its verification) succeeded.
        """
        if self.peer is not None and not self._dest_lost and self.phase is Phase.SECURING:
            if self._attempt is not None:
                self._attempt.succeeded()
            self._wire("secured")

    def _dest_handshake_timeout(self) -> None:
        self._dest_handshake_failure = f"no TLS handshake within {self.runtime.mapping.connect_timeout:g}s"
        if self.peer is not None:
            self.peer.transport.abortConnection()

    def _wire(self, input: str, direct: DirectConnect | None = None) -> None:
        """
        Both legs are ready (C{input}: connected, or secured): join them and let the client's
        bytes flow.  C{direct}: the destination was connected by hand (no protocol): its
        socket goes straight to the pump.
        """
        protocol = self.peer
        assert protocol is not None or direct is not None
        self._go(input)
        if self.runtime.metrics is not None:
            self.runtime.metrics.observe_connect(self.runtime.mapping.name, self.runtime.clock.seconds() - self._connect_started)
        runtime, session = self.runtime, self.session
        early, self._early = self._early, b""
        limits: tuple[Any, Any] = (None, None)
        rate_limit = getattr(runtime.mapping, "rate_limit", None)
        if rate_limit is not None and runtime.rate_limits is not None:
            up, down, self._release_limits = runtime.rate_limits.session(
                runtime.mapping.name, session.client_ip, rate_limit.per_session, rate_limit.per_client, rate_limit.per_mapping
            )
            limits = (up, down)
        if direct is not None:
            taken = take_client(runtime.clock, self.transport, direct)
            if taken is None:  # not expected: direct_route checked the client leg
                direct.close()
                self.terminate("connect-failed")
                return
        else:
            taken = take_over(runtime.clock, self.transport, protocol.transport) if runtime.socket_pump else None
        if taken is not None:
            # Plain TCP both ways: the pump owns both sockets from now on, and tells us how
            # the session ends (pump_eof, pump_ended); the transports hear nothing more.
            client_socket, destination_socket, client_unsent, destination_unsent = taken
            self._pump = SocketPump(
                runtime.clock, client_socket, destination_socket, session, self, client_unsent, destination_unsent, limits, self._track_idle,
                runtime.poller, direct, runtime.sockets_linger,
            )
            # Let go of the Twisted transports (and the destination's protocol, connector and
            # factory): they will never be used again, and kept they cost about 1 KB a session.
            self.transport = self.peer = None
            # What only the connect path (failover) needed goes too.
            self._decision = self._list = None
            self._order = ()
        else:
            self.transport = real_transport(self.transport)  # accepted lean: a Twisted transport now
            self._pump = TransportPump(runtime.clock, self.transport, protocol.transport, session, limits, self._track_idle)
        if self._track_idle:
            self._start_timer(runtime.mapping.idle_timeout, self._idle_check)
        if self._client_eof:
            self._go("client_eof")  # it came while deciding or connecting: the pump passes it on
        self._pump.start(early, self._client_eof)

    def _connect_failed(self, failure: Failure, position: int, timed_out: Any) -> None:
        if self.phase is not Phase.CONNECTING or self._client_lost or self._reason is not None:
            self._maybe_finish()
            return
        assert self._decision is not None
        destination = self._decision.destinations[self._order[position]]
        reason = "connect-timeout" if timed_out or failure.check(TimeoutError) else "connect-failed"
        why = f"no connection within {self.runtime.mapping.connect_timeout:g}s" if timed_out else failure.getErrorMessage()
        if failure.check(CancelledError, ConnectingCancelledError) and not timed_out:
            why = "cancelled"
        _log.warn(
            "mapping {mapping}: session {session}: cannot connect to {destination}: {why}",
            mapping=self.runtime.mapping.name,
            session=self.session.id,
            destination=str(destination),
            why=why,
        )
        if self._attempt is not None:
            self._attempt.failed(why)
        if position + 1 < len(self._order):
            self._connect(position + 1)
        else:
            self._refuse(reason, "connect_failed")

    def _relay_error(self, failure: Failure) -> None:
        _log.failure("mapping {mapping}: session {session}: internal error", failure, mapping=self.runtime.mapping.name, session=self.session.id)
        self.terminate("connect-failed")

    # -- bytes -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._header_reader is not None:
            self._header_data(data)
            return
        if self.phase is Phase.PEEKING:
            self._peek_data(data)
            return
        if self.phase not in _JOINED:
            # Already decrypted (or read with a PROXY header) before the client was paused.
            self._early += data
            if len(self._early) > _EARLY_LIMIT:
                self.terminate("client-closed")
            return
        self._pump.from_client(data)

    def destination_data(self, data: bytes) -> None:
        """
        The destination sent C{data}: pass it to the client.
        """
        self._pump.from_destination(data)

    # -- half-close --------------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """
        The client sent FIN: pass it on once what it sent has been written.
        """
        if self.session is None:
            if self.phase is Phase.PENDING:
                peer_ip, peer_port = _address(self.transport.getPeer())
                self._drop(peer_ip, peer_port, "closed before a complete PROXY header", "proxy-closed")
            return
        if self._client_eof:
            return
        if pending_socket_error(self.transport):
            # A reset the reactor reported as an end of input: it ends as a reset.
            self.transport.abortConnection()
            return
        self._client_eof = True
        self._first_close = self._first_close or "client-closed"
        if self.phase is Phase.PEEKING and self._peek is not None:
            self._peeked(self._peek.finish())  # nothing more will come: decide now
        if self.phase in (Phase.DECIDING, Phase.ASKING, Phase.CONNECTING, Phase.SECURING) and self._reason is None:
            # Passed on once the destination is ready (see _wire): it may still answer.
            return
        if self.phase in (Phase.RELAYING, Phase.DESTINATION_DONE):
            self._go("client_eof")
        peer = self.peer
        if peer is None or self._dest_lost:
            self.transport.loseConnection()
            return
        if self._dest_eof:
            # Both directions are done: closing (after the buffered bytes) sends the FIN too.
            self._close_both()
            return
        self._after_sent(CLIENT, self._end_to_destination)

    def writeConnectionLost(self) -> None:
        pass

    def destination_eof(self) -> None:
        """
        The destination sent FIN: pass it on to the client.
        """
        if self._dest_eof:
            return
        self._dest_eof = True
        self._first_close = self._first_close or "destination-closed"
        if self.phase in (Phase.RELAYING, Phase.CLIENT_DONE):
            self._go("destination_eof")
        if self._client_lost:
            return
        if self._client_eof:
            self._close_both()
            return
        self._after_sent(DESTINATION, self._end_to_client)

    def _after_sent(self, side: str, action: Any) -> None:
        """
        C{action} once what C{side} sent has been passed on: a rate limit may still hold some
        (on Twisted's transports: see L{TransportPump.after_sent}).
        """
        if isinstance(self._pump, TransportPump):
            self._pump.after_sent(side, action)
        else:
            action()

    def _end_to_destination(self) -> None:
        """
        Pass the client's FIN on to the destination.
        """
        self.peer.transport.unregisterProducer()
        self.peer.transport.loseWriteConnection()

    def _end_to_client(self) -> None:
        """
        Pass the destination's FIN on to the client.
        """
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def _close_both(self) -> None:
        """
        Both directions are done: close both legs (after what a rate limit still holds).
        """
        self._after_sent(CLIENT, lambda: self._after_sent(DESTINATION, self._close_legs))

    def _close_legs(self) -> None:
        client, peer = self.transport, self.peer
        if peer is not None and not self._dest_lost:
            peer.transport.unregisterProducer()
            peer.transport.loseConnection()
        if not self._client_lost:
            client.unregisterProducer()
            client.loseConnection()

    # -- endings -----------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._client_lost = True
        if self.session is None:
            # Closed before it became a session (no complete PROXY header, no TLS handshake):
            # nothing to report as an event; a failed handshake is logged.
            pending = self.phase is Phase.PENDING
            if pending and self.runtime.mapping.tls is not None:
                peer_ip, peer_port = _address(self.transport.getPeer())
                _log.warn(
                    "mapping {mapping}: TLS handshake with {peer_ip}:{peer_port} failed: {why}",
                    mapping=self.runtime.mapping.name,
                    peer_ip=peer_ip,
                    peer_port=peer_port,
                    why=describe_tls_failure(self.transport, reason),
                )
                if self.runtime.metrics is not None:
                    self.runtime.metrics.not_a_session(self.runtime.mapping.name, "tls-failed")
            elif pending and self._header_reader is not None:
                # Reset before a complete PROXY header (a FIN goes through readConnectionLost).
                peer_ip, peer_port = _address(self.transport.getPeer())
                self._drop(peer_ip, peer_port, "closed before a complete PROXY header", "proxy-closed")
            if self.phase is Phase.PENDING:
                self._go("lost")
            return
        self._first_close = self._first_close or "client-closed"
        if self.phase is Phase.PEEKING and self._peek is not None:
            self._peeked(self._peek.finish())  # decided (and ended) with what was read
            return
        self._leg_gone(reason.check(ConnectionDone) is not None or self._client_eof)
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.peer is not None and not self._dest_lost:
            transport = self.peer.transport
            transport.unregisterProducer()
            if reason.check(ConnectionDone) or self._client_eof:
                transport.loseConnection()
            else:
                transport.abortConnection()
        self._maybe_finish()

    def destination_lost(self, reason: Failure) -> None:
        """
        The destination leg is closed.
        """
        if self._pump is None and self.peer is not None:
            self._destination_not_ready(reason)
            return
        if reason.check(SSLError) and self._reason is None and not self._dest_eof:
            # TLS 1.3: a server that refuses our client certificate says so after the handshake.
            self._reason = "tls-failed"
            self._log_tls_failure(self.session.destination, describe_tls_failure(self.peer.transport if self.peer else None, reason))
        self._dest_lost = True
        self._first_close = self._first_close or "destination-closed"
        self._leg_gone(reason.check(ConnectionDone) is not None or self._dest_eof)
        if not self._client_lost:
            self.transport.unregisterProducer()
            if reason.check(ConnectionDone) or self._dest_eof:
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()
        self._maybe_finish()

    def _destination_not_ready(self, reason: Failure) -> None:
        """
        The destination closed before it was ready: its TLS handshake or verification failed.
        """
        protocol, self.peer = self.peer, None
        why = self._dest_handshake_failure or describe_tls_failure(protocol.transport if protocol else None, reason)
        self._dest_handshake_failure = None
        if self._client_lost or self._reason is not None:
            self._maybe_finish()
            return
        assert self._decision is not None
        self._log_tls_failure(str(self._decision.destinations[self._order[self._try]]), why)
        if self._attempt is not None:
            self._attempt.failed(f"TLS failed: {why}")
        if self._try + 1 < len(self._order):
            self._connect(self._try + 1)
        else:
            self._refuse("tls-failed", "connect_failed")

    def _log_tls_failure(self, destination: str | None, why: str) -> None:
        _log.warn(
            "mapping {mapping}: session {session}: TLS with {destination} failed: {why}",
            mapping=self.runtime.mapping.name,
            session=self.session.id,
            destination=destination,
            why=why,
        )

    def transports(self) -> tuple[Any, Any] | None:
        """
        The client's and the destination's Twisted transports while they carry the session's
        bytes, or None once a L{SocketPump} owns both sockets (the relay let them go then).
        """
        if self.transport is None or self.peer is None:
            return None
        return self.transport, self.peer.transport

    def terminate(self, reason: str) -> None:
        """
        End the session now with C{reason} (killed, shutdown, idle-timeout...), dropping what
        is still buffered.
        """
        if self.phase is Phase.ENDED:
            return
        self._reason = self._reason or reason
        if self.phase in _ENDS_AT_ONCE:
            # Otherwise (peeking, deciding, asking) the answer awaited ends it (see _allowed).
            self._go(_TERMINATE_INPUT.get(reason, "killed"))
        if self._connecting is not None:
            self._connecting.cancel()
        if isinstance(self._pump, SocketPump):
            self._pump.abort()
            return
        if self.peer is not None and not self._dest_lost:
            self.peer.transport.unregisterProducer()
            self.peer.transport.abortConnection()
        if not self._client_lost:
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    # -- the socket pump's reports (IPumpOwner) -------------------------------------------------

    def pump_eof(self, side: str) -> None:
        """
        C{side} sent FIN (the pump has passed it on).
        """
        if side == CLIENT:
            self._client_eof = True
            self._first_close = self._first_close or "client-closed"
            self._go("client_eof")
        else:
            self._dest_eof = True
            self._first_close = self._first_close or "destination-closed"
            self._go("destination_eof")

    def pump_ended(self, reset_by: str | None) -> None:
        """
        The pump closed both sockets: the session is over.
        """
        if reset_by is not None:
            self._first_close = self._first_close or f"{reset_by}-closed"
        self._leg_gone(reset_by is None)
        self._client_lost = self._dest_lost = True
        self._maybe_finish()

    def _idle_check(self) -> None:
        timeout = self.runtime.mapping.idle_timeout
        idle = self.runtime.clock.seconds() - self._pump.last_activity
        if idle >= timeout:
            _log.info("mapping {mapping}: session {session} idle for {idle:.0f}s; closing", mapping=self.runtime.mapping.name, session=self.session.id, idle=idle)
            self.terminate("idle-timeout")
        else:
            self._start_timer(timeout - idle, self._idle_check)

    def _leg_gone(self, clean: bool) -> None:
        """
        A leg closed (C{clean}: in order, else by a reset): the session is closing, unless it
        already is or is still being decided (then the answer ends it, see L{_allowed}).
        """
        if self.phase in _ENDS_AT_ONCE:
            self._go("lost" if clean else "reset")

    def _maybe_finish(self) -> None:
        """
        Closing, and both legs are closed with no connection attempt left: the session ends.
        """
        if self.phase is not Phase.CLOSING or not self._client_lost:
            return
        if self._connecting is not None or (self.peer is not None and not self._dest_lost):
            return
        self._go("both_done")

    def _ended(self) -> None:
        """
        Entering ENDED (once: it has no way out): give back what the session held and send its
        ClientDisconnect, the only place that does.
        """
        if self._attempt is not None:
            self._attempt.closed()
        if isinstance(self._pump, TransportPump):
            self._pump.stop()
        if self._release_limits is not None:
            self._release_limits()
            self._release_limits = None
        session = self.session
        session.reason = self._reason or self._first_close or "client-closed"
        session.terminate = None
        if self.runtime.cluster is not None:
            self.runtime.cluster.ended(self.runtime.mapping, session)
        # The event first: removing the last session may complete a shutdown drain.
        self.runtime.events.client_disconnect(session.disconnect_event(self.runtime.clock.seconds()), refused=self._refusal is not None)
        self.runtime.sessions.remove(session)
