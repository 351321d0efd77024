"""
The host's network: which addresses each mapping listens on (adapters and usage classes),
transparent interception with nftables (and the original destination of an intercepted
connection), and the kernel's neighbour table (a client's MAC address).

Private modules: C{_bindings}, C{_interception}, C{_neighbours}.
"""

from ._bindings import Adapter, Listener, list_adapters, plan_listeners
from ._interception import TABLE, InterceptionError, install, original_destination, redirects, remove, ruleset
from ._interception import _port_set as port_set
from ._neighbours import mac_for

__all__ = [
    "TABLE",
    "Adapter",
    "InterceptionError",
    "Listener",
    "list_adapters",
    "install",
    "mac_for",
    "original_destination",
    "plan_listeners",
    "port_set",
    "redirects",
    "remove",
    "ruleset",
]
