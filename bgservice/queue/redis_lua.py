"""The Lua every Redis queue script starts with (redis_scripts.py): the prefix and clock
from ARGV, and the helpers that move, place and finish jobs, so that each state change is
written once; CLAIM_FN, the claim that CLAIM, ADD, FIRE and END share; and CASCADE, which
ends the jobs waiting on ended ones that a finishing script left over."""

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

-- Redis's own clock, for lease deadlines: those of every instance on one clock, so that a
-- host whose clock runs ahead takes no live instance's job over. (TIME in a script: Redis
-- 5 and later replicate a script's effects, not the script.)
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function jkey(id) return P .. ':job:' .. id end
local function pad(id) return string.format('%020d', tonumber(id)) end

-- The id a new job takes (ADD_BODY). ``mark``: the highest id the adding instance has
-- handed out or seen (redis_outage.Ids). A counter not above it is one Redis lost (a
-- restart without persistence, FLUSHALL, a failover to a replica without it), counting
-- from 1 again: moved past the mark, so that a client still holding an id from before
-- follows or collects no new job under it. Returns the id and 'new', or 'lost:N' (N: the
-- counter Redis had), for the instance to say.
local function next_id(mark)
  local id = redis.call('INCR', P .. ':id')
  if id > tonumber(mark) then return id, 'new' end
  redis.call('SET', P .. ':id', mark)
  return redis.call('INCR', P .. ':id'), 'lost:' .. string.format('%d', id - 1)
end

local function move(id, old, new, score)
  if old then redis.call('ZREM', P .. ':state:' .. old, id) end
  redis.call('ZADD', P .. ':state:' .. new, score, id)
end

-- Put a waiting job in line: ready, or delayed until run_at. Ready is two lines, each
-- scored -priority with the id padded to 20 digits: P:ready, every ready job (listings,
-- positions, the claim's first look), and P:ready:MODULE, its module's (where the claim
-- finds the best job it can take when the head of P:ready is one it cannot); P:ready_modules
-- names the modules that may have one (redis_lines.py). (Fields as the caller knows them,
-- else read: each redis.call costs about 1 us on top of its work.)
local function place(id, run_at, priority, module)
  if not run_at then
    local f = redis.call('HMGET', jkey(id), 'run_at', 'priority', 'module')
    run_at, priority, module = f[1], f[2], f[3]
  end
  run_at = tonumber(run_at)
  if run_at > now then
    redis.call('ZADD', P .. ':delayed', run_at, id)
  else
    local score, member = -tonumber(priority), pad(id)
    redis.call('ZADD', P .. ':ready', score, member)
    redis.call('ZADD', P .. ':ready:' .. module, score, member)
    redis.call('SADD', P .. ':ready_modules', module)
  end
  woke = true
end

-- Take a member out of both ready lines (``module`` nil: its job is gone, and with it
-- the name of its line, where the claim drops it when it comes to the head).
local function unready(member, module)
  redis.call('ZREM', P .. ':ready', member)
  if module then redis.call('ZREM', P .. ':ready:' .. module, member) end
end

-- Move up to ``most`` delayed jobs now due to the ready line: a claim's first step, and
-- what a listing does first (redis_db.DUE) to show the order they will run in.
local function promote_due(most)
  local due = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', NOW, 'LIMIT', 0, most)
  for _, id in ipairs(due) do
    redis.call('ZREM', P .. ':delayed', id)
    local f = redis.call('HMGET', jkey(id), 'state', 'run_at', 'priority', 'module')
    if f[1] == 'waiting' then place(id, f[2], f[3], f[4]) end
  end
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

-- Job ``id``, waiting, waits for the jobs ``blockers`` (ids, not ended) to end; with none,
-- it is placed (``run_at``, ``priority``, ``module`` as place() takes them: nil, read).
local function wait_on(id, blockers, run_at, priority, module)
  if #blockers == 0 then return place(id, run_at, priority, module) end
  redis.call('HSET', jkey(id), 'blockers', #blockers)
  for _, dep in ipairs(blockers) do redis.call('ZADD', blocked_key(dep), id, id) end
end

-- A job ends: its fields, state and unique key. The jobs waiting on it (P:blocked:ID) are
-- queued for the cascade below under a key of their own (P:cascade:N), so that the job,
-- retried and ending again, queues its new ones apart. Returns whether it queued some.
-- A result owed to an add that waits for it (ADD's 'owed', seconds) is kept that long at
-- least, whatever keep_results says: its waiter may be on another instance, reading it
-- once 'done' reaches it (keep_results = 0 expired it at once, and it got a 404).
local function ended(id, state, status, result, err, expires, known)
  local jk = jkey(id)
  local f = known or redis.call('HMGET', jk, 'state', 'unique_key', 'owed')
  local old, uk, owed = f[1], f[2], f[3]
  if owed and now + tonumber(owed) > tonumber(expires) then
    expires = string.format('%.6f', now + tonumber(owed))
  end
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

-- Job ``d`` fails (424) because job ``jid``, which it ran after, ended in ``st``: noted in
-- P:failed_by:JID, where a retry with dependents=1 finds it (redis_revive.py).
local function fail_after(d, jid, st, expires)
  local msg = 'Dependency: job ' .. jid .. ' ' .. st
  redis.call('ZADD', P .. ':failed_by:' .. jid, d, d)
  ended(d, 'failed', '424', msg, msg, expires)
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
          fail_after(d, jid, st, expires)
        end
      end
    end
  end
  return redis.call('EXISTS', list) == 1
end

-- Finish a job and the jobs waiting on it, transitively, as far as the budget goes; the
-- rest wait, 'cascade' published, for the instances' CASCADE scripts. ``known``: the
-- job's state, unique key and owed, when the caller has read them already.
local function finish(id, state, status, result, err, expires, known)
  if ended(id, state, status, result, err, expires, known) and cascade(expires, true) then
    left = true
  end
end

local function wake()
  if woke then redis.call('PUBLISH', P .. ':events', 'wake') end
  if left then redis.call('PUBLISH', P .. ':events', 'cascade') end
end

local function live(jk, ...)
  -- A job's state, or nil when it does not exist or its result has expired; then the
  -- values of the fields named after jk, read in the same HMGET (ADD's after=).
  local f = redis.call('HMGET', jk, 'state', 'expires', ...)
  if not f[1] then return nil end
  if f[2] and tonumber(f[2]) < now then return nil end
  return f[1], unpack(f, 3)
end

local function known(id)
  -- The job's key and state; or nil, nil and the 404 reply for an unknown or expired id.
  local jk = jkey(id)
  local st = live(jk)
  if not st then return nil, nil, {404, 'Job ' .. id .. ' not found (unknown or expired)'} end
  return jk, st
end
"""

# A module slot held past an attempt's end (P:held) given back; not twice (REAP may have).
UNHOLD_FN = r"""
local function unhold(member)
  if redis.call('ZREM', P .. ':held', member) == 1 then
    redis.call('HINCRBY', P .. ':modrun', string.match(member, '^[^|]+'), -1)
    woke = true  -- (the module's jobs waiting for the slot)
  end
end
"""

# Redis away or frozen: every live instance renews (RENEW, HELD) and reaps (REAP) once a
# renewal interval (lease / 3), so when one of them finds no such script for lease / 2 on
# Redis's clock (P:seen), Redis was away (a restart with its data, an outage) or frozen
# (DEBUG SLEEP, CLIENT PAUSE, a slow fork), and the renewals held up may land after the
# next reap: no lease is judged for a lease from then (P:hold). A REAP sent during a
# freeze ran as it thawed, ahead of the live instances' queued RENEWs, and took their
# jobs over; after an outage, an idle instance's first REAP came before their renewals.
SEEN_FN = r"""
local function seen(lease)
  local rnow = clock()
  local last = tonumber(redis.call('GET', P .. ':seen') or rnow)
  redis.call('SET', P .. ':seen', rnow)
  if rnow - last > lease / 2 then redis.call('SET', P .. ':hold', rnow + lease) end
  return rnow
end
"""

# The claim, shared by CLAIM, ADD, FIRE and END (an attempt's end takes the next job in the
# same round trip): moves due delayed jobs to ready, then takes the best ready job of a
# module the claiming instance can run (``runnable_json``: ["mail", ...]), under the
# module's limit and rate (limits and rates as JSON, {} for none; a rate {"mail": [10,
# 60]}: 10 starts per 60 s); its lease runs ``lease`` seconds on Redis's clock. Returns
# {id, next wake-up, the job's fields}, or {0, next} (the next delayed job, or a throttled
# module's window). A job of a module no instance can run waits, ready, until one can.
# However many jobs it cannot take are ahead (a limited module's backlog, jobs of modules
# only other instances run), it takes the best one it can: the head of P:ready, most
# often; else the best of the heads of its modules' lines (P:ready:MODULE, place()).
CLAIM_FN = r"""
local function claim(lease, owner, limits_json, rates_json, runnable_json)
  local nextd = redis.call('ZRANGE', P .. ':delayed', 0, 0, 'WITHSCORES')[2] or ''
  if nextd ~= '' and tonumber(nextd) <= now then  -- delayed jobs now due
    promote_due(200)
    nextd = redis.call('ZRANGE', P .. ':delayed', 0, 0, 'WITHSCORES')[2] or ''
  end
  local limits = limits_json == '{}' and {} or cjson.decode(limits_json)
  local rates = rates_json == '{}' and {} or cjson.decode(rates_json)
  -- A module name is [A-Za-z0-9_-] (registry.py): found as '"NAME"' in the JSON as it is,
  -- a tenth of the 1.3 us cjson.decode took (15 modules) per claim.
  local function runnable(module)
    return string.find(runnable_json, '"' .. module .. '"', 1, true)
  end
  local function throttled(module)  -- when its rate window has room again; nil: now
    local rate, rk = rates[module], P .. ':rate:' .. module
    if not rate then return nil end
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - rate[2])
    if redis.call('ZCARD', rk) < rate[1] then return nil end
    return tonumber(redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')[2]) + rate[2]
  end
  -- Whether a job of ``module`` may start now: under its limit and its rate (a throttled
  -- module's window, when it has jobs ready, is the next wake-up if sooner). Asked once
  -- a claim per module.
  local shut = {}
  local function open(module)
    if shut[module] == nil then
      local free, limit = throttled(module), limits[module]
      if free and (nextd == '' or free < tonumber(nextd)) then nextd = tostring(free) end
      shut[module] = free ~= nil or (limit ~= nil
        and tonumber(redis.call('HGET', P .. ':modrun', module) or '0') >= limit)
    end
    return not shut[module]
  end
  -- Start the job of ``member`` (out of the ready lines already); ``f``: its state,
  -- module, attempts and progress.
  local function take(member, f)
    local id, module = tostring(tonumber(member)), f[2]
    local jk = jkey(id)
    if rates[module] then
      redis.call('ZADD', P .. ':rate:' .. module, now, id .. '@' .. NOW)
      redis.call('EXPIRE', P .. ':rate:' .. module, math.ceil(rates[module][2]) + 1)
    end
    redis.call('HINCRBY', P .. ':modrun', module, 1)
    redis.call('HSET', jk, 'state', 'running', 'started', NOW, 'owner', owner,
               'attempts', (tonumber(f[3]) or 0) + 1)
    if f[4] then redis.call('HDEL', jk, 'progress') end
    redis.call('ZADD', P .. ':running', clock() + tonumber(lease), id)
    move(id, 'waiting', 'running', NOW)
    return {id, nextd, redis.call('HGETALL', jk)}
  end
  local function fields(member)
    return redis.call('HMGET', jkey(tostring(tonumber(member))), 'state', 'module',
                      'attempts', 'progress')
  end
  -- The head of one module's line, {member, score}; nil when it has none.
  local function head(module)
    local h = redis.call('ZRANGE', P .. ':ready:' .. module, 0, 0, 'WITHSCORES')
    return h[1] and {h[1], tonumber(h[2])}
  end
  -- The best job that it can take, of the heads of the lines of the modules it runs
  -- and may start now: a head no longer waiting, or no longer in P:ready (a line an
  -- instance of an earlier version did not keep), is dropped and its next looked at.
  local function best_of_lines()
    local heads = {}
    for module in string.gmatch(runnable_json, '"([^"]+)"') do
      local h = head(module)
      if h and open(module) then heads[module] = h end
    end
    while true do
      local best, line = nil, nil
      for module, h in pairs(heads) do
        if not best or h[2] < best[2] or (h[2] == best[2] and h[1] < best[1]) then
          best, line = h, module
        end
      end
      if not best then return {0, nextd} end
      local f = fields(best[1])
      if f[1] == 'waiting' and redis.call('ZREM', P .. ':ready', best[1]) == 1 then
        redis.call('ZREM', P .. ':ready:' .. line, best[1])
        return take(best[1], f)
      end
      unready(best[1], line)
      heads[line] = head(line)
    end
  end
  -- The head of P:ready first: most often the job taken, one ZRANGE (a page of 100
  -- copied into Lua for each claim was a third of a job's Redis time with a long queue).
  -- A member no longer waiting is removed.
  while true do
    local member = redis.call('ZRANGE', P .. ':ready', 0, 0)[1]
    if not member then return {0, nextd} end
    local f = fields(member)
    if f[1] == 'waiting' then
      if not (runnable(f[2]) and open(f[2])) then return best_of_lines() end
      unready(member, f[2])
      return take(member, f)
    end
    unready(member, f[2])
  end
end
"""

# ARGV: P, now, expires (of the jobs it fails). Fails or places the next jobs waiting on
# ended ones; 1 while some are left.
CASCADE = COMMON + "local more = cascade(ARGV[3], false)\nwake()\nreturn more and 1 or 0\n"
