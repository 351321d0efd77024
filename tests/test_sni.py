"""
Reading the TLS server name from a client's ClientHello without terminating TLS, and matching it
against rules' C{sni} patterns: real hellos from Python's ssl and from openssl s_client, split at
every byte, truncated, oversized, malformed, not TLS at all, and random bytes.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import ssl
import subprocess

import pytest

from wingate_map.relay._sni import (
    INCOMPLETE,
    MALFORMED,
    MAX_BUFFERED,
    MAX_HELLO,
    NOT_TLS,
    NO_SNI,
    SNI,
    TOO_LARGE,
    ClientHelloReader,
    HelloResult,
)
from wingate_map.config import check_sni_pattern, sni_matches

_NAME = re.compile(r"[a-z0-9.-]{1,253}\Z")


def python_hello(server_hostname: str | None, maximum: ssl.TLSVersion | None = None) -> bytes:
    """
    The first bytes Python's ssl module sends as a client asking for C{server_hostname}.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def openssl_hello(*options: str) -> bytes:
    """
    The first bytes a real C{openssl s_client} process sends to a local socket that only
    records them (bounded in time and size).
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)
        port = listener.getsockname()[1]
        process = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *options],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(60)
                reader, received = ClientHelloReader(), b""
                while len(received) < MAX_BUFFERED:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                    if reader.feed(chunk) is not None:
                        break
                return received
        finally:
            process.kill()
            process.wait(timeout=60)


def read_all(pieces: list[bytes]) -> tuple[HelloResult | None, list[HelloResult]]:
    """
    Feed C{pieces} one by one: the first result, and every result returned.
    """
    reader = ClientHelloReader()
    results = [r for r in (reader.feed(p) for p in pieces) if r is not None]
    return (results[0] if results else None), results


def record(fragment: bytes, version: bytes = b"\x03\x01", kind: int = 22) -> bytes:
    """
    One TLS record around C{fragment}.
    """
    return bytes([kind]) + version + len(fragment).to_bytes(2, "big") + fragment


def vector(data: bytes, size: int) -> bytes:
    """
    C{data} with its length in front, in C{size} bytes.
    """
    return len(data).to_bytes(size, "big") + data


def server_name_extension(*names: bytes, name_type: int = 0) -> bytes:
    """
    A server_name extension listing C{names}.
    """
    entries = b"".join(bytes([name_type]) + vector(n, 2) for n in names)
    return b"\x00\x00" + vector(vector(entries, 2), 2)


def hello(extensions: bytes | None, version: bytes = b"\x03\x03", session_id: bytes = b"") -> bytes:
    """
    A handshake message holding a ClientHello with C{extensions} (raw bytes, or none at all).
    """
    body = version + bytes(32) + vector(session_id, 1) + vector(b"\x13\x01\x00\x2f", 2) + b"\x01\x00"
    if extensions is not None:
        body += vector(extensions, 2)
    return b"\x01" + vector(body, 3)


def verdict(data: bytes) -> HelloResult:
    """
    The verdict on C{data} fed in one piece, or what finish() says when more was needed.
    """
    reader = ClientHelloReader()
    return reader.feed(data) or reader.finish()


PYTHON_CASES = [
    ("Example.COM", None, "example.com"),
    ("db.internal", ssl.TLSVersion.TLSv1_2, "db.internal"),
    ("a-b.c-d.example", ssl.TLSVersion.TLSv1_3, "a-b.c-d.example"),
    ("127.0.0.1", None, None),
    ("::1", None, None),
    (None, None, None),
]


@pytest.mark.parametrize("server_hostname, maximum, expected", PYTHON_CASES)
def test_python_hello_split_at_every_byte(server_hostname, maximum, expected):
    """
    The server name Python's ssl sends is read (lowercased) however TCP splits the hello; a
    client connecting to an IP address or without a name sends no SNI, and the session has none.
    Every byte fed comes back, in order, to be relayed.
    """
    data = python_hello(server_hostname, maximum)
    assert verdict(data) == HelloResult(expected, SNI if expected else NO_SNI, data)
    for cut in range(1, len(data)):
        first, results = read_all([data[:cut], data[cut:]])
        assert first is not None and first.server_name == expected, cut
        assert b"".join(r.data for r in results) == data, cut


@pytest.mark.parametrize(
    "options, expected",
    [
        (["-servername", "api.Example.test"], "api.example.test"),
        (["-servername", "legacy.example", "-tls1_2"], "legacy.example"),
        (["-noservername"], None),
    ],
)
def test_openssl_hello_split_at_every_byte(options, expected):
    """
    The server name a real openssl s_client sends is read however TCP splits its hello;
    C{-noservername} means no SNI.
    """
    data = openssl_hello(*options)
    assert verdict(data).server_name == expected
    assert verdict(data).reason == (SNI if expected else NO_SNI)
    for cut in range(1, len(data)):
        first, results = read_all([data[:cut], data[cut:]])
        assert first is not None and first.server_name == expected, cut
        assert b"".join(r.data for r in results) == data, cut


def test_byte_by_byte():
    """
    A hello arriving one byte at a time is read once its last byte is in, not before.
    """
    data = python_hello("one.byte.example")
    reader = ClientHelloReader()
    for i, byte in enumerate(data[:-1]):
        assert reader.feed(bytes([byte])) is None, i
    result = reader.feed(data[-1:])
    assert result == HelloResult("one.byte.example", SNI, data)
    assert reader.done


def test_hello_over_several_records():
    """
    A ClientHello whose handshake message is split over several TLS records (as RFC 8446
    allows) is read, whatever the record size, and bytes after it are handed on too.
    """
    message = python_hello("split.example")[5:]
    for size in (1, 2, 7, 100, len(message) - 1):
        records = b"".join(record(message[i : i + size]) for i in range(0, len(message), size))
        if len(records) > MAX_BUFFERED:
            continue
        result = verdict(records + b"early")
        assert result.server_name == "split.example", size
        assert result.data == records + b"early"


def test_truncated_hello_needs_more_then_is_incomplete():
    """
    A hello cut short at any point is waited for (no verdict), and finish() (peek_timeout or
    the client closing) gives up with no server name and every byte held.
    """
    data = python_hello("cut.example")
    for cut in range(0, len(data)):
        reader = ClientHelloReader()
        assert reader.feed(data[:cut]) is None, cut
        assert reader.finish() == HelloResult(None, INCOMPLETE, data[:cut])
        assert reader.feed(b"more") == HelloResult(None, INCOMPLETE, b"more")


def test_not_tls_decided_at_the_first_byte():
    """
    A client speaking plain text (an HTTP request) or an SSLv2-style hello is "not TLS" as soon
    as its first byte arrives, so it is relayed at once without waiting for peek_timeout.
    """
    for data in (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n"):
        reader = ClientHelloReader()
        assert reader.feed(data[:1]) == HelloResult(None, NOT_TLS, data[:1])
        assert reader.feed(data[1:]) == HelloResult(None, NOT_TLS, data[1:])
    sslv2 = b"\x80\x2e\x01\x03\x01" + bytes(0x2B)
    assert verdict(sslv2) == HelloResult(None, NOT_TLS, sslv2)
    # A TLS record type with an impossible version is not TLS either.
    assert verdict(b"\x16\x02\x00").reason == NOT_TLS
    assert verdict(b"\x16\x03\x05").reason == NOT_TLS
    assert verdict(b"\x17\x03\x03\x00\x05hello").reason == NOT_TLS


def test_oversized_hello():
    """
    A handshake message announcing more than MAX_HELLO bytes is "too large" as soon as its
    header arrives; a hello split into so many records that it needs more than MAX_BUFFERED
    bytes is too, and the reader never holds more than that.
    """
    header = b"\x01" + (MAX_HELLO).to_bytes(3, "big")
    assert verdict(record(header)).reason == TOO_LARGE
    reader = ClientHelloReader()
    assert reader.feed(b"\x16\x03\x01\x40\x00" + header) == HelloResult(
        None, TOO_LARGE, b"\x16\x03\x01\x40\x00" + header
    )
    # Largest accepted: a hello of exactly MAX_HELLO bytes (padding extension), in two records.
    padding = b"\x00\x15" + vector(bytes(MAX_HELLO - len(hello(b"")) - 4 - len(server_name_extension(b"big.example"))), 2)
    big = hello(server_name_extension(b"big.example") + padding)
    assert len(big) == MAX_HELLO
    assert verdict(record(big[:16000]) + record(big[16000:])).server_name == "big.example"
    # The same message in 1-byte records needs far more than the bound.
    reader = ClientHelloReader()
    tiny = (record(big[i : i + 1]) for i in range(len(big)))
    fed = 0
    for piece in tiny:
        fed += len(piece)
        result = reader.feed(piece)
        if result is not None:
            break
    assert result is not None and result.reason == TOO_LARGE
    assert fed <= MAX_BUFFERED + 6


@pytest.mark.parametrize(
    "name",
    [
        b"trailing.dot.",
        b".leading.dot",
        b"double..dot",
        b"under_score.example",
        b"space example",
        b"nul\x00.example",
        b"caf\xc3\xa9.example",
        b"x" * 64 + b".example",
        b"a." * 126 + b"ab",  # 254 characters
        b"",
    ],
)
def test_bad_host_names_are_no_name(name):
    """
    A server name that is not a plain DNS host name (trailing or empty labels, bytes outside
    letters, digits and hyphens, a label over 63 or a name over 253 characters) is treated as
    no name at all, never passed on as text.
    """
    result = verdict(record(hello(server_name_extension(name))))
    assert result.server_name is None
    assert result.reason == MALFORMED


def test_longest_name():
    """
    A 253-character name is accepted.
    """
    name = b"a." * 125 + b"abc"
    assert len(name) == 253
    assert verdict(record(hello(server_name_extension(name)))).server_name == name.decode()


@pytest.mark.parametrize(
    "message, reason",
    [
        (hello(None), NO_SNI),
        (hello(b""), NO_SNI),
        (hello(b"\x00\x0a\x00\x02\x00\x17"), NO_SNI),
        (hello(server_name_extension(b"a.example", b"b.example")), MALFORMED),
        (hello(server_name_extension(b"a.example", name_type=1)), MALFORMED),
        (hello(server_name_extension(b"a.example") + server_name_extension(b"b.example")), MALFORMED),
        (hello(b"\x00\x0a\x00\x00" + b"\x00\x0a\x00\x00" + server_name_extension(b"a.example")), MALFORMED),
        (hello(b"\x00\x00\x00\x00"), MALFORMED),
        (hello(b"\x00\x00\x00\x02\x00\x00"), MALFORMED),
        (hello(b"\x00\x00\x00\x05\x00\x03\x00\x00\x09"), MALFORMED),
        (hello(server_name_extension(b"a.example"), version=b"\x02\x00"), MALFORMED),
        (hello(server_name_extension(b"a.example"), session_id=bytes(33)), MALFORMED),
        (hello(server_name_extension(b"a.example")) + b"\x02\x00\x00\x00", SNI),
        (b"\x02" + hello(server_name_extension(b"a.example"))[1:], MALFORMED),
    ],
)
def test_structure_checks(message, reason):
    """
    Every field of the hello is checked: no extensions or no server_name is "no SNI"; two
    names, a name type other than host_name, a repeated extension, a list or extension length
    that does not fit, a wrong version, an over-long session id or another handshake type is
    malformed.
    """
    assert verdict(record(message)).reason == reason


def test_lengths_that_lie():
    """
    Every length field, made larger or smaller than its contents, gives a verdict without
    reading past its container: never a name other than the real one.
    """
    data = record(hello(server_name_extension(b"exact.example")))
    for position in range(3, len(data)):
        for delta in (-1, 1, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[position] = (mutated[position] + delta) % 256
            result = verdict(bytes(mutated))
            # The name is the last 13 bytes: changing one of them may yield another clean name.
            changed = mutated[-13:].decode("latin-1").lower()
            assert result.server_name in (None, "exact.example", changed), position
            assert result.data == bytes(mutated)


def test_zero_length_and_oversized_records():
    """
    A handshake record of length 0 or over 16 KiB is malformed.
    """
    assert verdict(b"\x16\x03\x01\x00\x00").reason == MALFORMED
    assert verdict(b"\x16\x03\x01\x40\x01").reason == MALFORMED


def test_a_later_record_of_another_type_is_malformed():
    """
    When the hello continues in a second record, that record must be a handshake record too.
    """
    message = hello(server_name_extension(b"two.example"))
    assert verdict(record(message[:10]) + record(message[10:], kind=23)).reason == MALFORMED
    assert verdict(record(message[:10]) + b"\x16\x02").reason == MALFORMED


def test_random_input_never_raises():
    """
    Random bytes, random mutations and truncations of real hellos, fed in random pieces, never
    raise; every verdict is one of the documented reasons, a name is always a clean host name,
    and the bytes come back unchanged.  (Seeded, bounded.)
    """
    rng = random.Random(12)
    real = [python_hello("fuzz.example"), python_hello("x.y.example", ssl.TLSVersion.TLSv1_2)]
    reasons = {SNI, NO_SNI, NOT_TLS, MALFORMED, TOO_LARGE, INCOMPLETE}
    for round_ in range(3000):
        kind = round_ % 3
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
            if rng.random() < 0.5:
                data = b"\x16\x03" + data
        else:
            data = bytearray(rng.choice(real))
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            if kind == 2:
                data = data[: rng.randrange(len(data) + 1)]
            data = bytes(data)
        reader = ClientHelloReader()
        results, pos = [], 0
        while pos < len(data):
            step = rng.randrange(1, 64)
            result = reader.feed(data[pos : pos + step])
            pos += step
            if result is not None:
                results.append(result)
        results.append(reader.finish())
        assert results[0].reason in reasons
        assert b"".join(r.data for r in results) == data
        name = results[0].server_name
        assert name is None or _NAME.match(name)
        assert (name is not None) == (results[0].reason == SNI)


@pytest.mark.parametrize(
    "pattern, name, expected",
    [
        ("app.example.com", "app.example.com", True),
        ("App.Example.COM", "app.EXAMPLE.com", True),
        ("app.example.com", "www.app.example.com", False),
        ("app.example.com", "example.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.Example.com", "A.EXAMPLE.COM", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a.example.com.evil", False),
        ("*.example.com", None, False),
        ("app.example.com", None, False),
        ("app.example.com", "", False),
    ],
)
def test_sni_matches(pattern, name, expected):
    """
    A pattern matches exactly or, with a leading C{*.}, one or more labels in front of the
    rest, case-insensitively; C{*.example.com} never matches C{example.com}, and a session
    without a server name matches no pattern.
    """
    assert sni_matches(pattern, name) is expected


@pytest.mark.parametrize("pattern", ["app.example.com", "*.example.com", "*.com", "Db-1.Internal", "localhost"])
def test_valid_patterns(pattern):
    """
    Host names and leading-wildcard patterns are valid C{sni} patterns.
    """
    assert check_sni_pattern(pattern) is None


@pytest.mark.parametrize(
    "pattern, words",
    [
        ("*", "whole first label"),
        ("a.*.example.com", "whole first label"),
        ("*example.com", "whole first label"),
        ("**.example.com", "whole first label"),
        ("example.com.", "not a valid name"),
        ("", "not a valid name"),
        ("*.", "not a valid name"),
        ("ex ample.com", "not a valid name"),
        ("exämple.com", "not a valid name"),
        ("x" * 64 + ".com", "not a valid name"),
        (5, "not int"),
    ],
)
def test_invalid_patterns(pattern, words):
    """
    A pattern with a wildcard anywhere but as the whole first label, a trailing dot, an empty
    or over-long label, or characters outside host names is refused with a message saying what
    is allowed.
    """
    message = check_sni_pattern(pattern)
    assert message is not None and words in message
    assert "*.example.com" in message
