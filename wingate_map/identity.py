"""
Who a client is: the user it is recognised as, the groups it is in, and how sure we are.

Identity levels rank C{authenticated} (proven: a TLS client certificate, an admin-API login) above
C{assumed} (inferred from the location it connects from) above C{guest} (nobody recognised).
Sources are asked from the strongest level down and the first answer wins.
"""

from __future__ import annotations

from typing import Iterable

from attrs import frozen
from zope.interface.verify import verifyObject

from .interfaces import IIdentitySource

LEVELS = ("authenticated", "assumed", "guest")
EVERYONE = "everyone"


@frozen
class Identity:
    """
    The user a client is recognised as.

    @ivar level: C{authenticated}, C{assumed} or C{guest}.
    @ivar groups: every group the user is in, always including C{everyone}.
    """

    user: str = "guest"
    level: str = "guest"
    groups: tuple[str, ...] = (EVERYONE,)


GUEST = Identity()


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
