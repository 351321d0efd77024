"""
The one place the relay reads private state of Twisted's TCP transports, and why.

The socket pump (L{wingate_map.relay._pump}) takes a connected transport's socket over.  Doing
that safely needs two facts Twisted has no public API for:

  - what the transport has buffered but not sent yet (a PROXY header written at connect):
    L{twisted.internet.abstract.FileDescriptor} keeps it in C{dataBuffer}/C{offset} (public
    attributes) and C{_tempDataBuffer} (private; stable since Twisted 8);
  - whether its write side is already shut (C{loseWriteConnection} was called):
    C{_writeDisconnected}.

Both answer conservatively when the attributes are not there (nothing buffered can be told:
None; write side: shut), so a Twisted that changes them makes the relay keep Twisted's own
transports (slower, never wrong).  pyproject.toml pins Twisted below its next major version
(Twisted numbers versions by year; move the pin after checking these attributes).
"""

from __future__ import annotations

from typing import Any


def unsent(transport: Any) -> bytes | None:
    """
    What C{transport} (a L{twisted.internet.abstract.FileDescriptor}) has buffered but not sent
    yet, or None if that cannot be told.
    """
    try:
        head = transport.dataBuffer[transport.offset :]
        tail = transport._tempDataBuffer
    except AttributeError:
        return None
    if not isinstance(head, bytes) or not isinstance(tail, list):
        return None
    return head + b"".join(tail) if tail else bytes(head)


def write_closed(transport: Any) -> bool:
    """
    Whether C{transport}'s write side is shut (C{loseWriteConnection}); C{True} if that cannot
    be told.
    """
    return bool(getattr(transport, "_writeDisconnected", True))
