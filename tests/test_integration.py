"""
The relay over real sockets on loopback: payloads intact, half-close, failures, load, memory and
file descriptors.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher

from wingate_map.errors import BindError
from wingate_map.relay import _destinations, _poller, _protocol
from wingate_map.relay._poller import READ

from .helpers import (
    EchoProtocol,
    Peer,
    PeerFactory,
    buffered,
    free_port,
    half_close_exchange,
    mapping_config,
    open_fds,
    relay_of,
    start_service,
    wait_for,
)

MB = 1024 * 1024


def reactor():
    from twisted.internet import reactor as r

    return r


@defer.inlineCallbacks
def listen(factory, host="127.0.0.1"):
    port = yield TCP4ServerEndpoint(reactor(), 0, backlog=1024, interface=host).listen(factory)
    return port


def port_open(port, host="127.0.0.1"):
    """
    Whether something accepts connections on host:port.
    """
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except ConnectionRefusedError:
        return False


def connect(port, peer, host="127.0.0.1"):
    return connectProtocol(TCP4ClientEndpoint(reactor(), host, port), peer)


@pytest.fixture(params=["direct", "direct-on-reactor", "endpoint"])
def connect_path(request, monkeypatch):
    """
    Each way a plain destination can be reached, one at a time: connected by hand with the
    data plane's poller (the default; the endpoint path is forbidden, so a test passes only
    through the hand-made connect), connected by hand with the reactor's own descriptor set
    (what a reactor without epoll gets), or through the endpoint factory (as destinations
    given by name or with TLS).
    """
    if request.param == "endpoint":
        monkeypatch.setattr(_protocol, "direct_route", lambda *args: None)
    else:

        def forbidden(self, destination, timeout, preamble=b""):
            raise AssertionError("endpoint path used")

        monkeypatch.setattr(_destinations.StandardEndpointFactory, "endpoint_for_destination", forbidden)
    if request.param == "direct-on-reactor":
        import wingate_map.service._root as root

        monkeypatch.setattr(root, "descriptors_for", _poller.ReactorDescriptors)
    return request.param


@pytest.fixture
def warnings():
    """
    The text of every log event of this test.
    """
    seen: list[str] = []

    def observe(event):
        fmt = event.get("log_format")
        if fmt:
            try:
                seen.append(fmt.format(**event))
            except Exception:
                pass

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.inlineCallbacks
def test_50mb_both_ways_intact():
    """
    50 MB of random bytes each way arrive unchanged (same SHA-256) and are counted exactly.
    """
    up, down = os.urandom(50 * MB), os.urandom(50 * MB)
    servers = PeerFactory(payload=down)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=up)
        yield connect(port, client)
        yield client.lost
        server = servers.peers[0]
        yield server.lost
        [event] = yield sink.disconnects(1)
        assert client.digest.hexdigest() == hashlib.sha256(down).hexdigest()
        assert server.digest.hexdigest() == hashlib.sha256(up).hexdigest()
        assert (event["bytes_from_client"], event["bytes_to_client"]) == (50 * MB, 50 * MB)
        assert event["reason"] in ("client-closed", "destination-closed")
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_from_client(connect_path):
    """
    The client sends a request and half-closes; the destination sees EOF, then answers, and
    the answer reaches the client after its own FIN.
    """
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = yield half_close_exchange(lambda peer: connect(port, peer), servers)
        assert client.eof.called
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "client-closed"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_half_close_from_destination(connect_path):
    """
    The destination sends a banner and half-closes; the client sees EOF and can still send.
    """
    servers = PeerFactory(payload=b"banner")
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connect(port, client)
        yield client.eof
        assert client.first_bytes == b"banner"
        client.transport.write(b"still talking")
        server = servers.peers[0]
        yield server.when_received(13)
        client.transport.loseWriteConnection()
        yield server.lost
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "destination-closed"
        assert (event["bytes_from_client"], event["bytes_to_client"]) == (13, 6)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_destination_refusing(connect_path, warnings):
    """
    A destination that refuses ends the session with connect-failed, logged with the refusal;
    the client is closed.
    """
    dead = free_port()
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", dead)]))
    try:
        client = Peer(payload=b"hello", half_close=False)
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "connect-failed" and event["bytes_from_client"] == 0
        assert any(f"cannot connect to 127.0.0.1:{dead}" in w and "refused" in w for w in warnings), warnings
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_failover_when_first_refuses(connect_path):
    """
    With a failover list, a refusing first destination is skipped and the second serves.
    """
    servers = PeerFactory(payload=b"second")
    server_port = yield listen(servers)
    port = free_port()
    second = ("127.0.0.1", server_port.getHost().port)
    service, sink = start_service(mapping_config(port, [("127.0.0.1", free_port()), second]))
    try:
        client = Peer(payload=b"x")
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert client.first_bytes == b"second"
        assert event["destination"] == f"127.0.0.1:{second[1]}"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_destination_black_holed(connect_path):
    """
    A destination that never answers (SYNs dropped: a full accept queue) ends the session with
    connect-timeout after connect_timeout, and the half-open socket is closed.
    """
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())  # fills the accept queue
    port = free_port()
    service, sink = start_service(mapping_config(port, [hole.getsockname()], extra="connect_timeout = 0.5"))
    try:
        before = open_fds()
        client = Peer(payload=b"", half_close=False)
        yield connect(port, client)
        yield client.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "connect-timeout"
        assert 0.4 < event["duration"] < 10
        yield wait_for(lambda: open_fds() <= before)
    finally:
        yield service.stopService()
        filler.close()
        hole.close()


@pytest_twisted.inlineCallbacks
def test_destination_reset_mid_stream(connect_path):
    """
    A destination that resets mid-stream makes the client see a reset too, not a clean end.
    """
    servers = PeerFactory(payload=b"", half_close=False, reset_after=100_000)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=os.urandom(1 * MB), half_close=False)
        yield connect(port, client)
        reason = yield client.lost
        assert isinstance(reason, ConnectionLost) and not isinstance(reason, ConnectionDone)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "destination-closed"
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_vanishing_mid_stream():
    """
    A client that resets mid-stream ends the session (client-closed) and the destination leg
    is closed too.
    """
    servers = PeerFactory(payload=os.urandom(4 * MB), half_close=False)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=b"", half_close=False, reset_after=200_000)
        yield connect(port, client)
        yield client.lost
        server = yield servers.next_peer(0)
        yield server.lost
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "client-closed"
        assert len(service.sessions) == 0
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_200_concurrent_sessions():
    """
    200 clients at once: all 200 sessions are live together (none has ended) while every
    client gets its own bytes echoed back intact; then each closes and ends cleanly.
    """
    factory = protocol.Factory.forProtocol(EchoProtocol)
    factory.noisy = False
    server_port = yield listen(factory)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        payloads = [os.urandom(10_000) for _ in range(200)]
        # No client closes until told to: each session stays open after its echo.
        clients = [Peer(payload=p, half_close=False) for p in payloads]
        yield defer.gatherResults([connect(port, c) for c in clients])
        yield wait_for(lambda: all(c.received == 10_000 for c in clients) or any(c.lost.called for c in clients), timeout=60)
        assert [c for c in clients if c.lost.called] == []
        assert len(service.sessions) == 200
        assert sink.of("ClientDisconnect") == []
        for client, payload in zip(clients, payloads):
            assert client.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
        for client in clients:
            client.transport.loseWriteConnection()
        yield defer.gatherResults([c.lost for c in clients]).addTimeout(60, reactor())
        events = yield sink.disconnects(200)
        assert len({e["session"] for e in events}) == 200
        assert {e["reason"] for e in events} == {"client-closed"}
        assert sorted(e["bytes_to_client"] for e in events) == [10_000] * 200
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_slow_reader_keeps_memory_bounded():
    """
    A destination writing 64 MB to a client that does not read stalls instead of filling the
    relay's memory: the relay buffers well under 1 MB; then the client reads all of it intact.
    """
    payload = os.urandom(64 * MB)
    servers = PeerFactory(payload=payload)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        client = Peer(payload=b"", read=False)
        yield connect(port, client)
        server = yield servers.next_peer(0)
        # Stalled: the relay has stopped reading from the destination because the client's
        # leg is full, and the server is held back by flow control.
        def stalled():
            live = service.sessions.live()
            relay = relay_of(live[0]) if live else None
            if relay is None or relay._pump is None:
                return False
            # The destination's leg is no longer read: the socket pump's own (registered on the
            # data plane's poller, not on the reactor), or Twisted's.
            transports = relay.transports()
            if transports is None:
                leg = relay._pump.destination
                not_read = not leg.reading and not leg.mask & READ
            else:
                not_read = transports[1] not in reactor().getReaders()
            return not_read and server.sender.paused

        yield wait_for(stalled)
        [session] = service.sessions.live()
        relay = relay_of(session)
        # Twisted's write buffers too while its transports carry the session (the socket pump
        # takes over what they still held).
        held = sum(buffered(t) for t in relay.transports() or ()) + relay._pump.held()
        assert held < 1 * MB, held
        assert server.sent < len(payload)
        client.transport.resumeProducing()
        yield client.lost
        assert client.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_no_fds_leaked_after_2000_sessions():
    """
    After 2,000 sessions (100 at a time) the process has the file descriptors it started with.
    """
    factory = protocol.Factory.forProtocol(EchoProtocol)
    factory.noisy = False
    server_port = yield listen(factory)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)]))
    try:
        before = open_fds()
        for batch in range(20):
            clients = [Peer(payload=b"ping %d" % i) for i in range(100)]
            yield defer.gatherResults([connect(port, c) for c in clients])
            yield defer.gatherResults([c.lost for c in clients])
        yield sink.disconnects(2000)
        yield wait_for(lambda: len(service.sessions) == 0 and open_fds() <= before)
        assert open_fds() <= before
        assert len(sink.of("ClientDisconnect")) == 2000
    finally:
        yield service.stopService()
        yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_drain_then_shutdown():
    """
    Stopping the service closes the listener at once, lets a live session finish within
    drain_timeout, and ends sessions still open after it with reason shutdown.
    """
    servers = PeerFactory(payload=b"", half_close=False)
    server_port = yield listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)], service="drain_timeout = 0.5"))
    client = Peer(payload=b"", half_close=False)
    yield connect(port, client)
    yield servers.next_peer(0)
    stopped = service.stopService()
    yield wait_for(lambda: not port_open(port))
    assert not stopped.called and len(service.sessions) == 1
    yield stopped
    yield client.lost
    [event] = sink.of("ClientDisconnect")
    assert event["reason"] == "shutdown"
    yield server_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_bind_failure_is_all_or_nothing():
    """
    If one listener cannot bind, start-up fails naming mapping, address and port, and no other
    listener is left open.
    """
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    other = free_port()
    text = (
        f'[mappings.a]\nport = {other}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = 1 }}\n'
        f'[mappings.b]\nport = {busy_port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = 1 }}\n'
    )
    try:
        with pytest.raises(BindError) as info:
            start_service(text)
        assert str(info.value).startswith(f"mapping b: cannot listen on 127.0.0.1:{busy_port}: ")
        # a's listener, opened first, is closed again (at the reactor's next turn).
        yield wait_for(lambda: not port_open(other))
    finally:
        busy.close()


def test_unwritable_audit_log_is_a_clear_error(tmp_path):
    """
    An audit log that cannot be opened stops start-up with an error naming the key and file,
    and no listener is opened.
    """
    from wingate_map.errors import WingateMapError

    target = tmp_path / "events.jsonl"
    target.mkdir()  # a directory where the file should be
    port = free_port()
    text = mapping_config(port, [("127.0.0.1", 9)], service=f'audit_log = "{target}"')
    with pytest.raises(WingateMapError) as info:
        start_service(text)
    assert str(info.value).startswith(f"service.audit_log: cannot open {target}: ")
    assert not port_open(port)


def _bound_client(peer, source_ip, port):
    """
    Connect C{peer} to 127.0.0.1:C{port} from C{source_ip} (any 127.x.y.z is a distinct
    client location on Linux).
    """
    endpoint = TCP4ClientEndpoint(reactor(), "127.0.0.1", port, bindAddress=(source_ip, 0))
    return connectProtocol(endpoint, peer)


@pytest_twisted.inlineCallbacks
def test_rules_route_clients_by_user_and_location():
    """
    Clients connecting from different 127.0.0.x addresses reach the destination their user or
    location rule chooses; a rejected user is closed; everyone else gets the default; and a
    rule's failover list skips a refusing destination.
    """
    names = ["alice", "lab", "default"]
    factories = {n: PeerFactory(payload=n.encode(), close_on_eof=True) for n in names}
    ports = {}
    for n in names:
        listening = yield listen(factories[n])
        ports[n] = listening
    dead = free_port()
    port = free_port()
    text = f"""
[users.alice]
locations = ["127.0.0.21"]
[users.mallory]
locations = ["127.0.0.23"]
groups = ["blocked"]

[mappings.m]
port = {port}
bind = "127.0.0.1"
default = {{ host = "127.0.0.1", port = {ports["default"].getHost().port} }}

[[mappings.m.rules]]
user = "alice"
to = {{ host = "127.0.0.1", port = {ports["alice"].getHost().port} }}

[[mappings.m.rules]]
from = ["127.0.0.22"]
to = [{{ host = "127.0.0.1", port = {dead} }}, {{ host = "127.0.0.1", port = {ports["lab"].getHost().port} }}]

[[mappings.m.rules]]
group = "blocked"
action = "reject"
"""
    service, sink = start_service(text)
    try:
        got = {}
        for source in ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"]:
            client = Peer(payload=b"hi")
            yield _bound_client(client, source, port)
            yield client.lost
            got[source] = client.first_bytes
        assert got == {"127.0.0.21": b"alice", "127.0.0.22": b"lab", "127.0.0.23": b"", "127.0.0.24": b"default"}
        events = yield sink.disconnects(4)
        by_client = {e["client_ip"]: e for e in events}
        assert by_client["127.0.0.21"]["user"] == "alice" and by_client["127.0.0.21"]["rule"] == 0
        assert by_client["127.0.0.21"]["identity"] == "assumed"
        assert by_client["127.0.0.22"]["rule"] == 1
        assert by_client["127.0.0.22"]["destination"] == f"127.0.0.1:{ports['lab'].getHost().port}"
        assert by_client["127.0.0.23"]["reason"] == "rejected" and by_client["127.0.0.23"]["destination"] is None
        assert by_client["127.0.0.24"]["user"] == "guest" and by_client["127.0.0.24"]["rule"] == "default"
    finally:
        yield service.stopService()
        for listening in ports.values():
            yield listening.stopListening()
