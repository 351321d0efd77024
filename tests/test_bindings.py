"""
Adapter usage classes and what a bind list resolves to.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from wingate_map.network._bindings import Adapter, classify, list_adapters, plan_listeners, resolve_bind
from wingate_map.config import parse_config
from wingate_map.errors import BindingError, WingateMapError

LO = Adapter("lo", ("127.0.0.1", "::1"))
LAN = Adapter("eth0", ("192.168.1.1", "fe80::1"))
# Addresses below are only classified, never contacted.
WAN = Adapter("eth1", ("81.2.69.160", "2a00:1450::5", "fe80::2"))
ULA = Adapter("wg0", ("fd00::1",))
LINKLOCAL = Adapter("eth2", ("169.254.3.4",))
BARE = Adapter("eth3", ())
MIXED = Adapter("eth4", ("198.51.100.7", "10.1.2.3"))
ONLY_FE80 = Adapter("eth5", ("fe80::5",))
ADAPTERS = (LO, LAN, WAN, ULA, LINKLOCAL, BARE, MIXED, ONLY_FE80)

INTERNAL_CASES = [
    ("127.0.0.1",),
    ("127.5.6.7",),
    ("::1",),
    ("127.0.0.1", "::1"),
    ("10.0.0.1",),
    ("10.2.3.4", "fe80::1"),
    ("10.255.255.254", "fe80::1", "fe80::abcd"),
    ("172.16.0.1",),
    ("172.31.255.254",),
    ("192.168.0.1",),
    ("192.168.255.254", "fe80::9"),
    ("169.254.0.1",),
    ("169.254.255.254",),
    ("fd00::1",),
    ("fc00::1",),
    ("fdff:ffff::1", "fe80::1"),
    ("10.0.0.1", "192.168.1.1", "172.20.0.1", "fd12::1", "fe80::1", "169.254.1.1"),
]

EXTERNAL_CASES = [
    (),  # no address
    ("fe80::1",),  # only IPv6 link-local counts as no address
    ("fe80::1", "fe80::2"),
    ("febf:ffff::1",),  # still fe80::/10
    ("81.2.69.160",),  # public
    ("81.2.69.160", "fe80::1"),  # public plus the kernel's automatic link-local
    ("2a00:1450::5", "fe80::1"),
    ("100.64.0.1",),  # shared address space (carrier-grade NAT), 100.64/10
    ("100.127.255.254", "fe80::1"),
    ("192.0.2.1",),  # documentation
    ("198.51.100.1",),
    ("203.0.113.1", "fe80::1"),
    ("2001:db8::1",),
    ("198.18.0.1",),  # benchmarking 198.18/15
    ("198.19.255.254",),
    ("2001:2::1",),  # benchmarking 2001:2::/48
    ("172.15.255.254",),  # just outside 172.16/12
    ("172.32.0.1",),
    ("169.253.255.254",),
    ("fe00::1",),  # just outside fc00::/7
    ("192.0.0.8",),  # ipaddress calls these private; they are not in SPEC §2's list
    ("240.0.0.1",),
    ("0.0.0.1",),
    ("64:ff9b:1::1",),
    ("2001:10::1",),
    ("::ffff:10.0.0.1",),  # IPv4-mapped: not an IPv4 address on the adapter
    ("10.1.2.3", "198.51.100.7"),  # mixed private and public
    ("192.168.1.1", "fe80::1", "2001:db8::7"),
    ("127.0.0.1", "192.0.2.10"),  # a public address on loopback is still public
    ("fd00::1", "100.64.1.1"),
]


@pytest.mark.parametrize("addresses", INTERNAL_CASES, ids=",".join)
def test_internal_adapters(addresses):
    """
    An adapter whose every address, IPv6 link-local aside, is loopback, RFC 1918 private, IPv4
    link-local or unique-local IPv6 is internal, in any order.
    """
    assert classify(Adapter("x", addresses)) == "internal"
    assert classify(Adapter("x", tuple(reversed(addresses)))) == "internal"


@pytest.mark.parametrize("addresses", EXTERNAL_CASES, ids=lambda a: ",".join(a) or "none")
def test_external_adapters(addresses):
    """
    An adapter with any other address (public, 100.64/10, documentation, benchmarking, reserved)
    is external even beside private or link-local ones, and so is an adapter with no address
    but IPv6 link-local ones, in any order.
    """
    assert classify(Adapter("x", addresses)) == "external"
    assert classify(Adapter("x", tuple(reversed(addresses)))) == "external"


@pytest.mark.parametrize(
    "adapter, expected",
    [(LO, "internal"), (LAN, "internal"), (WAN, "external"), (ULA, "internal"), (LINKLOCAL, "internal"),
     (BARE, "external"), (MIXED, "external"), (ONLY_FE80, "external")],
)
def test_classification(adapter, expected):
    """
    The adapters the other tests here use are classified as SPEC §2 says.
    """
    assert classify(adapter) == expected


def test_override_wins():
    """
    [interfaces] overrides the automatic class, including to dmz.
    """
    assert classify(WAN, {"eth1": "dmz"}) == "dmz"
    assert classify(LAN, {"eth0": "external"}) == "external"


def test_resolve_by_class_skips_ipv6_link_local():
    """
    internal resolves to every address of every internal adapter, IPv4 and IPv6, except IPv6
    link-local addresses (which need a scope to bind); an external adapter's addresses, its
    private ones included, are never among them.
    """
    assert resolve_bind(["internal"], ADAPTERS) == ["127.0.0.1", "::1", "192.168.1.1", "fd00::1", "169.254.3.4"]
    assert resolve_bind(["external"], ADAPTERS) == ["81.2.69.160", "2a00:1450::5", "198.51.100.7", "10.1.2.3"]
    assert resolve_bind(["dmz"], ADAPTERS) == []


@pytest.mark.parametrize("addresses", EXTERNAL_CASES, ids=lambda a: ",".join(a) or "none")
def test_internal_never_resolves_to_an_external_adapter(addresses):
    """
    bind = "internal" listens on no address of an external adapter, not even its private ones,
    and on no IPv6 link-local address of an internal one.
    """
    adapters = (Adapter("lan", ("10.200.0.1", "fe80::200")), Adapter("x", addresses))
    assert resolve_bind(["internal"], adapters) == ["10.200.0.1"]


def test_default_bind_listens_on_private_addresses_only():
    """
    A mapping without bind listens on the private adapter only, not on an adapter with a public
    address and the kernel's automatic IPv6 link-local address (the case issue 9 found).
    """
    adapters = (Adapter("lo", ("127.0.0.1", "::1")), Adapter("wan", ("192.0.2.1", "fe80::1")),
                Adapter("lan", ("10.99.0.1", "fe80::2")), Adapter("cgnat", ("100.64.0.1", "fe80::3")))
    config = parse_config("[mappings.m]\nport = 80\n")
    assert [str(l) for l in plan_listeners(config, adapters)] == ["127.0.0.1:80", "[::1]:80", "10.99.0.1:80"]


def test_resolve_names_addresses_and_all():
    """
    Adapter names and IP addresses may be mixed; "all" is every address; duplicates go.
    """
    assert resolve_bind(["eth1", "127.0.0.1", "lo"], ADAPTERS) == ["81.2.69.160", "2a00:1450::5", "127.0.0.1", "::1"]
    assert len(resolve_bind(["all"], ADAPTERS)) == 9


def test_plan_conflict_and_empty():
    """
    Two mappings on the same address and port, or a bind matching nothing, are errors that
    name the mappings.
    """
    config = parse_config(
        '[mappings.a]\nport = 80\nbind = "lo"\n[mappings.b]\nport = 80\nbind = "127.0.0.1"\n'
        '[mappings.c]\nport = 81\nbind = "dmz"\n'
    )
    with pytest.raises(BindingError) as info:
        plan_listeners(config, ADAPTERS)
    text = str(info.value)
    assert "mappings.b.port: 127.0.0.1:80 is already used by mapping a" in text
    assert "mappings.c.bind: ['dmz'] matches no address" in text


def test_plan_skips_disabled():
    """
    Disabled mappings get no listener.
    """
    config = parse_config('[mappings.a]\nport = 80\nbind = "lo"\n[mappings.b]\nport = 80\nbind = "lo"\nenabled = false\n')
    assert [str(l) for l in plan_listeners(config, ADAPTERS)] == ["127.0.0.1:80", "[::1]:80"]


class _Entry:
    """
    One address as psutil's net_if_addrs() reports it.
    """

    def __init__(self, family, address):
        self.family = family
        self.address = address


class _FakePsutil:
    """
    A stand-in for the psutil module: net_if_addrs() returns C{listing} or raises C{error}.
    """

    AF_LINK = 17

    def __init__(self, listing=None, error=None):
        self.listing = listing or {}
        self.error = error

    def net_if_addrs(self):
        if self.error is not None:
            raise self.error
        return self.listing


def test_list_adapters_reads_psutil():
    """
    Adapters come sorted by name, with IPv4 and IPv6 addresses (scope suffixes dropped) and the
    MAC address.
    """
    system = _FakePsutil({
        "eth0": [_Entry(socket.AF_INET, "10.0.0.1"), _Entry(socket.AF_INET6, "fe80::1%eth0"), _Entry(17, "52:54:00:12:34:56")],
        "lo": [_Entry(socket.AF_INET, "127.0.0.1"), _Entry(socket.AF_INET6, "::1")],
    })
    assert list_adapters(system) == (
        Adapter("eth0", ("10.0.0.1", "fe80::1"), "52:54:00:12:34:56"),
        Adapter("lo", ("127.0.0.1", "::1")),
    )


def test_list_adapters_out_of_file_descriptors_is_a_binding_error():
    """
    When psutil cannot list the adapters (out of file descriptors), the error is wingatemap's
    own BindingError saying what failed, which the adapter watcher logs before trying again at
    its next poll, instead of a raw OSError that stops the watcher.
    """
    system = _FakePsutil(error=OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    with pytest.raises(BindingError) as info:
        list_adapters(system)
    assert str(info.value) == "cannot list the network adapters: Too many open files (EMFILE)"
    assert isinstance(info.value, WingateMapError)
    assert isinstance(info.value.__cause__, OSError)
    system.error = None
    assert list_adapters(system) == ()  # the next poll works again once descriptors are back
