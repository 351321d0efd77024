"""
The TLS server name a client asks for, read from its ClientHello without terminating TLS (what
nginx's C{ssl_preread} and HAProxy's C{req.ssl_sni} do).  (The C{sni} patterns rules
match it with are in L{wingate_map.config}.)

L{ClientHelloReader} is fed the first bytes a client sends, in whatever pieces TCP delivers them,
and says once it knows: the host name, or C{None} when the bytes are not TLS, are malformed, carry
no server name or are too large.  Every byte is hostile: every length is checked against its
container, nothing is trusted as text, the reader holds at most L{MAX_BUFFERED} bytes and never
raises on any input.  The bytes it was fed come back unchanged in its results, to be relayed to
the destination.

Strictness: the name must be what RFC 6066 §3 allows, a DNS host name of ASCII letters, digits,
hyphens and dots in labels of 1-63 characters, at most 253 characters, I{without a trailing dot}
(a name ending in a dot, an empty label, an underscore, a space, a NUL or any non-ASCII byte means
"no server name", never a name that rules could match).  Names are lowercased.
"""

from __future__ import annotations

from attrs import frozen

from ..config import host_name as _host_name

#: The largest handshake message (header included) accepted as a ClientHello.  Real ones are
#: 200 bytes to 2 KiB (post-quantum key shares included); RFC 8446 records carry at most 16 KiB.
MAX_HELLO = 16 * 1024 + 4

#: The most bytes a reader ever holds: a ClientHello of L{MAX_HELLO} bytes plus the headers of the
#: TLS records it may be split over.  A hello needing more (say one split into thousands of tiny
#: records) is "too large".
MAX_BUFFERED = MAX_HELLO + 256

_RECORD_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXTENSION_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_MAX_RECORD = 2**14

#: Why a reader finished (L{HelloResult.reason}).
SNI = "sni"
NO_SNI = "no-sni"
NOT_TLS = "not-tls"
MALFORMED = "malformed"
TOO_LARGE = "too-large"
INCOMPLETE = "incomplete"


@frozen
class HelloResult:
    """
    What a L{ClientHelloReader} found.

    @ivar server_name: the lowercased host name the client asked for, or C{None}.
    @ivar reason: L{SNI} when C{server_name} is set; otherwise why not: L{NO_SNI} (a valid
        ClientHello without a host name), L{NOT_TLS}, L{MALFORMED}, L{TOO_LARGE} or
        L{INCOMPLETE} (given up on by L{ClientHelloReader.finish}).
    @ivar data: the bytes to relay: everything fed since the previous result, unchanged.
    """

    server_name: str | None
    reason: str
    data: bytes


class ClientHelloReader:
    """
    An incremental, strict reader of the first TLS ClientHello on a connection.

    Call L{feed} with each piece of data the client sends until it returns a L{HelloResult};
    call L{finish} if the client stops sending (C{peek_timeout}) or closes first.  The
    concatenated C{data} of the results is exactly the bytes fed, in order: a result hands
    back everything fed so far, and a L{feed} after the result hands back just that piece.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._handshake = bytearray()
        self._parsed = 0  # bytes of _buffer consumed as whole records
        self._result: HelloResult | None = None

    @property
    def done(self) -> bool:
        """
        Whether the reader has reached its verdict.
        """
        return self._result is not None

    def feed(self, data: bytes) -> HelloResult | None:
        """
        Take the next C{data} the client sent.

        @return: C{None} while more bytes are needed; once known, a L{HelloResult} whose C{data}
            holds every byte fed so far.  After that, each call returns the same verdict with
            C{data} being only the bytes of that call.
        """
        if self._result is not None:
            return HelloResult(self._result.server_name, self._result.reason, bytes(data))
        self._buffer += data
        verdict = self._advance()
        if verdict is None and len(self._buffer) > MAX_BUFFERED:
            verdict = (None, TOO_LARGE)
        if verdict is None:
            return None
        return self._conclude(*verdict)

    def finish(self) -> HelloResult:
        """
        Give up waiting (the client went quiet or closed): the verdict so far, L{INCOMPLETE} if
        there was none, with every byte still held.
        """
        if self._result is not None:
            return HelloResult(self._result.server_name, self._result.reason, b"")
        return self._conclude(None, INCOMPLETE)

    def _conclude(self, server_name: str | None, reason: str) -> HelloResult:
        data = bytes(self._buffer)
        self._result = HelloResult(server_name, reason, b"")
        self._buffer = bytearray()
        self._handshake = bytearray()
        return HelloResult(server_name, reason, data)

    def _advance(self) -> tuple[str | None, str] | None:
        """
        Consume whole records, checking each header byte and the handshake header as soon as
        they arrive; parse the ClientHello once it is whole.
        """
        buffer = self._buffer
        while True:
            head = buffer[self._parsed : self._parsed + 5]
            verdict = _check_record_header(head, first=self._parsed == 0)
            if verdict is not None or len(head) < 5:
                return verdict
            length = int.from_bytes(head[3:5], "big")
            if length == 0 or length > _MAX_RECORD:
                return (None, MALFORMED)
            end = self._parsed + 5 + length
            if len(buffer) < end:
                # Judge the handshake header even from a partial record: refuse early.
                return _check_handshake_header(self._handshake + buffer[self._parsed + 5 : end])
            self._handshake += buffer[self._parsed + 5 : end]
            self._parsed = end
            verdict = _check_handshake_header(self._handshake)
            if verdict is not None:
                return verdict
            hello_length = int.from_bytes(self._handshake[1:4], "big") if len(self._handshake) >= 4 else -1
            if 0 <= hello_length <= len(self._handshake) - 4:
                return _parse_client_hello(memoryview(self._handshake)[4 : 4 + hello_length])


def _check_handshake_header(handshake: bytes | bytearray) -> tuple[str | None, str] | None:
    """
    Reject a handshake message that is not a ClientHello, or announces more than L{MAX_HELLO}.
    """
    if handshake and handshake[0] != _HANDSHAKE_CLIENT_HELLO:
        return (None, MALFORMED)
    if len(handshake) >= 4 and int.from_bytes(handshake[1:4], "big") + 4 > MAX_HELLO:
        return (None, TOO_LARGE)
    return None


def _check_record_header(head: bytes | bytearray, first: bool) -> tuple[str | None, str] | None:
    """
    Reject a record header as soon as one of its bytes is wrong.  The first record decides
    whether this is TLS at all; a later bad record makes the hello malformed.
    """
    wrong = NOT_TLS if first else MALFORMED
    if len(head) >= 1 and head[0] != _RECORD_HANDSHAKE:
        return (None, wrong)  # includes SSLv2-style hellos (high bit set) and plain text
    if len(head) >= 2 and head[1] != 3:
        return (None, wrong)
    if len(head) >= 3 and head[2] > 4:
        return (None, wrong)
    return None


class _Cursor:
    """
    Reads big-endian fields from a view, refusing to step past its end.
    """

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int) -> memoryview | None:
        if n < 0 or self.remaining() < n:
            return None
        part = self.view[self.pos : self.pos + n]
        self.pos += n
        return part

    def number(self, size: int) -> int | None:
        part = self.take(size)
        return None if part is None else int.from_bytes(part, "big")

    def vector(self, size: int) -> memoryview | None:
        """
        A length-prefixed field whose length takes C{size} bytes.
        """
        length = self.number(size)
        return None if length is None else self.take(length)


def _parse_client_hello(body: memoryview) -> tuple[str | None, str]:
    """
    The verdict on a complete ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
    """
    cursor = _Cursor(body)
    version = cursor.take(2)
    if version is None or version[0] != 3 or cursor.take(32) is None:
        return (None, MALFORMED)
    session_id = cursor.vector(1)
    if session_id is None or len(session_id) > 32:
        return (None, MALFORMED)
    suites = cursor.vector(2)
    if suites is None or len(suites) < 2 or len(suites) % 2:
        return (None, MALFORMED)
    compression = cursor.vector(1)
    if compression is None or len(compression) < 1:
        return (None, MALFORMED)
    if cursor.remaining() == 0:
        return (None, NO_SNI)  # no extensions at all (SSL 3.0 / early TLS 1.0 clients)
    extensions = cursor.vector(2)
    if extensions is None or cursor.remaining() != 0:
        return (None, MALFORMED)
    return _find_server_name(_Cursor(extensions))


def _find_server_name(extensions: _Cursor) -> tuple[str | None, str]:
    """
    Walk every extension (each type at most once) and read the server_name one.
    """
    seen: set[int] = set()
    server_name: memoryview | None = None
    while extensions.remaining():
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind is None or data is None or kind in seen:
            return (None, MALFORMED)
        seen.add(kind)
        if kind == _EXTENSION_SERVER_NAME:
            server_name = data
    if server_name is None:
        return (None, NO_SNI)
    return _read_server_name(_Cursor(server_name))


def _read_server_name(extension: _Cursor) -> tuple[str | None, str]:
    """
    The server_name extension (RFC 6066 §3): a list holding exactly one host_name, as OpenSSL
    requires too.
    """
    names = extension.vector(2)
    if names is None or extension.remaining() != 0:
        return (None, MALFORMED)
    entries = _Cursor(names)
    name_type = entries.number(1)
    name = entries.vector(2)
    if name_type != _NAME_TYPE_HOST_NAME or name is None or entries.remaining() != 0:
        return (None, MALFORMED)
    host = _host_name(bytes(name))
    return (host, SNI) if host is not None else (None, MALFORMED)


def server_name(raw: bytes) -> str | None:
    """
    The name a client asked for in a TLS handshake wingatemap terminated (pyOpenSSL's
    C{get_servername}), held to the same rules as a peeked one: lowercased, or C{None} unless
    it is a well-formed host name.
    """
    return _host_name(raw)
