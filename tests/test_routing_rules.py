"""
Rule conditions beyond who and where: the server name a client asks for (sni) and schedules
(when), as the configuration reads them and the rule service decides with them.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from wingate_map.config import parse_config
from wingate_map.errors import ConfigError
from wingate_map.policy import AssumedIdentitySource, IdentityResolver
from wingate_map.values import ClientInfo
from wingate_map.policy import MappingRuleService
from wingate_map.config import load_timezone

CONFIG = """
[service]
timezone = "Europe/Berlin"
[users.alice]
locations = ["10.0.0.5"]
groups = ["eng"]
[mappings.rdp]
port = 3389
peek_sni = true
default = "10.0.0.10:3389"
[[mappings.rdp.rules]]
group = "eng"
when = ["mon-fri 07:00-19:00", "sat 10:00-12:00"]
to = "10.0.0.21:3389"
[[mappings.rdp.rules]]
sni = ["rdp.corp.example", "*.lab.corp.example"]
to = "10.0.0.30:3389"
[[mappings.rdp.rules]]
from = ["10.0.9.0/24"]
when = "22:00-06:00"
to = "10.0.0.40:3389"
"""


def service(text: str = CONFIG, at: str = "2026-11-30T08:00:00+01:00") -> MappingRuleService:
    config = parse_config(text)
    [mapping] = config.mappings
    moment = datetime.fromisoformat(at).timestamp()
    return MappingRuleService(
        mapping, IdentityResolver.of([AssumedIdentitySource(config.users)]), tz=load_timezone(config.service.timezone), now=lambda: moment
    )


def client(ip: str, sni: str | None = None) -> ClientInfo:
    return ClientInfo(mapping="rdp", client_ip=ip, client_port=1, local_ip="10.0.0.1", local_port=3389, sni=sni)


@pytest.mark.parametrize(
    "at, rule",
    [
        ("2026-11-30T08:00:00+01:00", 0),  # Monday 08:00 in Berlin
        ("2026-11-30T06:59:00+01:00", "default"),
        ("2026-11-30T19:00:00+01:00", "default"),  # [start, end)
        ("2026-11-30T18:30:00+00:00", "default"),  # 19:30 in Berlin
        ("2026-12-05T11:59:00+01:00", 0),  # Saturday
        ("2026-12-06T11:00:00+01:00", "default"),  # Sunday
    ],
)
def test_when_decides_by_the_clock_in_the_service_timezone(at, rule):
    """
    A rule with when holds only inside its windows, read in [service] timezone.
    """
    assert service(at=at).decide(client("10.0.0.5")).rule == rule


def test_when_across_midnight_with_a_from_rule():
    """
    A from rule with a window across midnight holds late in the evening and early in the morning.
    """
    assert service(at="2026-11-30T23:30:00+01:00").decide(client("10.0.9.7")).rule == 2
    assert service(at="2026-12-01T05:59:00+01:00").decide(client("10.0.9.7")).rule == 2
    assert service(at="2026-12-01T06:00:00+01:00").decide(client("10.0.9.7")).rule == "default"


@pytest.mark.parametrize(
    "sni, rule",
    [("rdp.corp.example", 1), ("RDP.Corp.Example", 1), ("a.b.lab.corp.example", 1), ("lab.corp.example", "default"), (None, "default")],
)
def test_sni_condition(sni, rule):
    """
    sni matches exactly or by a leading *. for one or more labels, case-insensitively; no name
    matches nothing.
    """
    assert service(at="2026-11-29T08:00:00+01:00").decide(client("10.0.0.77", sni)).rule == rule


def test_explain_says_why_a_window_holds_or_not():
    """
    explain shows the server name, and for when the local time and each window's verdict.
    """
    _, lines = service().explain(client("10.0.0.5", "x.lab.corp.example"), at=datetime(2026, 11, 29, 8, 0, tzinfo=timezone.utc))
    text = "\n".join(lines)
    assert "server name (sni): x.lab.corp.example" in text
    assert "sun 2026-11-29 09:00 Europe/Berlin (+0100) is outside the schedule" in text
    assert "rule 1 (sni = rdp.corp.example, *.lab.corp.example) -> 10.0.0.30:3389: MATCHES" in text


@pytest.mark.parametrize(
    "change, expected",
    [
        ('when = ["mon-fri 07:00-19:00", "someday 07:00-08:00"]', "mappings.rdp.rules[0].when[1]: "),
        ('when = "25:00-26:00"', "mappings.rdp.rules[0].when: "),
        ('when = []', "mappings.rdp.rules[0].when: a list is not allowed; expected a time window or a non-empty list"),
    ],
)
def test_bad_windows_are_config_errors(change, expected):
    """
    A window that cannot be read is a configuration error naming its key path.
    """
    text = CONFIG.replace('when = ["mon-fri 07:00-19:00", "sat 10:00-12:00"]', change)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(str(p).startswith(expected) for p in info.value.problems), info.value.problems


def test_bad_sni_and_timezone_are_config_errors():
    """
    A bad server-name pattern, an sni condition without peek_sni or tls, and an unknown time
    zone are errors naming their keys.
    """
    text = CONFIG.replace('"*.lab.corp.example"', '"a.*.example"').replace("Europe/Berlin", "Mars/Olympus")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    found = [str(p) for p in info.value.problems]
    assert any(p.startswith("mappings.rdp.rules[1].sni[1]: 'a.*.example'") for p in found), found
    assert any(p.startswith("service.timezone: unknown time zone 'Mars/Olympus'") for p in found), found
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG.replace("peek_sni = true\n", ""))
    assert [str(p) for p in info.value.problems] == [
        "mappings.rdp.rules[1].sni: needs peek_sni = true (or tls on the mapping): otherwise the server name is never known"
    ]
