"""
What happens to an accepted client: which destination it gets, or whether it is refused.

A mapping's rule service recognises the client (through the ordered identity sources), then
walks the mapping's rules in order: the first whose every condition holds decides (its
destinations, or reject); if none does, the mapping's C{default} applies; with no default the
client is refused (C{no-destination}).

Cost per connection does not grow with the number of connections, and stays small with many
rules: the rules without a C{from} condition that an identity can match are worked out once per
identity and cached, and the rules whose C{from} covers a client address come from one index
(a bisect), so a decision looks at a handful of rules, not all of them.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone, tzinfo
from typing import Callable

from attrs import frozen
from zope.interface import implementer

from ..network import mac_for as neighbour_mac
from ..config import Mapping, Rule
from ..values import CONNECT, NO_DESTINATION, REJECT, ClientInfo, Decision, Identity
from ._identity import IdentityResolver
from ..interfaces import IRuleService
from ..config import LocationSet, RangeLists, client_address
from ..config import Schedule, load_timezone
from ..config import sni_matches

_CACHE_LIMIT = 4096


@frozen
class _CompiledRule:
    rule: Rule
    from_: LocationSet | None
    not_from: LocationSet | None
    schedule: Schedule | None = None

    def identity_holds(self, identity: Identity) -> bool:
        rule = self.rule
        if rule.users is not None and identity.user not in rule.users:
            return False
        if rule.groups is not None and not set(rule.groups).intersection(identity.groups):
            return False
        return True

    @property
    def dynamic(self) -> bool:
        """
        Whether the rule has conditions that depend on the connection (sni) or the time (when).
        """
        return self.rule.sni is not None or self.schedule is not None

    def dynamic_holds(self, client: ClientInfo, moment: Callable[[], datetime]) -> bool:
        if self.rule.sni is not None and not any(sni_matches(p, client.sni) for p in self.rule.sni):
            return False
        if self.schedule is not None and not self.schedule.matches(moment()):
            return False
        return True


@implementer(IRuleService)
class MappingRuleService:
    """
    Decides for one mapping from its configuration.
    """

    def __init__(
        self,
        mapping: Mapping,
        identities: IdentityResolver = IdentityResolver(),
        mac_for: Callable[[str], str | None] = neighbour_mac,
        tz: tzinfo | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """
        @param tz: the zone of the rules' C{when} schedules (default: the system's).
        @param now: the current time (POSIX seconds), for C{when}.
        """
        self.mapping = mapping
        self.identities = identities
        self._mac_for = mac_for
        self._now = now
        if tz is None and any(rule.when is not None for rule in mapping.rules):
            tz = load_timezone(None)
        self._rules = tuple(
            _CompiledRule(
                rule,
                LocationSet(rule.from_) if rule.from_ is not None else None,
                LocationSet(rule.not_from) if rule.not_from is not None else None,
                Schedule.parse(rule.when, tz) if rule.when is not None and tz is not None else None,
            )
            for rule in mapping.rules
        )
        # Rules with a from condition: an index from client address to the rules whose from
        # covers it.  Wildcard-pattern and mac: locations cannot be indexed by address; rules
        # using them are checked one by one (they are rare).
        ranges: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        unindexed = []
        for compiled in self._rules:
            if compiled.from_ is None:
                continue
            if all(l.kind == "range" for l in compiled.from_.locations):
                for l in compiled.from_.locations:
                    ranges[l.version].append((l.lo, l.hi, compiled.rule.index))
            else:
                unindexed.append(compiled)
        self._from_index = {version: RangeLists(r) for version, r in ranges.items()}
        self._unindexed_from = tuple(unindexed)
        self._by_identity: dict[tuple[str, tuple[str, ...]], tuple[_CompiledRule, ...]] = {}

    def _mac_lookup(self, client_ip: str) -> Callable[[], str | None]:
        """
        The client's MAC address, looked up at most once and only if a mac: location needs it.
        """
        found: list[str | None] = []

        def mac() -> str | None:
            if not found:
                found.append(self._mac_for(client_ip))
            return found[0]

        return mac

    def _static_candidates(self, identity: Identity) -> tuple[_CompiledRule, ...]:
        """
        The rules without a from condition whose user and group conditions hold for
        C{identity} (cached: they depend on nothing else).
        """
        key = (identity.user, identity.groups)
        found = self._by_identity.get(key)
        if found is None:
            if len(self._by_identity) >= _CACHE_LIMIT:
                self._by_identity.clear()
            found = self._by_identity[key] = tuple(r for r in self._rules if r.from_ is None and r.identity_holds(identity))
        return found

    def _decision(self, rule: Rule, identity: Identity) -> Decision:
        if rule.action == REJECT:
            return Decision(REJECT, (), rule.index, identity)
        return Decision(CONNECT, rule.to, rule.index, identity)

    def _fallback(self, identity: Identity) -> Decision:
        if self.mapping.default:
            return Decision(CONNECT, self.mapping.default, "default", identity)
        return Decision(NO_DESTINATION, (), None, identity)

    def _moment(self, at: datetime | None = None) -> Callable[[], datetime]:
        """
        The moment C{when} conditions are checked at, computed at most once and only if needed.
        """
        found: list[datetime] = [at] if at is not None else []

        def moment() -> datetime:
            if not found:
                found.append(datetime.fromtimestamp(self._now(), timezone.utc))
            return found[0]

        return moment

    def decide(self, client: ClientInfo) -> Decision:
        """
        See L{IRuleService.decide}.
        """
        identity = self.identities.identify(client)
        if not self._rules:
            return self._fallback(identity)
        ip = client_address(client.client_ip)
        mac = self._mac_lookup(client.client_ip)
        moment = self._moment()

        best: _CompiledRule | None = None
        # The first rule without from that holds...
        for compiled in self._static_candidates(identity):
            if (compiled.not_from is None or not compiled.not_from.contains(ip, mac)) and (
                not compiled.dynamic or compiled.dynamic_holds(client, moment)
            ):
                best = compiled
                break
        # ...against the first earlier rule whose from covers the client and that holds.
        limit = best.rule.index if best is not None else len(self._rules)
        hits = self._from_index[ip.version].labels(int(ip)) if ip is not None else ()
        for index in hits:
            if index >= limit:
                break
            compiled = self._rules[index]
            if (
                compiled.identity_holds(identity)
                and (compiled.not_from is None or not compiled.not_from.contains(ip, mac))
                and (not compiled.dynamic or compiled.dynamic_holds(client, moment))
            ):
                best, limit = compiled, index
                break
        for compiled in self._unindexed_from:
            if compiled.rule.index >= limit:
                break
            if (
                compiled.identity_holds(identity)
                and compiled.from_ is not None
                and compiled.from_.contains(ip, mac)
                and (compiled.not_from is None or not compiled.not_from.contains(ip, mac))
                and (not compiled.dynamic or compiled.dynamic_holds(client, moment))
            ):
                best = compiled
                break
        if best is not None:
            return self._decision(best.rule, identity)
        return self._fallback(identity)

    def explain(self, client: ClientInfo, at: datetime | None = None) -> tuple[Decision, list[str]]:
        """
        The decision for C{client} (at the moment C{at}, default now), and every step that led
        to it in words.
        """
        identity, why = self.identities.explain(client)
        lines = [f"client {client.client_ip} is {identity.user} ({identity.level}): {why}"]
        lines.append(f"groups: {', '.join(identity.groups)}")
        if any(compiled.rule.sni is not None for compiled in self._rules):
            lines.append(f"server name (sni): {client.sni if client.sni else 'none'}")
        ip = client_address(client.client_ip)
        mac = self._mac_lookup(client.client_ip)
        moment = self._moment(at)

        decision: Decision | None = None
        for compiled in self._rules:
            rule = compiled.rule
            label = f"rule {rule.index} ({rule.conditions()}) {rule.outcome()}"
            if decision is not None:
                lines.append(f"  {label}: not considered (an earlier rule matched)")
                continue
            failed = []
            if rule.users is not None and identity.user not in rule.users:
                failed.append(f"user is {identity.user}, not {' or '.join(rule.users)}")
            if rule.groups is not None and not set(rule.groups).intersection(identity.groups):
                failed.append(f"{identity.user} is in none of the groups {', '.join(rule.groups)}")
            if compiled.from_ is not None and not compiled.from_.contains(ip, mac):
                failed.append(f"{client.client_ip} is not in from")
            if compiled.not_from is not None and compiled.not_from.contains(ip, mac):
                failed.append(f"{client.client_ip} is in not_from")
            if rule.sni is not None and not any(sni_matches(p, client.sni) for p in rule.sni):
                failed.append(f"server name {client.sni} matches none of sni" if client.sni else "no server name is known (sni)")
            inside = None
            if compiled.schedule is not None:
                if not compiled.schedule.matches(moment()):
                    failed.append(f"when: {compiled.schedule.explain(moment())}")
                else:
                    inside = compiled.schedule.explain(moment())
            if failed:
                lines.append(f"  {label}: no: {'; '.join(failed)}")
            else:
                lines.append(f"  {label}: MATCHES")
                if inside is not None:
                    lines.append(f"    when: {inside}")
                decision = self._decision(rule, identity)
        if not self._rules:
            lines.append("  (the mapping has no rules)")
        if decision is None:
            decision = self._fallback(identity)
            if decision.action == CONNECT:
                lines.append("no rule matched: the default applies")
            else:
                lines.append("no rule matched and the mapping has no default")
        if decision.action == CONNECT:
            lines.append(f"destination: {' | '.join(str(d) for d in decision.destinations)} (rule {decision.rule})")
        elif decision.action == REJECT:
            lines.append(f"destination: none; the client is rejected (rule {decision.rule}, reason rejected)")
        else:
            lines.append("destination: none; the client is refused (reason no-destination)")
        return decision, lines
