"""
Server names: the host-name grammar a TLS server name must follow (RFC 6066 §3), and the C{sni}
patterns rules give (C{"app.example.com"}, C{"*.example.com"}): checked when the configuration is
read, matched by the rules, and applied by the relay to a name read from a ClientHello.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9-]{1,63}\Z")


def host_name(raw: bytes) -> str | None:
    """
    C{raw} as a lowercased host name, or C{None} unless it is a well-formed one.
    """
    if not 1 <= len(raw) <= 253 or not raw.isascii():
        return None
    name = raw.decode("ascii").lower()
    if all(_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def check_sni_pattern(text: object) -> str | None:
    """
    Why C{text} is not a valid C{sni} pattern, or C{None} if it is one.

    A pattern is a host name (letters, digits, hyphens, dots; labels of 1-63 characters; at most
    253 characters; no trailing dot), optionally starting with C{*.} to stand for one or more
    labels.  Case does not matter.
    """
    allowed = (
        "expected a host name such as 'app.example.com' or a leading wildcard such as "
        "'*.example.com' (letters, digits, hyphens and dots; no trailing dot)"
    )
    if not isinstance(text, str):
        return f"{allowed}, not {type(text).__name__}"
    rest = text[2:] if text.startswith("*.") else text
    if "*" in rest:
        return f"{text!r}: '*' may only be the whole first label ('*.example.com'); {allowed}"
    if host_name(rest.encode("utf-8")) is None:
        return f"{text!r} is not a valid name: {allowed}"
    return None


def sni_matches(pattern: str, name: str | None) -> bool:
    """
    Whether the server name C{name} matches the C{sni} pattern C{pattern}, case-insensitively:
    exactly, or for C{*.example.com} any name with one or more labels before C{.example.com}
    (C{a.example.com}, C{a.b.example.com}, never C{example.com} itself).  No name matches nothing.
    """
    if not name:
        return False
    pattern = pattern.lower()
    name = name.lower()
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return len(name) > len(suffix) and name.endswith(suffix)
    return name == pattern
