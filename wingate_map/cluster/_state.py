"""
What a gateway keeps locally about the cluster, whatever the store behind it: the link state and
its observers, the login cache, the sessions it counts against cluster limits and the bounded
buffer of events on their way to the stream.  Shared by the Redis store and the in-memory fake,
so both behave the same where the contract says so.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Iterable

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

_log = Logger()

UP = "up"
DOWN = "down"


@define
class LinkState:
    """
    C{up} or C{down}, with observers called on every change and Deferreds waiting for a state.
    """

    node: str
    state: str = DOWN
    _observers: list[Callable[[str], object]] = field(factory=list)
    _waiting: list[tuple[str, Deferred[None]]] = field(factory=list)

    def set(self, state: str, why: str = "") -> None:
        """
        Enter C{state}; observers and waiters hear of a change only.
        """
        if state == self.state:
            return
        self.state = state
        if state == UP:
            _log.info("cluster node {node}: link to the shared store is up", node=self.node)
        else:
            _log.warn("cluster node {node}: link to the shared store is down ({why})", node=self.node, why=why or "disconnected")
        for observer in list(self._observers):
            try:
                observer(state)
            except Exception:
                _log.failure("cluster node {node}: state observer failed", node=self.node)
        waiting, self._waiting = self._waiting, []
        for wanted, d in waiting:
            if wanted == state:
                d.callback(None)
            else:
                self._waiting.append((wanted, d))

    def add_observer(self, observer: Callable[[str], object]) -> None:
        """
        Call C{observer(state)} on every change.
        """
        self._observers.append(observer)

    def when(self, state: str) -> Deferred[None]:
        """
        A Deferred firing once the link is in C{state} (at once if it is).
        """
        if self.state == state:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((state, d))
        return d


@define
class LoginCache:
    """
    The logins this gateway knows: client address -> (user, expiry on the local clock).

    Updated by change notifications (L{apply}) and replaced by periodic snapshots (L{replace});
    notifications that arrive while a snapshot is being read are applied again on top of it, so
    a change is never lost to a resync that started before it.
    """

    clock: Any
    _entries: dict[str, tuple[str, float]] = field(factory=dict)
    _during_resync: list[tuple[str, str | None, float]] | None = None

    def apply(self, client_ip: str, user: str | None, ttl: float) -> None:
        """
        C{client_ip} is C{user} for C{ttl} more seconds (C{user} None: logged out).
        """
        if self._during_resync is not None:
            self._during_resync.append((client_ip, user, self.clock.seconds() + ttl))
        self._set(client_ip, user, self.clock.seconds() + ttl)

    def _set(self, client_ip: str, user: str | None, expires: float) -> None:
        if user is None or expires <= self.clock.seconds():
            self._entries.pop(client_ip, None)
        else:
            self._entries[client_ip] = (user, expires)

    def begin_resync(self) -> None:
        """
        A snapshot is being read: remember the notifications from now on.
        """
        self._during_resync = []

    def abort_resync(self) -> None:
        """
        The snapshot could not be read; the cache stays as it is.
        """
        self._during_resync = None

    def replace(self, snapshot: Iterable[tuple[str, str, float]]) -> None:
        """
        The store's full list of (client address, user, seconds left); notifications that came
        in meanwhile win.
        """
        now = self.clock.seconds()
        self._entries = {ip: (user, now + ttl) for ip, user, ttl in snapshot if ttl > 0}
        replay, self._during_resync = self._during_resync or [], None
        for client_ip, user, expires in replay:
            self._set(client_ip, user, expires)

    def get(self, client_ip: str) -> tuple[str, float] | None:
        """
        The unexpired login of C{client_ip}: (user, expiry), or None.
        """
        entry = self._entries.get(client_ip)
        if entry is not None and entry[1] <= self.clock.seconds():
            del self._entries[client_ip]
            return None
        return entry

    def snapshot(self) -> dict[str, tuple[str, float]]:
        """
        Every unexpired login: client address -> (user, expiry on the local clock).
        """
        now = self.clock.seconds()
        for key in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]
        return dict(self._entries)


@define
class HeldCounts:
    """
    The sessions this gateway counts against cluster-wide limits: session id -> (mapping,
    client address).  Re-published after a reconnect; releases that could not be sent wait here.
    """

    held: dict[str, tuple[str, str]] = field(factory=dict)
    unsent_releases: dict[str, tuple[str, str]] = field(factory=dict)

    def pairs(self) -> dict[tuple[str, str], list[str]]:
        """
        The held sessions grouped by (mapping, client address).
        """
        grouped: dict[tuple[str, str], list[str]] = {}
        for session_id, pair in self.held.items():
            grouped.setdefault(pair, []).append(session_id)
        return grouped


@define
class EventBuffer:
    """
    Events on their way to the stream: never blocks the caller; beyond C{limit} waiting events,
    new ones are dropped, counted in C{dropped} and logged (once when the loss starts and once
    when it ends, with the count).
    """

    node: str
    stream: str
    limit: int
    pending: collections.deque[str] = field(factory=collections.deque)
    dropped: int = 0
    _dropping_since: int | None = None

    def add(self, event: dict[str, Any]) -> bool:
        """
        Queue C{event} (as the JSON the stream holds); whether it was kept.
        """
        if len(self.pending) >= self.limit:
            self._drop(1)
            return False
        self.pending.append(json.dumps(event, separators=(",", ":"), default=str))
        return True

    def _drop(self, count: int) -> None:
        if self._dropping_since is None:
            self._dropping_since = self.dropped
            _log.warn(
                "cluster node {node}: events stream {stream} is not keeping up (buffer of {limit} events full); "
                "dropping events until it does (the audit log keeps them)",
                node=self.node, stream=self.stream, limit=self.limit,
            )
        self.dropped += count

    def take(self, count: int) -> list[str]:
        """
        Up to C{count} of the oldest waiting events, removed from the buffer.
        """
        return [self.pending.popleft() for _ in range(min(count, len(self.pending)))]

    def put_back(self, entries: list[str]) -> None:
        """
        C{entries} (taken earlier) could not be written: first in line again, as far as the bound
        allows; the rest are dropped.
        """
        room = max(0, self.limit - len(self.pending))
        keep = entries[:room]
        if len(entries) > room:
            self._drop(len(entries) - room)
        self.pending.extendleft(reversed(keep))

    def written(self) -> None:
        """
        A batch reached the stream: if events were being dropped, say how many were lost.
        """
        if self._dropping_since is not None and len(self.pending) < self.limit:
            _log.warn(
                "cluster node {node}: events stream {stream} keeps up again; {count} events were dropped",
                node=self.node, stream=self.stream, count=self.dropped - self._dropping_since,
            )
            self._dropping_since = None


class StoreBase:
    """
    The part of L{wingate_map.interfaces.IClusterStore} both stores answer from local state:
    the link state, the login cache and the event buffer.  A subclass sets C{_link},
    C{_logins} and C{_events} and provides C{_write_login} and C{_events_added}.
    """

    def _init_common(
        self, clock: Any, node: str, node_ttl: float, events_stream: str | None, events_maxlen: int,
        event_buffer: int, sessions: Any, on_kill: Any, kill_timeout: float, resync_interval: float,
    ) -> None:
        """
        Set what both stores keep (their constructors' shared arguments and local state).
        """
        self.node = node
        self.node_ttl = float(node_ttl)
        self.events_stream = events_stream
        self.events_maxlen = int(events_maxlen)
        self.sessions_source = sessions
        self.on_kill = on_kill
        self.kill_timeout = kill_timeout
        self.resync_interval = resync_interval
        self._link = LinkState(node)
        self._logins = LoginCache(clock)
        self._unsent_logins: dict[str, tuple[str | None, float]] = {}
        self._counts = HeldCounts()
        self._events = EventBuffer(node, events_stream or "", event_buffer)
        self._instance: str | None = None
        self._last_resync = float("-inf")

    @property
    def state(self) -> str:
        """
        See L{IClusterStore.state}.
        """
        return self._link.state

    @property
    def dropped(self) -> int:
        """
        See L{IClusterStore.dropped}.
        """
        return self._events.dropped

    def add_state_observer(self, observer: Callable[[str], object]) -> None:
        """
        See L{IClusterStore.add_state_observer}.
        """
        self._link.add_observer(observer)

    def when_state(self, state: str) -> Deferred[None]:
        """
        See L{IClusterStore.when_state}.
        """
        return self._link.when(state)

    def put_login(self, client_ip: str, user: str, ttl: float) -> Deferred[bool]:
        """
        See L{IClusterStore.put_login}.  Fires with C{True} once shared, C{False} if the link is
        down (the login holds here at once and is written when the link is back).
        """
        self._logins.apply(client_ip, user, float(ttl))
        return self._write_login(client_ip, user, float(ttl))

    def delete_login(self, client_ip: str) -> Deferred[bool]:
        """
        See L{IClusterStore.delete_login}; fires like L{put_login}.
        """
        self._logins.apply(client_ip, None, 0.0)
        return self._write_login(client_ip, None, 0.0)

    def _write_login(self, client_ip: str, user: str | None, ttl: float) -> Deferred[bool]:
        raise NotImplementedError

    def login(self, client_ip: str) -> tuple[str, float] | None:
        """
        See L{IClusterStore.login}.
        """
        return self._logins.get(client_ip)

    def logins(self) -> dict[str, tuple[str, float]]:
        """
        See L{IClusterStore.logins}.
        """
        return self._logins.snapshot()

    def add_event(self, event: dict[str, Any]) -> None:
        """
        See L{IClusterStore.add_event}.
        """
        if self.events_stream is not None and self._events.add(event):
            self._events_added()

    def _events_added(self) -> None:
        raise NotImplementedError
