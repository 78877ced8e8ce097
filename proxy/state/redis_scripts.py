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

# Quotas (see llmproxy.state.quota): KEYS are one hash per counter: ``t`` the total,
# for a sliding log ``o``/``n`` the oldest/newest bucket index and one field per bucket
# (its index, in decimal) holding its amount. The keys of one call share the hash tag
# ``{q}`` (redis.py), so the script is legal on Redis Cluster too.
#
# ARGV: slack_ms, buckets per window, then per counter: limit, window_us (0: running
# total), amount, minimum, ttl_ms ('' = none). Returns per counter {used, granted,
# reset_us, retry_us (-1: never), slot} followed by the admitted flag.
LUA_RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slack_ms = tonumber(ARGV[1])
local per_window = tonumber(ARGV[2])
local n = #KEYS
local used, grant, spec = {}, {}, {}
local ok = true
local function field(b) return string.format('%d', b) end
for i = 1, n do
  local h = KEYS[i]
  local b = 2 + (i - 1) * 5
  local q = {limit = tonumber(ARGV[b + 1]), win = tonumber(ARGV[b + 2]), amount = tonumber(ARGV[b + 3]),
             minimum = tonumber(ARGV[b + 4]), ttl = tonumber(ARGV[b + 5])}
  spec[i] = q
  local total = tonumber(redis.call('HGET', h, 't') or '0')
  if q.win > 0 then
    q.width = q.win / per_window
    q.first = math.floor((now - q.win) / q.width)
    local oldest = tonumber(redis.call('HGET', h, 'o') or '')
    if oldest and oldest < q.first then
      local all = redis.call('HGETALL', h)
      local keep = nil
      for j = 1, #all, 2 do
        local f = all[j]
        if f ~= 't' and f ~= 'o' and f ~= 'n' then
          local bucket = tonumber(f)
          if bucket < q.first then
            total = total - tonumber(all[j + 1])
            redis.call('HDEL', h, f)
          elseif not keep or bucket < keep then
            keep = bucket
          end
        end
      end
      redis.call('HSET', h, 't', total)
      if keep then redis.call('HSET', h, 'o', field(keep)) else redis.call('HDEL', h, 'o', 'n') end
    end
  end
  used[i] = total
  local g = math.min(q.amount, q.limit - total)
  if g < q.minimum then ok = false end
  grant[i] = g
end
local out = {}
for i = 1, n do
  local h, q = KEYS[i], spec[i]
  local total, g, slot = used[i], 0, 0
  if ok then
    g = grant[i]
    total = total + g
  end
  local reset, retry = 0, 0
  if q.win > 0 then
    slot = math.floor(now / q.width)
    if ok then
      redis.call('HINCRBY', h, field(slot), g)
      redis.call('HSET', h, 't', total, 'n', field(slot))
      if not redis.call('HGET', h, 'o') then redis.call('HSET', h, 'o', field(slot)) end
      redis.call('PEXPIRE', h, math.ceil((q.win + q.width) / 1000) + slack_ms)
    end
    local newest = tonumber(redis.call('HGET', h, 'n') or '')
    if newest and newest >= q.first then reset = math.max(0, (newest + 1) * q.width + q.win - now) end
    if not ok and total + q.minimum > q.limit then
      retry = -1
      if q.minimum <= q.limit then
        local all = redis.call('HGETALL', h)
        local buckets = {}
        for j = 1, #all, 2 do
          local f = all[j]
          if f ~= 't' and f ~= 'o' and f ~= 'n' then
            buckets[#buckets + 1] = {tonumber(f), tonumber(all[j + 1])}
          end
        end
        table.sort(buckets, function(a, c) return a[1] < c[1] end)
        local freed = 0
        for j = 1, #buckets do
          freed = freed + buckets[j][2]
          if total - freed + q.minimum <= q.limit then
            retry = math.max(0, (buckets[j][1] + 1) * q.width + q.win - now)
            break
          end
        end
      end
    end
  else
    if ok then
      redis.call('HSET', h, 't', total)
      if q.ttl then redis.call('PEXPIRE', h, q.ttl) end
    elseif total + q.minimum > q.limit then
      retry = -1
    end
  end
  out[#out + 1] = total
  out[#out + 1] = g
  out[#out + 1] = math.floor(reset)
  out[#out + 1] = math.floor(retry)
  out[#out + 1] = slot
end
out[#out + 1] = ok and 1 or 0
return out
"""

# KEYS as LUA_RESERVE; ARGV: per counter: window_us, slot, delta (amount - reserved).
LUA_SETTLE = """
for i = 1, #KEYS do
  local h = KEYS[i]
  local b = (i - 1) * 3
  local win, slot, delta = tonumber(ARGV[b + 1]), ARGV[b + 2], tonumber(ARGV[b + 3])
  if win > 0 then
    if redis.call('HEXISTS', h, slot) == 1 then
      redis.call('HINCRBY', h, slot, delta)
      redis.call('HINCRBY', h, 't', delta)
    end
  elseif redis.call('EXISTS', h) == 1 then
    redis.call('HINCRBY', h, 't', delta)
  end
end
return 0
"""
