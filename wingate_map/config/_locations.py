"""
Client locations: the address forms a user's C{locations} and a rule's C{from} / C{not_from} use,
and indexes that match a client against thousands of them in logarithmic time.

Forms: a single IPv4 or IPv6 address (C{10.0.0.5}, C{fd00::5}), a CIDR block (C{10.0.1.0/24},
C{fd00::/64}), an inclusive range (C{10.0.2.10-10.0.2.20}), IPv4 with C{*} wildcard octets
(C{192.168.7.*}, C{10.*.*.5}), and a MAC address (C{mac:52:54:00:12:34:56}) resolved through the
kernel's neighbour table at connect time.  IPv4-mapped IPv6 clients (C{::ffff:10.0.0.5}) match
as their IPv4 address.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import ipaddress
import re
import socket
from typing import Callable, Iterable

from attrs import frozen

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")

FORMS = (
    "an IP address (10.0.0.5, fd00::5), a CIDR block (10.0.1.0/24), a range "
    "(10.0.2.10-10.0.2.20), IPv4 with * octets (192.168.7.*) or mac:52:54:00:12:34:56"
)


@frozen
class Location:
    """
    One parsed location.

    @ivar kind: C{range} (C{lo}..C{hi} inclusive, as integers, of IP C{version}), C{pattern}
        (IPv4 C{mask}/C{value} for wildcards in the middle) or C{mac}.
    """

    text: str
    kind: str
    version: int = 4
    lo: int = 0
    hi: int = 0
    mask: int = 0
    value: int = 0
    mac: str = ""

    def __str__(self) -> str:
        return self.text

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, mac: str | None) -> bool:
        """
        Whether a client at C{ip} (already unmapped) with MAC address C{mac} is here.
        """
        if self.kind == "mac":
            return mac is not None and mac == self.mac
        if ip is None or ip.version != self.version:
            return False
        number = int(ip)
        if self.kind == "pattern":
            return number & self.mask == self.value
        return self.lo <= number <= self.hi


def normalise_mac(text: str) -> str:
    """
    A MAC address in lower case with colons.
    """
    return text.strip().lower().replace("-", ":")


def parse_location(text: str) -> Location:
    """
    Parse one location string.

    @raise ValueError: with a message saying which forms are allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected {FORMS}")
    raw = text.strip()
    if raw.lower().startswith("mac:"):
        mac = normalise_mac(raw[4:])
        if not _MAC_RE.match(mac):
            raise ValueError(f"{raw!r} is not a MAC address like mac:52:54:00:12:34:56")
        return Location(text=raw, kind="mac", mac=mac)
    if "*" in raw:
        parts = raw.split(".")
        if len(parts) != 4 or not all(p == "*" or (p.isdigit() and int(p) <= 255) for p in parts):
            raise ValueError(f"{raw!r}: wildcards are IPv4 octets, e.g. 192.168.7.* or 10.*.*.5")
        mask = value = 0
        for part in parts:
            mask <<= 8
            value <<= 8
            if part != "*":
                mask |= 0xFF
                value |= int(part)
        # Trailing wildcards only: a plain range, so it can be indexed.
        if all(parts[i] == "*" for i in range(parts.index("*"), 4)):
            return Location(text=raw, kind="range", version=4, lo=value, hi=value | (~mask & 0xFFFFFFFF))
        return Location(text=raw, kind="pattern", version=4, mask=mask, value=value)
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValueError(f"{raw!r} is not a CIDR block like 10.0.1.0/24 or fd00::/64") from None
        return Location(text=raw, kind="range", version=net.version, lo=int(net.network_address), hi=int(net.broadcast_address))
    if "-" in raw:
        first, _, last = raw.partition("-")
        try:
            lo, hi = ipaddress.ip_address(first.strip()), ipaddress.ip_address(last.strip())
        except ValueError:
            raise ValueError(f"{raw!r} is not a range like 10.0.2.10-10.0.2.20") from None
        if lo.version != hi.version:
            raise ValueError(f"{raw!r}: both ends of a range must be IPv4, or both IPv6")
        if int(lo) > int(hi):
            raise ValueError(f"{raw!r}: the range ends before it starts")
        return Location(text=raw, kind="range", version=lo.version, lo=int(lo), hi=int(hi))
    try:
        address = unmap(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError(f"{raw!r} is not a location; expected {FORMS}") from None
    return Location(text=raw, kind="range", version=address.version, lo=int(address), hi=int(address))


def unmap(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    An IPv4-mapped IPv6 address as IPv4; any other address unchanged.
    """
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    A client's address string as an (unmapped) address object, or L{None} if it is not an IP.
    (Parsed with inet_pton and cached: this runs for every connection.)
    """
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        return unmap(ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])))
    except OSError:
        return None


class _Segments:
    """
    Disjoint elementary segments over overlapping ranges, each labelled with the smallest owner
    index among the ranges covering it: a stabbing query is one bisect.
    """

    def __init__(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        ordered = sorted(ranges)
        points = sorted({lo for lo, _, _ in ordered} | {hi + 1 for _, hi, _ in ordered})
        owners: list[int | None] = []
        active: list[tuple[int, int]] = []
        j = 0
        for point in points:
            while j < len(ordered) and ordered[j][0] <= point:
                lo, hi, owner = ordered[j]
                heapq.heappush(active, (owner, hi))
                j += 1
            while active and active[0][1] < point:
                heapq.heappop(active)
            owners.append(active[0][0] if active else None)
        self._points = points
        self._owners = owners

    def owner(self, number: int) -> int | None:
        k = bisect.bisect_right(self._points, number) - 1
        return self._owners[k] if k >= 0 else None


class RangeLists:
    """
    For overlapping labelled ranges: every label whose range covers a number, in label order,
    in one bisect (the lists of neighbouring segments are shared when equal).
    """

    def __init__(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        events: dict[int, list[tuple[int, int]]] = {}
        for lo, hi, label in ranges:
            events.setdefault(lo, []).append((1, label))
            events.setdefault(hi + 1, []).append((-1, label))
        points = sorted(events)
        active: dict[int, int] = {}
        interned: dict[tuple[int, ...], tuple[int, ...]] = {}
        lists: list[tuple[int, ...]] = []
        for point in points:
            for change, label in events[point]:
                count = active.get(label, 0) + change
                if count:
                    active[label] = count
                else:
                    active.pop(label, None)
            key = tuple(sorted(active))
            lists.append(interned.setdefault(key, key))
        self._points = points
        self._lists = lists

    def labels(self, number: int) -> tuple[int, ...]:
        k = bisect.bisect_right(self._points, number) - 1
        return self._lists[k] if k >= 0 else ()


class LocationIndex:
    """
    Ordered groups of locations (one group per owner: a user, in file order); L{first} says
    which is the first group with a location matching a client.
    """

    def __init__(self, groups: Iterable[Iterable[Location]]) -> None:
        ranges: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        self._patterns: list[tuple[int, int, int]] = []
        self._macs: dict[str, int] = {}
        self._locations: list[tuple[Location, ...]] = []
        for owner, locations in enumerate(groups):
            locations = tuple(locations)
            self._locations.append(locations)
            for location in locations:
                if location.kind == "range":
                    ranges[location.version].append((location.lo, location.hi, owner))
                elif location.kind == "pattern":
                    self._patterns.append((location.mask, location.value, owner))
                else:
                    self._macs.setdefault(location.mac, owner)
        self._segments = {version: _Segments(r) for version, r in ranges.items()}
        self.needs_mac = bool(self._macs)

    def first(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, mac: Callable[[], str | None] | None = None) -> int | None:
        """
        The index of the first group matching a client at C{ip}; C{mac} is called (at most
        once, and only if some location is a MAC address) to find the client's MAC address.
        """
        best: int | None = None
        if ip is not None:
            best = self._segments[ip.version].owner(int(ip))
            if ip.version == 4:
                number = int(ip)
                for mask, value, owner in self._patterns:
                    if number & mask == value and (best is None or owner < best):
                        best = owner
        if self._macs and mac is not None:
            address = mac()
            if address is not None:
                owner = self._macs.get(address)
                if owner is not None and (best is None or owner < best):
                    best = owner
        return best

    def matching_location(self, owner: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, mac: str | None) -> Location | None:
        """
        Which location of group C{owner} matches (for explanations).
        """
        for location in self._locations[owner]:
            if location.matches(ip, mac):
                return location
        return None


class LocationSet:
    """
    A set of locations (a rule's C{from} or C{not_from}): does a client fall in any of them?
    """

    def __init__(self, locations: Iterable[Location]) -> None:
        self.locations = tuple(locations)
        self._index = LocationIndex([self.locations])
        self.needs_mac = self._index.needs_mac

    def __contains__(self, ip: object) -> bool:
        return self.contains(ip)  # type: ignore[arg-type]

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, mac: Callable[[], str | None] | None = None) -> bool:
        """
        Whether a client at C{ip} (with MAC address from C{mac}) is in the set.
        """
        return self._index.first(ip, mac) is not None
