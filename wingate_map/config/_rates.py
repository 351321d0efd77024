"""
Rates (C{rate_limit} values): a decimal number, an optional decimal prefix C{k}, C{M} or C{G} and
the unit C{bit}, optionally C{bit/s}; read into bits per second.  The relay's limiters
(L{wingate_map.relay}) enforce them.
"""

from __future__ import annotations

import re

_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<prefix>[kmg]?)bit(?:/s)?", re.IGNORECASE)
_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}

RATE_FORM = (
    "expected bits per second such as '512kbit', '50Mbit' or '1Gbit' (a number, an optional "
    "decimal prefix k, M or G, and the unit 'bit')"
)


def parse_rate(text: object) -> int:
    """
    The rate C{text} names, in bits per second.

    @raise ValueError: saying what is wrong and what is allowed.
    """
    if not isinstance(text, str):
        raise ValueError(f"{RATE_FORM}; not {type(text).__name__}")
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: {RATE_FORM}")
    bits = round(float(match.group("number")) * _PREFIXES[match.group("prefix").lower()])
    if bits < 8:
        raise ValueError(f"{text!r}: a rate must be at least 8bit (one byte per second); omit it for no limit")
    return bits
