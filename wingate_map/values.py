"""
The values the replaceable parts pass each other (L{wingate_map.interfaces}): what is known
about a client (L{ClientInfo}), who it is (L{Identity}), what happens to it (L{Decision}, with
an L{Action}), and why a session ended (L{Reason}).

They live here, below the policy and the relay, so that identity sources, rule services and
the relay share them without importing each other.  The enums are C{str} enums: a member
compares equal to its word, and events and JSON carry the plain word (L{REASONS} and
L{LEVELS} are plain strings).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from attrs import field, frozen

if TYPE_CHECKING:
    from .config import Destination

#: The group every user is in.
EVERYONE = "everyone"


class Level(StrEnum):
    """
    How sure we are of an identity, strongest first.
    """

    AUTHENTICATED = "authenticated"
    ASSUMED = "assumed"
    GUEST = "guest"


#: The identity levels, strongest first, as plain strings.
LEVELS = tuple(level.value for level in Level)


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
class ClientInfo:
    """
    What is known about an accepted client when its destination is chosen.

    @ivar original_dst: C{ip:port} the client originally addressed (intercepted connections).
    @ivar certificate_cn: the subject CN of the client's verified TLS certificate, if any.
    @ivar sni: the server name the client asked for in its TLS ClientHello, if known.
    """

    mapping: str
    client_ip: str
    client_port: int
    local_ip: str
    local_port: int
    original_dst: str | None = None
    tls: bool = False
    certificate_cn: str | None = None
    sni: str | None = None


class Action(StrEnum):
    """
    What a rule service decided for a client.
    """

    CONNECT = "connect"
    REJECT = "reject"
    NO_DESTINATION = "no-destination"


CONNECT = Action.CONNECT
REJECT = Action.REJECT
NO_DESTINATION = Action.NO_DESTINATION


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


class Reason(StrEnum):
    """
    Why a session ended (the C{reason} of ClientDisconnect, SPEC §3).
    """

    CLIENT_CLOSED = "client-closed"
    DESTINATION_CLOSED = "destination-closed"
    REJECTED = "rejected"
    NO_DESTINATION = "no-destination"
    CONNECT_FAILED = "connect-failed"
    CONNECT_TIMEOUT = "connect-timeout"
    TLS_FAILED = "tls-failed"
    IDLE_TIMEOUT = "idle-timeout"
    LIMIT = "limit"
    BLOCKED = "blocked"
    KILLED = "killed"
    SHUTDOWN = "shutdown"
    LOST = "lost"


#: Every session-ending reason, as plain strings, in the SPEC's order.
REASONS = tuple(reason.value for reason in Reason)
