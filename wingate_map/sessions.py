"""
Live sessions: one per accepted connection, from accept to the last byte.

The registry is what the drain at shutdown waits on, what the admin API lists and kills, and
where the ClientConnect / ClientDisconnect fields come from.
"""

from __future__ import annotations

import itertools
import secrets
from datetime import datetime, timezone
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import Deferred

_last_second: list[Any] = [None, ""]
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))  # the end of every utc_iso


def utc_iso(seconds: float) -> str:
    """
    C{seconds} since the epoch as UTC ISO 8601 with milliseconds, e.g. C{2026-11-26T10:00:00.000Z}.
    (The date and time part is formatted once per second: this runs twice per connection.)
    """
    whole = int(seconds)
    if _last_second[0] != whole:
        _last_second[0] = whole
        _last_second[1] = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    millis = int((seconds - whole) * 1000)
    if 0 <= millis < 1000:
        return _last_second[1] + _MILLIS[millis]
    return f"{_last_second[1]}.{min(999, millis):03d}Z"


@define(eq=False)
class Session:
    """
    One accepted connection and what has happened to it so far.

    @ivar terminate: ends the session at once with the given reason (set by the relay).
    """

    id: str
    mapping: str
    client_ip: str
    client_port: int
    local_ip: str
    local_port: int
    started: float
    original_dst: str | None = None
    tls: bool = False
    user: str | None = None
    identity: str | None = None
    destination: str | None = None
    rule: int | str | None = None
    sni: str | None = None  # the server name the client asked for (peek_sni, TLS listener)
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    reason: str | None = None
    node: str | None = None  # the [cluster] node name (set by the registry), else None
    terminate: Callable[[str], object] | None = field(default=None, repr=False)

    def fields(self, event: str, now: float) -> dict[str, Any]:
        """
        The fields every event of this session carries.
        """
        return {
            "event": event,
            "time": utc_iso(now),
            "session": self.id,
            "mapping": self.mapping,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "user": self.user,
            "identity": self.identity,
            "local_ip": self.local_ip,
            "local_port": self.local_port,
            "original_dst": self.original_dst,
            "destination": self.destination,
            "tls": self.tls,
            "rule": self.rule,
            "sni": self.sni,
            "node": self.node,
        }

    def connect_event(self, now: float) -> dict[str, Any]:
        """
        The ClientConnect event.
        """
        return self.fields("ClientConnect", now)

    def disconnect_event(self, now: float) -> dict[str, Any]:
        """
        The ClientDisconnect event: ClientConnect's fields, byte counts, duration and reason.
        """
        fields = self.fields("ClientDisconnect", now)
        fields["bytes_from_client"] = self.bytes_from_client
        fields["bytes_to_client"] = self.bytes_to_client
        fields["duration"] = round(max(0.0, now - self.started), 6)
        fields["reason"] = self.reason
        return fields


@define
class SessionRegistry:
    """
    The live sessions of a service.
    """

    _live: dict[str, Session] = field(factory=dict)
    _per_mapping: dict[str, int] = field(factory=dict)
    _per_client: dict[tuple[str, str], int] = field(factory=dict)
    # Connections not yet sessions (PROXY header or TLS handshake to come): they count against
    # the limits too.
    _pending_per_mapping: dict[str, int] = field(factory=dict)
    _pending_per_client: dict[tuple[str, str], int] = field(factory=dict)
    _prefix: str = field(factory=lambda: secrets.token_hex(4))
    _counter: Any = field(factory=lambda: itertools.count(1))
    _empty_waiters: list[Deferred[None]] = field(factory=list)
    # The [cluster] node name every session of this registry carries (SPEC §7), or None.
    node: str | None = None
    _gone_waiters: dict[str, list[Deferred[None]]] = field(factory=dict)

    def new_id(self) -> str:
        """
        A session id unique to this process (and, by its random prefix, very likely beyond).
        """
        return f"{self._prefix}-{next(self._counter)}"

    def add(self, session: Session) -> None:
        """
        Start tracking C{session}.
        """
        self._live[session.id] = session
        session.node = self.node
        _count(self._per_mapping, self._per_client, session.mapping, session.client_ip, 1)

    def remove(self, session: Session) -> None:
        """
        C{session} is over.
        """
        if self._live.pop(session.id, None) is not None:
            _count(self._per_mapping, self._per_client, session.mapping, session.client_ip, -1)
        if self._gone_waiters:
            for d in self._gone_waiters.pop(session.id, ()):
                d.callback(None)
        if not self._live:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)

    def live(self) -> list[Session]:
        """
        The live sessions, oldest first.
        """
        return list(self._live.values())

    def get(self, session_id: str) -> Session | None:
        """
        The live session with this id, if any.
        """
        return self._live.get(session_id)

    def count(self, mapping: str, client_ip: str | None = None) -> int:
        """
        Live sessions of C{mapping} (from C{client_ip}, if given).
        """
        if client_ip is None:
            return self._per_mapping.get(mapping, 0)
        return self._per_client.get((mapping, client_ip), 0)

    def add_pending(self, mapping: str, peer_ip: str | None) -> None:
        """
        A connection to C{mapping} was accepted that is not a session yet (its PROXY header or
        TLS handshake is still to come); it counts for C{peer_ip} too unless that is L{None}
        (a trusted PROXY sender, which speaks for many clients).
        """
        _count(self._pending_per_mapping, self._pending_per_client, mapping, peer_ip, 1)

    def remove_pending(self, mapping: str, peer_ip: str | None) -> None:
        """
        A connection counted by L{add_pending} became a session or was closed.
        """
        _count(self._pending_per_mapping, self._pending_per_client, mapping, peer_ip, -1)

    def connections(self, mapping: str, client_ip: str | None = None) -> int:
        """
        What the connection limits count: live sessions of C{mapping} plus its connections
        not yet sessions (from C{client_ip}, if given).
        """
        if client_ip is None:
            return self._per_mapping.get(mapping, 0) + self._pending_per_mapping.get(mapping, 0)
        key = (mapping, client_ip)
        return self._per_client.get(key, 0) + self._pending_per_client.get(key, 0)

    def __len__(self) -> int:
        return len(self._live)

    def kill(self, session_id: str, reason: str = "killed") -> bool:
        """
        End a live session; C{False} if there is no such session.
        """
        session = self._live.get(session_id)
        if session is None or session.terminate is None:
            return False
        session.terminate(reason)
        return True

    def when_gone(self, session_id: str) -> Deferred[None]:
        """
        A Deferred that fires once session C{session_id} has ended (its ClientDisconnect sent);
        at once if it is not live.
        """
        d: Deferred[None] = Deferred()
        if session_id not in self._live:
            d.callback(None)
        else:
            self._gone_waiters.setdefault(session_id, []).append(d)
        return d

    def terminate_all(self, reason: str) -> None:
        """
        End every live session with C{reason}.
        """
        for session in list(self._live.values()):
            if session.terminate is not None:
                session.terminate(reason)

    def when_empty(self) -> Deferred[None]:
        """
        A Deferred that fires once no session is live (at once if none is).
        """
        d: Deferred[None] = Deferred()
        if not self._live:
            d.callback(None)
        else:
            self._empty_waiters.append(d)
        return d


def _count(per_mapping: dict[str, int], per_client: dict[tuple[str, str], int], mapping: str, client_ip: str | None, change: int) -> None:
    """
    Add C{change} to the counts of C{mapping} and of (C{mapping}, C{client_ip}), dropping
    counts that reach zero.
    """
    _add(per_mapping, mapping, change)
    if client_ip is not None:
        _add(per_client, (mapping, client_ip), change)


def _add(counts: dict[Any, int], key: Any, change: int) -> None:
    left = counts.get(key, 0) + change
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
