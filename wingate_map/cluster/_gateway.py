"""
What a running gateway plugs into its cluster store: the relay's admission check for mappings
with C{limits_scope = "cluster"}, and the event sink that feeds the events stream.

Nothing here waits on Redis except L{ClusterLimits.admit} for the mappings that ask for a
cluster-wide count; every other mapping pays one attribute check per session.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IEventSink
from ._errors import ClusterUnavailable
from ._state import UP

_log = Logger()


def _counted_here(mapping: Any) -> bool:
    return mapping.limits_scope == "cluster" and mapping.max_connections_per_client > 0


class ClusterLimits:
    """
    The relay's side of cluster-wide per-client limits (SPEC §7): one atomic check-and-add in
    the store per session of a C{limits_scope = "cluster"} mapping; while the store is down,
    the node-local count (already checked by the relay) decides and the session is held, to be
    counted in the store once it is back.

    @ivar store: the L{wingate_map.interfaces.IClusterStore}.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def admit(self, mapping: Any, session: Any) -> Deferred[str | None] | None:
        """
        Count C{session} against its client's cluster-wide limit.

        @return: L{None} when there is nothing to wait for (not a cluster-limited mapping, or
            the store is down and the session was held on node-local counts); else a Deferred
            firing with L{None} (admitted) or why the session is over the limit.
        """
        if not _counted_here(mapping):
            return None
        store = self.store
        if store.state != UP:
            store.hold(mapping.name, session.client_ip, session.id)
            return None
        limit = mapping.max_connections_per_client

        def counted(ok: bool) -> str | None:
            if ok:
                return None
            return f"max_connections_per_client ({limit}) reached for {session.client_ip} across the cluster"

        def unavailable(failure: Failure) -> None:
            # The relay already checked the node-local count: admit on it, counted later.
            if not failure.check(ClusterUnavailable):
                _log.failure("cluster limit check of session {session} failed; using node-local limits", failure, session=session.id)
            store.hold(mapping.name, session.client_ip, session.id)
            return None

        return store.acquire(mapping.name, session.client_ip, limit, session.id).addCallbacks(counted, unavailable)

    def ended(self, mapping: Any, session: Any) -> None:
        """
        C{session} is over: it no longer counts (the store sends it later if it is down).
        """
        if _counted_here(mapping):
            self.store.release(session.id)


@implementer(IEventSink)
class StreamSink:
    """
    Every event also goes to the cluster's events stream (C{[cluster] events_stream}): queued in
    the store and written in pipelined batches, never delaying or vetoing a session.
    """

    hears_refused = True

    def __init__(self, store: Any) -> None:
        self.store = store

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        See L{IEventSink.client_connect}: queued, always allowed.
        """
        self.store.add_event(event)

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        See L{IEventSink.client_disconnect}: queued.
        """
        self.store.add_event(event)
