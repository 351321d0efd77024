"""
The words of a mapping's C{balance} setting and the bounds of a destination's C{weight}: read
by the configuration, used by the relay's balancer.
"""

FAILOVER = "failover"
ROUND_ROBIN = "round-robin"
LEAST_CONNECTIONS = "least-connections"
SOURCE_HASH = "source-hash"
METHODS = (FAILOVER, ROUND_ROBIN, LEAST_CONNECTIONS, SOURCE_HASH)

MAX_WEIGHT = 256
