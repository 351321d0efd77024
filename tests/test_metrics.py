"""
Metrics that fit long TCP sessions: bytes counted while a session runs (never twice, never
going down), every mapping's series from the start, connections that never became sessions,
reloads, build info and the process collector, worker processes merged without
prometheus_client's multiprocess mode; and a Grafana dashboard whose every query names only
metrics a live C{/metrics} exports.  In memory for the collector and merge logic, as real
twistd processes for C{/metrics} and the dashboard.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail, succeed
from twisted.python.failure import Failure

from wingate_map.metrics import DROPS, REFUSALS, Metrics
from wingate_map.proxy_protocol import HEADER_TIMEOUT
from wingate_map.sessions import REASONS, Session
from wingate_map.testing import RelayHarness, simple_mapping
from wingate_map.tls import ServerTls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "docs", "grafana", "wingatemap-dashboard.json")


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of an exposition: (name, sorted labels) -> value.
    """
    if isinstance(text, bytes):
        text = text.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: bytes | str, name: str, **labels: str) -> float | None:
    """
    One sample's value, or None when the exposition lacks it.
    """
    return samples(text).get((name, tuple(sorted(labels.items()))))


class FakeSessions:
    """
    A sessions registry with only what the metrics read: the live sessions, by id.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, Session] = {}

    def add(self, session_id: str, mapping: str = "m") -> Session:
        """
        A new live session.
        """
        session = Session(id=session_id, mapping=mapping, client_ip="10.0.0.1", client_port=1000, local_ip="10.0.0.2", local_port=80, started=0.0)
        self.by_id[session_id] = session
        return session

    def remove(self, session: Session) -> None:
        """
        The relay is done with C{session}.
        """
        del self.by_id[session.id]

    def live(self) -> list[Session]:
        """
        The live sessions.
        """
        return list(self.by_id.values())

    def get(self, session_id: str) -> Session | None:
        """
        The live session with this id.
        """
        return self.by_id.get(session_id)


def _end(metrics: Metrics, session: Session, reason: str = "client-closed") -> None:
    session.reason = reason
    metrics.client_disconnect(session.disconnect_event(10.0))


def test_a_long_sessions_bytes_show_while_it_runs_never_twice_and_never_going_down():
    """
    A session's bytes appear in wingatemap_bytes_total while it runs (not only when it ends);
    at its end, while the relay still lists it and after, they are counted exactly once; a
    session a dead worker carried (reason lost) adds no bytes of its own; the counter never
    goes down at any scrape.
    """
    sessions = FakeSessions()
    metrics = Metrics(sessions, mappings=lambda: ["m"])
    seen: list[tuple[float, float]] = []

    def scrape() -> tuple[float, float]:
        text = metrics.render()
        now = (value(text, "wingatemap_bytes_total", mapping="m", direction="from_client"), value(text, "wingatemap_bytes_total", mapping="m", direction="to_client"))
        if seen:
            assert now[0] >= seen[-1][0] and now[1] >= seen[-1][1], (seen, now)
        seen.append(now)
        return now

    assert scrape() == (0, 0)
    first, other = sessions.add("s-1"), sessions.add("s-2")
    metrics.client_connect(first.connect_event(0.0))
    first.bytes_from_client, first.bytes_to_client = 1000, 50
    assert scrape() == (1000, 50)  # live, an hour before it ends
    first.bytes_from_client, first.bytes_to_client = 1500, 70
    other.bytes_to_client = 5
    assert scrape() == (1500, 75)
    _end(metrics, first)  # the event comes first; the relay removes the session after it
    assert scrape() == (1500, 75)
    sessions.remove(first)
    assert scrape() == (1500, 75)
    other.bytes_to_client = 9
    _end(metrics, other, "killed")
    sessions.remove(other)
    assert scrape() == (1500, 79)
    lost = dict(first.disconnect_event(20.0), session="w-1", reason="lost", bytes_from_client=700)
    metrics.client_disconnect(lost)
    text = metrics.render()
    assert scrape() == (1500, 79)
    assert value(text, "wingatemap_sessions_ended_total", mapping="m", reason="lost") == 1
    assert value(text, "wingatemap_sessions_ended_total", mapping="m", reason="killed") == 1
    assert value(text, "wingatemap_connections_accepted_total", mapping="m") == 1


def test_many_ended_sessions_are_forgotten_once_removed():
    """
    The sessions ended but not yet removed are remembered only until the relay removes them:
    thousands of sessions leave nothing behind, and the totals stay exact.
    """
    sessions = FakeSessions()
    metrics = Metrics(sessions, mappings=lambda: ["m"])
    for i in range(3000):
        session = sessions.add(f"s-{i}")
        session.bytes_from_client = 2
        _end(metrics, session)
        sessions.remove(session)
    assert len(metrics._ended) <= 1024
    assert value(metrics.render(), "wingatemap_bytes_total", mapping="m", direction="from_client") == 6000


def test_every_enabled_mapping_has_every_series_at_zero_from_the_start_and_after_a_reload():
    """
    Before any connection, each enabled mapping has accepted, active, bytes each way, every
    refusal, end and drop reason, and the connect latency histogram, all 0; a mapping a reload
    adds has them at the next scrape; a mapping a reload removes keeps its counters.
    """
    enabled = ["web", "db"]
    metrics = Metrics(FakeSessions(), mappings=lambda: list(enabled))
    text = metrics.render()
    for mapping in enabled:
        assert value(text, "wingatemap_connections_accepted_total", mapping=mapping) == 0
        assert value(text, "wingatemap_connections_active", mapping=mapping) == 0
        for direction in ("from_client", "to_client"):
            assert value(text, "wingatemap_bytes_total", mapping=mapping, direction=direction) == 0
        for reason in REFUSALS:
            assert value(text, "wingatemap_connections_refused_total", mapping=mapping, reason=reason) == 0
        for reason in REASONS:
            assert value(text, "wingatemap_sessions_ended_total", mapping=mapping, reason=reason) == 0
        for reason in DROPS:
            assert value(text, "wingatemap_connections_dropped_total", mapping=mapping, reason=reason) == 0
        assert value(text, "wingatemap_connect_latency_seconds_count", mapping=mapping) == 0
        assert value(text, "wingatemap_connect_latency_seconds_bucket", mapping=mapping, le="+Inf") == 0
    enabled[:] = ["web", "new"]
    text = metrics.render()
    assert value(text, "wingatemap_connections_accepted_total", mapping="new") == 0
    assert value(text, "wingatemap_bytes_total", mapping="new", direction="to_client") == 0
    assert value(text, "wingatemap_connections_accepted_total", mapping="db") == 0
    assert "_created" not in text.decode()


def test_connections_that_never_became_sessions_are_counted_by_mapping_and_reason():
    """
    not_a_session counts a dropped connection under its mapping and reason, and nothing else.
    """
    metrics = Metrics(FakeSessions(), mappings=lambda: ["m"])
    metrics.not_a_session("m", "proxy-invalid")
    metrics.not_a_session("m", "proxy-invalid")
    metrics.not_a_session("tls", "tls-failed")
    text = metrics.render()
    assert value(text, "wingatemap_connections_dropped_total", mapping="m", reason="proxy-invalid") == 2
    assert value(text, "wingatemap_connections_dropped_total", mapping="tls", reason="tls-failed") == 1
    assert value(text, "wingatemap_connections_dropped_total", mapping="tls", reason="tls-timeout") == 0
    assert value(text, "wingatemap_connections_accepted_total", mapping="m") == 0


def _proxied_harness(**kwargs):
    from wingate_map.config import Destination, parse_location

    harness = RelayHarness(simple_mapping(Destination(host="10.0.0.1", port=80), proxy_protocol=True, proxy_protocol_from=(parse_location("127.0.0.0/8"),), **kwargs))
    metrics = Metrics(harness.sessions)
    harness.factory.runtime.metrics = metrics
    return harness, metrics


@pytest.mark.parametrize(
    "peer, data, reason",
    [
        ("10.9.9.9", None, "proxy-untrusted"),
        ("127.0.0.9", b"PROXY TCP4 1.2.3.4\r\n", "proxy-invalid"),
        ("127.0.0.9", b"GET / HTTP/1.0\r\n", "proxy-invalid"),
        ("127.0.0.9", b"PROXY TCP4 1.2", "proxy-timeout"),
        ("127.0.0.9", b"", "proxy-closed"),
    ],
)
def test_the_relay_counts_a_dropped_proxy_connection_once_with_its_reason(peer, data, reason):
    """
    A PROXY-protocol connection from an untrusted peer, with a malformed or missing header, one
    that sends no complete header in time, or one that closes before it: counted once under
    the mapping and its reason, with no session and no accepted connection.
    """
    harness, metrics = _proxied_harness()
    client, transport = harness.accept(client_ip=peer)
    if data:
        client.dataReceived(data)
    if reason == "proxy-timeout":
        harness.clock.advance(HEADER_TIMEOUT + 0.1)
    if reason == "proxy-closed":
        client.readConnectionLost()
    client.connectionLost()
    text = metrics.render()
    assert value(text, "wingatemap_connections_dropped_total", mapping="test", reason=reason) == 1
    assert sum(v for (name, _), v in samples(text).items() if name == "wingatemap_connections_dropped_total") == 1
    assert value(text, "wingatemap_connections_accepted_total", mapping="test") == 0 and harness.sink.events == []


@pytest.mark.parametrize("reason", ["tls-failed", "tls-timeout"])
def test_the_relay_counts_a_failed_or_slow_client_tls_handshake_once(reason):
    """
    A TLS mapping's client whose handshake fails, or does not finish in time: counted once
    under the mapping and tls-failed / tls-timeout, with no session.
    """
    from OpenSSL.SSL import Error as SSLError

    from wingate_map.config import Destination

    harness = RelayHarness(simple_mapping(Destination(host="10.0.0.1", port=80), tls=ServerTls(cert="unused.pem", key="unused.key")))
    metrics = Metrics(harness.sessions)
    harness.factory.runtime.metrics = metrics
    client, _ = harness.accept()
    if reason == "tls-timeout":
        harness.clock.advance(HEADER_TIMEOUT + 0.1)
        client.connectionLost()
    else:
        client.connectionLost(Failure(SSLError([("SSL routines", "", "wrong version number")])))
    text = metrics.render()
    assert value(text, "wingatemap_connections_dropped_total", mapping="test", reason=reason) == 1
    assert sum(v for (name, _), v in samples(text).items() if name == "wingatemap_connections_dropped_total") == 1
    assert harness.sink.events == []


def test_reloads_are_counted_and_the_last_success_is_timed():
    """
    Reloads are counted by result (both at 0 from the start); the time of the last successful
    load is the start until a reload succeeds, and a refused reload does not move it.
    """
    clock = [1000.0]
    metrics = Metrics(FakeSessions(), now=lambda: clock[0])
    text = metrics.render()
    assert value(text, "wingatemap_reloads_total", result="success") == 0 and value(text, "wingatemap_reloads_total", result="failure") == 0
    assert value(text, "wingatemap_last_reload_success_timestamp_seconds") == 1000.0
    clock[0] = 2000.0
    metrics.reloaded(True)
    clock[0] = 3000.0
    metrics.reloaded(False)
    metrics.reloaded(False)
    text = metrics.render()
    assert value(text, "wingatemap_reloads_total", result="success") == 1 and value(text, "wingatemap_reloads_total", result="failure") == 2
    assert value(text, "wingatemap_last_reload_success_timestamp_seconds") == 2000.0


def test_build_info_and_the_process_collector():
    """
    Build info names wingatemap's version, Python's and Twisted's; the process collector's
    CPU, memory and file descriptor series are there.
    """
    import platform

    import twisted

    from wingate_map.cli import version

    text = Metrics(FakeSessions()).render()
    assert value(text, "wingatemap_build_info", version=version(), python=platform.python_version(), twisted=twisted.__version__) == 1
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"):
        assert value(text, name) is not None, name


def test_two_services_in_one_process_do_not_collide():
    """
    Two services' metrics in one process are independent, and building them changes nothing
    process-wide (no prometheus_client multiprocess environment).
    """
    before = dict(os.environ)
    one, two = FakeSessions(), FakeSessions()
    first, second = Metrics(one, mappings=lambda: ["m"]), Metrics(two, mappings=lambda: ["m"])
    first.client_connect(one.add("a").connect_event(0.0))
    one.by_id["a"].bytes_from_client = 10
    assert value(first.render(), "wingatemap_connections_accepted_total", mapping="m") == 1
    assert value(second.render(), "wingatemap_connections_accepted_total", mapping="m") == 0
    assert value(second.render(), "wingatemap_bytes_total", mapping="m", direction="from_client") == 0
    assert dict(os.environ) == before


# -- worker processes, merged --------------------------------------------------------------------


def _worker_text(accepted: float, active: float, sent: float, latency: tuple[float, ...] = (), cpu: float = 1.0, reloads: float = 0) -> str:
    """
    A worker's exposition, as a real one renders it.
    """
    sessions = FakeSessions()
    worker = Metrics(sessions, mappings=lambda: ["m"])
    for i in range(int(accepted)):
        worker.client_connect({"mapping": "m"})
    for i in range(int(active)):
        sessions.add(f"w-{i}").bytes_from_client = int(sent) if i == 0 else 0
    for seconds in latency:
        worker.observe_connect("m", seconds)
    for _ in range(int(reloads)):
        worker.reloaded(True)
    text = worker.render().decode()
    return re.sub(r"^process_cpu_seconds_total .*$", f"process_cpu_seconds_total {cpu}", text, flags=re.MULTILINE)


class FakeWorkers:
    """
    The running workers, and what each answers to a scrape.
    """

    def __init__(self) -> None:
        self.running: dict[int, int] = {}  # worker -> pid
        self.answers: dict[int, str | None] = {}  # pid -> text, None: no answer

    def __call__(self) -> list[tuple[int, int, str]]:
        return [(index, pid, f"/run/worker-{index}.sock") for index, pid in sorted(self.running.items())]

    def fetch(self, reactor, path, timeout):
        pid = self.running[int(path.rsplit("-", 1)[1].split(".")[0])]
        answer = self.answers.get(pid)
        return fail(ConnectionRefusedError("no answer")) if answer is None else succeed(answer)


def _scrape(metrics: Metrics) -> str:
    result = []
    metrics.exposition().addCallback(result.append)
    [text] = result
    return text.decode()


def test_workers_expositions_are_merged_and_a_dead_workers_counters_never_go_back():
    """
    The primary's /metrics adds every worker's series to its own (counters, gauges, histogram
    buckets), labels each process's process_* series with its worker number, and shows build
    info and reloads of the primary only.  A worker that does not answer counts with its last
    answer; when it exits its counters are kept and its gauges dropped, so no counter goes
    down, also once a new worker starts from zero.
    """
    sessions = FakeSessions()
    workers = FakeWorkers()
    primary = Metrics(sessions, mappings=lambda: ["m"], workers=workers, fetch=workers.fetch)
    primary.client_connect({"mapping": "m"})
    sessions.add("p-1").bytes_from_client = 5
    primary.observe_connect("m", 0.003)
    workers.running[1] = 111
    workers.answers[111] = _worker_text(accepted=4, active=2, sent=100, latency=(0.003, 2.0), cpu=7.0, reloads=3)
    text = _scrape(primary)
    assert value(text, "wingatemap_connections_accepted_total", mapping="m") == 5
    assert value(text, "wingatemap_connections_active", mapping="m") == 3
    assert value(text, "wingatemap_bytes_total", mapping="m", direction="from_client") == 105
    assert value(text, "wingatemap_connect_latency_seconds_bucket", mapping="m", le="0.005") == 2
    assert value(text, "wingatemap_connect_latency_seconds_bucket", mapping="m", le="2.5") == 3
    assert value(text, "wingatemap_connect_latency_seconds_count", mapping="m") == 3
    assert value(text, "process_cpu_seconds_total", worker="1") == 7.0
    assert value(text, "process_cpu_seconds_total", worker="0") is not None
    assert value(text, "process_cpu_seconds_total") is None
    assert value(text, "wingatemap_reloads_total", result="success") == 0  # the primary's
    assert len([k for k in samples(text) if k[0] == "wingatemap_build_info"]) == 1
    assert "_created" not in text

    workers.answers[111] = None  # busy, or dying: its last answer counts
    assert value(_scrape(primary), "wingatemap_connections_accepted_total", mapping="m") == 5

    del workers.running[1]  # it exits (the pool forgets its pid, then tells the metrics)
    primary.process_gone(111)
    primary.client_disconnect(dict(Session(id="w-0", mapping="m", client_ip="1.2.3.4", client_port=1, local_ip="x", local_port=2, started=0.0, reason="lost").disconnect_event(1.0), bytes_from_client=100))
    text = _scrape(primary)
    assert value(text, "wingatemap_connections_accepted_total", mapping="m") == 5
    assert value(text, "wingatemap_bytes_total", mapping="m", direction="from_client") == 105  # not 205: no double count
    assert value(text, "wingatemap_connections_active", mapping="m") == 1  # its sessions are gone
    assert value(text, "wingatemap_connect_latency_seconds_count", mapping="m") == 3
    assert value(text, "wingatemap_sessions_ended_total", mapping="m", reason="lost") == 1
    assert value(text, "process_cpu_seconds_total", worker="1") is None

    workers.running[1] = 222  # restarted: it starts from zero
    workers.answers[222] = _worker_text(accepted=1, active=1, sent=10)
    text = _scrape(primary)
    assert value(text, "wingatemap_connections_accepted_total", mapping="m") == 6
    assert value(text, "wingatemap_bytes_total", mapping="m", direction="from_client") == 115
    assert value(text, "wingatemap_connections_active", mapping="m") == 2


def test_an_answer_from_a_worker_that_exited_meanwhile_is_not_counted_twice():
    """
    A worker that answers a scrape and exits before the answer is used: its counters are
    counted once (as kept at its exit), not once more from the late answer.
    """
    workers = FakeWorkers()
    workers.running[1] = 111
    workers.answers[111] = _worker_text(accepted=2, active=0, sent=0)
    primary = Metrics(FakeSessions(), mappings=lambda: ["m"], workers=workers, fetch=lambda *a: late)
    from twisted.internet.defer import Deferred

    late = succeed(workers.answers[111])
    assert value(_scrape(primary), "wingatemap_connections_accepted_total", mapping="m") == 2
    late = Deferred()
    result = []
    primary.exposition().addCallback(result.append)
    del workers.running[1]
    primary.process_gone(111)
    late.callback(_worker_text(accepted=3, active=0, sent=0))
    assert value(result[0], "wingatemap_connections_accepted_total", mapping="m") == 2
    assert value(_scrape(primary), "wingatemap_connections_accepted_total", mapping="m") == 2
