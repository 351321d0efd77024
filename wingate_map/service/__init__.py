"""
The service tree: a root (L{WingateMapService}) that builds what new connections use and
orders the start and the stop, and its child services, each opening and closing what it holds
(listeners, admin site, adapter watcher, worker processes, interception table, audit log,
health checks, cluster store; signal handlers and systemd notification only when the service
is the whole program).

Private modules: C{_root} (the root), C{_listeners} (the listening ports), C{_parts} (the
other children), C{_program} (what only a program does: C{_signals}, C{_notify} for systemd),
C{_workers} (the worker processes), C{_resource} (the shape of a child that holds something
open).
"""

from ._root import WingateMapService
from ._listeners import listen_description

__all__ = ["WingateMapService", "listen_description"]
