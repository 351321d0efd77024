"""
What happens to an accepted client: which destination it gets, or whether it is refused.

A mapping's rule service recognises the client (through the identity sources), then picks the
destination: the mapping's C{default} when it has one, otherwise nothing (the client is refused
with reason C{no-destination}).
"""

from __future__ import annotations

from attrs import field, frozen
from zope.interface import implementer

from .config import Destination, Mapping
from .identity import GUEST, Identity, IdentityResolver
from .interfaces import IRuleService

CONNECT = "connect"
REJECT = "reject"
NO_DESTINATION = "no-destination"


@frozen
class ClientInfo:
    """
    What is known about an accepted client when its destination is chosen.

    @ivar original_dst: C{ip:port} the client originally addressed (intercepted connections).
    """

    mapping: str
    client_ip: str
    client_port: int
    local_ip: str
    local_port: int
    original_dst: str | None = None
    tls: bool = False


@frozen
class Decision:
    """
    The outcome for one client.

    @ivar action: L{CONNECT}, L{REJECT} or L{NO_DESTINATION}.
    @ivar destinations: tried in order until one connects (for L{CONNECT}).
    @ivar rule: the 0-based index of the matching rule, C{"default"}, or L{None}.
    """

    action: str
    destinations: tuple[Destination, ...] = ()
    rule: int | str | None = None
    identity: Identity = GUEST
    reasons: tuple[str, ...] = field(default=(), eq=False)


@implementer(IRuleService)
@frozen
class MappingRuleService:
    """
    Decides for one mapping from its configuration.
    """

    mapping: Mapping
    identities: IdentityResolver = IdentityResolver()

    def decide(self, client: ClientInfo) -> Decision:
        """
        See L{IRuleService.decide}.
        """
        identity = self.identities.identify(client)
        if self.mapping.default:
            return Decision(CONNECT, self.mapping.default, "default", identity, ("no rule matched; the default applies",))
        return Decision(NO_DESTINATION, (), None, identity, ("no rule matched and the mapping has no default",))
