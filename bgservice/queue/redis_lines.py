"""The Redis queue's ready line per module (P:ready:MODULE, beside P:ready: redis_lua.py's
place() and claim), kept by every instance: made from P:ready where it is missing (data an
earlier version wrote), and watched, so that ready jobs no live instance runs are said.

    P:ready_modules      set: the modules that may have a ready line (place() adds them,
                         STRANDED drops those whose line is gone)
    P:runners            zset: module -> until when (Redis's clock) a live instance with
                         workers runs it; each sets its own modules a lease on, every
                         lease / 3 (an instance with workers = 0 runs none)
    P:stranded           hash: module -> "SINCE LAST": ready jobs of it found with no live
                         instance to run them since SINCE, said in a log last at LAST
                         (0: not yet); dropped once one runs it or none wait
    P:instances          hash: instance -> "WORKERS UNTIL": its [queue] workers, renewed
                         every lease / 3 a lease on (Redis's clock); queue:stats' sum
                         (WORKERS) drops the ones past UNTIL: instances gone
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from bgservice.queue.redis_lua import COMMON
from bgservice.queue.redis_outage import Outage

log = logging.getLogger(__name__)

SPLIT_BATCH = 1000  # ready jobs one SPLIT script puts in their lines (about 9 ms of Redis)
SAID_EVERY = 60.0  # s: a module's stranded jobs are said this often at most (all instances)

# ARGV: P, now, batch. The next ``batch`` members of P:ready put in their modules' lines,
# from where the last batch ended (P:ready_split: "SCORE MEMBER"; "done" at the end). In
# batches, so that a long line of an earlier version's jobs does not hold Redis up: the
# claims and adds in between keep both lines themselves. Returns {1 when done, jobs put}.
SPLIT = (
    COMMON
    + r"""
local mark, batch = redis.call('GET', P .. ':ready_split'), tonumber(ARGV[3])
if mark == 'done' then return {1, 0} end
local from = 0
if mark then  -- on from the last member put, by its rank: put back for the look if it was
  -- claimed since (no one else sees it: a script is atomic)
  local score, member = string.match(mark, '^(%S+) (%d+)$')
  local back = redis.call('ZADD', P .. ':ready', 'NX', score, member)
  from = redis.call('ZRANK', P .. ':ready', member) + 1 - back
  if back == 1 then redis.call('ZREM', P .. ':ready', member) end
end
local page = redis.call('ZRANGE', P .. ':ready', from, from + batch - 1, 'WITHSCORES')
local put = 0
for i = 1, #page, 2 do
  local f = redis.call('HMGET', jkey(tostring(tonumber(page[i]))), 'state', 'module')
  if f[1] == 'waiting' then
    redis.call('ZADD', P .. ':ready:' .. f[2], page[i + 1], page[i])
    redis.call('SADD', P .. ':ready_modules', f[2])
    put = put + 1
  else  -- no longer waiting: dropped, as a claim drops it (else the lines would count
    -- fewer for ever, and STRANDED have it split again)
    redis.call('ZREM', P .. ':ready', page[i])
  end
end
woke = put > 0  -- (an idle instance may run what it could not find before)
wake()
if #page < 2 * batch then
  redis.call('SET', P .. ':ready_split', 'done')
  return {1, put}
end
redis.call('SET', P .. ':ready_split', page[#page] .. ' ' .. page[#page - 1])
return {0, put}
"""
)

# ARGV: P, now, lease, the modules this instance runs (JSON, [] with workers = 0), every
# (s), the instance's name, its workers. Renews this instance's modules in P:runners and
# its workers in P:instances; returns {module, ready jobs, ...}: the
# modules whose ready jobs have had no live instance to run them for a lease (one that
# runs the module may be starting; after Redis was away, every instance renews within a
# lease), each said at most ``every`` seconds. P:ready holding more jobs than the lines
# together (jobs an instance of an earlier version placed since the split): split again
# (P:ready_split dropped).
STRANDED = (
    COMMON
    + r"""
local lease, every, rnow = tonumber(ARGV[3]), tonumber(ARGV[5]), clock()
local runners, said = P .. ':runners', P .. ':stranded'
redis.call('HSET', P .. ':instances', ARGV[6], ARGV[7] .. ' ' .. (rnow + lease))
for module in string.gmatch(ARGV[4], '"([^"]+)"') do  -- (ZADD GT is Redis 6.2)
  if tonumber(redis.call('ZSCORE', runners, module) or 0) < rnow + lease then
    redis.call('ZADD', runners, rnow + lease, module)
  end
end
local out, lined = {}, 0
for _, module in ipairs(redis.call('SMEMBERS', P .. ':ready_modules')) do
  local n = redis.call('ZCARD', P .. ':ready:' .. module)
  lined = lined + n
  if n == 0 then redis.call('SREM', P .. ':ready_modules', module) end
  if n == 0 or tonumber(redis.call('ZSCORE', runners, module) or 0) >= rnow then
    redis.call('HDEL', said, module)
  else
    local since, last = string.match(redis.call('HGET', said, module) or '', '^(%S+) (%S+)$')
    since, last = tonumber(since) or rnow, tonumber(last) or 0
    if rnow - since >= lease and rnow - last >= every then
      last = rnow
      out[#out + 1] = module
      out[#out + 1] = n
    end
    redis.call('HSET', said, module, since .. ' ' .. last)
  end
end
local split = P .. ':ready_split'
if lined < redis.call('ZCARD', P .. ':ready') and redis.call('GET', split) == 'done' then
  redis.call('DEL', split)
end
return out
"""
)

# ARGV: P, now. The workers of the live instances (P:instances); those gone are dropped.
WORKERS = (
    COMMON
    + r"""
local rnow, total, all = clock(), 0, redis.call('HGETALL', P .. ':instances')
for i = 1, #all, 2 do
  local workers, til = string.match(all[i + 1], '^(%d+) (%S+)$')
  if tonumber(til) < rnow then
    redis.call('HDEL', P .. ':instances', all[i])
  else
    total = total + tonumber(workers)
  end
end
return total
"""
)

Call = Callable[..., Awaitable[Any]]  # RedisJobs.call: a script by name, its arguments


async def keep_lines(
    call: Call, runnable: Callable[[], str], lease: float, outage: Outage, me: str, workers: int
) -> None:
    """Every lease / 3, for as long as the instance runs: split P:ready into the modules'
    lines if it is not (first at start: till then, a claim finds an earlier version's jobs
    only at the head of P:ready), renew the modules this instance runs (``runnable``: as
    CLAIM takes them, [] with no workers) and its ``workers`` under its name ``me``, and
    say the modules whose ready jobs none runs."""
    while True:
        try:
            await split(call)
            stranded = await call("STRANDED", repr(lease), runnable(), repr(SAID_EVERY), me,
                                  workers)  # fmt: skip
            for module, count in zip(stranded[::2], stranded[1::2], strict=True):
                log.warning("job queue: %d ready jobs of module %s wait, and no live instance "
                            "runs it (loaded, with workers > 0): they start once one does",
                            count, module.decode())  # fmt: skip
        except RedisError as exc:
            log.log(outage.level, "ready lines not kept (%s): again in %.1f s", exc, lease / 3)
        await asyncio.sleep(lease / 3)


async def split(call: Call) -> None:
    """P:ready split into the modules' lines unless it is (SPLIT, a batch a script)."""
    put = 0
    while True:
        done, batch = await call("SPLIT", SPLIT_BATCH)
        put += batch
        if done:
            break
    if put:
        log.info("job queue: %d ready jobs put in their modules' ready lines (a queue an "
                 "earlier version wrote)", put)  # fmt: skip
