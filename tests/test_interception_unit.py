"""
Interception in memory: the nftables ruleset, intercept listeners, original destinations and
clear failures.
"""

from __future__ import annotations

import socket
import struct

import pytest

from wingate_map.network import _interception as interception
from wingate_map.network import Adapter, plan_listeners
from wingate_map.config import parse_config
from wingate_map.errors import BindingError
from wingate_map.network._interception import InterceptionError, Redirect, original_destination, ruleset


def test_ruleset_ports_ranges_and_families():
    """
    One rule per adapter and family, dnat to the adapter's bound address keeping the port;
    consecutive ports collapse into ranges; the table is deleted and recreated atomically.
    """
    script = ruleset(
        [
            Redirect("rdp", "eth0", "10.0.0.1", (3390, 5000, 5001, 5002, 5010)),
            Redirect("rdp", "eth0", "fd00::1", (3390,)),
        ]
    )
    assert script.splitlines()[:3] == ["table inet wingatemap", "delete table inet wingatemap", "table inet wingatemap {"]
    assert '        iifname "eth0" meta nfproto ipv4 tcp dport { 3390, 5000-5002, 5010 } dnat ip to 10.0.0.1 comment "mapping rdp"' in script
    assert '        iifname "eth0" meta nfproto ipv6 tcp dport { 3390 } dnat ip6 to [fd00::1] comment "mapping rdp"' in script
    assert "type nat hook prerouting priority dstnat; policy accept;" in script


def test_intercept_ports_listen_like_the_service_port():
    """
    Intercept ports (and ranges) get listeners on every address the mapping binds to.
    """
    config = parse_config('[mappings.m]\nport = 80\nbind = ["eth0"]\nintercept = [8080, "9000-9001"]\n')
    listeners = plan_listeners(config, [Adapter("eth0", ("10.0.0.1", "fd00::1"))])
    assert [(str(l), l.intercept, l.adapter) for l in listeners] == [
        ("10.0.0.1:80", False, "eth0"), ("10.0.0.1:8080", True, "eth0"), ("10.0.0.1:9000", True, "eth0"), ("10.0.0.1:9001", True, "eth0"),
        ("[fd00::1]:80", False, "eth0"), ("[fd00::1]:8080", True, "eth0"), ("[fd00::1]:9000", True, "eth0"), ("[fd00::1]:9001", True, "eth0"),
    ]


def test_intercept_conflict_on_overlapping_addresses():
    """
    An intercept port that another mapping also uses on an overlapping address is an error
    naming both mappings (found when the adapters are known, if not from the file alone).
    """
    config = parse_config('[mappings.a]\nport = 80\nbind = "internal"\nintercept = [8080]\n[mappings.b]\nport = 8080\nbind = "10.0.0.1"\n')
    with pytest.raises(BindingError) as info:
        plan_listeners(config, [Adapter("eth0", ("10.0.0.1",))])
    assert "mappings.b.port: 10.0.0.1:8080 is already used by mapping a" in str(info.value)


class FakeSocket(socket.socket):
    def __init__(self, family, answer):
        super().__init__(family, socket.SOCK_STREAM)
        self.answer = answer

    def getsockopt(self, level, option, size=None):
        assert option == interception.SO_ORIGINAL_DST
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class FakeTransport:
    def __init__(self, sock):
        self.socket = sock


def test_original_destination_ipv4_ipv6_and_none():
    """
    SO_ORIGINAL_DST answers are decoded for IPv4 and IPv6; no conntrack entry means None.
    """
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 3390, socket.inet_pton(socket.AF_INET, "10.77.2.2"))
    v6 = struct.pack("!HHI16sI", socket.AF_INET6, 443, 0, socket.inet_pton(socket.AF_INET6, "fd77:2::2"), 0)
    for family, answer, expected in [
        (socket.AF_INET, v4, ("10.77.2.2", 3390)),
        (socket.AF_INET6, v6, ("fd77:2::2", 443)),
        (socket.AF_INET, OSError(2, "No such file or directory"), None),
    ]:
        sock = FakeSocket(family, answer)
        try:
            assert original_destination(FakeTransport(sock)) == expected
        finally:
            sock.close()
    assert original_destination(object()) is None


def test_missing_nft_is_a_clear_error(monkeypatch):
    """
    Without nftables installed, transparent interception fails with a message saying so.
    """
    monkeypatch.setattr(interception.shutil, "which", lambda *a, **k: None)
    with pytest.raises(InterceptionError) as info:
        interception.install("table inet wingatemap {}\n")
    assert "the nft command is not installed" in str(info.value)
