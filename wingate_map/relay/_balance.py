"""
Choosing among a list of destinations (C{balance}) and keeping track of each one's health.

A L{Balancer} holds one destination list's state (per list and per process, as SPEC §2 says) and
answers L{Balancer.candidates}: the order in which to try its destinations for one connection,
the chosen one first and the others as fallbacks.  Methods:

 - C{failover}: in the order written.
 - C{round-robin}: smooth weighted round robin (nginx's): over C{weight_1 + ... + weight_n}
   connections each destination is chosen C{weight} times, spread out rather than in runs.
 - C{least-connections}: the one with the fewest live connections for its C{weight}
   (C{live / weight}); ties are broken by weighted round robin.
 - C{source-hash}: by client address, with rendezvous (highest random weight) hashing on a
   stable hash (BLAKE2b): a client reaches the same destination while the set of up destinations
   is unchanged, and when one goes down only its own clients move.  C{weight} is not used.

Destinations that are down are left out while another is up; when all are down, all are tried
in the method's order.

A L{DestinationHealth} follows one destination, from the connections made to it (passive) and
from active checks when C{health_check} is set:

 - C{fall} failed connections in a row, or C{fall} failed checks in a row: down.
 - Without active checks, a down destination is given one real connection again every
   C{interval} seconds (it becomes a candidate again; the first connection to it is the
   retry), and is up at the first success.
 - With active checks, C{rise} successful checks in a row bring it up; a successful connection
   to a down destination (tried because all were down) does not, the checks decide.

State changes are logged once each.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any, Sequence

from attrs import field, frozen, validators
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..config import FAILOVER, LEAST_CONNECTIONS, MAX_WEIGHT, METHODS, ROUND_ROBIN, SOURCE_HASH

_log = Logger(namespace="wingate_map.balance")  # the name log lines carried before the module moved here

UP = "up"
DOWN = "down"


@frozen
class HealthPolicy:
    """
    How a destination list judges health (C{health_check}'s values and defaults).

    @ivar fall: failed checks, or failed connections, in a row that make a destination down.
    @ivar rise: successful checks in a row that make it up again (active checks only).
    @ivar interval: seconds between checks; without active checks, between retries of a down
        destination.
    @ivar timeout: seconds a check may take (for the checker; not used here).
    @ivar active: whether active checks run.
    """

    fall: int = field(default=3, validator=validators.ge(1))
    rise: int = field(default=2, validator=validators.ge(1))
    interval: float = field(default=5.0, validator=validators.gt(0))
    timeout: float = field(default=2.0, validator=validators.gt(0))
    active: bool = False


class DestinationHealth:
    """
    The health and counters of one destination in one list.

    @ivar state: L{UP} or L{DOWN}.  A destination starts up.
    @ivar since: when the state last changed (the clock's seconds; the start for the first).
    @ivar live: connections being made or relayed to it now.
    @ivar total: sessions connected to it so far.
    @ivar failures: connections to it that failed so far.
    @ivar checks: active checks run; C{check_failures}: those that failed.
    @ivar last_error: the last failed connection's or check's reason, or C{None}.
    """

    def __init__(self, name: str, policy: HealthPolicy, clock: IReactorTime, where: str = "") -> None:
        """
        @param name: the destination as events spell it (C{10.0.0.30:3389}).
        @param where: which list it is in, for logs (such as C{mapping rdp rule 2}).
        """
        self.name = name
        self.where = where
        self.policy = policy
        self._clock = clock
        self.state = UP
        self.since = clock.seconds()
        self.live = 0
        self.total = 0
        self.failures = 0
        self.checks = 0
        self.check_failures = 0
        self.last_error: str | None = None
        self._failed_connections = 0  # in a row
        self._failed_checks = 0  # in a row
        self._passed_checks = 0  # in a row
        self._next_retry = 0.0

    @property
    def up(self) -> bool:
        """
        Whether the destination is up.
        """
        return self.state == UP

    def retry_due(self) -> bool:
        """
        Whether a down destination should get a real connection again now: only without active
        checks, once every C{interval} seconds.
        """
        return self.state == DOWN and not self.policy.active and self._clock.seconds() >= self._next_retry

    def connecting(self) -> "Attempt":
        """
        A connection to this destination is starting: it counts as live at once (so that
        least-connections sees it) and the returned L{Attempt} reports how it went.
        """
        self.live += 1
        if self.state == DOWN:
            self._next_retry = self._clock.seconds() + self.policy.interval
        return Attempt(self)

    def check_succeeded(self) -> None:
        """
        An active check passed: C{rise} in a row bring a down destination up.
        """
        self.checks += 1
        self._failed_checks = 0
        self._passed_checks += 1
        if self.state == DOWN and self._passed_checks >= self.policy.rise:
            self._change(UP, f"{self._passed_checks} successful checks in a row")

    def check_failed(self, error: str) -> None:
        """
        An active check failed with C{error}: C{fall} in a row make the destination down.
        """
        self.checks += 1
        self.check_failures += 1
        self.last_error = error
        self._passed_checks = 0
        self._failed_checks += 1
        if self.state == UP and self._failed_checks >= self.policy.fall:
            self._change(DOWN, f"{self._failed_checks} failed checks in a row, the last: {error}")

    def as_dict(self) -> dict[str, Any]:
        """
        The fields C{GET /destinations} shows for this destination (without mapping and rule).
        """
        return {
            "destination": self.name,
            "state": self.state,
            "since": datetime.fromtimestamp(self.since, timezone.utc).isoformat().replace("+00:00", "Z"),
            "live": self.live,
            "total": self.total,
            "last_error": self.last_error,
        }

    def _connected(self) -> None:
        self.total += 1
        self._failed_connections = 0
        if self.state == DOWN and not self.policy.active:
            self._change(UP, "a connection succeeded")

    def _connect_failed(self, error: str) -> None:
        self.live -= 1
        self.failures += 1
        self.last_error = error
        self._failed_connections += 1
        if self.state == UP and self._failed_connections >= self.policy.fall:
            self._change(DOWN, f"{self._failed_connections} failed connections in a row, the last: {error}")

    def _closed(self) -> None:
        self.live -= 1

    def _change(self, state: str, why: str) -> None:
        self.state = state
        self.since = self._clock.seconds()
        self._failed_connections = self._failed_checks = self._passed_checks = 0
        where = f"{self.where}: " if self.where else ""
        if state == DOWN:
            self._next_retry = self.since + self.policy.interval
            _log.warn("{where}destination {destination} is down: {why}", where=where, destination=self.name, state=state, why=why)
        else:
            _log.info("{where}destination {destination} is up: {why}", where=where, destination=self.name, state=state, why=why)


class Attempt:
    """
    One connection to a destination, from its start: report L{succeeded} or L{failed}, and
    L{closed} when a session that succeeded ends.  Reports after the first of each kind are
    ignored, so counters never drift.
    """

    def __init__(self, health: DestinationHealth) -> None:
        self._health = health
        self._state = "connecting"

    def succeeded(self) -> None:
        """
        The connection was made (and its TLS handshake, if any, completed).
        """
        if self._state == "connecting":
            self._state = "connected"
            self._health._connected()

    def failed(self, error: str) -> None:
        """
        The connection could not be made: C{error} says why (refused, timeout, TLS failed).
        """
        if self._state == "connecting":
            self._state = "done"
            self._health._connect_failed(error)

    def closed(self) -> None:
        """
        The session relayed to this destination is over; or the attempt was abandoned before
        it finished (then it counts neither as success nor failure).
        """
        if self._state in ("connecting", "connected"):
            self._state = "done"
            self._health._closed()


class Balancer:
    """
    One destination list's choice of destination, by C{method}.
    """

    def __init__(
        self,
        names: Sequence[str],
        clock: IReactorTime,
        method: str = FAILOVER,
        weights: Sequence[int] | None = None,
        policy: HealthPolicy | None = None,
        where: str = "",
    ) -> None:
        """
        @param where: which list this is, for logs (such as C{mapping rdp rule 2}).
        @param names: the destinations as events spell them (C{host:port} or an endpoint),
            in the order written; source-hash hashes these names, so a reordered list keeps
            its clients.
        @param weights: each destination's C{weight} (1-256); default 1 each.
        @raise ValueError: for an unknown method, a weight out of range, or an empty list.
        """
        if method not in METHODS:
            raise ValueError(f"unknown balance method {method!r}: expected one of {', '.join(METHODS)}")
        if not names:
            raise ValueError("a destination list needs at least one destination")
        weights = [1] * len(names) if weights is None else list(weights)
        if len(weights) != len(names) or not all(isinstance(w, int) and 1 <= w <= MAX_WEIGHT for w in weights):
            raise ValueError(f"each weight must be an integer from 1 to {MAX_WEIGHT}, one per destination")
        policy = HealthPolicy() if policy is None else policy
        self.names = tuple(names)
        self.method = method
        self.weights = tuple(weights)
        self.health = tuple(DestinationHealth(name, policy, clock, where) for name in names)
        self._current = [0] * len(names)  # smooth weighted round robin's running weights

    def candidates(self, client_ip: str | None = None) -> list[int]:
        """
        The indexes of the destinations to try for a client at C{client_ip} (its canonical
        address text; used by source-hash), in order: the chosen one first, then fallbacks.
        Down destinations are left out while another is up (one due for a retry counts as up);
        when all are down, all are listed.
        """
        if len(self.names) == 1:
            return [0]  # what every method below gives for one destination, up or down
        everyone = range(len(self.names))
        eligible = [i for i in everyone if self.health[i].up or self.health[i].retry_due()]
        if not any(self.health[i].up for i in eligible):
            eligible = list(everyone)
        if self.method == ROUND_ROBIN:
            return self._round_robin(eligible)
        if self.method == LEAST_CONNECTIONS:
            return self._least_connections(eligible)
        if self.method == SOURCE_HASH:
            return sorted(eligible, key=lambda i: (-_score(client_ip or "", self.names[i]), i))
        return eligible

    def _round_robin(self, among: list[int]) -> list[int]:
        chosen = self._pick(among)
        rest = sorted((i for i in among if i != chosen), key=lambda i: (-self._current[i], i))
        return [chosen, *rest]

    def _least_connections(self, among: list[int]) -> list[int]:
        load = {i: Fraction(self.health[i].live, self.weights[i]) for i in among}
        least = min(load.values())
        chosen = self._pick([i for i in among if load[i] == least])
        rest = sorted((i for i in among if i != chosen), key=lambda i: (load[i], i))
        return [chosen, *rest]

    def _pick(self, among: list[int]) -> int:
        """
        Smooth weighted round robin over C{among}: raise each one's running weight by its
        weight, choose the highest, lower it by the sum.
        """
        total = 0
        best = among[0]
        for i in among:
            self._current[i] += self.weights[i]
            total += self.weights[i]
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= total
        return best


def _score(client_ip: str, name: str) -> int:
    """
    The rendezvous score of destination C{name} for C{client_ip}: a stable 64-bit hash, the
    same in every process and run (unlike Python's salted C{hash()}).
    """
    digest = hashlib.blake2b(f"{client_ip}\x00{name}".encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")
