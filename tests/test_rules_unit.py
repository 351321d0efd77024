"""
Specific mappings in memory: locations, who a client is recognised as, which rule matches, and
what explain says.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from wingate_map.config import parse_config
from wingate_map.errors import ConfigError
from wingate_map.policy import AssumedIdentitySource, IdentityResolver
from wingate_map.config import LocationIndex, LocationSet, client_address, parse_location
from wingate_map.values import CONNECT, NO_DESTINATION, REJECT, ClientInfo
from wingate_map.policy import MappingRuleService


def ip(text):
    return client_address(text)


@pytest.mark.parametrize(
    "location, inside, outside",
    [
        ("10.0.0.5", ["10.0.0.5", "::ffff:10.0.0.5"], ["10.0.0.6", "::1"]),
        ("fd00::5", ["fd00::5", "FD00:0::5"], ["fd00::6", "10.0.0.5"]),
        ("10.0.1.0/24", ["10.0.1.0", "10.0.1.255", "::ffff:10.0.1.9"], ["10.0.2.0", "10.0.0.255"]),
        ("fd00::/64", ["fd00::1", "fd00::ffff:ffff:ffff:ffff"], ["fd00:0:0:1::1", "10.0.0.1"]),
        ("10.0.2.10-10.0.2.20", ["10.0.2.10", "10.0.2.15", "10.0.2.20"], ["10.0.2.9", "10.0.2.21"]),
        ("fd00::10-fd00::20", ["fd00::10", "fd00::1f"], ["fd00::21"]),
        ("192.168.7.*", ["192.168.7.0", "192.168.7.255", "::ffff:192.168.7.1"], ["192.168.8.1"]),
        ("10.*.*.5", ["10.1.2.5", "10.255.0.5"], ["10.1.2.6", "11.1.2.5"]),
        ("::ffff:10.0.0.9", ["10.0.0.9", "::ffff:10.0.0.9"], ["10.0.0.8"]),
    ],
)
def test_location_forms(location, inside, outside):
    """
    Every location form matches the addresses it covers and no others, IPv4-mapped IPv6
    clients matching as IPv4.
    """
    parsed = parse_location(location)
    locations = LocationSet([parsed])
    for address in inside:
        assert locations.contains(ip(address)), address
        assert parsed.matches(ip(address), None), address
    for address in outside:
        assert not locations.contains(ip(address)), address
        assert not parsed.matches(ip(address), None), address


def test_mac_location():
    """
    A mac: location matches the client whose neighbour-table entry has that MAC, in any case
    or separator style.
    """
    locations = LocationSet([parse_location("mac:52-54-00-AB-34-56")])
    assert locations.contains(ip("10.0.0.9"), lambda: "52:54:00:ab:34:56")
    assert not locations.contains(ip("10.0.0.9"), lambda: "52:54:00:ab:34:57")
    assert not locations.contains(ip("10.0.0.9"), lambda: None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.300", "is not a location"),
        ("10.0.0.0/33", "is not a CIDR block"),
        ("10.0.0.9-10.0.0.1", "the range ends before it starts"),
        ("10.0.0.1-fd00::1", "both ends of a range must be IPv4, or both IPv6"),
        ("10.0.*", "wildcards are IPv4 octets"),
        ("mac:52:54:00", "is not a MAC address"),
        ("alice", "is not a location; expected an IP address"),
    ],
)
def test_bad_locations(text, message):
    """
    A malformed location says what is wrong and which forms are allowed.
    """
    with pytest.raises(ValueError) as info:
        parse_location(text)
    assert message in str(info.value)


def test_index_first_match_in_order():
    """
    With overlapping locations, the first group in order wins, whichever is more specific.
    """
    index = LocationIndex(
        [
            [parse_location("10.0.0.0/8")],
            [parse_location("10.0.1.5")],
            [parse_location("10.0.1.0/24"), parse_location("fd00::/16")],
            [parse_location("192.168.*.9")],
        ]
    )
    assert index.first(ip("10.0.1.5")) == 0
    assert index.first(ip("fd00::1")) == 2
    assert index.first(ip("192.168.3.9")) == 3
    assert index.first(ip("11.0.0.1")) is None


def test_index_agrees_with_linear_scan():
    """
    The segment index gives the same first match as checking every location in order, for
    random overlapping ranges.
    """
    rng = random.Random(7)
    groups = []
    for _ in range(300):
        base = rng.randrange(0, 2**32 - 70000)
        kind = rng.choice(["single", "range", "cidr"])
        if kind == "single":
            text = str(ipaddress.IPv4Address(base))
        elif kind == "range":
            text = f"{ipaddress.IPv4Address(base)}-{ipaddress.IPv4Address(base + rng.randrange(65536))}"
        else:
            text = f"{ipaddress.IPv4Address(base)}/{rng.randrange(12, 32)}"
        groups.append([parse_location(text)])
    index = LocationIndex(groups)
    probes = [rng.randrange(2**32) for _ in range(2000)]
    probes += [g[0].lo for g in groups] + [g[0].hi for g in groups] + [g[0].hi + 1 for g in groups]
    for number in probes:
        address = ipaddress.IPv4Address(number % 2**32)
        expected = next((i for i, g in enumerate(groups) if g[0].matches(address, None)), None)
        assert index.first(address) == expected, address


CONFIG = """
[users.alice]
locations = ["10.0.0.5", "10.0.1.0/24"]
groups = ["engineering"]
[users.bob]
locations = ["10.0.1.7", "10.0.2.10-10.0.2.20", "mac:52:54:00:00:00:0b"]
groups = ["contractors"]
[users.carol]
locations = ["fd00::/64"]

[mappings.rdp]
port = 3389
default = { host = "10.0.0.10", port = 3389 }

[[mappings.rdp.rules]]
user = "alice"
from = ["10.0.0.0/24"]
to = { host = "10.0.0.20", port = 3389 }

[[mappings.rdp.rules]]
from = ["192.168.5.0/24"]
not_from = ["192.168.5.66"]
to = [{ host = "10.0.0.30", port = 3389 }, { host = "10.0.0.31", port = 3389 }]

[[mappings.rdp.rules]]
group = "contractors"
action = "reject"

[[mappings.rdp.rules]]
user = ["carol", "alice"]
group = "everyone"
to = { host = "10.0.0.40", port = 3389 }

[mappings.nodefault]
port = 3390
"""

MACS = {"10.9.9.9": "52:54:00:00:00:0b"}


def service(name="rdp", text=CONFIG):
    config = parse_config(text)
    source = AssumedIdentitySource(config.users, mac_for=MACS.get)
    return MappingRuleService(config.mapping(name), IdentityResolver.of([source]), mac_for=MACS.get)


def decide(address, name="rdp"):
    return service(name).decide(ClientInfo(name, address, 1000, "127.0.0.1", 3389))


@pytest.mark.parametrize(
    "address, user, level, rule, action, first_destination",
    [
        ("10.0.0.5", "alice", "assumed", 0, CONNECT, "10.0.0.20:3389"),
        ("10.0.1.7", "alice", "assumed", 3, CONNECT, "10.0.0.40:3389"),  # alice is first in the file
        ("10.0.2.15", "bob", "assumed", 2, REJECT, None),
        ("10.9.9.9", "bob", "assumed", 2, REJECT, None),  # by MAC address
        ("fd00::77", "carol", "assumed", 3, CONNECT, "10.0.0.40:3389"),
        ("192.168.5.1", "guest", "guest", 1, CONNECT, "10.0.0.30:3389"),
        ("192.168.5.66", "guest", "guest", "default", CONNECT, "10.0.0.10:3389"),  # not_from
        ("::ffff:10.0.0.5", "alice", "assumed", 0, CONNECT, "10.0.0.20:3389"),
        ("203.0.113.9", "guest", "guest", "default", CONNECT, "10.0.0.10:3389"),
    ],
)
def test_decisions(address, user, level, rule, action, first_destination):
    """
    Users are recognised by location (first user in file order wins, nobody is guest), and
    the first rule whose every condition holds decides; otherwise the default.
    """
    decision = decide(address)
    assert (decision.identity.user, decision.identity.level, decision.rule, decision.action) == (user, level, rule, action)
    assert "everyone" in decision.identity.groups
    if first_destination:
        assert str(decision.destinations[0]) == first_destination


def test_no_default_is_no_destination():
    """
    No matching rule and no default: no-destination, rule null.
    """
    decision = decide("10.0.0.5", name="nodefault")
    assert (decision.action, decision.rule, decision.destinations) == (NO_DESTINATION, None, ())


def test_explain_agrees_with_decide():
    """
    explain reaches the same decision as the fast path for every kind of client, and says why.
    """
    rules = service()
    for address in ["10.0.0.5", "10.0.1.7", "10.0.2.15", "10.9.9.9", "fd00::77", "192.168.5.1", "192.168.5.66", "203.0.113.9"]:
        client = ClientInfo("rdp", address, 1, "127.0.0.1", 3389)
        decision, lines = rules.explain(client)
        fast = rules.decide(client)
        assert (decision.rule, decision.action, decision.destinations) == (fast.rule, fast.action, fast.destinations)
    _, lines = rules.explain(ClientInfo("rdp", "10.0.2.15", 1, "127.0.0.1", 3389))
    assert lines[0] == "client 10.0.2.15 is bob (assumed): location 10.0.2.10-10.0.2.20 of users.bob"
    assert lines[2] == "  rule 0 (user = alice; from = 10.0.0.0/24) -> 10.0.0.20:3389: no: user is bob, not alice; 10.0.2.15 is not in from"
    assert lines[4] == "  rule 2 (group = contractors) reject: MATCHES"
    assert lines[-1] == "destination: none; the client is rejected (rule 2, reason rejected)"


def test_candidate_cache_is_bounded():
    """
    The per-identity rule cache never grows past its limit, however many users are seen.
    """
    from wingate_map.policy import _rules as rules_module
    from wingate_map.values import Identity

    rules = service()
    for n in range(rules_module._CACHE_LIMIT + 50):
        rules._static_candidates(Identity(user=f"u{n}", level="authenticated"))
    assert len(rules._by_identity) <= rules_module._CACHE_LIMIT


@pytest.mark.parametrize(
    "rules_text, expected",
    [
        ('user = "alcie"\nto = { host = "a", port = 1 }', 'mappings.m.rules[0].user: \'alcie\' is not a user defined in [users] (did you mean "alice"?)'),
        ('group = "enginering"\nto = { host = "a", port = 1 }', "mappings.m.rules[0].group: 'enginering' is not a group of any user"),
        ('to = { host = "a", port = 1 }', "mappings.m.rules[0]: a rule needs at least one condition"),
        ('user = "alice"', "mappings.m.rules[0].to: is required"),
        ('user = "alice"\naction = "drop"', 'mappings.m.rules[0].action: "drop" is not allowed; the only action is "reject"'),
        ('user = "alice"\naction = "reject"\nto = { host = "a", port = 1 }', 'mappings.m.rules[0]: give either to or action = "reject", not both'),
        ('from = ["10.0.0.0/33"]\naction = "reject"', "mappings.m.rules[0].from[0]: '10.0.0.0/33' is not a CIDR block"),
        ('user = "alice"\ncolour = "red"\naction = "reject"', "mappings.m.rules[0].colour: unknown key"),
    ],
)
def test_rule_errors(rules_text, expected):
    """
    Rule mistakes are errors with the rule's key path.
    """
    text = '[users.alice]\nlocations = ["10.0.0.5"]\ngroups = ["engineering"]\n[mappings.m]\nport = 1\n[[mappings.m.rules]]\n' + rules_text + "\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(str(p).startswith(expected) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "users_text, expected",
    [
        ('[users.guest]\nlocations = ["10.0.0.1"]', "users.guest: 'guest' is the user nobody recognised is"),
        ('[users.a]\nlocations = ["nowhere"]', "users.a.locations[0]: 'nowhere' is not a location"),
        ('[users.a]\nlocation = ["10.0.0.1"]', 'users.a.location: unknown key (did you mean "locations"?)'),
        ('[users.a]\ngroups = "x"\nlocations = []', "users.a.locations: an empty list is not allowed"),
    ],
)
def test_user_errors(users_text, expected):
    """
    User mistakes are errors with the user's key path.
    """
    with pytest.raises(ConfigError) as info:
        parse_config(users_text + "\n")
    assert any(str(p).startswith(expected) for p in info.value.problems), info.value.problems


def test_shadowed_rules_are_warned():
    """
    A rule with the same conditions as an earlier one, or after a rule matching everyone,
    never matches: a warning naming both rules.
    """
    config = parse_config(
        '[users.alice]\nlocations = ["10.0.0.5"]\n[mappings.m]\nport = 1\ndefault = { host = "a", port = 1 }\n'
        '[[mappings.m.rules]]\nuser = "alice"\nto = { host = "a", port = 2 }\n'
        '[[mappings.m.rules]]\nuser = "alice"\naction = "reject"\n'
        '[[mappings.m.rules]]\ngroup = "everyone"\nto = { host = "a", port = 3 }\n'
        '[[mappings.m.rules]]\nfrom = "10.0.0.0/8"\nto = { host = "a", port = 4 }\n'
    )
    warnings = [str(w) for w in config.warnings]
    assert "mappings.m.rules[1]: never matches: rule 0 has the same conditions" in warnings
    assert "mappings.m.rules[3]: never matches: rule 2 matches every client" in warnings
    assert "mappings.m.default: never used: a rule matches every client" in warnings


def test_proxy_protocol_keys():
    """
    proxy_protocol_from needs proxy_protocol; proxy_protocol without it is warned about.
    """
    config = parse_config('[mappings.m]\nport = 1\nproxy_protocol = true\n')
    assert any("any peer may send a PROXY header" in str(w) for w in config.warnings)
    with pytest.raises(ConfigError) as info:
        parse_config('[mappings.m]\nport = 1\nproxy_protocol_from = ["10.0.0.1"]\n')
    assert "mappings.m.proxy_protocol_from: is only allowed with proxy_protocol = true" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config('[mappings.m]\nport = 1\ndefault = { host = "a", port = 1, proxy_protocol = "v3" }\n')
    assert 'mappings.m.default.proxy_protocol: "v3" is not allowed; expected false, "v1" or "v2"' in str(info.value)


def test_fast_path_agrees_with_explain_on_random_rules():
    """
    For random users and rules (overlapping from / not_from blocks, wildcards, user and group
    conditions, rejects), the indexed decision equals the rule-by-rule explanation for every
    client tried.
    """
    rng = random.Random(11)

    def block():
        kind = rng.choice(["cidr", "single", "range", "wild"])
        a, b = rng.randrange(4), rng.randrange(4)
        if kind == "cidr":
            return f"10.{a}.{b}.0/{rng.choice([16, 24, 28])}"
        if kind == "single":
            return f"10.{a}.{b}.{rng.randrange(16)}"
        if kind == "range":
            lo = rng.randrange(16)
            return f"10.{a}.{b}.{lo}-10.{a}.{b}.{lo + rng.randrange(8)}"
        return f"10.*.{b}.{rng.randrange(16)}"

    for trial in range(20):
        lines = []
        for u in range(8):
            lines.append(f'[users.u{u}]\nlocations = ["{block()}"]\ngroups = ["g{u % 3}"]')
        lines.append('[mappings.m]\nport = 1\ndefault = { host = "d", port = 1 }')
        for r in range(25):
            conditions = []
            if rng.random() < 0.4:
                conditions.append(f'user = "u{rng.randrange(8)}"')
            if rng.random() < 0.3:
                conditions.append(f'group = "g{rng.randrange(3)}"')
            if rng.random() < 0.6 or not conditions:
                conditions.append(f'from = ["{block()}", "{block()}"]')
            if rng.random() < 0.3:
                conditions.append(f'not_from = ["{block()}"]')
            outcome = 'action = "reject"' if rng.random() < 0.2 else f'to = {{ host = "r{r}", port = 1 }}'
            lines.append("[[mappings.m.rules]]\n" + "\n".join(conditions) + "\n" + outcome)
        rules = service("m", "\n".join(lines) + "\n")
        for _ in range(150):
            address = f"10.{rng.randrange(4)}.{rng.randrange(4)}.{rng.randrange(20)}"
            client = ClientInfo("m", address, 1, "127.0.0.1", 1)
            slow, _ = rules.explain(client)
            fast = rules.decide(client)
            assert (fast.rule, fast.action, fast.destinations) == (slow.rule, slow.action, slow.destinations), (trial, address)
