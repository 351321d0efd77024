"""
Network adapters, their usage classes, and the listeners a configuration asks for.

An adapter listed in C{[interfaces]} has the usage class given there.  Otherwise it is classified
by its addresses (SPEC §2), IPv6 link-local addresses (fe80::/10) ignored since the kernel gives
nearly every adapter one: an adapter whose every remaining address is loopback, private (RFC 1918),
IPv4 link-local (169.254/16) or unique-local (fc00::/7) is C{internal}; an adapter with any other
address (public, shared 100.64/10, documentation or benchmarking ranges), or with no address left,
is C{external}.  The ranges are spelled out here rather than taken from L{ipaddress}'
C{is_private}, which also counts documentation and benchmarking ranges.  C{dmz} is only ever set
by hand.  A C{bind} list names usage classes, C{all}, adapter names or IP addresses; it resolves
to the concrete addresses to listen on.  IPv6 link-local addresses need a scope to bind to, so
class and adapter bindings leave them out; name one explicitly to use it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any, Iterable

from attrs import field, frozen

from ..config import Config, format_host_port
from ..errors import BindingError


@frozen
class Adapter:
    """
    A network adapter as the kernel reports it.

    @ivar addresses: its IPv4 and IPv6 addresses, without scope suffixes.
    """

    name: str
    addresses: tuple[str, ...] = ()
    mac: str | None = None


@frozen
class Listener:
    """
    One socket to listen on: C{address}:C{port} for mapping C{mapping}; C{intercept} for an
    intercept port; C{adapter} is the adapter that has the address (if any).
    """

    mapping: str
    address: str
    port: int
    intercept: bool = field(default=False, eq=False)
    adapter: str | None = field(default=None, eq=False)

    def __str__(self) -> str:
        return format_host_port(self.address, self.port)


def list_adapters(system: Any = None) -> tuple[Adapter, ...]:
    """
    The adapters of this machine and their addresses, from psutil.

    @param system: what to ask instead of the C{psutil} module (for tests): an object with
        C{net_if_addrs()} and C{AF_LINK}.
    @raise BindingError: the adapters cannot be listed now (for instance out of file
        descriptors); the adapter watcher logs it and asks again at its next poll.
    """
    if system is None:
        import psutil

        system = psutil
    try:
        listing = system.net_if_addrs()
    except OSError as e:
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "OSError"
        raise BindingError(f"cannot list the network adapters: {e.strerror or e} ({code})") from e
    adapters = []
    for name, entries in sorted(listing.items()):
        addresses = []
        mac = None
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                addresses.append(entry.address.split("%", 1)[0])
            elif entry.family == getattr(system, "AF_LINK", None):
                mac = entry.address
        adapters.append(Adapter(name=name, addresses=tuple(addresses), mac=mac))
    return tuple(adapters)


_IPV6_LINK_LOCAL = ipaddress.ip_network("fe80::/10")

# Every range whose addresses make an adapter internal (SPEC §2).  Anything else -- public, shared
# 100.64/10, documentation, benchmarking, multicast, reserved -- is external.
_INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",  # loopback
        "::1/128",
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",  # IPv4 link-local
        "fc00::/7",  # unique local
    )
)


def _is_internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in network for network in _INTERNAL_NETWORKS)


def _is_ipv6_link_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address in _IPV6_LINK_LOCAL


def classify(adapter: Adapter, overrides: dict[str, str] | None = None) -> str:
    """
    The usage class of C{adapter}: C{internal}, C{external} or C{dmz} (see the module docstring).
    """
    if overrides and adapter.name in overrides:
        return overrides[adapter.name]
    addresses = [ipaddress.ip_address(a) for a in adapter.addresses]
    counted = [a for a in addresses if not _is_ipv6_link_local(a)]
    if counted and all(_is_internal_address(a) for a in counted):
        return "internal"
    return "external"


def resolve_bind(
    bind: Iterable[str], adapters: Iterable[Adapter], overrides: dict[str, str] | None = None
) -> list[str]:
    """
    The addresses a C{bind} list stands for, in adapter order, without duplicates.
    """
    adapters = tuple(adapters)
    out: dict[str, None] = {}
    for item in bind:
        try:
            out[str(ipaddress.ip_address(item))] = None
            continue
        except ValueError:
            pass
        for adapter in adapters:
            if item == "all" or item == adapter.name or item == classify(adapter, overrides):
                for address in adapter.addresses:
                    # An IPv6 link-local address needs a scope to bind; name it explicitly.
                    if not _is_ipv6_link_local(ipaddress.ip_address(address)):
                        out[address] = None
    return list(out)


def plan_listeners(
    config: Config, adapters: Iterable[Adapter] | None = None, warnings: list[str] | None = None
) -> list[Listener]:
    """
    Every listener the enabled mappings of C{config} need on this machine: the service port
    and every intercept port, on every address the mapping's bind resolves to.

    A bind that matches no address now is not an error when it names adapters or usage classes
    (they are followed as they come and go): it is reported in C{warnings} if given, else an
    error.

    @raise BindingError: two mappings claim the same address and port, or a bind matches no
        address (see above).  Every problem is listed.
    """
    adapters = tuple(list_adapters() if adapters is None else adapters)
    overrides = config.interface_classes()
    owner = {address: a.name for a in adapters for address in a.addresses}
    problems = []
    claimed: dict[tuple[str, int], str] = {}
    listeners = []
    for mapping in config.enabled_mappings():
        addresses = resolve_bind(mapping.bind, adapters, overrides)
        if not addresses:
            known = ", ".join(f"{a.name} ({classify(a, overrides)})" for a in adapters) or "none"
            message = f"mappings.{mapping.name}.bind: {list(mapping.bind)} matches no address on this machine (adapters: {known})"
            if warnings is not None:
                warnings.append(message + "; waiting for one to appear")
            else:
                problems.append(message)
        for address in addresses:
            for port in mapping.ports():
                key = (address, port)
                if key in claimed:
                    problems.append(
                        f"mappings.{mapping.name}.{'port' if port == mapping.port else 'intercept'}: "
                        f"{format_host_port(address, port)} is already used by mapping {claimed[key]}"
                    )
                    continue
                claimed[key] = mapping.name
                listeners.append(
                    Listener(mapping=mapping.name, address=address, port=port, intercept=port != mapping.port, adapter=owner.get(address))
                )
    if problems:
        raise BindingError("\n".join(problems))
    return listeners
