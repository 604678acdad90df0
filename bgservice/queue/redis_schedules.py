"""The Redis engine's schedules: definitions and last slots in two hashes, and FIRE, the
script that adds a slot's job only if no instance has fired that slot yet.

    P:schedules        hash: schedule name -> its definition (JSON)
    P:schedule_slots   hash: schedule name -> the last slot fired (or when it was made)
    P:declared:OWNER   set: the [[schedule]] names of a live instance's service.config;
                       expires a lease after the instance last renewed it (OWNER: its
                       name, HOST:PID:N), deleted when it stops
    P:declarers        set: the OWNERs of those sets (one that expired is dropped when seen)

A change of the definitions is published as ``schedules`` on ``P:events``: every
instance reloads them (bgservice.queue.redis follows the channel).

Instances sharing the queue may be started with different configs (a rolling deploy): at
its start an instance removes a schedule that came from service.config and is not in its
own only when no other live instance's config still has it (REMOVE); the last instance
to start with the schedule gone from its config removes it.

They may have different modules too: every instance's timer comes to each slot, and one
that cannot run the schedule's module leaves the run to those that can (``fire``),
quietly. Only when no instance added it, UNFIRED_AFTER seconds on, is it an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError

from bgservice.config import RedisSettings
from bgservice.errors import Busy, ServiceError
from bgservice.queue.commands import AddSpec
from bgservice.queue.redis_db import RedisJobs, pipeline
from bgservice.queue.redis_outage import available
from bgservice.queue.redis_scripts import ADD_BODY, CLAIM_FN, COMMON
from bgservice.queue.schedules import Schedule

if TYPE_CHECKING:
    from bgservice.queue.scheduler import Scheduler

log = logging.getLogger(__name__)

UNFIRED_AFTER = 10.0  # s after a slot left to other instances: none added it, an error
LOAD_RETRY_MAX = 5.0  # s: the schedules not loaded (Redis refusing), tried again this often

# ADD's ARGV, then the schedule's name and the slot. {0, 'fired'} when it was fired.
FIRE = (
    COMMON
    + CLAIM_FN
    + r"""
local MARK = {ARGV[#ARGV - 1], ARGV[#ARGV]}
table.remove(ARGV)
table.remove(ARGV)
local fired = redis.call('HGET', P .. ':schedule_slots', MARK[1])
if fired and tonumber(fired) >= tonumber(MARK[2]) then return {0, 'fired'} end
"""
    + ADD_BODY
)

# ARGV: P, now, name, definition, last slot for a schedule new to Redis, reset ('1': a
# resumed schedule), then the instance whose service.config has it and how long its
# declaration lasts (ms), or '' '' (a schedule of run time, or a change of one).
PUT = r"""
local P = ARGV[1]
redis.call('HSET', P .. ':schedules', ARGV[3], ARGV[4])
if ARGV[6] == '1' then
  redis.call('HSET', P .. ':schedule_slots', ARGV[3], ARGV[5])
else
  redis.call('HSETNX', P .. ':schedule_slots', ARGV[3], ARGV[5])
end
if ARGV[7] ~= '' then
  redis.call('SADD', P .. ':declared:' .. ARGV[7], ARGV[3])
  redis.call('PEXPIRE', P .. ':declared:' .. ARGV[7], ARGV[8])
  redis.call('SADD', P .. ':declarers', ARGV[7])
end
return 1
"""

# ARGV: P, now, name, this instance. Removes the schedule, unless it came from
# service.config and the config of another live instance has it. Returns 1 (removed), 0
# (no such schedule), or the instance that keeps it.
REMOVE = r"""
local P, name = ARGV[1], ARGV[3]
local text = redis.call('HGET', P .. ':schedules', name)
if not text then return 0 end
if cjson.decode(text).origin == 'config' then
  for _, other in ipairs(redis.call('SMEMBERS', P .. ':declarers')) do
    local key = P .. ':declared:' .. other
    if redis.call('EXISTS', key) == 0 then
      redis.call('SREM', P .. ':declarers', other)
    elseif other ~= ARGV[4] and redis.call('SISMEMBER', key, name) == 1 then
      return other
    end
  end
end
redis.call('HDEL', P .. ':schedules', name)
redis.call('HDEL', P .. ':schedule_slots', name)
return 1
"""


class _ScheduleCheck(Protocol):
    def __call__(self, schedule: Schedule, caller: str | None = None) -> None: ...


class RedisSchedules:
    """Mixed into RedisQueue: the JobQueue schedule methods, on its ``db``."""

    db: RedisJobs
    conf: RedisSettings
    scheduler: Scheduler | None
    _declared: set[str]  # the [[schedule]] names of this instance's service.config

    async def loading(self, start: Callable[[], Awaitable[None]]) -> None:
        """Run ``start`` (load the schedules, JobQueue.start_scheduler) until Redis lets
        it: while Redis is away, again as soon as it answers; else after a backoff."""
        delay, level = 1.0, logging.WARNING  # (said once: the outage has lines of its own)
        while True:
            try:
                return await start()
            except Busy as exc:  # (available's 503)
                log.log(level, "schedules not loaded (%s): again once Redis answers, in %.0f s "
                        "at most", exc.message, delay)  # fmt: skip
                level = logging.DEBUG
                await self.db.outage.wait(delay)
                delay = min(delay * 2, LOAD_RETRY_MAX)

    async def fire(self, schedule: Schedule, slot: float | None) -> int | None:
        """A slot's run (JobQueue.fire), added here only if this instance can run its
        module: else left to the instances that can (None, as for a slot fired by
        another). ``slot`` None, a run now (``queue:fire``): refused here as an add is."""
        if slot is not None:
            try:
                self.check_schedule(schedule)
            except ServiceError as exc:
                self._leave(schedule, slot, exc)
                return None
            self._elsewhere.discard(schedule.name)  # (said again if it goes again)
        return await self.add(schedule.spec(slot)) or None

    def _leave(self, schedule: Schedule, slot: float, refused: ServiceError) -> None:
        name = schedule.name
        if name not in self._elsewhere:  # said once a schedule, not at every run
            self._elsewhere.add(name)
            log.info("schedule %s: module %s takes no run here (%d %s): its runs are left to "
                     "the instances that have it", name, schedule.module, refused.code,
                     refused.message)  # fmt: skip
        self._spawn(self._added_elsewhere(name, slot, refused))

    async def _added_elsewhere(self, name: str, slot: float, refused: ServiceError) -> None:
        """A slot this instance left: an ERROR if no instance had added it by UNFIRED_AFTER
        seconds after (every instance that left it says so: none could add it)."""
        await asyncio.sleep(UNFIRED_AFTER)
        try:
            fired = await self.db.batch.execute("HGET", self.db.key("schedule_slots"), name)
        except RedisError:  # (Redis away: the instances that can add it retry meanwhile)
            return
        now = self.scheduler.schedules.get(name) if self.scheduler is not None else None
        if fired is not None and float(fired) < slot and now is not None and not now.paused:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(slot))
            log.error("schedule %s: the run of %s was added by no instance in %.0f s (not "
                      "here: %d %s): it is lost", name, when, UNFIRED_AFTER, refused.code,
                      refused.message)  # fmt: skip

    def register_schedule_scripts(self) -> None:
        for name, text in (("FIRE", FIRE), ("PUT_SCHEDULE", PUT), ("REMOVE_SCHEDULE", REMOVE)):
            self.db.scripts[name] = self.db.redis.register_script(text)

    @available
    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]:
        # A pool connection, not the Batcher's: many schedules are a large reply, which
        # would hold every job's reply up behind it.
        pipe = pipeline(self.db.redis, transaction=True)
        pipe.hgetall(self.db.key("schedules"))
        pipe.hgetall(self.db.key("schedule_slots"))
        definitions, slots = await pipe.execute()
        return {
            name.decode(): (Schedule.from_stored(text), float(slots.get(name, 0.0)))
            for name, text in definitions.items()
        }

    @available
    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None:
        reset_flag = "1" if reset else ""
        declared = ("", "")
        # Put by the scheduler's start (the only puts before the queue has a scheduler): a
        # schedule of this instance's config, which it declares for as long as it runs.
        if schedule.origin == "config" and self.scheduler is None:
            self._declared.add(schedule.name)
            declared = (self.owner, str(int(self.conf.lease * 1000)))
        await self.db.call("PUT_SCHEDULE", schedule.name, schedule.stored(), repr(last),
                           reset_flag, *declared)  # fmt: skip

    @available
    async def remove_schedule(self, name: str) -> bool:
        gone = await self.db.call("REMOVE_SCHEDULE", name, self.owner)
        if isinstance(gone, bytes):
            log.info("schedule %s: kept: the service.config of instance %s, running, still "
                     "has it", name, gone.decode())  # fmt: skip
            return False
        return bool(gone)

    async def declare(self) -> None:
        """Say again that this instance runs with its config's schedules (at each lease
        renewal: the declaration lasts a lease)."""
        if self._declared:
            key = self.db.key(f"declared:{self.owner}")
            await asyncio.gather(
                self.db.batch.execute("SADD", key, *self._declared),
                self.db.batch.execute("PEXPIRE", key, int(self.conf.lease * 1000)),
                self.db.batch.execute("SADD", self.db.key("declarers"), self.owner),
            )

    async def undeclare(self, starting: bool = False) -> None:
        """Stopping: this instance's config keeps no schedule any more. Starting: neither
        do the configs of this host's earlier instances that are gone (a crash leaves its
        declaration behind for a lease)."""
        gone = [self.owner]
        try:
            if starting:
                host, pid = socket.gethostname(), os.getpid()
                others = await self.db.batch.execute("SMEMBERS", self.db.key("declarers"))
                gone += [o.decode() for o in others if _gone(o.decode(), host, pid)]
            elif not self._declared:
                return
            await asyncio.gather(
                self.db.batch.execute("DEL", *(self.db.key(f"declared:{o}") for o in gone)),
                self.db.batch.execute("SREM", self.db.key("declarers"), *gone),
            )
        except RedisError as exc:  # (they expire)
            log.warning("schedule declarations not removed (%s): they expire", exc)

    def schedules_changed(self) -> None:
        self._spawn(self._publish_schedules())

    async def _publish_schedules(self) -> None:
        # Signed: the instance that changed them has them already (a reload is O(schedules)).
        try:
            await self.db.redis.publish(self.db.key("events"), f"schedules:{self.owner}")
        except RedisError as exc:  # Redis away, or we are stopping: was an unexpected error
            log.warning(
                "other instances not told of the schedules changed here (%s): they load "
                "it at the next change announced, or at a restart", exc,
            )  # fmt: skip

    _spawn: Callable[[Coroutine[Any, Any, None]], None]  # RedisQueue's
    owner: str  # RedisQueue's: this instance's name
    _elsewhere: set[str]  # schedules whose runs this instance leaves to others (fire)
    add: Callable[[AddSpec], Coroutine[Any, Any, int]]  # JobQueue's
    check_schedule: _ScheduleCheck  # JobQueue's


def _gone(owner: str, host: str, pid: int) -> bool:
    """Whether the instance named ``owner`` (HOST:PID:N) is an earlier one of this host
    that is no longer running (or had our pid: a container restarted)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    if int(parts[1]) == pid:
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # (a process of another user: running)
        return False
    return False
