"""
The active health checker (wingate_map/relay/_health.py) in memory on a simulated clock: checks
spread over the interval, rise and fall through checks, a TLS destination passing only once its
handshake is done, timeouts, a PROXY-protocol destination checked with a LOCAL header, one
check per destination shared by the lists it is in, reload keeping unchanged lists, and
nothing left scheduled once stopped.
"""

from __future__ import annotations

import random

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from wingate_map.relay._balance import DOWN, UP
from wingate_map.config import parse_config
from wingate_map.relay import HealthChecker, build_lists, combine_states
from wingate_map.relay._proxy_protocol import V2_SIGNATURE
from wingate_map.testing import FakeEndpoints


class Runtime:
    """
    The parts of a mapping's runtime the checker reads.
    """

    def __init__(self, mapping, clock, endpoints, previous=None):
        self.mapping = mapping
        self.endpoints = endpoints
        self.balancers = build_lists(mapping, clock, previous)


def setup(text: str, seed: int = 1):
    """
    A started checker over mapping "m" of C{text}: (clock, endpoints, checker, runtime).
    """
    clock, endpoints = Clock(), FakeEndpoints()
    runtime = Runtime(parse_config(text).mapping("m"), clock, endpoints)
    checker = HealthChecker(clock, rng=random.Random(seed))
    checker.update([runtime])
    checker.startService()
    return clock, endpoints, checker, runtime


def config(default: str, extra: str = 'health_check = { interval = 5, timeout = 2, fall = 2, rise = 2 }') -> str:
    return f'[mappings.m]\nport = 9000\nbind = "127.0.0.1"\n{extra}\ndefault = {default}\n'


def settle_all(endpoints: FakeEndpoints, passed: bool) -> None:
    """
    End every pending check attempt: accepted, or refused.
    """
    for attempt in endpoints.attempts:
        if not attempt.deferred.called:
            attempt.succeed() if passed else attempt.fail(ConnectionRefusedError())


def test_checks_are_spread_over_the_interval():
    """
    100 destinations checked every 5 s do not start their checks together: the first checks
    are spread over the first interval, and later ones stay spread (at most a few in any
    tenth of a second), each destination checked about once per interval.
    """
    default = "[" + ", ".join(f'"127.0.{i // 250}.{i % 250 + 1}:80"' for i in range(100)) + "]"
    clock, endpoints, checker, _ = setup(config(default))
    assert checker.checked == 100
    starts = []
    first: dict[str, float] = {}
    for _ in range(300):  # 30 s in steps of 0.1 s
        before = len(endpoints.attempts)
        clock.advance(0.1)
        starts.append(len(endpoints.attempts) - before)
        for attempt in endpoints.attempts[before:]:
            first.setdefault(str(attempt.destination), clock.seconds())
        settle_all(endpoints, True)
    assert max(starts) <= 10, starts
    assert len(first) == 100 and max(first.values()) <= 5.0  # each within the first interval
    assert len({round(t, 1) for t in first.values()}) > 30  # not a few bursts
    per_destination = {}
    for attempt in endpoints.attempts:
        per_destination[str(attempt.destination)] = per_destination.get(str(attempt.destination), 0) + 1
    assert set(per_destination.values()) <= {5, 6, 7}


def test_fall_and_rise_through_checks():
    """
    fall failed checks in a row make a destination down (logged once), rise passed checks in
    a row bring it up again; a pass in between starts the count again.  Results are counted.
    """
    clock, endpoints, checker, runtime = setup(config('"127.0.0.1:1"'))
    state = runtime.balancers["default"].balancer.health[0]

    def check(passed: bool) -> None:
        before = len(endpoints.attempts)
        for _ in range(80):
            clock.advance(0.1)
            if len(endpoints.attempts) > before:
                break
        assert len(endpoints.attempts) == before + 1
        settle_all(endpoints, passed)

    with capturedLogs() as events:
        check(False)
        assert state.state == UP
        check(False)
        assert state.state == DOWN
        check(False)
        check(True)
        assert state.state == DOWN
        check(False)
        check(True)
        check(True)
        assert state.state == UP
    assert [e["state"] for e in events if "state" in e] == [DOWN, UP]
    assert state.checks == 7 and state.check_failures == 4
    assert "refused" in (state.last_error or "").lower()


def test_tls_destination_passes_only_after_its_handshake():
    """
    A TLS destination's check passes once the handshake (verification included) is done, not
    at the TCP connect; a handshake that fails or never comes within timeout fails the check.
    """
    clock, endpoints, checker, runtime = setup(config('{ host = "127.0.0.1", port = 1, tls = true, verify = false }'))
    state = runtime.balancers["default"].balancer.health[0]
    clock.advance(5)
    [attempt] = endpoints.attempts
    attempt.succeed()
    assert state.checks == 0
    attempt.handshake()
    assert state.checks == 1 and state.check_failures == 0
    clock.advance(6)
    attempt = endpoints.attempts[1]
    attempt.succeed()
    attempt.close(clean=False)
    assert state.check_failures == 1 and state.last_error.startswith("TLS failed")
    clock.advance(6)
    attempt = endpoints.attempts[2]
    attempt.succeed()
    clock.advance(2)
    assert state.check_failures == 2 and state.last_error == "no answer within 2s"
    assert attempt.transport.aborted


def test_a_check_that_does_not_connect_times_out_and_checks_never_overlap():
    """
    A connect that hangs fails the check after timeout and is cancelled; with a timeout
    longer than the interval, no second check starts while one is running.
    """
    clock, endpoints, checker, runtime = setup(config('"127.0.0.1:1"', "health_check = { interval = 1, timeout = 3, fall = 1 }"))
    state = runtime.balancers["default"].balancer.health[0]
    clock.advance(1)
    assert len(endpoints.attempts) == 1
    clock.advance(2)  # two intervals later, the first check is still running
    assert len(endpoints.attempts) == 1 and state.checks == 0
    clock.advance(1.01)
    assert state.state == DOWN and state.last_error == "no answer within 3s"
    assert endpoints.attempts[0].deferred.called  # cancelled


def test_proxy_protocol_destination_is_checked_with_a_local_header():
    """
    A destination expecting a PROXY v2 header gets a LOCAL one (no client) at each check.
    """
    clock, endpoints, checker, _ = setup(config('{ host = "127.0.0.1", port = 1, proxy_protocol = "v2" }'))
    clock.advance(5)
    assert endpoints.attempts[0].preamble == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_one_check_per_destination_shared_by_its_lists():
    """
    A destination in two lists is checked once per interval and both lists hear the result;
    without health_check nothing is checked.
    """
    text = config('"127.0.0.1:1"') + '[[mappings.m.rules]]\nfrom = ["10.0.0.0/8"]\nto = ["127.0.0.1:1", "127.0.0.1:2"]\n'
    clock, endpoints, checker, runtime = setup(text)
    assert checker.checked == 2
    clock.advance(5)
    assert sorted(str(a.destination) for a in endpoints.attempts) == ["127.0.0.1:1", "127.0.0.1:2"]
    settle_all(endpoints, True)
    assert runtime.balancers["default"].balancer.health[0].checks == 1
    assert runtime.balancers[0].balancer.health[0].checks == 1
    _, _, passive, _ = setup(config('"127.0.0.1:1"', ""))
    assert passive.checked == 0


def test_stopped_checker_leaves_nothing_scheduled_and_hears_nothing():
    """
    Stopping the checker (at shutdown) cancels its timers and the checks in flight; a late
    answer changes nothing.
    """
    clock, endpoints, checker, runtime = setup(config('["127.0.0.1:1", "127.0.0.1:2"]'))
    clock.advance(5)
    assert endpoints.attempts
    checker.stopService()
    assert clock.getDelayedCalls() == []
    assert all(a.deferred.called for a in endpoints.attempts)
    assert [h.checks for h in runtime.balancers["default"].balancer.health] == [0, 0]


def test_reload_keeps_unchanged_lists_and_their_schedule():
    """
    Lists unchanged by a reload keep their balancer and health; a changed list starts afresh;
    destinations no longer checked stop being checked.
    """
    clock, endpoints, checker, runtime = setup(config('["127.0.0.1:1", "127.0.0.1:2"]') + '[[mappings.m.rules]]\nfrom = ["10.0.0.0/8"]\nto = "127.0.0.1:3"\n')
    previous = {found.key: found for found in runtime.balancers.values()}
    new = Runtime(parse_config(config('["127.0.0.1:1", "127.0.0.1:2"]') + '[[mappings.m.rules]]\nfrom = ["10.0.0.0/8"]\nto = "127.0.0.1:4"\n').mapping("m"), clock, endpoints, previous)
    assert new.balancers["default"] is runtime.balancers["default"]
    assert new.balancers[0] is not runtime.balancers[0]
    checker.update([new])
    assert checker.checked == 3
    clock.advance(10)
    assert "127.0.0.1:3" not in {str(a.destination) for a in endpoints.attempts}
    changed = Runtime(parse_config(config('["127.0.0.1:1", "127.0.0.1:2"]', 'balance = "round-robin"\nhealth_check = { interval = 5, timeout = 2, fall = 2, rise = 2 }')).mapping("m"), clock, endpoints, previous)
    assert changed.balancers["default"] is not runtime.balancers["default"]


def test_states_of_worker_processes_are_combined():
    """
    /destinations over worker processes: counts added up; down when any process sees it down
    (since the first saw it, with its error); up since the last saw it come up.
    """
    def entry(state, since, live, total, error=None):
        return {"mapping": "m", "rule": "default", "destination": "a:1", "state": state, "since": since, "live": live, "total": total, "last_error": error}

    combined = combine_states([[entry("up", "2024-01-01T00:00:00Z", 1, 5)], [entry("down", "2024-01-02T00:00:00Z", 0, 2, "refused")], [entry("down", "2024-01-01T12:00:00Z", 0, 1, "timeout")]])
    assert combined == [entry("down", "2024-01-01T12:00:00Z", 1, 8, "timeout")]
    combined = combine_states([[entry("up", "2024-01-01T00:00:00Z", 1, 5)], [entry("up", "2024-01-03T00:00:00Z", 2, 2)]])
    assert combined == [entry("up", "2024-01-03T00:00:00Z", 3, 7)]
