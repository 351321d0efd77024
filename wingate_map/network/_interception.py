"""
Transparent interception (Linux): connections that clients on the bound adapters make to *any*
host on a mapping's intercept ports are sent to the mapping instead.

wingatemap owns one nftables table, C{inet wingatemap}.  Its prerouting NAT chain rewrites the
destination address of matching TCP connections arriving on each bound adapter to that
adapter's own (bound) address, keeping the port, where the intercept listener is.  Conntrack
remembers the original destination, which the relay reads back with C{SO_ORIGINAL_DST}
(IPv4) or C{IP6T_SO_ORIGINAL_DST} (IPv6).  The table is written in one atomic C{nft -f}
transaction that first deletes any table of that name (a stale one left by a crash), rewritten
when adapters change, and deleted at stop.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
from typing import Any, Iterable

from attrs import frozen

from ..errors import WingateMapError

TABLE = "wingatemap"
SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST has the same value


class InterceptionError(WingateMapError):
    """
    The interception ruleset could not be installed or removed.
    """


@frozen
class Redirect:
    """
    Send TCP connections arriving on C{adapter} for C{ports} to C{address} (same port).
    """

    mapping: str
    adapter: str
    address: str
    ports: tuple[int, ...]


def redirects(config: Any, listeners: Iterable[Any]) -> list[Redirect]:
    """
    The redirects transparent interception needs for C{listeners} (of C{config}): for each
    mapping with C{intercept_transparent}, bound adapter and address family, the adapter's first
    listening address.  Loopback gets none (local traffic never passes prerouting).
    """
    chosen: dict[tuple[str, str, int], Redirect] = {}
    for listener in listeners:
        mapping = config.mapping(listener.mapping)
        if not (mapping.intercept_transparent and listener.intercept and listener.adapter):
            continue
        address = ipaddress.ip_address(listener.address)
        if not address.is_loopback:
            key = (mapping.name, listener.adapter, address.version)
            chosen.setdefault(key, Redirect(mapping.name, listener.adapter, listener.address, mapping.intercept))
    return list(chosen.values())


def _port_set(ports: Iterable[int]) -> str:
    ordered = sorted(set(ports))
    parts: list[str] = []
    start = prev = None
    for port in ordered:
        if start is None:
            start = prev = port
        elif port == prev + 1:
            prev = port
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = port
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return "{ " + ", ".join(parts) + " }"


def ruleset(redirects: Iterable[Redirect]) -> str:
    """
    The nftables script that installs (or replaces) wingatemap's table.
    """
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
    ]
    for redirect in sorted(redirects, key=lambda r: (r.mapping, r.adapter, r.address)):
        family = "ipv4" if ipaddress.ip_address(redirect.address).version == 4 else "ipv6"
        target = f"ip to {redirect.address}" if family == "ipv4" else f"ip6 to [{redirect.address}]"
        lines.append(
            f'        iifname "{redirect.adapter}" meta nfproto {family} tcp dport {_port_set(redirect.ports)} '
            f'dnat {target} comment "mapping {redirect.mapping}"'
        )
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def _nft() -> str:
    path = shutil.which("nft") or ("/usr/sbin/nft" if shutil.which("nft", path="/usr/sbin:/sbin") else None)
    if path is None:
        raise InterceptionError(
            "intercept_transparent needs nftables: the nft command is not installed (Debian: apt-get install nftables)"
        )
    return path


def install(script: str) -> None:
    """
    Apply C{script} atomically.

    @raise InterceptionError: nft is missing, or refused (not root, no nf_tables...), with its
        message.
    """
    result = subprocess.run([_nft(), "-f", "-"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        why = result.stderr.strip() or f"exit status {result.returncode}"
        if "Operation not permitted" in why:
            why += " (transparent interception needs root or CAP_NET_ADMIN)"
        raise InterceptionError(f"cannot install the nftables table inet {TABLE}: {why}")


def remove() -> None:
    """
    Delete wingatemap's table if it exists.
    """
    path = shutil.which("nft") or "/usr/sbin/nft"
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n"
    result = subprocess.run([path, "-f", "-"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise InterceptionError(f"cannot remove the nftables table inet {TABLE}: {result.stderr.strip()}")


def _socket_of(transport: Any) -> socket.socket | None:
    for _ in range(4):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def original_destination(transport: Any) -> tuple[str, int] | None:
    """
    Where the client originally sent this connection, before NAT (L{None} if it was not
    redirected, or the kernel does not know).
    """
    sock = _socket_of(transport)
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_INET:
            data = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", data)
            return socket.inet_ntop(socket.AF_INET, packed), port
        if sock.family == socket.AF_INET6:
            data = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, _flow, packed = struct.unpack_from("!2xHI16s", data)
            address = ipaddress.IPv6Address(packed)
            return str(address.ipv4_mapped or address), port
    except OSError:
        return None
    return None
