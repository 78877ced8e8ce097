"""The Lua scripts of :class:`~llmproxy.state.redis.RedisStore`: one atomic step each, one key each.

See the theory of operation in :mod:`llmproxy.state.redis` (versions, tombstones, expiry).
"""

from __future__ import annotations

# Shared Lua helpers, prepended to each script. ``live`` reads a value hash
# and returns (val or false, ver string or false); val is false when the key
# is absent, deleted (tombstone) or past ``exp``.
LUA_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function live(key)
  local f = redis.call('HMGET', key, 'val', 'ver', 'exp')
  if f[1] and f[3] and tonumber(f[3]) <= now_ms then
    return false, f[2]
  end
  return f[1], f[2]
end

local function write(key, val, ver, ttl_ms, tomb_ms)
  local new = string.format('%.0f', math.max((tonumber(ver) or 0) + 1, now_us))
  if ttl_ms then
    redis.call('HSET', key, 'val', val, 'ver', new,
               'exp', string.format('%.0f', now_ms + ttl_ms))
    redis.call('PEXPIRE', key, ttl_ms + tomb_ms)
  else
    redis.call('HSET', key, 'val', val, 'ver', new)
    redis.call('HDEL', key, 'exp')
    redis.call('PERSIST', key)
  end
end

local function bury(key, tomb_ms)
  redis.call('HDEL', key, 'val', 'exp')
  redis.call('PEXPIRE', key, tomb_ms)
end
"""

# KEYS[1] value hash -> {val, ver} or nil
LUA_GET = """
local val, ver = live(KEYS[1])
if not val then return false end
return {val, ver}
"""

# KEYS[1] value hash; ARGV: val, cas ('' = none), ttl_ms ('' = none), tomb_ms
LUA_SET = """
local val, ver = live(KEYS[1])
if ARGV[2] ~= '' and ARGV[2] ~= (val and ver or '0') then return 0 end
write(KEYS[1], ARGV[1], ver, tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""

# KEYS[1] value hash; ARGV: cas ('' = none), tomb_ms
LUA_DELETE = """
local val, ver = live(KEYS[1])
if not val or (ARGV[1] ~= '' and ARGV[1] ~= ver) then return 0 end
bury(KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS[1] lease's value hash; ARGV: holder, ttl_ms, tomb_ms
LUA_ACQUIRE = """
local val, ver = live(KEYS[1])
if val and val ~= ARGV[1] then return 0 end
write(KEYS[1], ARGV[1], ver, tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
"""

# KEYS[1] lease's value hash; ARGV: holder, tomb_ms
LUA_RELEASE = """
local val, ver = live(KEYS[1])
if val == ARGV[1] then bury(KEYS[1], tonumber(ARGV[2])) end
return 0
"""

# KEYS[1] counter; ARGV: amount, ttl_ms. Create at 0 with the ttl, then add:
# INCRBY keeps the expiry, so the ttl applies on creation only.
LUA_INCR_TTL = """
redis.call('SET', KEYS[1], 0, 'PX', ARGV[2], 'NX')
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""
