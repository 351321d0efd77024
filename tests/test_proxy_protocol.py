"""
The PROXY protocol: parsing what load balancers send (v1 and v2, in pieces, malformed), the
relay accepting it only from trusted peers, and the header sent to destinations.
"""

from __future__ import annotations

import struct

import pytest

from wingate_map.config import Destination, parse_location
from wingate_map.proxy_protocol import (
    HEADER_TIMEOUT,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    build_header,
)
from wingate_map.testing import RelayHarness, simple_mapping

DEST = Destination(host="192.0.2.10", port=80)


def feed_in_pieces(data: bytes, size: int):
    reader = ProxyHeaderReader()
    result = None
    for i in range(0, len(data), size):
        result = reader.feed(data[i : i + size])
        if result is not None:
            return result
    return result


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest.mark.parametrize(
    "source, destination",
    [(("10.1.2.3", 5555), ("10.0.0.1", 80)), (("fd00::3", 5555), ("fd00::1", 443))],
)
def test_round_trip_in_pieces(version, piece, source, destination):
    """
    A header built for either version parses back to the same addresses, however it is split
    across reads, and the bytes after it are kept.
    """
    header, rest = feed_in_pieces(build_header(version, source, destination) + b"payload", piece)
    assert header == ProxyHeader(int(version[1]), source, destination)
    assert rest.endswith(b"payload") or piece < 1000


def test_unknown_and_local():
    """
    v1 UNKNOWN and v2 LOCAL mean "use the connection's own addresses": no source.
    """
    assert ProxyHeaderReader().feed(b"PROXY UNKNOWN\r\nrest") == (ProxyHeader(1, None, None), b"rest")
    assert ProxyHeaderReader().feed(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == (ProxyHeader(1, None, None), b"")
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert ProxyHeaderReader().feed(local + b"x") == (ProxyHeader(2, None, None), b"x")


def test_mixed_families_sent_as_ipv6():
    """
    A header for an IPv4 client reaching an IPv6 address is sent as IPv6 (IPv4-mapped) and
    reads back as the IPv4 client.
    """
    header, _ = ProxyHeaderReader().feed(build_header("v1", ("10.0.0.5", 1), ("fd00::1", 2)))
    assert header.source == ("10.0.0.5", 1) and header.destination == ("fd00::1", 2)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 100, "longer than 107 bytes"),
        (b"PROXY TCP4 " + b"9" * 120 + b"\r\n", "longer than 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed PROXY v1 header"),
        (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "malformed PROXY v1 header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "malformed PROXY v1 header"),
        (b"PROXY HTTP 1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY v1 header"),
        (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + b"\x00" * 12, "no PROXY header"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "unsupported PROXY v2 version 3"),
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 8000), "larger than"),
        (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + b"\x00" * 12, "malformed PROXY v2 header"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed PROXY v2 header"),
    ],
)
def test_bad_headers(data, message):
    """
    Wrong signatures, oversized, truncated-address and malformed headers are errors that say
    what was wrong.
    """
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(data)
    assert message in str(info.value)


def test_truncated_header_waits():
    """
    A header that has not fully arrived is not an error yet: the reader waits for more.
    """
    full = build_header("v2", ("10.1.2.3", 1), ("10.0.0.1", 2))
    reader = ProxyHeaderReader()
    assert reader.feed(full[:10]) is None
    assert reader.feed(full[10:20]) is None
    assert reader.feed(full[20:])[0].source == ("10.1.2.3", 1)


def proxied(trusted=("127.0.0.0/8",)):
    return RelayHarness(
        simple_mapping(
            DEST,
            proxy_protocol=True,
            proxy_protocol_from=tuple(parse_location(t) for t in trusted) if trusted is not None else None,
        )
    )


def test_relay_uses_header_source_as_client():
    """
    From a trusted peer, the header's source address is the client for rules and events, and
    the bytes that came with the header are relayed after it.
    """
    harness = proxied()
    client, transport = harness.accept(client_ip="127.0.0.9")
    assert harness.sink.events == [] and harness.endpoints.attempts == []
    client.dataReceived(build_header("v2", ("10.20.30.40", 4444), ("127.0.0.1", 8080))[:7])
    client.dataReceived(build_header("v2", ("10.20.30.40", 4444), ("127.0.0.1", 8080))[7:] + b"early")
    [event] = harness.sink.of("ClientConnect")
    assert (event["client_ip"], event["client_port"]) == ("10.20.30.40", 4444)
    assert transport.producerState == "paused"
    attempt = harness.endpoints.attempts[0]
    attempt.succeed()
    assert attempt.transport.value() == b"early"
    assert client.session.bytes_from_client == 5


@pytest.mark.parametrize(
    "trusted, peer, data, why",
    [
        (("10.0.0.0/8",), "127.0.0.9", b"", "peer is not in proxy_protocol_from"),
        (("127.0.0.0/8",), "127.0.0.9", b"GET / HTTP/1.0\r\n", "no PROXY header"),
        (None, "127.0.0.9", b"PROXY TCP4 1.2.3.4\r\n", "malformed PROXY v1 header"),
    ],
)
def test_relay_refuses_bad_or_untrusted_headers(trusted, peer, data, why, caplog_twisted):
    """
    A peer outside proxy_protocol_from, a missing or malformed header: the connection is
    closed, the peer and reason are logged, nothing is dialled and no session exists.
    """
    harness = proxied(trusted)
    client, transport = harness.accept(client_ip=peer)
    if data:
        client.dataReceived(data)
    assert transport.aborted
    client.connectionLost()
    assert harness.endpoints.attempts == [] and harness.sink.events == [] and len(harness.sessions) == 0
    assert any(f"closed connection from {peer}:50000: {why}" in line for line in caplog_twisted)


def test_relay_header_timeout(caplog_twisted):
    """
    A trusted peer that sends no complete header in time is closed.
    """
    harness = proxied()
    client, transport = harness.accept()
    client.dataReceived(b"PROXY TCP4 1.2")
    harness.clock.advance(HEADER_TIMEOUT + 0.1)
    assert transport.aborted
    assert any("no complete PROXY header within" in line for line in caplog_twisted)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_sent_to_destination(version):
    """
    A destination with proxy_protocol gets a header naming the real client and the address it
    connected to, before any client byte (and the header is not counted as client bytes).
    """
    harness = RelayHarness(simple_mapping(Destination(host="192.0.2.10", port=80, proxy_protocol=version)))
    client, transport = harness.accept(client_ip="127.0.0.5", client_port=43210)
    attempt = harness.endpoints.attempts[0]
    attempt.succeed()
    client.dataReceived(b"hello")
    header, rest = ProxyHeaderReader().feed(attempt.transport.value())
    assert header.source == ("127.0.0.5", 43210) and header.destination == ("127.0.0.1", 8080)
    assert rest == b"hello" and client.session.bytes_from_client == 5
