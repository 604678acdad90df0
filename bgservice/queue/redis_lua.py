"""The Lua every Redis queue script starts with (redis_scripts.py): the prefix and clock
from ARGV, and the helpers that move, place and finish jobs, so that each state change is
written once."""

from __future__ import annotations

COMMON = r"""
local P = ARGV[1]
local NOW = ARGV[2]
local now = tonumber(NOW)
local woke = false

local function jkey(id) return P .. ':job:' .. id end
local function pad(id) return string.format('%020d', tonumber(id)) end

local function move(id, old, new, score)
  if old then redis.call('ZREM', P .. ':state:' .. old, id) end
  redis.call('ZADD', P .. ':state:' .. new, score, id)
end

-- Put a waiting job in line: ready, or delayed until run_at. (run_at and priority as
-- the caller knows them, else read: each redis.call costs about 1 us on top of its work.)
local function place(id, run_at, priority)
  if not run_at then
    local f = redis.call('HMGET', jkey(id), 'run_at', 'priority')
    run_at, priority = f[1], f[2]
  end
  run_at = tonumber(run_at)
  if run_at > now then
    redis.call('ZADD', P .. ':delayed', run_at, id)
  else
    redis.call('ZADD', P .. ':ready', -tonumber(priority), pad(id))
  end
  woke = true
end

-- Finish a job and, transitively, the jobs that depended on it. ``known``: the first
-- job's state and unique key, when the caller has read them already.
local function finish(id, state, status, result, err, expires, known)
  local todo = {{id, state, status, result, err}}
  local i = 1
  while i <= #todo do
    local t = todo[i]
    i = i + 1
    local jid, st = t[1], t[2]
    local jk = jkey(jid)
    local f = (i == 2 and known) or redis.call('HMGET', jk, 'state', 'unique_key')
    local old, uk = f[1], f[2]
    -- owner '' rather than a separate HDEL: no instance is named ''.
    redis.call('HSET', jk, 'state', st, 'finished', NOW, 'status', t[3], 'result', t[4],
               'expires', expires, 'owner', '')
    if t[5] ~= '' then redis.call('HSET', jk, 'error', t[5]) end
    if uk and redis.call('HGET', P .. ':unique', uk) == tostring(jid) then
      redis.call('HDEL', P .. ':unique', uk)
    end
    move(jid, old, st, NOW)
    redis.call('ZADD', P .. ':finished', expires, jid)
    redis.call('PUBLISH', P .. ':events', 'done:' .. jid)
    local deps = redis.call('SMEMBERS', P .. ':blocked:' .. jid)
    if #deps > 0 then redis.call('DEL', P .. ':blocked:' .. jid) end
    for _, d in ipairs(deps) do
      -- No blockers field: it stopped waiting for us (retried since, or failed already).
      local dk = jkey(d)
      local g = redis.call('HMGET', dk, 'state', 'blockers')
      if g[1] == 'waiting' and g[2] then
        if st == 'done' then
          if redis.call('HINCRBY', dk, 'blockers', -1) <= 0 then
            redis.call('HDEL', dk, 'blockers')
            place(d)
          end
        else
          redis.call('HDEL', dk, 'blockers')
          local msg = 'Dependency: job ' .. jid .. ' ' .. st
          todo[#todo + 1] = {d, 'failed', '424', msg, msg}
        end
      end
    end
  end
end

local function wake()
  if woke then redis.call('PUBLISH', P .. ':events', 'wake') end
end

local function live(jk)
  -- A job's state, or nil when it does not exist or its result has expired.
  local f = redis.call('HMGET', jk, 'state', 'expires')
  if not f[1] then return nil end
  if f[2] and tonumber(f[2]) < now then return nil end
  return f[1]
end

local function known(id)
  -- The job's key and state; or nil, nil and the 404 reply for an unknown or expired id.
  local jk = jkey(id)
  local st = live(jk)
  if not st then return nil, nil, {404, 'Job ' .. id .. ' not found (unknown or expired)'} end
  return jk, st
end
"""
