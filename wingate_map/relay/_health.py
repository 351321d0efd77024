"""
Destination lists at run time: their balancers and the active health checker.

Every destination list of an enabled mapping (its C{default}, each rule's C{to}) gets one
L{DestinationList} holding a L{Balancer} (SPEC §2: its state is per list and per process).  The
relay asks it for the order in which to try the destinations and reports each attempt to the
destination's L{DestinationHealth}; that is the passive marking.  A reload keeps a list's
balancer, and so its health, counters and round-robin position, when the list is unchanged (the
same mapping, rule index, destinations, C{balance} and C{health_check}); any change starts the
list afresh, up.  Sessions still relaying to a replaced list report to its old state, which is
then dropped.

L{HealthChecker} is the active side, a child service of the wingatemap service: with
C{health_check}, every destination is checked every C{interval} seconds by a TCP connect (a
verified TLS handshake for TLS destinations; a PROXY v2 LOCAL / v1 UNKNOWN header first for a
destination that expects one), given C{timeout} seconds, through the same endpoint factory as
real connections, so host names are resolved at every check.  Checks are spread out: the first
one of each destination comes at a random moment within the first interval and each next one
after C{interval} +/- 10 %, so many destinations never start their checks together.  A
destination that appears in several lists with the same interval and timeout is checked once
and every list hears the result.  Only enabled mappings are checked (disabled ones have no
runtime); the checker stops at shutdown, cancelling the checks in flight.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._balance import DOWN, Balancer, DestinationHealth, HealthPolicy
from ..config import Destination, Mapping
from ._proxy_protocol import build_header
from ..tls import describe_tls_failure

_log = Logger(namespace="wingate_map.health")  # the name log lines carried before the module moved here

#: Each next check comes after the interval times a random factor in this range.
JITTER = (0.9, 1.1)


@define(eq=False)
class DestinationList:
    """
    One destination list of a mapping and its balancer.

    @ivar rule: the rule's 0-based index, or C{"default"}.
    @ivar key: what must stay the same for a reload to keep this list's state.
    """

    mapping: str
    rule: int | str
    destinations: tuple[Destination, ...]
    balancer: Balancer
    key: tuple[Any, ...]

    def states(self) -> list[dict[str, Any]]:
        """
        This list's entries of C{GET /destinations}: mapping, rule, destination, state, since,
        live, total, last_error.
        """
        return [{"mapping": self.mapping, "rule": self.rule, **health.as_dict()} for health in self.balancer.health]


def policy_of(mapping: Mapping) -> HealthPolicy:
    """
    The health policy of C{mapping}'s lists: its C{health_check} (active checks), or the
    defaults for passive marking (fall 3, a retry every 5 s).
    """
    check = mapping.health_check
    if check is None:
        return HealthPolicy()
    return HealthPolicy(fall=check.fall, rise=check.rise, interval=check.interval, timeout=check.timeout, active=True)


def build_lists(mapping: Mapping, clock: IReactorTime, previous: dict[tuple[Any, ...], DestinationList] | None = None) -> dict[int | str, DestinationList]:
    """
    The destination lists of C{mapping}, by rule index or C{"default"}; those unchanged since
    C{previous} (lists by L{DestinationList.key}) are kept as they are.
    """
    policy = policy_of(mapping)
    found: list[tuple[int | str, tuple[Destination, ...]]] = [("default", mapping.default)] if mapping.default else []
    found += [(rule.index, rule.to) for rule in mapping.rules if rule.to]
    lists: dict[int | str, DestinationList] = {}
    for rule, destinations in found:
        key = (mapping.name, rule, destinations, mapping.balance, policy)
        kept = (previous or {}).get(key)
        if kept is None:
            where = f"mapping {mapping.name} " + ("default" if rule == "default" else f"rule {rule}")
            balancer = Balancer([str(d) for d in destinations], clock, mapping.balance, [d.weight for d in destinations], policy, where=where)
            kept = DestinationList(mapping.name, rule, destinations, balancer, key)
        lists[rule] = kept
    return lists


@implementer(IHandshakeListener)
class _CheckProtocol(Protocol):
    """
    One check's connection: passed once connected (TCP) or once the TLS handshake and its
    verification are done; then closed at once.
    """

    def __init__(self, check: "_Target", tls: bool) -> None:
        self.check = check
        self.tls = tls
        self.passed = False

    def connectionMade(self) -> None:
        if not self.tls:
            self.handshakeCompleted()

    def handshakeCompleted(self) -> None:
        self.passed = True
        self.check.finished(None)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.passed:
            self.check.finished(f"TLS failed: {describe_tls_failure(self.transport, reason)}")


class _CheckFactory(Factory):
    noisy = False

    def __init__(self, check: "_Target", tls: bool) -> None:
        self.check = check
        self.tls = tls

    def buildProtocol(self, addr: Any) -> _CheckProtocol:
        return _CheckProtocol(self.check, self.tls)


class _Target:
    """
    One destination checked every C{interval}; its results go to every list it is in.

    @ivar members: (list, index) pairs whose health hears the results.
    """

    def __init__(self, checker: "HealthChecker", destination: Destination, interval: float, timeout: float) -> None:
        self.checker = checker
        self.destination = destination
        self.interval = interval
        self.timeout = timeout
        self.members: list[tuple[DestinationList, int]] = []
        self.endpoints: Any = None
        self._timer: Any = None
        self._deadline: Any = None
        self._connecting: Deferred[Any] | None = None
        self._protocol: _CheckProtocol | None = None

    def start(self) -> None:
        """
        Start checking: the first check at a random moment within the first interval.
        """
        if self._timer is None:
            self._timer = self.checker.clock.callLater(self.checker.random.uniform(0, self.interval), self._run)

    def stop(self) -> None:
        """
        Stop checking; a check in flight is abandoned and reported to nobody.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._settle()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.passed = True  # nothing more to report
            protocol.transport.abortConnection()

    def _run(self) -> None:
        clock = self.checker.clock
        self._timer = clock.callLater(self.interval * self.checker.random.uniform(*JITTER), self._run)
        if self._connecting is not None or self._protocol is not None:
            return  # the previous check is still running (timeout > interval): no overlap
        destination = self.destination
        preamble = build_header(destination.proxy_protocol, ("", 0), ("", 0)) if destination.proxy_protocol else b""
        factory = _CheckFactory(self, destination.tls is not None)
        try:
            d = self.endpoints.endpoint_for_destination(destination, self.timeout, preamble).connect(factory)
        except Exception as e:
            self.finished(f"cannot connect: {e}")
            return
        self._connecting = d
        self._deadline = clock.callLater(self.timeout, self._expire)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: _CheckProtocol) -> None:
        self._connecting = None
        if not protocol.passed:
            self._protocol = protocol  # a TLS handshake to come

    def _failed(self, failure: Failure) -> None:
        if self._connecting is None:
            return  # stopped, or timed out: already handled
        self._connecting = None
        self.finished(failure.getErrorMessage())

    def _expire(self) -> None:
        self._deadline = None
        connecting, self._connecting = self._connecting, None
        protocol, self._protocol = self._protocol, None
        self.finished(f"no answer within {self.timeout:g}s")
        if connecting is not None:
            connecting.cancel()
        if protocol is not None and protocol.transport is not None:
            protocol.passed = True
            protocol.transport.abortConnection()

    def _settle(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def finished(self, error: str | None) -> None:
        """
        The check passed (C{error} is None) or failed: every list containing this destination
        hears it, and the metrics count it.
        """
        if self._timer is None:
            return  # stopped meanwhile
        self._settle()
        self._protocol = None
        metrics = self.checker.metrics
        for destination_list, index in self.members:
            health: DestinationHealth = destination_list.balancer.health[index]
            if error is None:
                health.check_succeeded()
            else:
                health.check_failed(error)
            if metrics is not None:
                metrics.destination_checked(destination_list.mapping, destination_list.rule, health.name, error is None)


class HealthChecker(Service):
    """
    The active health checks of every destination list with C{health_check}.

    @ivar clock: schedules the checks.
    @ivar random: spreads them (seeded in tests).
    @ivar metrics: told of every check result (C{destination_checked}), or L{None}.
    """

    name = "health-checker"

    def __init__(self, clock: IReactorTime, metrics: Any = None, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self.random = rng or random.Random()
        self._targets: dict[tuple[Destination, float, float], _Target] = {}

    def update(self, runtimes: Iterable[Any]) -> None:
        """
        Check the destinations of C{runtimes} (the enabled mappings' L{MappingRuntime}s, with
        their C{balancers} and C{endpoints}) from now on: new ones start, gone ones stop,
        unchanged ones keep their schedule.
        """
        wanted: dict[tuple[Destination, float, float], tuple[Any, list[tuple[DestinationList, int]]]] = {}
        for runtime in runtimes:
            for destination_list in runtime.balancers.values():
                policy = destination_list.balancer.health[0].policy
                if not policy.active:
                    continue
                for index, destination in enumerate(destination_list.destinations):
                    key = (destination, policy.interval, policy.timeout)
                    wanted.setdefault(key, (runtime.endpoints, []))[1].append((destination_list, index))
        for key in [k for k in self._targets if k not in wanted]:
            self._targets.pop(key).stop()
        for key, (endpoints, members) in wanted.items():
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = _Target(self, *key)
                if self.running:
                    target.start()
            target.endpoints, target.members = endpoints, members

    @property
    def checked(self) -> int:
        """
        How many destinations are being checked.
        """
        return len(self._targets)

    def startService(self) -> None:
        super().startService()
        for target in self._targets.values():
            target.start()

    def stopService(self) -> None:
        super().stopService()
        for target in self._targets.values():
            target.stop()


def combine_states(per_process: Iterable[Iterable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    C{GET /destinations} over several worker processes, each with its own health state: one
    entry per (mapping, rule, destination), in the order first seen; C{live} and C{total}
    added up; C{down} when any process sees it down (since the first of them saw it go down,
    with that process's last error), else C{up} (since the last of them saw it come up).
    """
    merged: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for states in per_process:
        for state in states:
            key = (state.get("mapping"), state.get("rule"), state.get("destination"))
            into = merged.get(key)
            if into is None:
                merged[key] = dict(state)
                continue
            into["live"] += state.get("live", 0)
            into["total"] += state.get("total", 0)
            since, known = state.get("since") or "", into.get("since") or ""
            if state.get("state") != into["state"]:
                if state.get("state") == DOWN:
                    into.update(state=DOWN, since=state.get("since"), last_error=state.get("last_error"))
                continue
            # The same state: down since the earliest, up since the latest.
            if (since < known) if into["state"] == DOWN else (since > known):
                into.update(since=state.get("since"), last_error=state.get("last_error") or into.get("last_error"))
    return list(merged.values())
