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

from wingate_map.events._metrics import DROPS, REFUSALS, Metrics
from wingate_map.relay._proxy_protocol import HEADER_TIMEOUT
from wingate_map.values import REASONS
from wingate_map.sessions import Session
from wingate_map.testing import RelayHarness, simple_mapping
from wingate_map.tls import ServerTls

from .helpers import free_port

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


def assert_one_family_per_name(text: str) -> None:
    """
    Each metric family appears once in an exposition, and each sample once.
    """
    types = re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE)
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    lines = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(set(lines)), sorted(line for line in lines if lines.count(line) > 1)


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
    assert_one_family_per_name(text)
    assert len([line for line in text.splitlines() if line.startswith("wingatemap_build_info")]) == 1
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


# -- the dashboard ----------------------------------------------------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """
    The metric names a PromQL expression selects (not functions, keywords, labels, strings,
    ranges or dashboard variables).
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if not match.group(2) and match.group(1).lower() not in _PROMQL_WORDS:
            names.add(match.group(1))
    return names


def dashboard_queries() -> list[str]:
    """
    Every PromQL expression of the shipped dashboard: panel targets, annotations, and the
    metric of each variable's label_values() query.
    """
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    queries = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        queries += [target["expr"] for target in panel.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        match = re.match(r"label_values\((.*),\s*\w+\)$", text)
        if match:
            queries.append(match.group(1))
    return queries


def test_promql_metric_names_are_read_correctly():
    """
    The dashboard check reads metric names out of PromQL as Prometheus would: suffixes kept,
    functions, aggregation clauses, label matchers, ranges and variables left out.
    """
    expr = 'histogram_quantile(0.9, sum by (le, mapping) (rate(wingatemap_connect_latency_seconds_bucket{mapping=~"$mapping", le!="x y"}[$__rate_interval]))) / on(instance) group_left sum without (job) (up) * 8 + time() - max(wingatemap_x_total offset 5m)'
    assert promql_metric_names(expr) == {"wingatemap_connect_latency_seconds_bucket", "up", "wingatemap_x_total"}


def assert_dashboard_matches(exposition: str) -> None:
    """
    Every metric name a dashboard query uses is exported by this live exposition, and the
    dashboard covers connections, refusals, connections that never became sessions, bytes,
    connect latency and reloads.
    """
    exported = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    used: set[str] = set()
    for query in dashboard_queries():
        names = promql_metric_names(query)
        assert names, f"no metric in dashboard query {query!r}"
        missing = names - exported
        assert not missing, f"dashboard query {query!r} uses {sorted(missing)}, not in /metrics"
        used |= names
    assert {
        "wingatemap_connections_accepted_total",
        "wingatemap_connections_active",
        "wingatemap_connections_refused_total",
        "wingatemap_connections_dropped_total",
        "wingatemap_bytes_total",
        "wingatemap_connect_latency_seconds_bucket",
        "wingatemap_reloads_total",
        "wingatemap_last_reload_success_timestamp_seconds",
    } <= used


# -- real processes -------------------------------------------------------------------------------


def _scrape_live(admin: int) -> str:
    from .test_operations import api

    status, text = api(admin, "GET", "/metrics")
    assert status == 200, text
    return text


def test_live_metrics_of_a_running_service_and_the_dashboard(tmp_path):
    """
    A running wingatemap: every enabled mapping's series exist at 0 before any connection, the
    dashboard's every query names a metric /metrics exports, and the reference lists exactly
    the metrics it exports; a session's bytes show while
    it runs and count once after it ends; a bad PROXY header and a failed client TLS
    handshake are counted as connections that never became sessions; reloads are counted
    (applied and refused), a mapping a reload adds has its series at once, and only an
    applied reload moves the last-reload time.
    """
    from .pki import PKI
    from .test_operations import TOKEN, EchoServer, api, connect, start

    echo = EchoServer()
    web, proxied, secure, admin = (free_port() for _ in range(4))
    cert, key = PKI(tmp_path).issue("gw", "localhost", names=("127.0.0.1",))

    def config(extra: str = "") -> str:
        return (
            f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
            f'[mappings.web]\nport = {web}\nbind = "127.0.0.1"\ndefault = "127.0.0.1:{echo.port}"\n'
            f'[mappings.proxied]\nport = {proxied}\nbind = "127.0.0.1"\nproxy_protocol = true\ndefault = "127.0.0.1:{echo.port}"\n'
            f'[mappings.secure]\nport = {secure}\nbind = "127.0.0.1"\ntls = {{ cert = "{cert}", key = "{key}" }}\ndefault = "127.0.0.1:{echo.port}"\n'
            f'[mappings.off]\nport = {free_port()}\nbind = "127.0.0.1"\nenabled = false\ndefault = "127.0.0.1:{echo.port}"\n' + extra
        )

    proc, path = start(tmp_path, config())
    try:
        proc.wait_line(r"admin API listening")
        text = _scrape_live(admin)
        for mapping in ("web", "proxied", "secure"):
            assert value(text, "wingatemap_connections_accepted_total", mapping=mapping) == 0
            assert value(text, "wingatemap_bytes_total", mapping=mapping, direction="to_client") == 0
            assert value(text, "wingatemap_connections_dropped_total", mapping=mapping, reason="tls-failed") == 0
        assert value(text, "wingatemap_connections_accepted_total", mapping="off") is None
        assert_one_family_per_name(text)
        assert_dashboard_matches(text)
        assert_reference_matches(text)
        started = value(text, "wingatemap_last_reload_success_timestamp_seconds")

        client = connect(web)
        client.sendall(b"x" * 1000)
        received = 0
        while received < 1000:
            received += len(client.recv(65536))
        text = _scrape_live(admin)  # the session is still open
        assert value(text, "wingatemap_bytes_total", mapping="web", direction="from_client") == 1000
        assert value(text, "wingatemap_bytes_total", mapping="web", direction="to_client") == 1000
        assert value(text, "wingatemap_connections_active", mapping="web") == 1
        client.close()
        proc.wait_line(r"ClientDisconnect")
        text = _scrape_live(admin)
        assert value(text, "wingatemap_bytes_total", mapping="web", direction="from_client") == 1000
        assert value(text, "wingatemap_connections_active", mapping="web") == 0
        assert value(text, "wingatemap_sessions_ended_total", mapping="web", reason="client-closed") == 1

        bad = connect(proxied)
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        proc.wait_line(r"mapping proxied: closed connection from 127\.0\.0\.1")
        plain = connect(secure)
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        proc.wait_line(r"mapping secure: TLS handshake with 127\.0\.0\.1:\d+ failed")
        bad.close()
        plain.close()
        text = _scrape_live(admin)
        assert value(text, "wingatemap_connections_dropped_total", mapping="proxied", reason="proxy-invalid") == 1
        assert value(text, "wingatemap_connections_dropped_total", mapping="secure", reason="tls-failed") == 1
        assert value(text, "wingatemap_connections_accepted_total", mapping="proxied") == 0

        path.write_text(config(f'[mappings.added]\nport = {free_port()}\nbind = "127.0.0.1"\ndefault = "127.0.0.1:{echo.port}"\n'))
        assert api(admin, "POST", "/reload") == (200, {"reloaded": True})
        text = _scrape_live(admin)
        assert value(text, "wingatemap_reloads_total", result="success") == 1
        assert value(text, "wingatemap_connections_accepted_total", mapping="added") == 0
        applied = value(text, "wingatemap_last_reload_success_timestamp_seconds")
        assert applied >= started
        path.write_text("[mappings.broken]\nport = 0\n")
        assert api(admin, "POST", "/reload")[0] == 400
        text = _scrape_live(admin)
        assert value(text, "wingatemap_reloads_total", result="failure") == 1
        assert value(text, "wingatemap_last_reload_success_timestamp_seconds") == applied
    finally:
        proc.stop()
        echo.close()
    assert "Traceback" not in proc.output()


def test_with_workers_the_primary_merges_every_process_and_never_goes_back(tmp_path):
    """
    workers = 2 under twistd: the primary's /metrics counts the sessions and live bytes of
    both processes, labels each process's process_* series with its worker number, shows one
    build info, and matches the dashboard and the reference; when the worker is killed, no counter goes down
    (its sessions end once as lost, their bytes not counted again) and the live-session gauge
    drops them, also after the worker is restarted.
    """
    from .test_workers import _Gateway

    gateway = _Gateway(tmp_path)
    try:
        clients, on_worker = gateway.clients, gateway.on_worker
        for c in clients:
            c.sendall(b"abc")
            assert c.recv(3) == b"abc"
        text = _scrape_live(gateway.admin)
        assert value(text, "wingatemap_connections_accepted_total", mapping="m") == len(clients)
        assert value(text, "wingatemap_connections_active", mapping="m") == len(clients)
        assert value(text, "wingatemap_bytes_total", mapping="m", direction="from_client") == 3 * len(clients)
        assert value(text, "wingatemap_bytes_total", mapping="m", direction="to_client") == 5 * len(clients)  # "hi" + the echo
        assert value(text, "process_cpu_seconds_total", worker="0") is not None
        assert value(text, "process_cpu_seconds_total", worker="1") is not None
        assert_one_family_per_name(text)
        assert len([line for line in text.splitlines() if line.startswith("wingatemap_build_info")]) == 1
        assert_dashboard_matches(text)
        assert_reference_matches(text)
        before = samples(text)

        os.kill(gateway.worker, signal.SIGKILL)
        gateway.proc.wait_line(rf"worker 1 ended with {len(on_worker)} live session\(s\); ending them with reason lost")
        for attempt in range(2):
            after = samples(_scrape_live(gateway.admin))
            for key, old in before.items():
                name = key[0]
                if name.endswith(("_total", "_bucket", "_count", "_sum")) and not name.startswith("process_"):
                    assert after.get(key, 0) >= old, (key, old, after.get(key))
            assert after[("wingatemap_bytes_total", (("direction", "from_client"), ("mapping", "m")))] == 3 * len(clients)
            assert after[("wingatemap_sessions_ended_total", (("mapping", "m"), ("reason", "lost")))] == len(on_worker)
            assert after[("wingatemap_connections_active", (("mapping", "m"),))] == len(clients) - len(on_worker)
            gateway.proc.wait_count(r"Site starting on .*worker-1\.sock", 2)  # restarted; scrape once more
            before = after
    finally:
        gateway.close()
    assert "Traceback" not in gateway.proc.output()


def documented_metrics() -> set[str]:
    """
    The metric names in the first column of docs/reference.md's metrics table.
    """
    with open(os.path.join(ROOT, "docs", "reference.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+)`", line.split(" | ", 1)[0]))
    return names


def assert_reference_matches(exposition: str) -> None:
    """
    docs/reference.md lists exactly the metrics a live /metrics exports (by their TYPE names).
    """
    exported = set(re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE))
    documented = documented_metrics()
    assert sorted(exported - documented) == [], "exported but not in docs/reference.md"
    assert sorted(documented - exported) == [], "in docs/reference.md but not exported"


def test_a_proxy_connection_reset_before_its_header_is_logged_and_counted_once(caplog_twisted):
    """
    A PROXY-protocol client that resets its connection before a complete header (no FIN) is
    logged once with its peer and counted once as proxy-closed, like one that closes cleanly.
    """
    from twisted.internet.error import ConnectionLost

    harness, metrics = _proxied_harness()
    client, _ = harness.accept(client_ip="127.0.0.9")
    client.dataReceived(b"PROXY TCP4 1.2")
    client.connectionLost(Failure(ConnectionLost()))
    text = metrics.render()
    assert value(text, "wingatemap_connections_dropped_total", mapping="test", reason="proxy-closed") == 1
    assert sum(v for (name, _), v in samples(text).items() if name == "wingatemap_connections_dropped_total") == 1
    assert len([line for line in caplog_twisted if "closed connection from 127.0.0.9:50000" in line]) == 1
    assert harness.sink.events == [] and len(harness.sessions) == 0
