"""The Redis queue's state changes, each one atomic Lua script (see redis.py), and reading
back what they return.

Keys, all under the configured prefix ``P``:

    P:id                 INCR counter: ids unique across every instance, never reused
    P:job:ID             hash: the job's fields (job.COLUMNS), ``owner``, ``progress``
    P:ready              zset: waiting jobs due now; score -priority, member the id padded
                         to 20 digits, so equal priorities pop in order of arrival
    P:delayed            zset: waiting jobs due later; score run_at
    P:blocked:ID         set: waiting jobs that run after job ID has finished; such a job's
                         ``blockers`` field counts the dependencies it still waits for
    P:running            zset: running jobs; score the lease deadline its owner renews
    P:state:STATE        zset per state: score created (waiting), started (running) or
                         finished: counts, listings, the oldest waiting job
    P:finished           zset: finished jobs; score the time they expire
    P:unique             hash: unique key -> id of the waiting or running job holding it
    P:modrun             hash: module -> jobs running now, across instances (module limits)
    P:runs               zset: one JSON record per attempt; score the time it ended
    P:events             pub/sub channel: ``done:ID``, ``cancel:ID``, ``wake``,
                         ``schedules`` (definitions changed: reload them)
    P:schedules          hash: schedule name -> its definition (JSON)
    P:schedule_slots     hash: schedule name -> the last slot fired (or when it was made)

Every script takes the prefix as ARGV[1] and the caller's clock as ARGV[2]. Times are
written as the strings the caller sent, so they keep their full precision.
"""

from __future__ import annotations

_COMMON = r"""
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

local function place(id)
  local jk = jkey(id)
  local run_at = tonumber(redis.call('HGET', jk, 'run_at'))
  if run_at > now then
    redis.call('ZADD', P .. ':delayed', run_at, id)
  else
    redis.call('ZADD', P .. ':ready', -tonumber(redis.call('HGET', jk, 'priority')), pad(id))
  end
  woke = true
end

-- Finish a job and, transitively, the jobs that depended on it.
local function finish(id, state, status, result, err, expires)
  local todo = {{id, state, status, result, err}}
  local i = 1
  while i <= #todo do
    local t = todo[i]
    i = i + 1
    local jid, st = t[1], t[2]
    local jk = jkey(jid)
    local old = redis.call('HGET', jk, 'state')
    redis.call('HSET', jk, 'state', st, 'finished', NOW, 'status', t[3], 'result', t[4],
               'expires', expires)
    if t[5] ~= '' then redis.call('HSET', jk, 'error', t[5]) end
    redis.call('HDEL', jk, 'owner')
    local uk = redis.call('HGET', jk, 'unique_key')
    if uk and redis.call('HGET', P .. ':unique', uk) == tostring(jid) then
      redis.call('HDEL', P .. ':unique', uk)
    end
    move(jid, old, st, NOW)
    redis.call('ZADD', P .. ':finished', expires, jid)
    redis.call('PUBLISH', P .. ':events', 'done:' .. jid)
    local deps = redis.call('SMEMBERS', P .. ':blocked:' .. jid)
    redis.call('DEL', P .. ':blocked:' .. jid)
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

# ARGV: P, now, max_waiting, unique, after ("1,2,3" or ''), then the new job's fields.
# (FIRE: the same, then a schedule's name and the slot the job is the run of.)
_ADD = r"""
local unique, after = ARGV[4], ARGV[5]
if unique ~= '' then
  local existing = redis.call('HGET', P .. ':unique', unique)
  if existing then return {tonumber(existing), 'existing'} end
end
if redis.call('ZCARD', P .. ':state:waiting') >= tonumber(ARGV[3]) then
  return {-503, 'Queue full (' .. ARGV[3] .. ' jobs)'}
end
local blockers = {}
for dep in string.gmatch(after, '%d+') do
  local st = live(jkey(dep))
  if not st then return {-404, 'Job ' .. dep .. ' not found (unknown or expired)'} end
  if st == 'waiting' or st == 'running' then
    blockers[#blockers + 1] = dep
  elseif st ~= 'done' then
    return {-424, 'Job ' .. dep .. ' ' .. st}
  end
end
local id = redis.call('INCR', P .. ':id')
local jk = jkey(id)
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', jk, unpack(fields))
if unique ~= '' then redis.call('HSET', P .. ':unique', unique, id) end
move(id, nil, 'waiting', NOW)
if #blockers > 0 then
  redis.call('HSET', jk, 'blockers', #blockers)
  for _, dep in ipairs(blockers) do redis.call('SADD', P .. ':blocked:' .. dep, id) end
else
  place(id)
end
if MARK then redis.call('HSET', P .. ':schedule_slots', MARK[1], MARK[2]) end
wake()
return {id, 'new'}
"""
ADD = _COMMON + "local MARK = nil\n" + _ADD  # FIRE (redis_schedules.py) sets MARK

# ARGV: P, now, lease deadline, owner, module limits as JSON ({} for none).
# Moves due delayed jobs to ready, then takes the best ready job whose module is under
# its limit. Returns {id, next delayed time} and the job's fields, or {0, next} if none.
CLAIM = (
    _COMMON
    + r"""
local due = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', NOW, 'LIMIT', 0, 200)
for _, id in ipairs(due) do
  redis.call('ZREM', P .. ':delayed', id)
  if redis.call('HGET', jkey(id), 'state') == 'waiting' then place(id) end
end
local limits = cjson.decode(ARGV[5])
local nextd = redis.call('ZRANGE', P .. ':delayed', 0, 0, 'WITHSCORES')[2] or ''
local candidates = redis.call('ZRANGE', P .. ':ready', 0, 99)
for _, member in ipairs(candidates) do
  local id = tostring(tonumber(member))
  local jk = jkey(id)
  if redis.call('HGET', jk, 'state') ~= 'waiting' then
    redis.call('ZREM', P .. ':ready', member)
  else
    local module = redis.call('HGET', jk, 'module')
    local limit = limits[module]
    local running = tonumber(redis.call('HGET', P .. ':modrun', module) or '0')
    if not limit or running < limit then
      redis.call('ZREM', P .. ':ready', member)
      redis.call('HINCRBY', P .. ':modrun', module, 1)
      redis.call('HSET', jk, 'state', 'running', 'started', NOW, 'owner', ARGV[4])
      redis.call('HINCRBY', jk, 'attempts', 1)
      redis.call('HDEL', jk, 'progress')
      redis.call('ZADD', P .. ':running', ARGV[3], id)
      move(id, 'waiting', 'running', NOW)
      return {id, nextd, redis.call('HGETALL', jk)}
    end
  end
end
return {0, nextd}
"""
)


def _release(body: str) -> str:
    """A script that puts running jobs back to waiting (their attempt stays counted)."""
    return (
        _COMMON
        + r"""
local function release(id, ended)
  local jk = jkey(id)
  redis.call('ZREM', P .. ':running', id)
  if redis.call('HGET', jk, 'state') ~= 'running' then return false end
  local f = redis.call('HMGET', jk, 'module', 'attempts', 'started')
  local module = f[1]
  local started = tonumber(f[3])
  -- The cut attempt's run record, so the history counts every attempt (issue 19).
  redis.call('ZADD', P .. ':runs', NOW, cjson.encode({job = tonumber(id), module = module,
    attempt = tonumber(f[2]), started = started, finished = math.max(started, ended),
    outcome = 'interrupted'}))
  redis.call('HINCRBY', P .. ':modrun', module, -1)
  redis.call('HSET', jk, 'state', 'waiting', 'run_at', NOW)
  redis.call('HDEL', jk, 'owner')
  move(id, 'running', 'waiting', redis.call('HGET', jk, 'created'))
  place(id)
  return true
end
"""
        + body
    )


# ARGV: P, now, lease. Jobs whose lease ran out (their instance died) run again elsewhere;
# their attempt ran at least until the last renewal (deadline - lease).
REAP = _release(
    r"""
local gone = redis.call('ZRANGEBYSCORE', P .. ':running', '-inf', NOW, 'LIMIT', 0, 100,
                        'WITHSCORES')
local taken = {}
for i = 1, #gone, 2 do
  local id = gone[i]
  if release(id, tonumber(gone[i + 1]) - tonumber(ARGV[3])) then taken[#taken + 1] = id end
end
wake()
return taken
"""
)

# ARGV: P, now, owner, ids...: a stopping instance hands its unfinished jobs back.
RELEASE = _release(
    r"""
local n = 0
for i = 4, #ARGV do
  if redis.call('HGET', jkey(ARGV[i]), 'owner') == ARGV[3] and release(ARGV[i], now) then
    n = n + 1
  end
end
wake()
return n
"""
)

# ARGV: P, now, owner, deadline, ids...: renew our leases. Returns the ids we no longer
# hold (taken over after an outage) and the ids whose cancel was requested.
RENEW = (
    _COMMON
    + r"""
local lost, cancel = {}, {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local f = redis.call('HMGET', jkey(id), 'owner', 'state', 'cancel_requested')
  if f[1] == ARGV[3] and f[2] == 'running' then
    redis.call('ZADD', P .. ':running', 'XX', ARGV[4], id)
    if f[3] == '1' then cancel[#cancel + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancel}
"""
)

# ARGV: P, now, id, owner, state, status, result, error, expires, run_at, run record,
# last progress report ('' if none).
# The end of one attempt: a retry (state "waiting", at run_at) or a finished job. Does
# nothing (returns 0) if this instance no longer holds the job.
END = (
    _COMMON
    + r"""
local id, state = ARGV[3], ARGV[5]
local jk = jkey(id)
local f = redis.call('HMGET', jk, 'owner', 'state', 'module', 'created')
if f[1] ~= ARGV[4] or f[2] ~= 'running' then return 0 end
redis.call('ZREM', P .. ':running', id)
redis.call('HINCRBY', P .. ':modrun', f[3], -1)
if ARGV[11] ~= '' then redis.call('ZADD', P .. ':runs', NOW, ARGV[11]) end
if ARGV[12] ~= '' then redis.call('HSET', jk, 'progress', ARGV[12]) end
if state == 'waiting' then
  redis.call('HSET', jk, 'state', 'waiting', 'run_at', ARGV[10], 'error', ARGV[8])
  redis.call('HDEL', jk, 'owner')
  move(id, 'running', 'waiting', f[4])
  place(id)
else
  finish(id, state, ARGV[6], ARGV[7], ARGV[8], ARGV[9])
end
wake()
return 1
"""
)

# ARGV: P, now, id, expires. Returns {0, "cancelled"|"cancelling"} or {code, message}.
CANCEL = (
    _COMMON
    + r"""
local id = ARGV[3]
local jk, st, missing = known(id)
if missing then return missing end
if st == 'running' then
  redis.call('HSET', jk, 'cancel_requested', '1')
  redis.call('PUBLISH', P .. ':events', 'cancel:' .. id)
  return {0, 'cancelling'}
end
if st ~= 'waiting' then
  return {409, 'Job ' .. id .. ' already finished (' .. st .. ')'}
end
redis.call('ZREM', P .. ':ready', pad(id))
redis.call('ZREM', P .. ':delayed', id)
local after = redis.call('HGET', jk, 'after') or ''
for dep in string.gmatch(after, '%d+') do redis.call('SREM', P .. ':blocked:' .. dep, id) end
local msg = 'Job ' .. id .. ' cancelled'
finish(id, 'cancelled', '410', msg, msg, ARGV[4])
wake()
return {0, 'cancelled'}
"""
)

# ARGV: P, now, id. A failed or cancelled job waits again, attempts from zero.
RETRY = (
    _COMMON
    + r"""
local id = ARGV[3]
local jk, st, missing = known(id)
if missing then return missing end
if st ~= 'failed' and st ~= 'cancelled' then
  if st == 'waiting' or st == 'running' then
    return {409, 'Job ' .. id .. ' is ' .. st .. ', not failed'}
  end
  return {409, 'Job ' .. id .. ' is ' .. st .. ': only failed or cancelled jobs retry'}
end
redis.call('ZREM', P .. ':finished', id)
redis.call('HSET', jk, 'state', 'waiting', 'attempts', '0', 'run_at', NOW,
           'cancel_requested', '0')
redis.call('HDEL', jk, 'finished', 'expires', 'status', 'result', 'after', 'owner', 'blockers')
move(id, st, 'waiting', redis.call('HGET', jk, 'created'))
place(id)
wake()
return {0, 'ok'}
"""
)

# ARGV: P, now, history_before. Deletes finished jobs past their expiry, old history.
EXPIRE = (
    _COMMON
    + r"""
local gone = redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', NOW, 'LIMIT', 0, 1000)
for _, id in ipairs(gone) do
  local st = redis.call('HGET', jkey(id), 'state')
  if st then redis.call('ZREM', P .. ':state:' .. st, id) end
  redis.call('DEL', jkey(id))
  redis.call('ZREM', P .. ':finished', id)
end
redis.call('ZREMRANGEBYSCORE', P .. ':runs', '-inf', ARGV[3])
return #gone
"""
)

# ARGV: P, now, id. Forget a finished job (its run records stay, for the history).
# Returns {0, ''}, or {404 | 409, message}.
DELETE = (
    _COMMON
    + r"""
local id = ARGV[3]
local jk, st, missing = known(id)
if missing then return missing end
if st == 'waiting' or st == 'running' then
  return {409, 'Job ' .. id .. ' is ' .. st .. ': cancel it first'}
end
redis.call('ZREM', P .. ':state:' .. st, id)
redis.call('ZREM', P .. ':finished', id)
redis.call('DEL', jk)
return {0, ''}
"""
)

NAMES = ("ADD", "CLAIM", "REAP", "RELEASE", "RENEW", "END", "CANCEL", "RETRY", "EXPIRE", "DELETE")
