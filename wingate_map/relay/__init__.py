"""
The relay: everything that carries an accepted client to its destination.  Admission (a PROXY
header, the TLS server name peeked from a ClientHello), the session's protocol pair and its
life (L{RelayProtocol}, L{RelayFactory}, one L{MappingRuntime} per mapping), reaching a
destination (L{StandardEndpointFactory}; balancing between several and their active health
checks), and the data plane that moves the bytes (the socket pump, rate limits).

It asks the policy through L{wingate_map.interfaces.IRuleService} and tells the events hub;
it never imports the admin API, the CLI, the tap or the service tree.

Private modules: C{_protocol} (the protocol pair), C{_proxy_protocol}, C{_sni},
C{_destinations}, C{_balance}, C{_health}, C{_pump} (the data plane), C{_poller} (its epoll),
C{_connect} (the hand-started connect), C{_ratelimit},
C{_tcp_internals} (the one place that reads Twisted's TCP transport internals, and why),
C{_accept} (the listening port that accepts plain connections lean, L{ListeningPort}: the one
place that builds on Twisted's C{tcp.Port}, and why).
"""

from ._accept import ListeningPort
from ._destinations import StandardEndpointFactory
from ._health import DestinationList, HealthChecker, build_lists, combine_states
from ._poller import descriptors_for
from ._protocol import MappingRuntime, RelayFactory, RelayProtocol
from ._proxy_protocol import build_header
from ._ratelimit import RateLimits

__all__ = [
    "DestinationList",
    "HealthChecker",
    "ListeningPort",
    "MappingRuntime",
    "RateLimits",
    "RelayFactory",
    "RelayProtocol",
    "StandardEndpointFactory",
    "build_header",
    "build_lists",
    "combine_states",
    "descriptors_for",
]
