"""
Text that came from a client (a PROXY header, a TLS server name, a certificate, a user name) made
safe to print: control characters (C0, DEL, C1, so also terminal escape sequences), other
non-printable characters (bidirectional overrides, zero-width characters, line separators) and the
backslash become visible escapes such as C{\\x1b}, C{\\u202e} or C{\\\\}.  Printable text, spaces
included, is unchanged, and the result is one line: it cannot forge a log line or move a cursor.
"""

from __future__ import annotations

from typing import Any


def _escape_char(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: Any) -> str:
    """
    C{value} as text safe for a log line or a terminal (see the module docstring).  L{None} and
    numbers print as usual; bytes are escaped byte by byte (see L{printable_bytes}).
    """
    if isinstance(value, (bytes, bytearray)):
        return printable_bytes(value)
    text = value if isinstance(value, str) else str(value)
    # The fast path: runs for every field of every logged event.
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(char if char.isprintable() and char != "\\" else _escape_char(char) for char in text)


def printable_bytes(data: bytes | bytearray) -> str:
    """
    Client bytes as text: printable ASCII stays, every other byte (and the backslash) becomes
    C{\\xNN}.  For error messages that quote what a peer sent.
    """
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)
