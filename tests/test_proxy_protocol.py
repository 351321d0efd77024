"""
The PROXY protocol: parsing what load balancers send (v1 and v2, in pieces, malformed), the
relay accepting it only from trusted peers, and the header sent to destinations.
"""

from __future__ import annotations

import struct

import pytest

from wingate_map.config import Destination, parse_location
from wingate_map.relay._proxy_protocol import (
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


V2_INET = V2_SIGNATURE + b"\x21\x11"
INET_BLOCK = bytes([10, 1, 2, 3, 10, 0, 0, 1]) + struct.pack("!HH", 5555, 80)


def v2(family: bytes, body: bytes, command: int = 0x21) -> bytes:
    """
    A v2 header with C{command}, C{family} and C{body}, its length field telling the truth.
    """
    return V2_SIGNATURE + bytes([command]) + family + struct.pack("!H", len(body)) + body


V1_MALFORMED = [
    # Scope ids, stray characters, NUL: any text used to become the client's address.
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    b"PROXY TCP6 fe80::1%$(id);<svg> fe80::2 1 2\r\n",
    b"PROXY TCP6 fe80::1%\x1b[31m fe80::2 1 2\r\n",
    b"PROXY TCP6 fe80::2 fe80::1%1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 \x001.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4x 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 \xc3\xa91.2.3 5.6.7.8 1 2\r\n",
    # Addresses of the wrong family, or not in canonical IPv4 form.
    b"PROXY TCP4 fd00::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 fd00::1 1 2\r\n",
    b"PROXY TCP6 fd00::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 1::2::3 fd00::1 1 2\r\n",
    # Ports: plain decimal 0-65535, no sign, no leading zero, no other digits.
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x10\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 1_0\r\n",
    "PROXY TCP4 1.2.3.4 5.6.7.8 1 \u0661\r\n".encode(),
    # Separators, field count, line ending.
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
    b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 junk\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n",
    b"PROXY TCP4\r\n",
    # The protocol.
    b"PROXY HTTP 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY \r\n",
]

V2_MALFORMED = [
    (v2(b"\x12", INET_BLOCK), "DGRAM"),
    (v2(b"\x22", bytes(36)), "DGRAM"),
    (v2(b"\x11", INET_BLOCK[:8]), "8 bytes of addresses, family 1 needs 12"),
    (v2(b"\x21", INET_BLOCK), "12 bytes of addresses, family 2 needs 36"),
    (v2(b"\x31", INET_BLOCK), "12 bytes of addresses, family 3 needs 216"),
    (v2(b"\x41", INET_BLOCK), "unknown address family 4"),
    (v2(b"\x13", INET_BLOCK), "unknown transport 3"),
    (v2(b"\x11", INET_BLOCK + b"\x04\x00"), "a TLV is cut off"),
    (v2(b"\x11", INET_BLOCK + b"\x04\x00\x0a\x00\x00"), "a TLV runs past the end"),
    (v2(b"\x11", INET_BLOCK + b"\x04\x00\x00" + b"\x04\x00\x02\x00"), "a TLV runs past the end"),
    (v2(b"\x11", INET_BLOCK, command=0x22), "unknown command 2"),
]


@pytest.mark.parametrize("data", V1_MALFORMED, ids=lambda d: d.decode("latin-1").encode("unicode_escape").decode())
def test_malformed_v1_headers(data):
    """
    A v1 header is refused unless it is exactly PROXY, TCP4 or TCP6, two IP addresses of that
    family (no scope id, no stray character, no NUL, no leading zero), two plain decimal ports
    0-65535, single spaces and a CRLF; the error quotes the line with every control or
    non-ASCII byte escaped, so it is safe to log.
    """
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(data)
    message = str(info.value)
    assert message.startswith("malformed PROXY v1 header '")
    assert message.isprintable() and "\x1b" not in message and "\x00" not in message


@pytest.mark.parametrize("data, message", V2_MALFORMED, ids=[m for _, m in V2_MALFORMED])
def test_malformed_v2_headers(data, message):
    """
    A v2 header is refused when it is for UDP, its address block is shorter than its family
    needs, its family, transport or command is unknown, or its TLVs do not end exactly at the
    end of the header.
    """
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(data + b"payload")
    assert str(info.value).startswith("malformed PROXY v2 header: ") and message in str(info.value)


@pytest.mark.parametrize(
    "data, source, destination",
    [
        # IPv4-mapped IPv6 is the IPv4 client; any spelling inet_pton accepts reads canonically.
        (b"PROXY TCP6 ::ffff:10.1.2.3 fd00::1 1 2\r\n", ("10.1.2.3", 1), ("fd00::1", 2)),
        (b"PROXY TCP6 ::FFFF:a01:203 fd00::1 1 2\r\n", ("10.1.2.3", 1), ("fd00::1", 2)),
        (b"PROXY TCP6 FD00:0:0::0001 fd00::1 1 2\r\n", ("fd00::1", 1), ("fd00::1", 2)),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        (v2(b"\x21", b"\x00" * 10 + b"\xff\xff" + bytes([10, 1, 2, 3]) + bytes(15) + b"\x01" + struct.pack("!HH", 1, 2)), ("10.1.2.3", 1), ("::1", 2)),
        (v2(b"\x11", INET_BLOCK + b"\x04\x00\x02\x00\x00" + b"\x05\x00\x00"), ("10.1.2.3", 5555), ("10.0.0.1", 80)),
    ],
)
def test_accepted_headers_read_canonically(data, source, destination):
    """
    The addresses of an accepted header are in canonical text, IPv4-mapped IPv6 is read as
    IPv4 (one client, one spelling), ports 0 and 65535 are fine, and well-formed TLVs after
    the addresses are skipped.
    """
    assert ProxyHeaderReader().feed(data + b"rest") == (ProxyHeader(int(data.startswith(V2_SIGNATURE)) + 1, source, destination), b"rest")


@pytest.mark.parametrize(
    "data",
    [
        v2(b"\x11", b"", command=0x20),  # LOCAL: the family and block are ignored
        v2(b"\x12", INET_BLOCK[:3], command=0x20),
        v2(b"\x00", b""),  # UNSPEC family
        v2(b"\x10", INET_BLOCK),  # UNSPEC transport
        v2(b"\x31", bytes(216)),  # UNIX
        b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n",  # 107 bytes, anything before the CRLF ignored
    ],
)
def test_headers_meaning_use_the_connection(data):
    """
    LOCAL, UNSPEC, UNIX and v1 UNKNOWN headers (up to 107 bytes) mean "use the connection's
    own addresses", as before.
    """
    assert ProxyHeaderReader().feed(data + b"rest")[0].source is None


def test_v1_limit_is_107_bytes_with_crlf():
    """
    A v1 line of 108 bytes with its CRLF is refused even when the CRLF has arrived.
    """
    with pytest.raises(ProxyHeaderError, match="longer than 107 bytes"):
        ProxyHeaderReader().feed(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


def test_error_messages_escape_peer_bytes():
    """
    What a peer sent is quoted in the error only as visible escapes: a terminal escape
    sequence or a NUL cannot reach a log or a terminal.
    """
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(b"\x1b[2J\x00\x9b\\ok\r\n")
    assert str(info.value) == "no PROXY header: the connection starts with '\\x1b[2J\\x00\\x9b\\x5cok\\x0d\\x0a'"
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(b"PROXY TCP6 fe80::1%\x1b]0;owned\x07 ::1 1 2\r\n")
    assert "fe80::1%\\x1b]0;owned\\x07 ::1" in str(info.value)


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


def test_scope_ids_and_spellings_cannot_bypass_per_client_limits(caplog_twisted):
    """
    With max_connections_per_client = 1, a client holding its one session cannot get another
    by varying an IPv6 scope id (dropped before any session) or by spelling its address
    differently, IPv4-mapped or in v2 (same client, refused with reason limit).
    """
    harness = RelayHarness(
        simple_mapping(
            DEST,
            proxy_protocol=True,
            proxy_protocol_from=(parse_location("127.0.0.0/8"),),
            max_connections_per_client=1,
        )
    )
    first, _ = harness.accept(client_port=1)
    first.dataReceived(b"PROXY TCP6 fe80::1 fd00::1 4000 80\r\n")
    assert first.session.client_ip == "fe80::1" and len(harness.sessions) == 1
    for port, scope in enumerate([b"eth0", b"1", b"2", b"lo"], start=2):
        client, transport = harness.accept(client_port=port)
        client.dataReceived(b"PROXY TCP6 fe80::1%" + scope + b" fd00::1 4000 80\r\n")
        assert transport.aborted and client.session is None
        client.connectionLost()
    assert any("the source address is not an IPv6 address" in line for line in caplog_twisted)
    for port, header in enumerate(
        [
            b"PROXY TCP6 FE80:0:0::0:1 fd00::1 4000 80\r\n",
            build_header("v2", ("fe80::1", 4000), ("fd00::1", 80)),
        ],
        start=10,
    ):
        client, transport = harness.accept(client_port=port)
        client.dataReceived(header)
        assert client.session.client_ip == "fe80::1" and transport.disconnecting
        client.connectionLost()
    mapped, _ = harness.accept(client_port=20)
    mapped.dataReceived(b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 80\r\n")
    again, transport = harness.accept(client_port=21)
    again.dataReceived(b"PROXY TCP6 ::ffff:10.1.2.3 fd00::1 4000 80\r\n")
    assert again.session.client_ip == "10.1.2.3" and transport.disconnecting
    again.connectionLost()
    refused = [e["client_ip"] for e in harness.sink.of("ClientDisconnect") if e["reason"] == "limit"]
    assert refused == ["fe80::1", "fe80::1", "10.1.2.3"]
