"""
The PROXY protocol (HAProxy's, v1 text and v2 binary): reading the header a load balancer sends
in front of a client's bytes, and writing one to a destination that wants to know the real client.

Parsing uses Twisted's own parsers (C{twisted.protocols.haproxy}); the framing around them is
ours, because Twisted's wrapper needs the whole signature in the first read, hands the
connection to the application before the header is parsed, and cannot say why it dropped one.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from attrs import frozen

from .locations import unmap
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX = 16 + 4096
HEADER_TIMEOUT = 10.0


class ProxyHeaderError(Exception):
    """
    A PROXY header is missing, malformed or too large; the message says which.
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
        head = buffer[:12]
        if V2_SIGNATURE.startswith(head) and not V1_SIGNATURE.startswith(buffer[:6]):
            if len(buffer) < 16:
                return None
            if buffer[12] >> 4 != 2:
                raise ProxyHeaderError(f"unsupported PROXY v2 version {buffer[12] >> 4}")
            size = 16 + struct.unpack("!H", buffer[14:16])[0]
            if size > V2_MAX:
                raise ProxyHeaderError(f"PROXY v2 header of {size} bytes is larger than {V2_MAX}")
            if len(buffer) < size:
                return None
            header, rest = buffer[:size], buffer[size:]
            try:
                parsed = _header(2, V2Parser.parse(header))
            except (InvalidProxyHeader, ValueError, struct.error) as e:
                raise ProxyHeaderError(f"malformed PROXY v2 header ({e.__class__.__name__})") from None
            return parsed, rest
        if V1_SIGNATURE.startswith(buffer[:6]):
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > V1_MAX:
                    raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
                return None
            if end + 2 > V1_MAX:
                raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
            line, rest = buffer[:end], buffer[end + 2 :]
            if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
                # Valid per the specification; Twisted's parser wants a space after UNKNOWN.
                return ProxyHeader(1, None, None), rest
            try:
                info = V1Parser.parse(line)
                header = _header(1, info)
            except (InvalidProxyHeader, ValueError) as e:
                raise ProxyHeaderError(f"malformed PROXY v1 header {line[:60]!r} ({e.__class__.__name__})") from None
            return header, rest
        raise ProxyHeaderError(f"no PROXY header: the connection starts with {buffer[:16]!r}")


def _header(version: int, info: object) -> ProxyHeader:
    def address(a: object) -> tuple[str, int] | None:
        if a is None:
            return None
        host = getattr(a, "host", None)
        port = getattr(a, "port", None)
        if host is None:
            return None
        if isinstance(host, bytes):
            host = host.decode("ascii")
        number = int(port or 0)
        if not 0 <= number <= 65535:
            raise ValueError(f"port {number} out of range")
        # Validates the address and gives its canonical text (fd00::1, not fd00:0:0:...;
        # 10.1.2.3, not ::ffff:a01:203).
        return (str(unmap(ipaddress.ip_address(host))), number)

    return ProxyHeader(version, address(getattr(info, "source", None)), address(getattr(info, "destination", None)))


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
