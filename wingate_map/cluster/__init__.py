"""
Several gateways, one service: the state they share through Redis (SPEC §7).

L{RedisClusterStore} implements L{wingate_map.interfaces.IClusterStore} on Redis;
L{wingate_map.testing.FakeClusterStore} is the in-memory fake for tests.  docs/cluster.md
describes the design.
"""

from __future__ import annotations

from typing import Any

from ._errors import ClusterError, ClusterUnavailable, KillTimeout, NodeNameTaken
from ._gateway import ClusterLimits, StreamSink
from ._state import DOWN, UP
from ._url import RedisAddress, parse_redis_url

__all__ = [
    "ClusterError",
    "ClusterLimits",
    "ClusterUnavailable",
    "DOWN",
    "KillTimeout",
    "NodeNameTaken",
    "RedisAddress",
    "RedisClusterStore",
    "StreamSink",
    "UP",
    "parse_redis_url",
]


def __getattr__(name: str) -> Any:
    # txredisapi imports the global reactor when it is imported: load it only when a Redis
    # store is wanted, after twistd (or the test runner) has installed its reactor.
    if name == "RedisClusterStore":
        from ._redis import RedisClusterStore

        return RedisClusterStore
    raise AttributeError(name)
