"""
The kernel's neighbour table (ARP for IPv4, NDP for IPv6): which MAC address a client IP has.

Read over rtnetlink (an RTM_GETNEIGH dump of one address family) at connect time, so a
C{mac:} location follows a device wherever its address moves.  Only complete entries count
(reachable, stale, delay, probe, permanent); a client that is not on a directly attached
network has no entry and matches no C{mac:} location.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

_RTM_NEWNEIGH = 28
_RTM_GETNEIGH = 30
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NDA_DST = 1
_NDA_LLADDR = 2
_NUD_INCOMPLETE = 0x01
_NUD_FAILED = 0x20
_NUD_NOARP = 0x40

_HEADER = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_RTATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_neighbour_dump(data: bytes) -> tuple[dict[str, str], bool]:
    """
    The (IP -> MAC) entries in a buffer of rtnetlink messages, and whether the dump is done.
    """
    entries: dict[str, str] = {}
    offset = 0
    done = False
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind in (_NLMSG_DONE, _NLMSG_ERROR):
            done = True
        elif kind == _RTM_NEWNEIGH:
            body = offset + _HEADER.size
            family, _, _, _ifindex, state, _, _ = _NDMSG.unpack_from(data, body)
            attr = body + _NDMSG.size
            end = offset + length
            dst = mac = None
            while attr + _RTATTR.size <= end:
                attr_len, attr_type = _RTATTR.unpack_from(data, attr)
                if attr_len < _RTATTR.size:
                    break
                payload = data[attr + _RTATTR.size : attr + attr_len]
                if attr_type == _NDA_DST:
                    dst = payload
                elif attr_type == _NDA_LLADDR:
                    mac = payload
                attr += _align(attr_len)
            usable = not state & (_NUD_INCOMPLETE | _NUD_FAILED | _NUD_NOARP)
            if dst is not None and mac is not None and len(mac) == 6 and usable:
                ip = str(ipaddress.ip_address(dst)) if family in (socket.AF_INET, socket.AF_INET6) else None
                if ip is not None:
                    entries[ip] = ":".join(f"{b:02x}" for b in mac)
        offset += _align(length)
    return entries, done


def neighbour_table(family: int) -> dict[str, str]:
    """
    Every usable neighbour entry of one address family (C{AF_INET} or C{AF_INET6}).
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(1.0)
        body = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0)
        s.send(_HEADER.pack(_HEADER.size + len(body), _RTM_GETNEIGH, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        entries: dict[str, str] = {}
        while True:
            found, done = parse_neighbour_dump(s.recv(65536))
            entries.update(found)
            if done:
                return entries


def mac_for(ip: str) -> str | None:
    """
    The MAC address the kernel has for C{ip}, lower case with colons, or L{None}.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        return neighbour_table(family).get(str(address))
    except OSError:
        return None
