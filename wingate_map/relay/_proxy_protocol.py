"""
The PROXY protocol (HAProxy's, v1 text and v2 binary): reading the header a load balancer sends
in front of a client's bytes, and writing one to a destination that wants to know the real client.

The parser is ours, and strict, because what it returns becomes the client's address for rules,
limits, events, handler environments and logs (SPEC §6: client-supplied text is never trusted).
Twisted's parsers (C{twisted.protocols.haproxy}) read addresses with C{ipaddress}, which takes
IPv6 scope ids (C{fe80::1%anything}) as part of the address, accept any port text C{int()} takes,
and let UDP through; and Twisted's wrapper needs the whole signature in the first read, hands the
connection to the application before the header is parsed and cannot say why it dropped one.

What is accepted (HAProxy's proxy-protocol.txt, read strictly):

  - v1: C{PROXY TCP4|TCP6 SRC DST SPORT DPORT} and CRLF, fields separated by exactly one space,
    at most 107 bytes with the CRLF.  Addresses must be IP addresses of the family named
    (C{inet_pton}: no scope id, no stray character, no NUL); ports plain decimal 0-65535 with no
    sign and no leading zero (the specification forbids them).  C{PROXY UNKNOWN} and anything up
    to the CRLF means "use the connection's own addresses".
  - v2: version 2, command LOCAL (the connection's own addresses, whatever follows) or PROXY;
    for PROXY the address block must be as long as its family needs (12 bytes for INET, 36 for
    INET6, 216 for UNIX) and the TLVs after it must end exactly at the end of the header.
    DGRAM (UDP) is refused; an UNSPEC family or transport, and UNIX, mean "use the connection's
    own addresses".
  - Addresses are returned in canonical text (C{inet_ntop}): C{FD00:0::1} is C{fd00::1}, and an
    IPv4-mapped IPv6 address (C{::ffff:10.1.2.3}) is the IPv4 address C{10.1.2.3}.  So one
    client always has one spelling, which is what per-client limits count.

Error messages never carry raw peer bytes: what they quote is escaped (L{printable_bytes}).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct

from attrs import frozen

from ..printable import printable_bytes

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX = 16 + 4096
HEADER_TIMEOUT = 10.0

_V1_FAMILIES = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V2_LOCAL, _V2_PROXY = 0, 1
_V2_UNSPEC, _V2_INET, _V2_INET6, _V2_UNIX = 0, 1, 2, 3
_V2_STREAM, _V2_DGRAM = 1, 2
_V2_ADDRESS_SIZE = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


class ProxyHeaderError(Exception):
    """
    A PROXY header is missing, malformed or too large; the message says which (with any peer
    bytes it quotes escaped).
    """


@frozen
class ProxyHeader:
    """
    What a PROXY header said.  C{source} is L{None} for v2 LOCAL and v1 UNKNOWN, which mean
    "use the connection's own addresses".
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyHeaderReader:
    """
    Accumulates bytes until a whole PROXY header has arrived.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add C{data}; the parsed header and the bytes after it once complete, else L{None}.

        @raise ProxyHeaderError: the bytes cannot be (the start of) a valid header.
        """
        self._buffer += data
        buffer = self._buffer
        if V2_SIGNATURE.startswith(buffer[:12]) and not V1_SIGNATURE.startswith(buffer[:6]):
            if len(buffer) < 16:
                return None
            _check_v2_start(buffer)
            size = 16 + struct.unpack("!H", buffer[14:16])[0]
            if size > V2_MAX:
                raise ProxyHeaderError(f"PROXY v2 header of {size} bytes is larger than {V2_MAX}")
            if len(buffer) < size:
                return None
            return _parse_v2(buffer[:size]), buffer[size:]
        if V1_SIGNATURE.startswith(buffer[:6]):
            end = buffer.find(b"\r\n", 0, V1_MAX)
            if end < 0:
                if len(buffer) >= V1_MAX:
                    raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
                return None
            return _parse_v1(buffer[:end]), buffer[end + 2 :]
        raise ProxyHeaderError(f"no PROXY header: the connection starts with '{printable_bytes(buffer[:16])}'")


def _canonical(packed: bytes) -> str:
    """
    The canonical text of a packed IPv4 or IPv6 address; IPv4-mapped IPv6 as IPv4.
    """
    if len(packed) == 16 and packed.startswith(_MAPPED_PREFIX):
        packed = packed[12:]
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _parse_v1(line: bytes) -> ProxyHeader:
    """
    One v1 line without its CRLF.
    """
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # The specification: the receiver ignores whatever comes before the CRLF.
        return ProxyHeader(1, None, None)

    def malformed(why: str) -> ProxyHeaderError:
        return ProxyHeaderError(f"malformed PROXY v1 header '{printable_bytes(line)}': {why}")

    family = _V1_FAMILIES.get(fields[1])
    if family is None:
        raise malformed("the protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise malformed("expected PROXY TCP4|TCP6 SOURCE DESTINATION SOURCE_PORT DESTINATION_PORT separated by single spaces")
    addresses = []
    for name, text in (("source", fields[2]), ("destination", fields[3])):
        try:
            addresses.append(_canonical(socket.inet_pton(family, text.decode("ascii"))))
        except (OSError, ValueError):
            raise malformed(f"the {name} address is not an {'IPv4' if family == socket.AF_INET else 'IPv6'} address") from None
    ports = []
    for name, text in (("source", fields[4]), ("destination", fields[5])):
        if not _V1_PORT.fullmatch(text) or int(text) > 65535:
            raise malformed(f"the {name} port is not a number 0-65535 (decimal, no sign, no leading zero)")
        ports.append(int(text))
    return ProxyHeader(1, (addresses[0], ports[0]), (addresses[1], ports[1]))


def _check_v2_start(buffer: bytes) -> None:
    """
    Refuse a v2 header as soon as its first 16 bytes show it cannot be valid.
    """
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"unsupported PROXY v2 version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"malformed PROXY v2 header: unknown command {command}")


def _parse_v2(header: bytes) -> ProxyHeader:
    """
    One whole v2 header (its length already checked against the buffer).
    """
    if header[12] & 0x0F == _V2_LOCAL:
        # The specification: use the real connection endpoints, ignore the rest of the block.
        return ProxyHeader(2, None, None)
    family, transport = header[13] >> 4, header[13] & 0x0F
    if family > _V2_UNIX:
        raise ProxyHeaderError(f"malformed PROXY v2 header: unknown address family {family}")
    if transport > _V2_DGRAM:
        raise ProxyHeaderError(f"malformed PROXY v2 header: unknown transport {transport}")
    if transport == _V2_DGRAM:
        raise ProxyHeaderError("malformed PROXY v2 header: DGRAM (UDP) is not a TCP connection")
    if family == _V2_UNSPEC or transport != _V2_STREAM:
        return ProxyHeader(2, None, None)
    body = header[16:]
    need = _V2_ADDRESS_SIZE[family]
    if len(body) < need:
        raise ProxyHeaderError(f"malformed PROXY v2 header: {len(body)} bytes of addresses, family {family} needs {need}")
    _check_tlvs(body[need:])
    if family == _V2_UNIX:
        return ProxyHeader(2, None, None)
    size = 4 if family == _V2_INET else 16
    source_port, destination_port = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return ProxyHeader(2, (_canonical(body[:size]), source_port), (_canonical(body[size : 2 * size]), destination_port))


def _check_tlvs(data: bytes) -> None:
    """
    The TLVs after the addresses must tile the rest of the header exactly.
    """
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise ProxyHeaderError("malformed PROXY v2 header: a TLV is cut off by the end of the header")
        offset += 3 + struct.unpack("!H", data[offset + 1 : offset + 3])[0]
        if offset > len(data):
            raise ProxyHeaderError("malformed PROXY v2 header: a TLV runs past the end of the header")


def build_header(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """
    A PROXY header (C{"v1"} or C{"v2"}) saying a client at C{source} connected to
    C{destination}.  Mixed families are sent as IPv6 (IPv4 mapped); non-IP addresses (a Unix
    socket listener) as UNKNOWN / LOCAL.
    """
    try:
        src = ipaddress.ip_address(source[0])
        dst = ipaddress.ip_address(destination[0])
    except ValueError:
        return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + b"\x20\x00\x00\x00"
    if src.version != dst.version:
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")
    if src.version == 4:
        body = socket.inet_pton(socket.AF_INET, str(src)) + socket.inet_pton(socket.AF_INET, str(dst))
        family = 0x11
    else:
        body = socket.inet_pton(socket.AF_INET6, str(src)) + socket.inet_pton(socket.AF_INET6, str(dst))
        family = 0x21
    body += struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
