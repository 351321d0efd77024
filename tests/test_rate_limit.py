"""
Bandwidth limits (C{rate_limit}) on a running service: the configuration keys and their errors,
downloads and uploads timed by the test that never beat the limit by more than 10 % (per
session, and per client address and per mapping shared by concurrent sessions), on the socket
pump and on Twisted's transports (TLS legs use those), and a limited session whose relay never
holds more than about one read while its sender pushes as fast as it can.

The timed tests assert only that the limit holds (an upper bound: a busy machine can only make
a transfer slower); a loose lower bound catches a limiter that stalls.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from wingate_map.config._model import RateLimit, parse_config
from wingate_map.errors import ConfigError
from wingate_map.relay._pump import READ_SIZE, SocketPump, TransportPump
from wingate_map.relay._ratelimit import RateLimits, default_burst
from wingate_map.testing import RelayHarness, simple_mapping

from .helpers import Peer, PeerFactory, buffered, free_port, mapping_config, relay_of, start_service, wait_for
from .test_relay_unit import DEST, connected

RATE = 8_000_000  # bit/s: 1 MB/s
SIZE = 2_000_000  # bytes: two seconds' worth


def reactor():
    from twisted.internet import reactor as r

    return r


def _config(text: str):
    return parse_config('[mappings.m]\nport = 1000\nbind = "127.0.0.1"\ndefault = { host = "127.0.0.1", port = 1 }\n' + text)


def test_rate_limit_keys():
    """
    C{rate_limit} takes per_session, per_client and per_mapping, each optional, in bits per
    second with a decimal prefix.
    """
    mapping = _config('rate_limit = { per_session = "50Mbit", per_client = "100Mbit", per_mapping = "1Gbit" }').mapping("m")
    assert mapping.rate_limit == RateLimit(50_000_000, 100_000_000, 1_000_000_000)
    assert _config('rate_limit = { per_client = "512kbit" }').mapping("m").rate_limit == RateLimit(per_client=512_000)
    assert _config("").mapping("m").rate_limit is None


@pytest.mark.parametrize(
    "text, path, words",
    [
        ('rate_limit = { per_session = "50M" }', "mappings.m.rate_limit.per_session", "'50Mbit'"),
        ('rate_limit = { per_client = 5000 }', "mappings.m.rate_limit.per_client", "not int"),
        ('rate_limit = { per_mapping = "0bit" }', "mappings.m.rate_limit.per_mapping", "at least 8bit"),
        ('rate_limit = { per_sesion = "5Mbit" }', "mappings.m.rate_limit.per_sesion", "per_session"),
        ('rate_limit = "5Mbit"', "mappings.m.rate_limit", "must be a table"),
    ],
)
def test_rate_limit_errors_name_the_key(text, path, words):
    """
    A bad rate, an unknown key or a rate_limit that is not a table is refused, naming the key.
    """
    with pytest.raises(ConfigError) as caught:
        _config(text)
    message = str(caught.value)
    assert path in message and words in message


@defer.inlineCallbacks
def _transfer(limits: str, clients: list[str], upload: bool = False, socket_pump: bool = True, size: int = SIZE):
    """
    Run one transfer of C{size} bytes per client address in C{clients} at once (a download from
    the destination, or an upload to it) through a mapping with C{rate_limit = {limits}}; return
    (seconds from before the first connect until the last byte arrived, the relays used).
    """
    payload = b"r" * size
    servers = PeerFactory(payload=b"" if upload else payload, close_on_eof=True)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    service, sink = start_service(
        mapping_config(port, [("127.0.0.1", server_port.getHost().port)], f"rate_limit = {{ {limits} }}"), socket_pump=socket_pump
    )
    try:
        started = reactor().seconds()
        peers = []
        for address in clients:
            peer = Peer(payload=payload if upload else b"")
            endpoint = TCP4ClientEndpoint(reactor(), "127.0.0.1", port, bindAddress=(address, 0))
            yield connectProtocol(endpoint, peer)
            peers.append(peer)
        yield wait_for(lambda: len(service.sessions.live()) == len(clients))
        relays = [relay_of(s) for s in service.sessions.live()]
        if upload:
            yield wait_for(lambda: len(servers.peers) == len(clients) and all(p.received == size for p in servers.peers), timeout=60)
        else:
            yield defer.gatherResults([p.when_received(size) for p in peers])
        elapsed = reactor().seconds() - started
        yield sink.disconnects(len(clients))
        return elapsed, relays
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def _check_rate(total: int, elapsed: float, bits: int, buckets: int = 1) -> None:
    """
    C{total} bytes in C{elapsed} seconds kept to C{bits} per second within 10 % (after the
    bucket's initial burst, which may go at once); and not stalled (a quarter of it at least).
    """
    rate = bits / 8
    burst = default_burst(rate) * buckets
    assert (total - burst) / elapsed <= rate * 1.10, f"{total / elapsed * 8 / 1e6:.2f} Mbit/s through a {bits / 1e6:g} Mbit/s limit"
    assert total / elapsed >= rate / 4, f"{total / elapsed * 8 / 1e6:.2f} Mbit/s: the limiter stalls"


@pytest_twisted.inlineCallbacks
def test_download_holds_the_session_limit():
    """
    A download through a session limited to 8 Mbit/s takes at least as long as the limit says
    (never more than 10 % faster), relayed by the socket pump.
    """
    elapsed, [relay] = yield _transfer(f'per_session = "{RATE}bit"', ["127.0.0.1"])
    assert type(relay._pump) is SocketPump
    _check_rate(SIZE, elapsed, RATE)


@pytest_twisted.inlineCallbacks
def test_upload_holds_the_session_limit():
    """
    Each direction is limited separately: an upload is held to the limit too.
    """
    elapsed, _ = yield _transfer(f'per_session = "{RATE}bit"', ["127.0.0.1"], upload=True)
    _check_rate(SIZE, elapsed, RATE)


@pytest_twisted.inlineCallbacks
def test_download_holds_the_limit_on_twisted_transports():
    """
    On Twisted's transports (what TLS legs use) the limit holds the same way.
    """
    elapsed, [relay] = yield _transfer(f'per_session = "{RATE}bit"', ["127.0.0.1"], socket_pump=False)
    assert type(relay._pump) is TransportPump
    _check_rate(SIZE, elapsed, RATE)


@pytest_twisted.inlineCallbacks
def test_sessions_of_one_client_share_its_limit():
    """
    Two downloads at once from one client address share its per_client limit (each session
    alone would be allowed far more).
    """
    elapsed, _ = yield _transfer(f'per_session = "80Mbit", per_client = "{RATE}bit"', ["127.0.0.1", "127.0.0.1"], size=SIZE // 2)
    _check_rate(SIZE, elapsed, RATE)


@pytest_twisted.inlineCallbacks
def test_clients_of_one_mapping_share_its_limit():
    """
    Downloads from two client addresses at once share the mapping's per_mapping limit.
    """
    elapsed, _ = yield _transfer(f'per_client = "80Mbit", per_mapping = "{RATE}bit"', ["127.0.0.1", "127.0.0.2"], size=SIZE // 2)
    _check_rate(SIZE, elapsed, RATE)


@pytest.mark.parametrize("socket_pump", [True, False])
@pytest_twisted.inlineCallbacks
def test_a_limited_session_holds_at_most_one_read(socket_pump):
    """
    A destination pushing as fast as it can through a 4 Mbit/s session: the gateway holds at
    most about one read of it at any time (the rest waits in the sender and the kernel), so a
    limited session never grows the gateway's memory.
    """
    servers = PeerFactory(payload=b"m" * 50_000_000, close_on_eof=True)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, [("127.0.0.1", server_port.getHost().port)], 'rate_limit = { per_session = "4Mbit" }'), socket_pump=socket_pump)
    most = [0]
    try:
        client = Peer()
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        yield wait_for(lambda: len(service.sessions.live()) == 1)
        relay = relay_of(service.sessions.live()[0])
        yield wait_for(lambda: relay._pump is not None)

        def sample() -> None:
            held = relay._pump.held()
            if not socket_pump:  # and what Twisted's transports still have to write
                held += buffered(relay.transport) + buffered(relay.peer.transport)
            most[0] = max(most[0], held)

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        yield client.when_received(1_000_000)  # two seconds at the limit
        sampler.stop()
        assert 0 < client.received < 2_000_000
        assert most[0] <= 2 * READ_SIZE, f"the relay held {most[0]} bytes"
        client.transport.abortConnection()
        yield sink.disconnects(1)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def test_an_end_of_stream_waits_for_the_bytes_the_limit_holds():
    """
    On Twisted's transports (TLS legs), a destination's last bytes and its end of stream can
    arrive together: the client gets every byte before the FIN, however long the rate limit
    holds them.
    """
    harness = RelayHarness(simple_mapping(DEST, rate_limit=RateLimit(per_session=800_000)))  # 100 kB/s
    harness.factory.runtime.rate_limits = RateLimits(harness.clock)
    harness, client, client_t, attempt = connected(harness)
    answer = b"a" * 100_000
    attempt.protocol.dataReceived(answer)
    attempt.protocol.readConnectionLost()
    assert len(client_t.value()) < len(answer) and not client_t.write_closed
    for _ in range(30):
        harness.clock.advance(0.1)
    assert client_t.value() == answer and client_t.write_closed


def test_a_client_end_of_stream_waits_for_the_bytes_the_limit_holds():
    """
    The same upstream: a client's last bytes and FIN reach the destination in that order; when
    the destination had already finished, both legs are closed only after those bytes.
    """
    harness = RelayHarness(simple_mapping(DEST, rate_limit=RateLimit(per_session=800_000)))
    harness.factory.runtime.rate_limits = RateLimits(harness.clock)
    harness, client, client_t, attempt = connected(harness)
    attempt.protocol.readConnectionLost()  # the destination finished first
    request = b"q" * 100_000
    client.dataReceived(request)
    client.readConnectionLost()
    assert len(attempt.transport.value()) < len(request) and not attempt.transport.disconnecting
    for _ in range(30):
        harness.clock.advance(0.1)
    assert attempt.transport.value() == request and attempt.transport.disconnecting
