"""
What the service says about itself: the session events (ClientConnect, ClientDisconnect) and
their sinks (the hub, the log, the JSON-lines audit log, handlers that run programs or Python
callables), Prometheus metrics, and the operational log's observers.

Private modules: C{_hub} (hub and sinks), C{_handlers}, C{_metrics}, C{_logs}.
"""

from ._handlers import build_handlers
from ._hub import AuditLogSink, EventHub, LogSink
from ._logs import ServiceLogObserver, install
from ._metrics import Metrics

__all__ = ["AuditLogSink", "EventHub", "LogSink", "Metrics", "ServiceLogObserver", "build_handlers", "install"]
