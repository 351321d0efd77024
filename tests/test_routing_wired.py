"""
Routing wired end to end (issue 12 items 1-3): the configuration keys balance, health_check and
weight; the relay trying a destination list in the balancer's order and reporting each attempt
to the destination's health; peeking at the client's TLS ClientHello for its server name
(peek_sni) and relaying the peeked bytes untouched; the sni event field.
"""

from __future__ import annotations

import pytest

from wingate_map.config import HealthCheck, parse_config
from wingate_map.errors import ConfigError


def _mapping(extra: str, default: str = '["127.0.0.1:1", "127.0.0.1:2"]') -> str:
    return f'[mappings.m]\nport = 9000\nbind = "127.0.0.1"\ndefault = {default}\n{extra}\n'


def test_balance_health_check_and_weight_are_read():
    """
    balance, health_check (each key optional, with its defaults) and a destination's weight
    are accepted and reach the mapping.
    """
    config = parse_config(
        _mapping(
            'balance = "least-connections"\nhealth_check = { interval = 1, fall = 4 }',
            '["127.0.0.1:1", { host = "127.0.0.1", port = 2, weight = 3 }]',
        )
    )
    mapping = config.mapping("m")
    assert mapping.balance == "least-connections"
    assert mapping.health_check == HealthCheck(interval=1.0, timeout=2.0, fall=4, rise=2)
    assert [d.weight for d in mapping.default] == [1, 3]
    plain = parse_config(_mapping("")).mapping("m")
    assert plain.balance == "failover" and plain.health_check is None


@pytest.mark.parametrize(
    "extra, default, path",
    [
        ('balance = "roundrobin"', None, "mappings.m.balance"),
        ("health_check = { interval = 0 }", None, "mappings.m.health_check.interval"),
        ("health_check = { fall = 0 }", None, "mappings.m.health_check.fall"),
        ("health_check = { every = 5 }", None, "mappings.m.health_check.every"),
        ("health_check = 5", None, "mappings.m.health_check"),
        ('balance = "round-robin"', '[{ host = "a", port = 1, weight = 257 }]', "mappings.m.default[0].weight"),
        ('balance = "round-robin"', '[{ host = "a", port = 1, weight = 0 }]', "mappings.m.default[0].weight"),
    ],
)
def test_bad_values_name_the_key(extra, default, path):
    """
    A bad balance method, health_check value or weight is a configuration error naming its key.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(_mapping(extra, default) if default else _mapping(extra))
    assert path in str(caught.value)


def test_weight_without_a_weighted_method_is_warned():
    """
    A weight under failover or source-hash does nothing: it is warned about, with its key.
    """
    config = parse_config(_mapping('balance = "source-hash"', '[{ host = "a", port = 1, weight = 2 }, "b:1"]'))
    assert any(w.path == "mappings.m.default[0].weight" for w in config.warnings)
