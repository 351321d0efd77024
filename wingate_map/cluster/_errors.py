"""
The errors of the cluster store.
"""

from __future__ import annotations

from ..errors import WingateMapError


class ClusterError(WingateMapError):
    """
    Base class of the cluster store's errors.
    """


class ClusterUnavailable(ClusterError):
    """
    The shared store cannot be reached right now; the gateway carries on with what it knows
    (last known logins, node-local limits).
    """


class NodeNameTaken(ClusterError):
    """
    Another live gateway already holds this node name (C{cluster.node} must be unique).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        super().__init__(
            f"cluster.node: another live gateway is registered as {node!r}; give every gateway "
            "its own node name (or wait until the other one has been silent for node_ttl seconds)"
        )


class KillTimeout(ClusterError):
    """
    A kill request was not confirmed by the session's owner in time.
    """

    def __init__(self, session_id: str, timeout: float) -> None:
        self.session_id = session_id
        self.timeout = timeout
        super().__init__(f"session {session_id}: no gateway confirmed the kill within {timeout:g} s")
