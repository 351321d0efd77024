"""
Prometheus metrics (prometheus_client), fed by the events: connections accepted, active and
refused by mapping and reason, sessions ended by reason, bytes by direction, and a histogram of
destination connect latency.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from zope.interface import implementer

from .interfaces import IEventSink

REFUSALS = ("rejected", "no-destination", "connect-failed", "connect-timeout", "tls-failed", "limit", "blocked")


@implementer(IEventSink)
class Metrics:
    """
    A registry of wingatemap's metrics, and the event sink that keeps them.
    """

    def __init__(self, sessions: Any, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            # Workers share their metrics through files in this directory
            # (prometheus_client's multiprocess mode); this process then writes its values there.
            # multiprocess too, now: after twistd drops privileges the library's files may no
            # longer be readable.
            from prometheus_client import multiprocess, values  # noqa: F401

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
            values.ValueClass = values.MultiProcessValue()
        self.registry = CollectorRegistry()
        self.accepted = Counter("wingatemap_connections_accepted", "Connections accepted", ["mapping"], registry=self.registry)
        self.refused = Counter("wingatemap_connections_refused", "Sessions refused before relaying, by reason", ["mapping", "reason"], registry=self.registry)
        self.ended = Counter("wingatemap_sessions_ended", "Sessions ended, by reason", ["mapping", "reason"], registry=self.registry)
        self.bytes = Counter("wingatemap_bytes", "Bytes relayed, by direction", ["mapping", "direction"], registry=self.registry)
        self.connect_latency = Histogram(
            "wingatemap_connect_latency_seconds",
            "Time to connect to the destination (TLS handshake included)",
            ["mapping"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        if multiprocess_dir is None:
            active = Gauge("wingatemap_connections_active", "Live sessions", ["mapping"], registry=self.registry)
        else:
            active = Gauge("wingatemap_connections_active", "Live sessions", ["mapping"], registry=self.registry, multiprocess_mode="livesum")
        self._active = active
        self._sessions = sessions
        self._mappings: set[str] = set()
        self._children: dict[tuple[Any, ...], Any] = {}

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Count an accepted connection.
        """
        mapping = event["mapping"]
        self._child(self.accepted, mapping).inc()
        if self.multiprocess_dir is not None:
            self._active.labels(mapping).inc()
        elif mapping not in self._mappings:
            self._mappings.add(mapping)
            self._active.labels(mapping).set_function(lambda m=mapping: self._sessions.count(m))

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Count the end, its reason and its bytes.
        """
        mapping, reason = event["mapping"], event["reason"]
        self._child(self.ended, mapping, reason).inc()
        if self.multiprocess_dir is not None and reason != "lost":
            # A lost session was counted live by the worker that died (process_gone drops it).
            self._active.labels(mapping).dec()
        if reason in REFUSALS:
            self._child(self.refused, mapping, reason).inc()
        if event["bytes_from_client"]:
            self._child(self.bytes, mapping, "from_client").inc(event["bytes_from_client"])
        if event["bytes_to_client"]:
            self._child(self.bytes, mapping, "to_client").inc(event["bytes_to_client"])

    def observe_connect(self, mapping: str, seconds: float) -> None:
        """
        A destination connected after C{seconds}.
        """
        self._child(self.connect_latency, mapping).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call; this runs per connection.
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def process_gone(self, pid: int | None) -> None:
        """
        A worker process ended: its live-session gauge no longer counts.
        """
        if self.multiprocess_dir is not None and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.multiprocess_dir)

    def render(self) -> bytes:
        """
        The Prometheus text exposition.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=self.multiprocess_dir)
        return generate_latest(combined)
