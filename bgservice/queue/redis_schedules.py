"""The Redis engine's schedules: definitions and last slots in two hashes, and FIRE, the
script that adds a slot's job only if no instance has fired that slot yet.

    P:schedules        hash: schedule name -> its definition (JSON)
    P:schedule_slots   hash: schedule name -> the last slot fired (or when it was made)

A change of the definitions is published as ``schedules`` on ``P:events``: every
instance reloads them (bgservice.queue.redis follows the channel).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from bgservice.queue.redis_db import RedisJobs, available
from bgservice.queue.redis_scripts import ADD_BODY, CLAIM_FN, COMMON
from bgservice.queue.schedules import Schedule

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

# ARGV: P, now, name, definition, last slot for a schedule new to Redis.
PUT = r"""
local P = ARGV[1]
redis.call('HSET', P .. ':schedules', ARGV[3], ARGV[4])
if ARGV[6] == '1' then  -- reset: a resumed schedule
  redis.call('HSET', P .. ':schedule_slots', ARGV[3], ARGV[5])
else
  redis.call('HSETNX', P .. ':schedule_slots', ARGV[3], ARGV[5])
end
return 1
"""


class RedisSchedules:
    """Mixed into RedisQueue: the JobQueue schedule methods, on its ``db``."""

    db: RedisJobs

    def register_schedule_scripts(self) -> None:
        for name, text in (("FIRE", FIRE), ("PUT_SCHEDULE", PUT)):
            self.db.scripts[name] = self.db.redis.register_script(text)

    @available
    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]:
        pipe = self.db.redis.pipeline(transaction=True)
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
        await self.db.call("PUT_SCHEDULE", schedule.name, schedule.stored(), repr(last), reset_flag)

    @available
    async def remove_schedule(self, name: str) -> bool:
        pipe = self.db.redis.pipeline(transaction=True)
        pipe.hdel(self.db.key("schedules"), name)
        pipe.hdel(self.db.key("schedule_slots"), name)
        gone, _ = await pipe.execute()
        return bool(gone)

    def schedules_changed(self) -> None:
        self._spawn(self._publish_schedules())

    async def _publish_schedules(self) -> None:
        # Signed: the instance that changed them has them already (a reload is O(schedules)).
        await self.db.redis.publish(self.db.key("events"), f"schedules:{self.owner}")

    _spawn: Callable[[Coroutine[Any, Any, None]], None]  # RedisQueue's
    owner: str  # RedisQueue's: this instance's name
