"""
Adapter usage classes and what a bind list resolves to.
"""

from __future__ import annotations

import pytest

from wingate_map.bindings import Adapter, classify, plan_listeners, resolve_bind
from wingate_map.config import parse_config
from wingate_map.errors import BindingError

LO = Adapter("lo", ("127.0.0.1", "::1"))
LAN = Adapter("eth0", ("192.168.1.1", "fe80::1"))
# Addresses below are only classified, never contacted.
WAN = Adapter("eth1", ("81.2.69.160", "2a00:1450::5"))
ULA = Adapter("wg0", ("fd00::1",))
LINKLOCAL = Adapter("eth2", ("169.254.3.4",))
BARE = Adapter("eth3", ())
MIXED = Adapter("eth4", ("198.51.100.7", "10.1.2.3"))
ADAPTERS = (LO, LAN, WAN, ULA, LINKLOCAL, BARE, MIXED)


@pytest.mark.parametrize(
    "adapter, expected",
    [(LO, "internal"), (LAN, "internal"), (WAN, "external"), (ULA, "internal"), (LINKLOCAL, "internal"),
     (BARE, "external"), (MIXED, "internal")],
)
def test_classification(adapter, expected):
    """
    Loopback or any private/link-local/ULA address is internal; public-only or no address is
    external.
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
    link-local addresses (which need a scope to bind).
    """
    assert resolve_bind(["internal"], ADAPTERS) == ["127.0.0.1", "::1", "192.168.1.1", "fd00::1", "169.254.3.4", "198.51.100.7", "10.1.2.3"]
    assert resolve_bind(["external"], ADAPTERS) == ["81.2.69.160", "2a00:1450::5"]
    assert resolve_bind(["dmz"], ADAPTERS) == []


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
