"""The Redis queue's state changes, each one atomic Lua script (see redis.py), and reading
back what they return.

Keys, all under the configured prefix ``P``:

    P:id                 INCR counter: ids unique across every instance, never reused
                         (moved past the ids an instance knows of if Redis lost it: Ids)
    P:job:ID             hash: the job's fields (job.COLUMNS), ``owner``, ``progress``,
                         ``owed``; ``owner`` is the claim's token, INSTANCE/N, fresh for
                         every claim (an instance that claims a job again after an outage,
                         while its first attempt still runs, tells the two apart by it);
                         ``owed``: seconds its result is kept at least (an add?wait=1)
    P:ready              zset: waiting jobs due now; score -priority, member the id padded
                         to 20 digits, so equal priorities pop in order of arrival
    P:ready:MODULE       zset: the same, one module's jobs: a claim finds there the best job
                         it can take when the head of P:ready is one it cannot (redis_lua.py)
    P:ready_split        "done" once P:ready is split into those lines (an earlier version's
                         data has none); while it is being split, where that has got to
    P:delayed            zset: waiting jobs due later; score run_at
    P:blocked:ID         zset: waiting jobs that run after job ID has finished (score the id);
                         such a job's ``blockers`` field counts the dependencies it still waits for
    P:cascades           list: "N ID STATE": job ID ended in STATE; the zset P:cascade:N (its
                         P:blocked:ID renamed, N from INCR P:cascade_id) holds the jobs
                         waiting on it still to fail or place, 500 a script (redis_lua.py)
    P:running            zset: running jobs; score the lease deadline its owner renews, on
                         Redis's clock (TIME), not the instances' (they may disagree)
    P:state:STATE        zset per state: score created (waiting), started (running) or
                         finished: counts, listings, the oldest waiting job
    P:finished           zset: finished jobs; score the time they expire
    P:unique             hash: unique key -> id of the waiting or running job holding it
    P:seen, P:hold       when a renewal or reap last ran; no reap before P:hold (SEEN_FN)
    P:modrun             hash: module -> jobs running now, across instances (module limits),
                         and handlers still running past their job's timeout (P:held)
    P:held               zset: member MODULE|TOKEN, a handler still running past the end of
                         its attempt (claim TOKEN) at its timeout: its module's slot stays
                         taken until it returns; score a lease deadline its instance renews
    P:runs               zset: one JSON record per attempt; score the time it ended
    P:events             pub/sub: ``done:ID``, ``cancel:ID``, ``wake``, ``schedules``, ``cascade``
    P:rate:MODULE        zset: the module's job starts within its rate's interval
(and: schedules, redis_schedules.py; ready lines and the instances' workers, redis_lines.py;
P:failed_by:ID, redis_revive.py)

Every script takes the prefix as ARGV[1] and the caller's clock as ARGV[2]. Times are
written as the strings the caller sent, so they keep their full precision.
"""

from __future__ import annotations

from bgservice.queue.redis_lua import CLAIM_FN, COMMON, SEEN_FN, UNHOLD_FN
from bgservice.queue.redis_revive import REQUEUE_FN

# ARGV: P, now, max_waiting (jobs waiting or running), unique, after ("1,2,3" or ''), the
# adding instance's claim (lease, claim token, limits, rates, runnable modules, as CLAIM
# takes them; five '' when it has no free worker), owed (an add that waits for the result,
# wait=1: the seconds its job's result is kept at least, for it; else ''), the highest id
# the instance knows of (next_id, redis_lua.py), then the new job's fields. (FIRE: the same,
# then a schedule's name and slot.) Returns {id, 'new'} ('lost:N' for 'new' when next_id
# moved the id counter) or, with a claim, {id, 'new', what CLAIM returns}: an instance with
# a free worker takes the best ready job (most often the one it adds) in the same round
# trip, and wakes the others only if ready jobs are left. A held unique key: {id,
# 'existing'}, whether the queue is full or not (nothing is added); a waiting add is owed
# that job's result then.
ADD_BODY = r"""
local unique, after, owed = ARGV[4], ARGV[5], ARGV[11]
if unique ~= '' then
  local existing = redis.call('HGET', P .. ':unique', unique)
  if existing then
    if owed ~= '' then redis.call('HSET', jkey(existing), 'owed', owed) end
    return {tonumber(existing), 'existing'}
  end
end
local held = redis.call('ZCARD', P .. ':state:waiting') + redis.call('ZCARD', P .. ':state:running')
if held >= tonumber(ARGV[3]) then
  return {-503, 'Queue full (' .. ARGV[3] .. ' jobs)'}
end
local blockers = {}
for dep in string.gmatch(after, '%d+') do
  local st, cancelling = live(jkey(dep), 'cancel_requested')
  if not st then return {-404, 'Job ' .. dep .. ' not found (unknown or expired)'} end
  if cancelling == '1' then st = 'cancelled' end
  if st == 'waiting' or st == 'running' then blockers[#blockers + 1] = dep
  elseif st ~= 'done' then
    return {-424, 'Job ' .. dep .. ' ' .. st}
  end
end
local id, new = next_id(ARGV[12])
local jk = jkey(id)
local known = {}  -- (the fields place() takes)
for i = 13, #ARGV, 2 do known[ARGV[i]] = ARGV[i + 1] end
redis.call('HSET', jk, unpack(ARGV, 13))
if owed ~= '' then redis.call('HSET', jk, 'owed', owed) end
if unique ~= '' then redis.call('HSET', P .. ':unique', unique, id) end
move(id, nil, 'waiting', NOW)
wait_on(id, blockers, known.run_at, known.priority, known.module)
if MARK then redis.call('HSET', P .. ':schedule_slots', MARK[1], MARK[2]) end
if ARGV[6] == '' then
  wake()
  return {id, new}
end
local claimed = claim(ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
if claimed[1] ~= 0 then woke = redis.call('ZCARD', P .. ':ready') > 0 end
wake()
return {id, new, claimed}
"""

# ARGV: P, now, lease (s), the claim's token (INSTANCE/N), module limits, rates, the
# modules this instance can run (JSON).
CLAIM = COMMON + CLAIM_FN + "return claim(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7])\n"

ADD = COMMON + CLAIM_FN + "local MARK = nil\n" + ADD_BODY  # FIRE (redis_schedules.py) sets MARK


def _release(body: str) -> str:
    """A script that puts running jobs back to waiting (their attempt given back: queue/
    cuts.py); one acknowledged "cancelling" ends cancelled instead. ``counted``: a
    crash's interruption (REAP; a stop's RELEASE is none), which past ``limit`` ([queue]
    max_interruptions; none when nil) fails the job: 'failed' is returned then."""
    return (
        COMMON
        + r"""
local function release(id, ended, expires, counted, limit)
  local jk = jkey(id)
  redis.call('ZREM', P .. ':running', id)
  if redis.call('HGET', jk, 'state') ~= 'running' then return false end
  local f = redis.call('HMGET', jk, 'module', 'attempts', 'started', 'cancel_requested')
  local module = f[1]
  local started = tonumber(f[3])
  -- The cut attempt's run record, so the history counts every attempt (issue 19).
  redis.call('ZADD', P .. ':runs', NOW, cjson.encode({job = tonumber(id), module = module,
    attempt = tonumber(f[2]), started = started, finished = math.max(started, ended),
    outcome = 'interrupted'}))
  redis.call('HINCRBY', P .. ':modrun', module, -1)
  if f[4] == '1' then
    local msg = 'Job ' .. id .. ' cancelled'
    finish(id, 'cancelled', '410', msg, msg, expires)
    return true
  end
  local n = counted and redis.call('HINCRBY', jk, 'interruptions', 1)
  if n and limit and n > limit then  -- as engine.interrupted words it
    local msg = 'Job ' .. id .. ' interrupted ' .. n .. ' times, more than [queue] ' ..
      'max_interruptions (' .. limit .. '): each of those runs ended with the service ' ..
      '(crash, kill -9, power loss, or a lease that ran out); not run again'
    finish(id, 'failed', '500', msg, msg, expires)
    return 'failed'
  end
  redis.call('HSET', jk, 'state', 'waiting', 'run_at', NOW,
             'attempts', math.max((tonumber(f[2]) or 1) - 1, 0))
  redis.call('HDEL', jk, 'owner')
  move(id, 'running', 'waiting', redis.call('HGET', jk, 'created'))
  place(id)
  return true
end
"""
        + body
    )


# ARGV: P, now, lease, expires, max_interruptions. Jobs whose lease ran out (their instance
# died) run again elsewhere, or fail past max_interruptions: {ids again, ids failed, held
# slots freed}. Their attempt ran at least until the last renewal (deadline - lease, on
# Redis's clock: shifted to the caller's, which the run records use). Module slots held
# by handlers past their job (P:held) whose instance stopped renewing them are given back.
REAP = _release(
    UNHOLD_FN
    + SEEN_FN
    + r"""
local rnow = seen(tonumber(ARGV[3]))
if rnow < tonumber(redis.call('GET', P .. ':hold') or 0) then return {{}, {}, {}} end
local gone = redis.call('ZRANGEBYSCORE', P .. ':running', '-inf', rnow, 'LIMIT', 0, 100,
                        'WITHSCORES')
local taken, failed = {}, {}
for i = 1, #gone, 2 do
  local id = gone[i]
  local ended = tonumber(gone[i + 1]) - tonumber(ARGV[3]) + now - rnow
  local how = release(id, ended, ARGV[4], true, tonumber(ARGV[5]))
  if how == 'failed' then failed[#failed + 1] = id elseif how then taken[#taken + 1] = id end
end
local stale = redis.call('ZRANGEBYSCORE', P .. ':held', '-inf', rnow, 'LIMIT', 0, 100)
for _, member in ipairs(stale) do unhold(member) end
wake()
return {taken, failed, stale}
"""
)

# ARGV: P, now, expires, then id and claim token pairs: a stopping instance hands its
# unfinished jobs back.
RELEASE = _release(
    r"""
local n = 0
for i = 4, #ARGV, 2 do
  local holds = redis.call('HGET', jkey(ARGV[i]), 'owner') == ARGV[i + 1]
  if holds and release(ARGV[i], now, ARGV[3], false, nil) then n = n + 1 end
end
wake()
return n
"""
)

# ARGV: P, now, lease (s; '' to give them back), then members of P:held: the handlers past
# their job that still run on this instance renew their module slots' hold, or, returned,
# give the slots back.
HELD = (
    COMMON
    + UNHOLD_FN
    + SEEN_FN
    + r"""
if ARGV[3] == '' then
  for i = 4, #ARGV do unhold(ARGV[i]) end
  wake()
else
  local deadline = seen(tonumber(ARGV[3])) + tonumber(ARGV[3])
  for i = 4, #ARGV do redis.call('ZADD', P .. ':held', 'XX', deadline, ARGV[i]) end
end
return 1
"""
)

# ARGV: P, now, lease (s), then id and claim token pairs: renew our leases. Returns the ids
# we no longer hold (taken over after an outage) and the ids whose cancel was requested.
RENEW = (
    COMMON
    + SEEN_FN
    + r"""
local lost, cancel = {}, {}
local deadline = seen(tonumber(ARGV[3])) + tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local f = redis.call('HMGET', jkey(id), 'owner', 'state', 'cancel_requested')
  if f[1] == ARGV[i + 1] and f[2] == 'running' then
    redis.call('ZADD', P .. ':running', 'XX', deadline, id)
    if f[3] == '1' then cancel[#cancel + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancel}
"""
)

# ARGV: P, now, id, the attempt's claim token, state, status, result, error, expires, run_at,
# run record, last progress report ('' if none), a lease ('' for none) when the handler runs
# on past the attempt (its timeout: its module's slot stays taken, P:held), then the next
# claim's lease ('' for none), token, module limits, rates and runnable modules (as CLAIM
# takes them). The end of one attempt: a retry (state "waiting", at run_at) or a finished
# job. Does nothing (returns 0) if this attempt no longer holds the job. Recorded: {1}, or
# {1, what CLAIM returns}: the worker this attempt frees takes the next job in the same round
# trip. A cancel recorded while it ran wins (as in the embedded engine), heard by the attempt
# or not yet: the job ends cancelled and the reply starts with 2.
END = (
    COMMON
    + CLAIM_FN
    + r"""
local id, state = ARGV[3], ARGV[5]
local jk = jkey(id)
local f = redis.call('HMGET', jk, 'owner', 'state', 'module', 'created', 'unique_key',
                     'cancel_requested', 'owed')
if f[1] ~= ARGV[4] or f[2] ~= 'running' then return 0 end
local cut = f[6] == '1' and state ~= 'cancelled'
local run = ARGV[11]
if cut and run ~= '' then
  local r = cjson.decode(run); r.outcome = 'cancelled'; run = cjson.encode(r)
end
redis.call('ZREM', P .. ':running', id)
if ARGV[13] == '' then
  redis.call('HINCRBY', P .. ':modrun', f[3], -1)
else
  redis.call('ZADD', P .. ':held', clock() + tonumber(ARGV[13]), f[3] .. '|' .. ARGV[4])
end
if run ~= '' then redis.call('ZADD', P .. ':runs', NOW, run) end
if ARGV[12] ~= '' then redis.call('HSET', jk, 'progress', ARGV[12]) end
if cut then
  local msg = 'Job ' .. id .. ' cancelled'
  finish(id, 'cancelled', '410', msg, msg, ARGV[9], {'running', f[5], f[7]})
elseif state == 'waiting' then
  redis.call('HSET', jk, 'state', 'waiting', 'run_at', ARGV[10], 'error', ARGV[8], 'owner', '')
  move(id, 'running', 'waiting', f[4])
  place(id)
else
  finish(id, state, ARGV[6], ARGV[7], ARGV[8], ARGV[9], {'running', f[5], f[7]})
end
wake()
local recorded = cut and 2 or 1
if ARGV[14] == '' then return {recorded} end
return {recorded, claim(ARGV[14], ARGV[15], ARGV[16], ARGV[17], ARGV[18])}
"""
)

# ARGV: P, now, id, expires. Returns {0, "cancelled"|"cancelling"} or {code, message}. A
# running job's cancel gives its work up: its unique key is free at once (see ended()).
CANCEL = (
    COMMON
    + r"""
local id = ARGV[3]
local jk, st, missing = known(id)
if missing then return missing end
if st == 'running' then
  redis.call('HSET', jk, 'cancel_requested', '1')
  local uk = redis.call('HGET', jk, 'unique_key')
  if uk and redis.call('HGET', P .. ':unique', uk) == id then
    redis.call('HDEL', P .. ':unique', uk)
  end
  redis.call('PUBLISH', P .. ':events', 'cancel:' .. id)
  return {0, 'cancelling'}
end
if st ~= 'waiting' then
  return {409, 'Job ' .. id .. ' already finished (' .. st .. ')'}
end
unready(pad(id), redis.call('HGET', jk, 'module'))
redis.call('ZREM', P .. ':delayed', id)
local after = redis.call('HGET', jk, 'after') or ''
for dep in string.gmatch(after, '%d+') do redis.call('ZREM', blocked_key(dep), id) end
local msg = 'Job ' .. id .. ' cancelled'
finish(id, 'cancelled', '410', msg, msg, ARGV[4])
wake()
return {0, 'cancelled'}
"""
)

# ARGV: P, now, id. A failed or cancelled job waits again, attempts from zero, no longer
# after its after= jobs (requeue: redis_revive.py).
RETRY = (
    COMMON
    + REQUEUE_FN
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
local holder = requeue(id, st)
if holder then return {409, 'Job ' .. id .. "'s unique key is held by job " .. holder} end
redis.call('HDEL', jk, 'after')
place(id)
wake()
return {0, 'ok'}
"""
)

# ARGV: P, now, history_before, batch: deletes that many finished jobs past expiry, old history.
EXPIRE = (
    COMMON
    + r"""
local gone = redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', NOW, 'LIMIT', 0, ARGV[4])
for _, id in ipairs(gone) do
  local st = redis.call('HGET', jkey(id), 'state')
  if st then redis.call('ZREM', P .. ':state:' .. st, id) end
  redis.call('DEL', jkey(id), P .. ':failed_by:' .. id)  -- (its dependents: expire alike)
  redis.call('ZREM', P .. ':finished', id)
end
redis.call('ZREMRANGEBYSCORE', P .. ':runs', '-inf', ARGV[3])
return #gone
"""
)

# ARGV: P, now, id. Forget a finished job (its runs stay). Returns {0, ''}, or {404 | 409, message}.
DELETE = (
    COMMON
    + r"""
local id = ARGV[3]
local jk, st, missing = known(id)
if missing then return missing end
if st == 'waiting' or st == 'running' then
  return {409, 'Job ' .. id .. ' is ' .. st .. ': cancel it first'}
end
redis.call('ZREM', P .. ':state:' .. st, id)
redis.call('ZREM', P .. ':finished', id)
redis.call('DEL', jk, P .. ':failed_by:' .. id)
return {0, ''}
"""
)

# ARGV: P, now, id, the attempt's claim token, field, value: a running attempt's progress
# or checkpoint, written only while the attempt still holds the job. Returns 1 or 0.
NOTE = (
    COMMON
    + r"""
local f = redis.call('HMGET', jkey(ARGV[3]), 'owner', 'state')
if f[1] ~= ARGV[4] or f[2] ~= 'running' then return 0 end
redis.call('HSET', jkey(ARGV[3]), ARGV[5], ARGV[6])
return 1
"""
)

NAMES = "ADD CLAIM REAP RELEASE HELD RENEW END CANCEL RETRY EXPIRE DELETE NOTE".split()
