"""The Lua every Redis queue script starts with (redis_scripts.py): the prefix and clock
from ARGV, and the helpers that move, place and finish jobs, so that each state change is
written once; and CASCADE, which ends the jobs waiting on ended ones that a finishing
script left over."""

from __future__ import annotations

COMMON = r"""
local P = ARGV[1]
local NOW = ARGV[2]
local now = tonumber(NOW)
local woke = false
-- Jobs waiting on ended ones that one script fails or places at most (about 12 ms of
-- Redis): the rest wait for the next script, so other clients are answered in between.
local budget = 500
local left = false  -- some are left: wake() tells the instances

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

-- P:blocked:ID, the jobs waiting on job ID, scored by id (they are freed in the order
-- they came); one written as a plain set by an earlier version is converted first.
local function blocked_key(id)
  local key = P .. ':blocked:' .. id
  if redis.call('TYPE', key).ok == 'set' then
    local ids = redis.call('SMEMBERS', key)
    redis.call('DEL', key)
    for _, d in ipairs(ids) do redis.call('ZADD', key, d, d) end
  end
  return key
end

-- A job ends: its fields, state and unique key. The jobs waiting on it (P:blocked:ID) are
-- queued for the cascade below under a key of their own (P:cascade:N), so that the job,
-- retried and ending again, queues its new ones apart. Returns whether it queued some.
local function ended(id, state, status, result, err, expires, known)
  local jk = jkey(id)
  local f = known or redis.call('HMGET', jk, 'state', 'unique_key')
  local old, uk = f[1], f[2]
  -- owner '' rather than a separate HDEL: no instance is named ''.
  redis.call('HSET', jk, 'state', state, 'finished', NOW, 'status', status, 'result', result,
             'expires', expires, 'owner', '')
  if err ~= '' then redis.call('HSET', jk, 'error', err) end
  if uk and redis.call('HGET', P .. ':unique', uk) == tostring(id) then
    redis.call('HDEL', P .. ':unique', uk)
  end
  move(id, old, state, NOW)
  redis.call('ZADD', P .. ':finished', expires, id)
  redis.call('PUBLISH', P .. ':events', 'done:' .. id)
  local blocked = blocked_key(id)
  if redis.call('EXISTS', blocked) == 0 then return false end
  local n = redis.call('INCR', P .. ':cascade_id')
  redis.call('RENAME', blocked, P .. ':cascade:' .. n)
  redis.call('RPUSH', P .. ':cascades', n .. ' ' .. id .. ' ' .. state)
  return true
end

-- Fail or place the jobs waiting on ended ones (P:cascades, first ended first, each
-- job's in id order) until this script's budget is spent; with ``whole``, only a job's
-- whole set of them. Returns whether some are left (to CASCADE scripts, redis_db.py).
local function cascade(expires, whole)
  local list = P .. ':cascades'
  while budget > 0 do
    local item = redis.call('LINDEX', list, 0)
    if not item then return false end
    local n, jid, st = string.match(item, '^(%d+) (%d+) (%a+)$')
    local key = P .. ':cascade:' .. n
    if whole and redis.call('ZCARD', key) > budget then return true end
    local popped = redis.call('ZPOPMIN', key, budget)  -- id, score, id, score, ...
    if redis.call('EXISTS', key) == 0 then redis.call('LPOP', list) end
    budget = budget - #popped / 2
    for i = 1, #popped, 2 do
      local d = popped[i]
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
          ended(d, 'failed', '424', msg, msg, expires)
        end
      end
    end
  end
  return redis.call('EXISTS', list) == 1
end

-- Finish a job and the jobs waiting on it, transitively, as far as the budget goes; the
-- rest wait, 'cascade' published, for the instances' CASCADE scripts. ``known``: the
-- job's state and unique key, when the caller has read them already.
local function finish(id, state, status, result, err, expires, known)
  if ended(id, state, status, result, err, expires, known) and cascade(expires, true) then
    left = true
  end
end

local function wake()
  if woke then redis.call('PUBLISH', P .. ':events', 'wake') end
  if left then redis.call('PUBLISH', P .. ':events', 'cascade') end
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

# ARGV: P, now, expires (of the jobs it fails). Fails or places the next jobs waiting on
# ended ones; 1 while some are left.
CASCADE = COMMON + "local more = cascade(ARGV[3], false)\nwake()\nreturn more and 1 or 0\n"
