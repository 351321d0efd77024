"""
Logins for client addresses: an admin-API (or login portal) says "the client at this address is
user X for the next N seconds".  As an identity source these are C{authenticated} and outrank
location assumptions.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from twisted.logger import Logger
from zope.interface import implementer

from ..config import User
from ..values import Identity
from ._identity import identity_of
from ..interfaces import IIdentitySource
from ..config import client_address

MAX_TTL = 30 * 24 * 3600.0

_log = Logger(namespace="wingate_map.credentials")  # the name log lines carried before the module moved here


def _log_unshared(failure: Any, client_ip: str) -> None:
    """
    A login change could not be shared with the other gateways (it holds here and is written
    when the cluster link is back).
    """
    _log.warn("credentials: the login change for {client_ip} is not shared yet: {why}", client_ip=client_ip, why=failure.getErrorMessage())


@implementer(IIdentitySource)
class CredentialStore:
    """
    Client address -> (user, expiry).  Entries expire by the clock, checked when used.
    """

    level = "authenticated"

    def __init__(self, clock: Any, users: Iterable[User] = (), shared_path: str | None = None) -> None:
        self.clock = clock
        self._users = {u.name: u for u in users}
        self._entries: dict[str, tuple[str, float]] = {}
        # With worker processes, the logins live in a file every process reads when it changes
        # (one stat per lookup), so a worker started later, or restarted, knows them too.
        self._shared_path = shared_path
        self._shared_mtime: int | None = None
        # With [cluster], the logins live in the cluster store (written to Redis, announced to
        # every gateway, read from its local cache: no round trip per connection).
        self.cluster: Any = None

    def set_users(self, users: Iterable[User]) -> None:
        """
        The users known (after a reload); logins of users that are gone stop counting.
        """
        self._users = {u.name: u for u in users}

    @staticmethod
    def key(client_ip: str) -> str:
        """
        The canonical form of a client address (IPv4-mapped IPv6 as IPv4).

        @raise ValueError: not an IP address.
        """
        address = client_address(client_ip)
        if address is None:
            raise ValueError(f"{client_ip!r} is not an IP address")
        return str(address)

    def login(self, client_ip: str, user: str, ttl: float) -> float:
        """
        Record that C{client_ip} is C{user} for C{ttl} seconds; the expiry time.

        @raise ValueError: unknown user, bad address or TTL.
        """
        key = self.key(client_ip)
        if user not in self._users:
            raise ValueError(f"{user!r} is not a user defined in [users]")
        if not (isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and 0 < ttl <= MAX_TTL):
            raise ValueError(f"ttl must be a number of seconds > 0 and <= {MAX_TTL:g}")
        expires = self.clock.seconds() + float(ttl)
        if self.cluster is not None:
            self.cluster.put_login(key, user, float(ttl)).addErrback(_log_unshared, key)
            return expires
        self._sync()
        self._entries[key] = (user, expires)
        self._publish()
        return expires

    def _sync(self) -> None:
        """
        Re-read the shared file if another process changed it.
        """
        if self._shared_path is None:
            return
        try:
            mtime = os.stat(self._shared_path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._shared_mtime:
            return
        try:
            with open(self._shared_path, encoding="utf-8") as f:
                data = json.load(f)
            self._entries = {ip: (entry[0], float(entry[1])) for ip, entry in data.items()}
            self._shared_mtime = mtime
        except (OSError, ValueError, TypeError, IndexError):
            pass

    def _publish(self) -> None:
        if self._shared_path is None:
            return
        temporary = f"{self._shared_path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({ip: [user, expires] for ip, (user, expires) in self._entries.items()}, f)
        os.replace(temporary, self._shared_path)
        self._shared_mtime = os.stat(self._shared_path).st_mtime_ns

    def logout(self, client_ip: str) -> bool:
        """
        Forget C{client_ip}'s login; whether there was one.
        """
        if self.cluster is not None:
            key = self.key(client_ip)
            found = self.cluster.login(key) is not None
            self.cluster.delete_login(key).addErrback(_log_unshared, key)
            return found
        self._sync()
        found = self._entries.pop(self.key(client_ip), None) is not None
        if found:
            self._publish()
        return found

    def active(self) -> dict[str, tuple[str, float]]:
        """
        The unexpired logins.
        """
        if self.cluster is not None:
            return self.cluster.logins()
        self._sync()
        now = self.clock.seconds()
        for key in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]
        return dict(self._entries)

    def identify(self, client: Any) -> Identity | None:
        """
        See L{IIdentitySource.identify}.
        """
        cluster = self.cluster
        if cluster is None and not self._entries and self._shared_path is None:
            return None  # nobody logged in: the common case costs nothing per connection
        self._sync()
        address = client_address(client.client_ip)
        if cluster is not None:
            entry = cluster.login(str(address)) if address is not None else None
        else:
            entry = self._entries.get(str(address)) if address is not None else None
        if entry is None:
            return None
        name, expires = entry
        if expires <= self.clock.seconds():
            if cluster is None:
                self._entries.pop(str(address), None)
            return None
        user = self._users.get(name)
        return identity_of(user, self.level) if user is not None else None

    def explain(self, client: Any) -> str | None:
        """
        Why C{client} is recognised.
        """
        found = self.identify(client)
        return None if found is None else f"logged in through the admin API as {found.user}"
