"""The Redis queue's retries, in Lua: a failed or cancelled job back in line (REQUEUE_FN,
which RETRY, redis_scripts.py, and REVIVE share), and REVIVE, which brings back the jobs
that failed because a retried job did (``queue:retry?dependents=1``), 500 a script.

Key, under the configured prefix ``P`` (the others: redis_scripts.py):

    P:failed_by:ID       zset: the jobs that failed (424) because job ID, which they ran
                         after, ended failed or cancelled (score the id); written by the
                         cascade (redis_lua.fail_after), deleted with job ID. Jobs that
                         failed before this key was written (an earlier version) are not
                         in it, and are not brought back.

RedisJobs.revive (redis_db.py) runs REVIVE breadth first: a job is back, waiting on its
``after=`` jobs again, before the jobs that failed because of it are looked at.
"""

from __future__ import annotations

from bgservice.queue.redis_lua import COMMON

# Job ``id``, ended in ``st`` (failed or cancelled), waits again under its id: attempts
# from zero, nothing of its last run kept but its error; not placed yet. It takes its
# unique key back; if a job added since holds the key, nothing changes and that job's id
# is returned (two jobs waiting under one key would break what unique= promises).
REQUEUE_FN = r"""
local function requeue(id, st)
  local jk = jkey(id)
  local uk = redis.call('HGET', jk, 'unique_key')
  if uk then
    local holder = redis.call('HGET', P .. ':unique', uk)
    if holder and holder ~= id then return holder end
    redis.call('HSET', P .. ':unique', uk, id)
  end
  redis.call('ZREM', P .. ':finished', id)
  redis.call('HSET', jk, 'state', 'waiting', 'attempts', '0', 'run_at', NOW,
             'cancel_requested', '0', 'interruptions', '0')
  redis.call('HDEL', jk, 'finished', 'expires', 'status', 'result', 'owner', 'blockers',
             'started', 'progress', 'owed')
  move(id, st, 'waiting', redis.call('HGET', jk, 'created'))
  return nil
end
"""

# ARGV: P, now, expires (of the jobs that fail again), a cursor (the id up to which the
# first parent's jobs were brought back, '0' for none), then parents: job ids. The jobs
# in each parent's P:failed_by that still failed because of it (not retried since, not
# expired) wait again, after their after= jobs: a dependency waiting or running blocks
# them, one done or gone does not, and the first that failed or was cancelled fails them
# again, named (noted in its own P:failed_by). At most 500 a script, each parent's in id
# order. The jobs waiting on ended ones that scripts left over are ended first (cascade):
# a parent's own may be among them, not failed yet; a script whose budget they spend
# brings none back (done 0, the cursor as it was), and the next goes on. Returns {parents
# done, the cursor for the next, the ids back and waiting, the ids left failed: a job
# holds their unique key}.
REVIVE = (
    COMMON
    + REQUEUE_FN
    + r"""
local function revive(d, parent)
  local jk = jkey(d)
  local f = redis.call('HMGET', jk, 'state', 'status', 'error', 'expires', 'after')
  local why = 'Dependency: job ' .. parent .. ' '
  if f[1] ~= 'failed' or f[2] ~= '424' or (f[4] and tonumber(f[4]) < now)
      or (f[3] ~= why .. 'failed' and f[3] ~= why .. 'cancelled') then
    return nil
  end
  if requeue(d, 'failed') then return 'key' end
  redis.call('ZREM', P .. ':failed_by:' .. parent, d)
  local blockers = {}
  for dep in string.gmatch(f[5] or '', '%d+') do
    local st = redis.call('HGET', jkey(dep), 'state')
    if st == 'waiting' or st == 'running' then
      blockers[#blockers + 1] = dep
    elseif st and st ~= 'done' then
      fail_after(d, dep, st, ARGV[3])
      return 'failed'
    end
  end
  wait_on(d, blockers)
  return 'waiting'
end

local cursor, back, kept, done = ARGV[4], {}, {}, 0
if cascade(ARGV[3], false) then left = true end
for i = 5, #ARGV do
  local asked = budget
  if asked <= 0 then break end
  local found = redis.call('ZRANGEBYSCORE', P .. ':failed_by:' .. ARGV[i], '(' .. cursor,
                           '+inf', 'LIMIT', 0, asked)
  for _, d in ipairs(found) do
    local how = revive(d, ARGV[i])
    if how == 'waiting' then back[#back + 1] = d elseif how == 'key' then kept[#kept + 1] = d end
  end
  budget = budget - #found
  if #found == asked then
    cursor = found[#found]
    break
  end
  done, cursor = done + 1, '0'
end
wake()
return {done, cursor, back, kept}
"""
)
