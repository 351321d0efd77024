"""
Destination choice and health in memory: every balance method, skipping down destinations,
passive marking and retries, active check transitions, counters and state-change logs, on a
simulated clock.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from wingate_map.relay._balance import DOWN, UP, Balancer, HealthPolicy
from wingate_map.config import FAILOVER, LEAST_CONNECTIONS, ROUND_ROBIN, SOURCE_HASH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["10.0.0.30:3389", "10.0.0.31:3389", "10.0.0.32:3389"]


def fail(balancer: Balancer, index: int, times: int, error: str = "connection refused") -> None:
    """
    Make C{times} connections to destination C{index} fail.
    """
    for _ in range(times):
        balancer.health[index].connecting().failed(error)


def firsts(balancer: Balancer, count: int, client_ip: str | None = None) -> list[int]:
    """
    The chosen destination of C{count} connections in a row.
    """
    return [balancer.candidates(client_ip)[0] for _ in range(count)]


def state_logs(events) -> list[str]:
    """
    The state-change log events among C{events}, as "destination state".
    """
    return [f"{e['destination']} {e['state']}" for e in events if "state" in e and "destination" in e]


def test_failover_in_order_skipping_down():
    """
    failover lists the destinations in the order written; a down one is skipped while another
    is up; when all are down, all are tried in order.
    """
    clock = Clock()
    balancer = Balancer(NAMES, clock)
    assert balancer.candidates("10.1.1.1") == [0, 1, 2]
    fail(balancer, 0, 3)
    assert balancer.candidates("10.1.1.1") == [1, 2]
    fail(balancer, 1, 3)
    assert balancer.candidates("10.1.1.1") == [2]
    fail(balancer, 2, 3)
    assert balancer.candidates("10.1.1.1") == [0, 1, 2]


def test_round_robin_equal_weights():
    """
    round-robin takes each destination in turn; the others follow as fallbacks.
    """
    balancer = Balancer(NAMES, Clock(), ROUND_ROBIN)
    lists = [balancer.candidates() for _ in range(6)]
    assert [c[0] for c in lists] == [0, 1, 2, 0, 1, 2]
    assert all(sorted(c) == [0, 1, 2] for c in lists)


def test_round_robin_smooth_weights():
    """
    With weights 5, 1, 1, seven connections go 5, 1 and 1 times to them, spread out the way
    nginx's smooth weighted round robin does (a a b a c a a), not in runs.
    """
    balancer = Balancer(NAMES, Clock(), ROUND_ROBIN, weights=[5, 1, 1])
    assert firsts(balancer, 7) == [0, 0, 1, 0, 2, 0, 0]
    counts = collections.Counter(firsts(balancer, 700))
    assert counts == {0: 500, 1: 100, 2: 100}


def test_round_robin_skips_down():
    """
    A down destination gets no connections; the rest share them by weight.
    """
    clock = Clock()
    balancer = Balancer(NAMES, clock, ROUND_ROBIN, weights=[1, 2, 1])
    fail(balancer, 1, 3)
    counts = collections.Counter(firsts(balancer, 100))
    assert counts == {0: 50, 2: 50}


def test_least_connections():
    """
    least-connections chooses the destination with the fewest live connections for its weight;
    connections count from the moment they start, and ending one frees its place.
    """
    balancer = Balancer(NAMES[:2], Clock(), LEAST_CONNECTIONS, weights=[3, 1])
    attempts = []
    for _ in range(8):
        chosen = balancer.candidates()[0]
        attempts.append((chosen, balancer.health[chosen].connecting()))
    assert [h.live for h in balancer.health] == [6, 2]
    for chosen, attempt in attempts:
        if chosen == 0:
            attempt.succeeded()
            attempt.closed()
    assert balancer.candidates() == [0, 1]
    assert [h.live for h in balancer.health] == [0, 2]


def test_least_connections_ties_by_round_robin():
    """
    Destinations equally loaded are taken in weighted round robin, not always the first.
    """
    balancer = Balancer(NAMES, Clock(), LEAST_CONNECTIONS)
    assert firsts(balancer, 6) == [0, 1, 2, 0, 1, 2]


def test_least_connections_skips_down():
    """
    A down destination is skipped even though it has no live connections.
    """
    balancer = Balancer(NAMES, Clock(), LEAST_CONNECTIONS)
    balancer.health[1].connecting()
    fail(balancer, 0, 3)
    assert balancer.candidates() == [2, 1]


def test_source_hash_sticks_and_spreads():
    """
    source-hash sends a client to the same destination every time, and spreads many clients
    over all destinations about evenly.
    """
    balancer = Balancer(NAMES, Clock(), SOURCE_HASH)
    clients = [f"10.2.{i // 250}.{i % 250}" for i in range(3000)]
    chosen = {ip: balancer.candidates(ip) for ip in clients}
    assert all(balancer.candidates(ip) == chosen[ip] for ip in clients)
    counts = collections.Counter(c[0] for c in chosen.values())
    assert all(800 <= counts[i] <= 1200 for i in range(3)), counts
    assert all(sorted(c) == [0, 1, 2] for c in chosen.values())


def test_source_hash_down_moves_only_its_clients():
    """
    When a destination goes down only its own clients move (to their next choice), and when it
    is up again they come back; a reordered list keeps every client where it was.
    """
    clock = Clock()
    balancer = Balancer(NAMES, clock, SOURCE_HASH, policy=HealthPolicy(active=True))
    clients = [f"192.168.{i // 200}.{i % 200}" for i in range(1000)]
    before = {ip: balancer.candidates(ip) for ip in clients}
    for _ in range(3):
        balancer.health[1].check_failed("timeout")
    during = {ip: balancer.candidates(ip)[0] for ip in clients}
    for ip in clients:
        if before[ip][0] == 1:
            assert during[ip] == before[ip][1]
        else:
            assert during[ip] == before[ip][0]
    for _ in range(2):
        balancer.health[1].check_succeeded()
    assert {ip: balancer.candidates(ip) for ip in clients} == before
    reordered = Balancer(list(reversed(NAMES)), Clock(), SOURCE_HASH)
    assert all(NAMES[before[ip][0]] == reordered.names[reordered.candidates(ip)[0]] for ip in clients)


def test_source_hash_is_stable_across_processes():
    """
    A client reaches the same destination from every process and after a restart: the hash
    does not depend on Python's per-process hash seed.
    """
    script = (
        "import json; from twisted.internet.task import Clock; from wingate_map.relay._balance import Balancer;"
        f"b = Balancer({NAMES!r}, Clock(), 'source-hash');"
        "print(json.dumps([b.candidates(f'10.9.0.{i}') for i in range(50)]))"
    )
    results = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED=seed)
        output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120, check=True)
        results.append(json.loads(output.stdout))
    here = Balancer(NAMES, Clock(), SOURCE_HASH)
    assert results[0] == results[1] == [here.candidates(f"10.9.0.{i}") for i in range(50)]


def test_passive_marking_and_retry():
    """
    fall failed connections in a row make a destination down (a success in between resets the
    count); it is left out, then after interval seconds given one real connection; if that
    fails it waits another interval, and the first success brings it up.  Each change is
    logged once.
    """
    clock = Clock()
    balancer = Balancer(NAMES[:2], clock, policy=HealthPolicy(fall=3, interval=5))
    health = balancer.health[0]
    with capturedLogs() as events:
        fail(balancer, 0, 2)
        health.connecting().succeeded()
        fail(balancer, 0, 2)
        assert health.state == UP
        clock.advance(1)
        fail(balancer, 0, 1, "connection timed out")
        assert (health.state, health.since, health.last_error) == (DOWN, 1, "connection timed out")
        assert balancer.candidates() == [1]
        clock.advance(4.9)
        assert balancer.candidates() == [1]
        clock.advance(0.1)
        assert health.retry_due()
        assert balancer.candidates() == [0, 1]
        retry = health.connecting()
        assert balancer.candidates() == [1], "one retry per interval"
        retry.failed("connection refused")
        assert health.state == DOWN
        clock.advance(5)
        assert balancer.candidates() == [0, 1]
        health.connecting().succeeded()
        assert (health.state, health.since) == (UP, 11)
        assert balancer.candidates() == [0, 1]
    assert state_logs(events) == ["10.0.0.30:3389 down", "10.0.0.30:3389 up"]
    assert "3 failed connections in a row, the last: connection timed out" in events[0]["why"]


def test_active_checks():
    """
    With active checks, fall failed checks make a destination down and rise successful ones in
    a row bring it up (a failure in between starts the count again); a down destination is not
    retried with real connections, and a connection that succeeds while all are down does not
    bring it up.  Failed connections still make it down.
    """
    clock = Clock()
    balancer = Balancer(NAMES[:2], clock, policy=HealthPolicy(fall=2, rise=3, active=True))
    health = balancer.health[0]
    with capturedLogs() as events:
        health.check_failed("timeout")
        health.check_succeeded()
        health.check_failed("timeout")
        assert health.state == UP
        health.check_failed("connection refused")
        assert health.state == DOWN
        clock.advance(3600)
        assert not health.retry_due() and balancer.candidates() == [1]
        health.check_succeeded()
        health.check_succeeded()
        health.check_failed("timeout")
        health.check_succeeded()
        health.check_succeeded()
        fail(balancer, 1, 2)
        assert balancer.candidates() == [0, 1]
        health.connecting().succeeded()
        assert health.state == DOWN
        health.check_succeeded()
        assert (health.state, health.since) == (UP, 3600)
        fail(balancer, 0, 2)
        assert health.state == DOWN
    assert state_logs(events) == [
        "10.0.0.30:3389 down",
        "10.0.0.31:3389 down",
        "10.0.0.30:3389 up",
        "10.0.0.30:3389 down",
    ]
    assert (health.checks, health.check_failures) == (10, 4)


def test_counters_and_attempts():
    """
    live counts connections being made or relayed, total the sessions connected, failures the
    failed connects; reporting an attempt twice changes nothing, and an abandoned attempt is
    neither a success nor a failure.
    """
    clock = Clock()
    clock.advance(1700000000)
    balancer = Balancer(NAMES[:1], clock, policy=HealthPolicy(fall=1))
    health = balancer.health[0]
    first, second, third = health.connecting(), health.connecting(), health.connecting()
    assert health.live == 3
    first.succeeded()
    first.succeeded()
    first.failed("late")
    second.failed("connection refused")
    second.failed("again")
    second.closed()
    assert (health.live, health.total, health.failures, health.state) == (2, 1, 1, DOWN)
    third.closed()
    third.succeeded()
    first.closed()
    first.closed()
    assert (health.live, health.total, health.failures) == (0, 1, 1)
    assert health.as_dict() == {
        "destination": "10.0.0.30:3389",
        "state": "down",
        "since": "2023-11-14T22:13:20Z",
        "live": 0,
        "total": 1,
        "last_error": "connection refused",
    }


def test_a_probe_that_is_never_reported_does_not_block_retries():
    """
    If a retry connection is abandoned without a verdict, the destination is retried again
    after another interval.
    """
    clock = Clock()
    balancer = Balancer(NAMES[:2], clock, policy=HealthPolicy(fall=1, interval=2))
    fail(balancer, 0, 1)
    clock.advance(2)
    balancer.health[0].connecting().closed()
    assert balancer.candidates() == [1]
    clock.advance(2)
    assert balancer.candidates() == [0, 1]


def test_all_down_tries_all_even_when_one_is_due():
    """
    While every destination is down, each connection tries all of them, not only those due for
    a retry.
    """
    clock = Clock()
    balancer = Balancer(NAMES[:2], clock, policy=HealthPolicy(fall=1, interval=5))
    fail(balancer, 0, 1)
    clock.advance(3)
    fail(balancer, 1, 1)
    clock.advance(2)
    assert balancer.health[0].retry_due() and not balancer.health[1].retry_due()
    assert balancer.candidates() == [0, 1]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "random"}, "unknown balance method 'random'"),
        ({"weights": [1, 2]}, "from 1 to 256"),
        ({"weights": [0, 1, 1]}, "from 1 to 256"),
        ({"weights": [1, 257, 1]}, "from 1 to 256"),
        ({"weights": [1, 1.5, 1]}, "from 1 to 256"),
    ],
)
def test_bad_balancer(kwargs, words):
    """
    An unknown method or a weight out of 1-256 is refused with a message saying what is allowed.
    """
    with pytest.raises(ValueError, match=words):
        Balancer(NAMES, Clock(), **kwargs)
    with pytest.raises(ValueError, match="at least one destination"):
        Balancer([], Clock(), FAILOVER)


def test_health_policy_defaults_and_limits():
    """
    health_check defaults to interval 5, timeout 2, fall 3, rise 2; fall and rise are at least
    1 and the times positive.
    """
    assert HealthPolicy() == HealthPolicy(fall=3, rise=2, interval=5.0, timeout=2.0, active=False)
    for bad in ({"fall": 0}, {"rise": 0}, {"interval": 0}, {"timeout": -1}):
        with pytest.raises(ValueError):
            HealthPolicy(**bad)


@pytest.mark.parametrize("method", [FAILOVER, ROUND_ROBIN, LEAST_CONNECTIONS, SOURCE_HASH])
def test_a_single_destination_is_always_the_candidate(method):
    """
    A list of one destination offers it to every connection, whatever the method, while it is
    up and when it is down (all down: all are tried).
    """
    balancer = Balancer(NAMES[:1], Clock(), method=method)
    assert [balancer.candidates("10.1.1.1") for _ in range(3)] == [[0], [0], [0]]
    fail(balancer, 0, 3)
    assert balancer.health[0].state == DOWN
    assert balancer.candidates("10.1.1.1") == [0]
