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
            from prometheus_client import values

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

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Count an accepted connection.
        """
        mapping = event["mapping"]
        self.accepted.labels(mapping).inc()
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
        self.ended.labels(mapping, reason).inc()
        if self.multiprocess_dir is not None:
            self._active.labels(mapping).dec()
        if reason in REFUSALS:
            self.refused.labels(mapping, reason).inc()
        if event["bytes_from_client"]:
            self.bytes.labels(mapping, "from_client").inc(event["bytes_from_client"])
        if event["bytes_to_client"]:
            self.bytes.labels(mapping, "to_client").inc(event["bytes_to_client"])

    def observe_connect(self, mapping: str, seconds: float) -> None:
        """
        A destination connected after C{seconds}.
        """
        self.connect_latency.labels(mapping).observe(seconds)

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
