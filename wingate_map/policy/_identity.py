"""
Who a client is: the user it is recognised as, the groups it is in, and how sure we are.

Identity levels rank C{authenticated} (proven: a TLS client certificate, an admin-API login) above
C{assumed} (inferred from the location it connects from) above C{guest} (nobody recognised).
Sources are asked from the strongest level down and the first answer wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from attrs import frozen
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ..network import mac_for as neighbour_mac
from ..values import EVERYONE, GUEST, LEVELS, Identity
from ..config import User
from ..interfaces import IIdentitySource
from ..config import LocationIndex, client_address

if TYPE_CHECKING:
    from ..values import ClientInfo

@frozen
class IdentityResolver:
    """
    Asks ordered identity sources, strongest level first; nobody recognised is L{GUEST}.
    """

    sources: tuple[IIdentitySource, ...] = ()

    @classmethod
    def of(cls, sources: Iterable[IIdentitySource]) -> "IdentityResolver":
        """
        A resolver over C{sources}, each checked to provide L{IIdentitySource}.
        """
        sources = tuple(sources)
        for source in sources:
            verifyObject(IIdentitySource, source)
        ranked = sorted(sources, key=lambda s: LEVELS.index(s.level))
        return cls(tuple(ranked))

    def identify(self, client: object) -> Identity:
        """
        The identity of C{client}.
        """
        for source in self.sources:
            found = source.identify(client)
            if found is not None:
                return found
        return GUEST

    def explain(self, client: object) -> tuple[Identity, str]:
        """
        The identity of C{client} and why, in words.
        """
        for source in self.sources:
            found = source.identify(client)
            if found is not None:
                explain = getattr(source, "explain", None)
                why = (explain(client) if explain is not None else None) or f"recognised by {source.__class__.__name__}"
                return found, why
        return GUEST, "no identity source recognises this client"


def identity_of(user: User, level: str) -> Identity:
    """
    The identity of a configured user at C{level}.
    """
    return Identity(user=user.name, level=level, groups=tuple(user.groups) + (EVERYONE,))


@implementer(IIdentitySource)
class AssumedIdentitySource:
    """
    Recognises users by where they connect from: the first user in file order with a location
    matching the client is the one assumed.

    Lookups cost O(log n) in the number of locations (see L{LocationIndex}); C{mac:} locations
    read the kernel's neighbour table, once per connection and only if any user has one.
    """

    level = "assumed"

    def __init__(self, users: Iterable[User], mac_for: Callable[[str], str | None] = neighbour_mac) -> None:
        self.users = tuple(users)
        self._index = LocationIndex(u.locations for u in self.users)
        self._mac_for = mac_for
        # Identities are values: one per user, built once rather than per connection.
        self._identities = tuple(identity_of(u, self.level) for u in self.users)

    def identify(self, client: ClientInfo) -> Identity | None:
        """
        See L{IIdentitySource.identify}.
        """
        ip = client.client_ip
        owner = self._index.first(client_address(ip), (lambda: self._mac_for(ip)) if self._index.needs_mac else None)
        return None if owner is None else self._identities[owner]

    def explain(self, client: ClientInfo) -> str | None:
        """
        Why C{client} is recognised, e.g. C{location 10.0.1.0/24 of users.alice}; L{None} if not.
        """
        mac = self._mac_for(client.client_ip) if self._index.needs_mac else None
        ip = client_address(client.client_ip)
        owner = self._index.first(ip, lambda: mac)
        if owner is None:
            return None
        location = self._index.matching_location(owner, ip, mac)
        return f"location {location} of users.{self.users[owner].name}"


@implementer(IIdentitySource)
class CertificateIdentitySource:
    """
    Recognises users by a verified TLS client certificate: its subject CN is the user's name or
    one of the user's C{certificates}.  The identity is C{authenticated}.
    """

    level = "authenticated"

    def __init__(self, users: Iterable[User]) -> None:
        self._by_name: dict[str, User] = {}
        for user in users:
            for name in (user.name,) + tuple(user.certificates):
                self._by_name.setdefault(name, user)

    def identify(self, client: ClientInfo) -> Identity | None:
        """
        See L{IIdentitySource.identify}.
        """
        name = getattr(client, "certificate_cn", None)
        user = self._by_name.get(name) if name else None
        return None if user is None else identity_of(user, self.level)

    def explain(self, client: ClientInfo) -> str | None:
        """
        Why C{client} is recognised.
        """
        name = getattr(client, "certificate_cn", None)
        user = self._by_name.get(name) if name else None
        return None if user is None else f"TLS client certificate CN={name!r} of users.{user.name}"
