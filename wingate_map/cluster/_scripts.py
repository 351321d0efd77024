"""
The Lua scripts the Redis store runs: each is one atomic step on the server.

Key layout (C{P} is the store's prefix, C{wingatemap} by default):

  P:node:NODE          the node's registration (lease): its instance token, PX node_ttl
  P:nodes              set of registered node names (for sweeping and the cluster view)
  P:conn:MAPPING:IP    hash session id -> node: the sessions counted against a cluster limit
  P:held:NODE          set of the P:conn:... keys NODE has members in (for sweeping)
  P:sessions:NODE      hash session id -> JSON: the node's session directory, PX node_ttl
  P:login:IP           the user logged in from IP, PX the login's TTL
  P:instance           a random token per Redis data set: a new one means Redis lost its data

Several scripts read keys they compute (a node's lease, its session hash): fine on a single
Redis server (the supported deployment); Redis Cluster would need hash tags (docs/cluster.md).
"""

from __future__ import annotations

# KEYS: node key, nodes set.  ARGV: token, ttl ms, node.  1 = registered or renewed, 0 = the
# name is held by another live instance.  (SET NX PX on first registration, PEXPIRE after.)
REGISTER = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
if current then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# KEYS: node key.  ARGV: token.  Drops the registration if it is still ours.
DEREGISTER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: instance key.  ARGV: a fresh token.  The data set's token (set now if there was none).
INSTANCE = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# KEYS: count key, this node's held set.  ARGV: limit, node, session, node key prefix.
# Counts the live members (members of nodes whose lease is gone are removed, not counted) and
# adds the session if they are fewer than the limit.  1 = counted, 0 = at the limit.
ACQUIRE = """
local entries = redis.call('HGETALL', KEYS[1])
local live = 0
local alive = {}
for i = 1, #entries, 2 do
  local session, owner = entries[i], entries[i + 1]
  if session ~= ARGV[3] then
    local ok = alive[owner]
    if ok == nil then
      ok = redis.call('EXISTS', ARGV[4] .. owner) == 1
      alive[owner] = ok
    end
    if ok then live = live + 1 else redis.call('HDEL', KEYS[1], session) end
  end
end
if live >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
return 1
"""

# KEYS: count key, this node's held set.  ARGV: session, node.
RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
for _, owner in ipairs(redis.call('HVALS', KEYS[1])) do
  if owner == ARGV[2] then return 1 end
end
redis.call('SREM', KEYS[2], KEYS[1])
return 1
"""

# KEYS: nodes set.  ARGV: prefix.  Removes every trace of nodes whose lease is gone: their
# counted sessions, held set and session directory.  The number of nodes swept.
SWEEP = """
local swept = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':node:' .. node) == 0 then
    local held = ARGV[1] .. ':held:' .. node
    for _, key in ipairs(redis.call('SMEMBERS', held)) do
      local entries = redis.call('HGETALL', key)
      for i = 1, #entries, 2 do
        if entries[i + 1] == node then redis.call('HDEL', key, entries[i]) end
      end
    end
    redis.call('DEL', held, ARGV[1] .. ':sessions:' .. node)
    redis.call('SREM', KEYS[1], node)
    swept = swept + 1
  end
end
return swept
"""

# KEYS: nodes set.  ARGV: prefix.  [node, session JSON, node, session JSON, ...] of live nodes.
SESSIONS = """
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':node:' .. node) == 1 then
    for _, value in ipairs(redis.call('HVALS', ARGV[1] .. ':sessions:' .. node)) do
      out[#out + 1] = node
      out[#out + 1] = value
    end
  end
end
return out
"""
