"""
Real-socket helpers for the integration tests: peers that send and hash payloads, a wingatemap
service on loopback, free ports, and waiting on conditions without sleeping.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Callable

from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from wingate_map.config import parse_config
from wingate_map.service import WingateMapService
from wingate_map.testing import RecordingSink


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that is free on C{host} right now.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_fds() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> defer.Deferred[None]:
    """
    A Deferred firing once C{condition()} is true, checked every C{interval}s; fails after
    C{timeout}s.  For states no callback announces (buffer levels, fd counts).
    """
    from twisted.internet import reactor

    d: defer.Deferred[None] = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        if condition():
            loop.stop()
            d.callback(None)
        elif reactor.seconds() > deadline:
            loop.stop()
            d.errback(AssertionError(f"condition not met within {timeout}s"))

    loop = task.LoopingCall(check)
    loop.start(interval, now=True)
    return d


@implementer(IPushProducer)
class _Sender:
    """
    Writes a payload as fast as the transport's flow control allows.
    """

    def __init__(self, peer: "Peer") -> None:
        self.peer = peer
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        peer = self.peer
        while not self.paused and not self.stopped and peer.sent < len(peer.payload):
            chunk = peer.payload[peer.sent : peer.sent + peer.chunk]
            peer.sent += len(chunk)
            peer.transport.write(chunk)
        if peer.sent >= len(peer.payload) and not self.stopped:
            self.stopped = True
            peer.transport.unregisterProducer()
            peer.finished_sending()

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """
    A test peer: sends C{payload} (honouring flow control), then half-closes if C{half_close};
    hashes everything it receives.  On EOF it closes (once its payload is sent) if
    C{close_on_eof}; it always closes once both directions are done.

    @ivar eof: fires when the other side half-closes.
    @ivar lost: fires with the reason (an exception) when the connection is gone.
    """

    chunk = 65536

    def __init__(
        self,
        payload: bytes = b"",
        half_close: bool = True,
        read: bool = True,
        reset_after: int | None = None,
        close_on_eof: bool = True,
    ) -> None:
        self.payload = payload
        self.half_close = half_close
        self.close_on_eof = close_on_eof
        self.read = read
        self.reset_after = reset_after
        self.sent = 0
        self.received = 0
        self.digest = hashlib.sha256()
        self.first_bytes = b""
        self.eof_seen = False
        self.sent_all = False
        self.connected_d: defer.Deferred[Peer] = defer.Deferred()
        self.eof: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[BaseException] = defer.Deferred()
        self.received_d: dict[int, defer.Deferred[None]] = {}
        self.sender: _Sender | None = None

    def connectionMade(self) -> None:
        if not self.read:
            self.transport.pauseProducing()
        self.sender = _Sender(self)
        self.transport.registerProducer(self.sender, True)
        self.sender.resumeProducing()
        self.connected_d.callback(self)

    def finished_sending(self) -> None:
        self.sent_all = True
        if self.reset_after is not None:
            return
        if self.half_close:
            self.transport.loseWriteConnection()
        if self.eof_seen and self.half_close:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if len(self.first_bytes) < 64:
            self.first_bytes += data[: 64 - len(self.first_bytes)]
        for wanted, d in list(self.received_d.items()):
            if self.received >= wanted:
                del self.received_d[wanted]
                d.callback(None)
        if self.reset_after is not None and self.received >= self.reset_after:
            self.transport.abortConnection()

    def when_received(self, count: int) -> defer.Deferred[None]:
        """
        Fires once at least C{count} bytes have arrived.
        """
        if self.received >= count:
            return defer.succeed(None)
        return self.received_d.setdefault(count, defer.Deferred())

    def readConnectionLost(self) -> None:
        self.eof_seen = True
        if not self.eof.called:
            self.eof.callback(None)
        if self.close_on_eof and (self.sent_all or not self.half_close):
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.eof_seen:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.lost.called:
            # The exception itself, not the Failure: a Failure would make the Deferred fail.
            self.lost.callback(reason.value)


class PeerFactory(protocol.Factory):
    """
    Builds L{Peer}s with fixed arguments and keeps them in C{peers}; C{accepted} fires with each.
    """

    noisy = False

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.peers: list[Peer] = []
        self._waiting: list[defer.Deferred[Peer]] = []

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer(**self.kwargs)
        self.peers.append(peer)
        peer.connected_d.addCallback(self._announce)
        return peer

    def _announce(self, peer: Peer) -> Peer:
        if self._waiting:
            self._waiting.pop(0).callback(peer)
        return peer

    def next_peer(self, index: int) -> defer.Deferred[Peer]:
        """
        Fires with the C{index}-th accepted peer (0-based) once it is connected.
        """
        if index < len(self.peers) and self.peers[index].connected_d.called:
            return defer.succeed(self.peers[index])
        d: defer.Deferred[Peer] = defer.Deferred()
        self._waiting.append(d)
        return d


@implementer(IHalfCloseableProtocol)
class EchoProtocol(protocol.Protocol):
    """
    Echoes everything; when the client half-closes, finishes writing the echo and closes.
    (A protocol without half-close support would lose its unsent echo at the client's FIN.)
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def mapping_config(port: int, destinations: list[tuple[str, int]] | str, extra: str = "", service: str = "") -> str:
    """
    A configuration with one mapping "m" on 127.0.0.1:C{port}.
    """
    if isinstance(destinations, str):
        default = destinations
    else:
        default = "[" + ", ".join(f'{{ host = "{h}", port = {p} }}' for h, p in destinations) + "]"
    return f"[service]\n{service}\n[mappings.m]\nport = {port}\nbind = \"127.0.0.1\"\ndefault = {default}\n{extra}\n"


def start_service(text: str, **kwargs: Any) -> tuple[WingateMapService, RecordingSink]:
    """
    Start a wingatemap service for configuration C{text} on the running reactor.
    """
    from twisted.internet import reactor

    sink = RecordingSink()
    service = WingateMapService(parse_config(text), reactor=reactor, sinks=[sink], **kwargs)
    service.startService()
    return service, sink


def relay_of(session: Any) -> Any:
    """
    The relay protocol behind a live session.
    """
    return session.terminate.__self__


def buffered(transport: Any) -> int:
    """
    Bytes waiting in a Twisted TCP transport's write buffer.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@defer.inlineCallbacks
def half_close_exchange(connect: Callable[[Peer], Any], servers: PeerFactory):
    """
    A client sends a request and half-closes; the server sees EOF, answers after it and
    half-closes too.  Checks the answer reached the client; returns the client.
    """
    client = Peer(payload=b"request")
    yield connect(client)
    server = yield servers.next_peer(0)
    yield server.eof
    assert server.received == 7
    server.transport.write(b"answer after EOF")
    server.transport.loseWriteConnection()
    yield client.lost
    assert client.first_bytes == b"answer after EOF"
    return client
