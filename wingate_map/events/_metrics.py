"""
Prometheus metrics (prometheus_client) that fit long TCP sessions.

Fed by the events and a few direct calls: connections accepted, active, refused and ended by
mapping and reason; connections that never became a session (PROXY header, TLS handshake) by
mapping and reason; bytes by direction; destination connect latency; reloads; build info; and
prometheus_client's process collector.

Bytes are counted live at no cost per byte: the relay keeps each session's counts
(L{Session.bytes_from_client} / L{Session.bytes_to_client}) anyway, and at scrape time
L{_Live} adds the live sessions' counts to the totals of the sessions that have ended.  A
session's final counts move to the totals at its ClientDisconnect; a scrape between that and
its removal from the registry skips it (L{Metrics._ended}), so nothing is counted twice and the
counter never goes down.

Every enabled mapping has its series (at 0) from the start, and a mapping added by a reload
from the first scrape after it: a counter that appears only at its first increment hides that
increment from C{rate()} and C{increase()}.

With worker processes (C{[service] workers = N}) each process keeps its own registry (nothing
process-global: two services in one process never collide, and no prometheus_client internals
are replaced).  The primary's C{/metrics} asks every worker for its exposition over the
worker's private admin socket at scrape time and merges them (L{merge}): wingatemap's series
are summed per label set (counters, gauges, histogram buckets), each process's C{process_*}
series get a C{worker} label, and build info and reload series are the primary's.  Why not the
session reports the workers send on their pipe: they carry session starts, ends and byte counts
every few seconds, not refusal reasons, connect latencies or dropped connections; asking at
scrape time gives every metric as the worker has it then, and costs nothing between scrapes.
When a worker exits, the counters of its last answer are kept (L{Metrics.process_gone}), so a
sum never goes down; what it counted after that answer is lost.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IEventSink
from ..values import REASONS

_log = Logger(namespace="wingate_map.metrics")  # the name log lines carried before the module moved here

REFUSALS = ("rejected", "no-destination", "connect-failed", "connect-timeout", "tls-failed", "limit", "blocked")
# Why a connection never became a session (wingatemap_connections_dropped_total's reason).
DROPS = (
    "proxy-untrusted",  # the peer is not in proxy_protocol_from
    "proxy-invalid",  # a malformed PROXY header
    "proxy-timeout",  # no complete PROXY header in time
    "proxy-closed",  # closed before a complete PROXY header
    "tls-failed",  # the client's TLS handshake failed
    "tls-timeout",  # no TLS handshake in time
    "limit",  # over a connection limit before it became a session
)
DIRECTIONS = ("from_client", "to_client")
DESTINATION_LABELS = ["mapping", "rule", "destination"]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Series only the primary's own registry contributes to a merged exposition (build info is
# family "wingatemap_build" in a registry, "wingatemap_build_info" when parsed from text).
PRIMARY_ONLY = frozenset({"wingatemap_build", "wingatemap_build_info", "wingatemap_reloads", "wingatemap_last_reload_success_timestamp_seconds"})
# Families whose series are per process (prometheus_client's process collector).
PER_PROCESS_PREFIX = "process_"
CUMULATIVE = frozenset({"counter", "histogram", "summary"})
# Gauges merged over processes by their lowest value, not their sum: a destination is up (1)
# only while every process sees it up.
MERGED_BY_MIN = frozenset({"wingatemap_destination_up"})
WORKER_TIMEOUT = 5.0  # s a worker has to answer a scrape
_PRUNE_AT = 1024  # ended-but-not-yet-removed session ids kept before pruning


class _Live:
    """
    The collector of what live sessions change without an event: live sessions per mapping
    and bytes relayed (ended sessions' totals plus the live sessions' counts).
    """

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """
        C{wingatemap_connections_active} and C{wingatemap_bytes_total}, as of now.
        """
        metrics = self.metrics
        active = dict.fromkeys(metrics.mappings, 0)
        totals: dict[tuple[str, str], float] = {}
        for mapping in metrics.mappings:
            for direction in DIRECTIONS:
                totals[(mapping, direction)] = 0
        for family in metrics.bytes.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[(sample.labels["mapping"], sample.labels["direction"])] = sample.value
        ended = metrics._ended
        for session in metrics.sessions.live():
            mapping = session.mapping
            active[mapping] = active.get(mapping, 0) + 1
            if session.id in ended:
                continue  # its final counts are in the totals already
            key = (mapping, "from_client")
            totals[key] = totals.get(key, 0) + session.bytes_from_client
            key = (mapping, "to_client")
            totals[key] = totals.get(key, 0) + session.bytes_to_client
        gauge = GaugeMetricFamily("wingatemap_connections_active", "Live sessions", labels=["mapping"])
        for mapping, count in active.items():
            gauge.add_metric([mapping], count)
        counter = CounterMetricFamily("wingatemap_bytes", "Bytes relayed, by direction, live sessions included", labels=["mapping", "direction"])
        for (mapping, direction), value in totals.items():
            counter.add_metric([mapping, direction], value)
        up = GaugeMetricFamily("wingatemap_destination_up", "Whether a destination of a list is up (1) or down (0)", labels=DESTINATION_LABELS)
        for found in metrics.destinations():
            for health in found.balancer.health:
                up.add_metric([found.mapping, str(found.rule), health.name], 1 if health.up else 0)
        return [gauge, counter, up]


@implementer(IEventSink)
class Metrics:
    """
    A service's metrics (its own registry), and the event sink that keeps them.

    @ivar sessions: the live sessions (a L{SessionRegistry}, or anything with C{live()} and
        C{get(id)}).
    @ivar mappings: every mapping that has its series (in order of appearance).
    @ivar bytes: bytes of the sessions that have ended, by mapping and direction (a counter
        outside the registry: the exposed C{wingatemap_bytes_total} adds the live sessions').
    """

    reads_events_only = True  # see EventHub: it gets the event every built-in sink shares

    def __init__(
        self,
        sessions: Any,
        mappings: Callable[[], Iterable[str]] = tuple,
        workers: Callable[[], Iterable[tuple[int, int, str]]] | None = None,
        reactor: Any = None,
        now: Callable[[], float] = time.time,
        fetch: Callable[[Any, str, float], Deferred[str]] | None = None,
        destinations: Callable[[], Iterable[Any]] = tuple,
    ) -> None:
        """
        @param mappings: the names of the enabled mappings now (asked at every scrape).
        @param workers: in a primary with worker processes, the running workers now, as
            (worker number, pid, private admin socket path); L{None} elsewhere.
        @param reactor: what worker requests run on (the global reactor by default).
        @param now: the wall clock (unix time), for the reload timestamp.
        @param fetch: how a worker's exposition is asked for (L{fetch_metrics}).
        @param destinations: the destination lists now (L{wingate_map.relay.DestinationList}),
            for the C{up} gauge and the check counters.
        """
        from ..version import version

        self.sessions = sessions
        self._configured = mappings
        self._workers = workers
        self._reactor = reactor
        self._now = now
        self._fetch = fetch or fetch_metrics
        self.destinations = destinations
        self.mappings: dict[str, None] = {}
        self._ended: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}
        self._per_mapping: dict[str, _MappingCounters] = {}  # the children each event counts
        self._snapshots: dict[int, tuple[int, list[Metric]]] = {}  # pid -> (worker, families)
        self._retired: dict[str, Metric] = {}  # exited workers' last counters
        self._silent: set[int] = set()  # workers whose failure to answer is logged already
        self.registry = CollectorRegistry()
        registry = self.registry
        self.accepted = Counter("wingatemap_connections_accepted", "Connections accepted (sessions)", ["mapping"], registry=registry)
        self.refused = Counter("wingatemap_connections_refused", "Sessions refused before relaying, by reason", ["mapping", "reason"], registry=registry)
        self.ended = Counter("wingatemap_sessions_ended", "Sessions ended, by reason", ["mapping", "reason"], registry=registry)
        self.dropped = Counter(
            "wingatemap_connections_dropped",
            "Connections closed before they became a session (PROXY header, TLS handshake, limit), by reason",
            ["mapping", "reason"],
            registry=registry,
        )
        self.bytes = Counter("wingatemap_bytes", "Bytes relayed by ended sessions, by direction", ["mapping", "direction"], registry=None)
        self.connect_latency = Histogram(
            "wingatemap_connect_latency_seconds",
            "Time to connect to the destination (TLS handshake included)",
            ["mapping"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checks = Counter("wingatemap_destination_checks", "Active health checks of a destination", DESTINATION_LABELS, registry=registry)
        self.check_failures = Counter(
            "wingatemap_destination_check_failures", "Active health checks of a destination that failed", DESTINATION_LABELS, registry=registry
        )
        self.reloads = Counter("wingatemap_reloads", "Configuration reloads, by result", ["result"], registry=registry)
        self.last_reload = Gauge(
            "wingatemap_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (at start or by a reload), unix time",
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload.set(now())
        import platform

        import twisted

        Info("wingatemap_build", "wingatemap's version and what it runs on", registry=registry).info(
            {"version": version(), "python": platform.python_version(), "twisted": twisted.__version__}
        )
        ProcessCollector(registry=registry)
        registry.register(_Live(self))

    # -- what the relay and the service report -----------------------------------------------

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Count an accepted connection.
        """
        mapping = event["mapping"]
        counters = self._per_mapping.get(mapping) or self._counters(mapping)
        counters.accepted.inc()

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Count the end and its reason, and move the session's bytes to the totals.

        A session a dead worker carried (reason C{lost}) adds no bytes here: that worker's own
        counters, as it last answered a scrape, already hold them.
        """
        mapping, reason = event["mapping"], event["reason"]
        counters = self._per_mapping.get(mapping) or self._counters(mapping)
        ended = counters.ended.get(reason)
        if ended is None:  # a reason outside REASONS: its series from now on
            ended = counters.ended[reason] = self._child(self.ended, mapping, reason)
        ended.inc()
        if reason in REFUSALS:
            counters.refused[reason].inc()
        if reason == "lost":
            return
        count = event["bytes_from_client"]
        if count:
            counters.from_client.inc(count)
        count = event["bytes_to_client"]
        if count:
            counters.to_client.inc(count)
        session_id = event["session"]
        if self.sessions.get(session_id) is not None:
            # Still listed until the relay removes it: a scrape until then must skip it.
            if len(self._ended) >= _PRUNE_AT:
                self._ended = {i for i in self._ended if self.sessions.get(i) is not None}
            self._ended.add(session_id)

    def _counters(self, mapping: str) -> "_MappingCounters":
        """
        C{mapping}'s per-event counters, made (with every series of the mapping) once.
        """
        self._mapping(mapping)
        counters = self._per_mapping[mapping] = _MappingCounters(
            self._child(self.accepted, mapping),
            {reason: self._child(self.ended, mapping, reason) for reason in REASONS},
            {reason: self._child(self.refused, mapping, reason) for reason in REFUSALS},
            self._child(self.bytes, mapping, "from_client"),
            self._child(self.bytes, mapping, "to_client"),
            self._child(self.connect_latency, mapping),
        )
        return counters

    def not_a_session(self, mapping: str, reason: str) -> None:
        """
        A connection to C{mapping} closed before it became a session (see L{DROPS}).
        """
        self._mapping(mapping)
        self._child(self.dropped, mapping, reason).inc()

    def observe_connect(self, mapping: str, seconds: float) -> None:
        """
        A destination connected after C{seconds}.
        """
        counters = self._per_mapping.get(mapping) or self._counters(mapping)
        counters.latency.observe(seconds)

    def destination_checked(self, mapping: str, rule: int | str, destination: str, passed: bool) -> None:
        """
        An active check of C{destination} in C{mapping}'s list C{rule} passed or failed.
        """
        labels = (mapping, str(rule), destination)
        self._child(self.checks, *labels).inc()
        if not passed:
            self._child(self.check_failures, *labels).inc()

    def reloaded(self, success: bool) -> None:
        """
        A reload was applied (C{success}) or refused.
        """
        self._child(self.reloads, "success" if success else "failure").inc()
        if success:
            self.last_reload.set(self._now())

    def process_gone(self, pid: int | None) -> None:
        """
        Worker process C{pid} exited: keep the counters of its last answer (so the merged
        sums never go down); its gauges no longer count.
        """
        snapshot = self._snapshots.pop(pid, None) if pid is not None else None
        if snapshot is None:
            return
        self._silent.discard(snapshot[0])
        kept = [f for f in snapshot[1] if f.type in CUMULATIVE and not _per_process(f.name) and f.name not in PRIMARY_ONLY]
        self._retired = {family.name: family for family in merge([(0, list(self._retired.values())), (0, kept)])}

    # -- the exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """
        This process's own exposition (Prometheus text format), without C{_created} series
        (as merged ones are: they would double the exposition and say little).
        """
        self._refresh_mappings()
        return generate_latest(_Families(merge([(0, self.registry.collect())])))  # type: ignore[arg-type]

    def exposition(self) -> Deferred[bytes]:
        """
        What C{GET /metrics} answers: this process's exposition, or, in a primary with
        workers, every process's merged (see the module docstring).
        """
        workers = list(self._workers()) if self._workers is not None else []
        if not workers and not self._retired:
            return succeed(self.render())
        asked = [self._ask(index, pid, path) for index, pid, path in workers]
        return DeferredList(asked, consumeErrors=True).addCallback(lambda _: self._merged(workers))

    def _ask(self, index: int, pid: int, path: str) -> Deferred[None]:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor

        def answered(text: str) -> None:
            current = {p for _, p, _ in (self._workers() if self._workers is not None else ())}
            if pid not in current:
                return  # it exited meanwhile: its counters as last seen are kept already
            self._snapshots[pid] = (index, list(text_string_to_metric_families(text)))
            self._silent.discard(index)

        def failed(failure: Any) -> None:
            if index not in self._silent:
                self._silent.add(index)
                _log.warn(
                    "metrics: worker {worker} (pid {pid}) did not answer: {why}; its last answer is used",
                    worker=index,
                    pid=pid,
                    why=failure.getErrorMessage(),
                )

        return self._fetch(reactor, path, WORKER_TIMEOUT).addCallbacks(answered, failed)

    def _merged(self, workers: list[tuple[int, int, str]]) -> bytes:
        self._refresh_mappings()
        parts: list[tuple[int, list[Metric]]] = [(0, list(self.registry.collect())), (0, list(self._retired.values()))]
        for _, pid, _ in workers:
            snapshot = self._snapshots.get(pid)
            if snapshot is not None:
                parts.append(snapshot)
        return generate_latest(_Families(merge(parts, label_processes=True)))  # type: ignore[arg-type]

    # -- helpers -------------------------------------------------------------------------------

    def _refresh_mappings(self) -> None:
        for mapping in self._configured():
            self._mapping(mapping)
        # Every destination's check counters exist (at 0) from the start, like every series.
        for found in self.destinations():
            for health in found.balancer.health:
                labels = (found.mapping, str(found.rule), health.name)
                self._child(self.checks, *labels)
                self._child(self.check_failures, *labels)

    def _mapping(self, mapping: str) -> None:
        """
        Give C{mapping} every series, at 0, the first time it is seen.
        """
        if mapping in self.mappings:
            return
        self.mappings[mapping] = None
        self._child(self.accepted, mapping)
        self._child(self.connect_latency, mapping)
        for reason in REFUSALS:
            self._child(self.refused, mapping, reason)
        for reason in REASONS:
            self._child(self.ended, mapping, reason)
        for reason in DROPS:
            self._child(self.dropped, mapping, reason)

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call; this runs per connection.
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


@frozen
class _MappingCounters:
    """
    The labelled children a mapping's events count, looked up once: per event, no label
    tuple is built and no child looked up by its labels.
    """

    accepted: Any
    ended: dict[str, Any]  # by reason
    refused: dict[str, Any]  # by reason
    from_client: Any
    to_client: Any
    latency: Any


class _Families:
    """
    Ready-made metric families, in the shape C{generate_latest} reads.
    """

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        """
        The families.
        """
        return self.families


def _per_process(name: str) -> bool:
    return name.startswith(PER_PROCESS_PREFIX)


def merge(parts: Iterable[tuple[int, Iterable[Metric]]], label_processes: bool = False) -> list[Metric]:
    """
    One set of metric families from several processes' (worker number, families): samples of
    the same name and labels are added up (counters, gauges, histogram buckets, counts and
    sums); C{_created} samples are left out (the processes started at different times).
    With C{label_processes}, C{process_*} families are not added up but each sample gets a
    C{worker} label, and the L{PRIMARY_ONLY} families come from worker 0 only.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, families in parts:
        for family in families:
            name = family.name
            if name.endswith("_created"):
                continue  # a counter's _created series, parsed from text as a family of its own
            per_process = label_processes and _per_process(name)
            if label_processes and index != 0 and name in PRIMARY_ONLY:
                continue
            if name not in merged:
                merged[name] = Metric(name, family.documentation, family.type)
                values[name] = {}
            into = values[name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = dict(sample.labels)
                if per_process:
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                if name in MERGED_BY_MIN and key in into:
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] = into.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def fetch_metrics(reactor: Any, socket_path: str, timeout: float) -> Deferred[str]:
    """
    C{GET /metrics} from a worker's private admin API on its Unix socket: the text, or a
    failure (no answer within C{timeout}s, or not 200).
    """
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.web.client import Agent, readBody
    from twisted.web.iweb import IAgentEndpointFactory

    @implementer(IAgentEndpointFactory)
    class _ToSocket:
        def endpointForURI(self, uri: Any) -> Any:
            return UNIXClientEndpoint(reactor, socket_path, timeout=timeout)

    d = Agent.usingEndpointFactory(reactor, _ToSocket()).request(b"GET", b"http://localhost/metrics")
    timer = reactor.callLater(timeout, d.cancel)

    def got(response: Any) -> Deferred[bytes]:
        if response.code != 200:
            raise RuntimeError(f"HTTP {response.code}")
        return readBody(response)

    def settled(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return d.addCallback(got).addBoth(settled).addCallback(lambda body: body.decode("utf-8"))
