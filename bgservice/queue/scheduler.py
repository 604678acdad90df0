"""Fires recurring jobs: one loop timer for the soonest slot of every schedule.

Each schedule's next slot is worked out when it is made, changed or fired, and kept: a
change or a tick costs the schedules it touches, not all of them (a reload, at start or
when another instance on Redis changed them, works them all out again).

The schedules and the last slot each has fired live in the queue's storage (SQLite table,
Redis hash), behind ``Schedules``, which each engine implements; the engine's ``fire``
adds the slot's job and records the slot in one transaction, so that a restart neither
loses nor repeats a run and, on Redis, one instance of several fires it. At start the
``[[schedule]]`` tables of service.config replace the stored definitions of the same
name (one paused at run time stays paused; a pause that came from the config lasts only
while the config says ``paused = true``), and schedules that came from the config but
are no longer in it are removed. docs/queue.md describes the commands.

A schedule replaced with other times (cron, every, tz) starts afresh, from its first slot
after the change, as a new one does: its last slot, of the old times, would have let a
slot of the new ones that fell before the change fire at once. One replaced with other
job options only keeps its last slot.

At most ``[queue] max_schedules`` schedules are kept, those of service.config included:
an add beyond it (a new name; replacing one is always allowed) is refused with ``503``,
as a full queue refuses a job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from bgservice.errors import BadRequest, Busy, Conflict, NotFound, ServiceError
from bgservice.protocol import split_request
from bgservice.queue.commands import Command
from bgservice.queue.schedules import COUNT_MAX, GRACE, Schedule, make_schedule

if TYPE_CHECKING:
    from bgservice.config import QueueSettings

log = logging.getLogger(__name__)

SCHEDULE_COMMANDS = frozenset({"schedules", "schedule", "unschedule", "pause", "resume", "fire"})
RECHECK = 60.0  # the timer never waits longer: a wall clock that jumped is noticed
RETRY = 1.0  # after a slot could not be fired (Redis down, queue full)


class Schedules(Protocol):
    """What the scheduler needs of the queue engine."""

    @property
    def settings(self) -> QueueSettings:
        """``[queue]``: ``max_schedules`` bounds how many are kept."""
        ...

    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]:
        """Every stored schedule and the last slot it fired (or when it was made)."""
        ...

    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None:
        """Store the definition; ``last`` only for a schedule new to the store, or when
        ``reset`` (a resumed schedule starts from its next slot)."""
        ...

    async def remove_schedule(self, name: str) -> bool: ...

    def check_schedule(self, schedule: Schedule, caller: str | None = None) -> None:
        """Raise the error a job of ``schedule`` would get if added now, or if ``caller``
        (a client's source) added one itself."""
        ...

    async def fire(self, schedule: Schedule, slot: float | None) -> int | None:
        """Add the slot's job and mark the slot fired, atomically; None when it had been
        fired already (by another instance). ``slot`` None: a run now."""
        ...

    def schedules_changed(self) -> None:
        """Tell other instances (if any) to reload the definitions."""
        ...


class Scheduler:
    def __init__(self, store: Schedules, configured: tuple[Schedule, ...]) -> None:
        self.store = store
        self.configured = configured
        self.schedules: dict[str, Schedule] = {}
        self.last: dict[str, float] = {}
        # The next slot of each schedule not paused, worked out when it changes or fires,
        # not for all of them at each change and each tick (1,000 schedules, half cron:
        # 22 ms a change, as long a tick).
        self._next: dict[str, float] = {}
        self._slotted: dict[str, tuple[float, bool]] = {}  # last -> whether it is a slot
        self._changes = 0  # made by this instance (reload)
        self.max_schedules = store.settings.max_schedules
        # Names being added right now: pipelined adds each check the bound before any of
        # them is stored, so those under way count too.
        self._adding: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.Task[None] | None = None
        self._closed = False
        self._retrying: set[str] = set()  # schedules whose slot waits (503): said once

    async def start(self) -> None:
        stored = await self.store.load_schedules()
        now = time.time()
        names = {s.name for s in self.configured}
        for schedule in self.configured:
            was = stored[schedule.name][0] if schedule.name in stored else None
            if was is not None and was.paused and _paused_at_run_time(was, schedule):
                schedule = _with(schedule, paused=True, paused_by="runtime")  # it stays so
            # No longer paused by the config: it goes on from its next slot, as on a resume.
            if was is not None:
                resumed = was.paused and not schedule.paused
                schedule = _with(schedule, resumed=now if resumed else was.resumed)
            retimed = was is not None and was.times != schedule.times
            await self.store.put_schedule(schedule, now, reset=retimed)
            self._check_module(schedule)
        changed = bool(self.configured)
        for name, (schedule, _) in stored.items():
            # (On Redis, another live instance's config may keep it: the engine says so.)
            if schedule.origin == "config" and name not in names:
                if await self.store.remove_schedule(name):
                    log.info("schedule %s: no longer in service.config, removed", name)
                    changed = True
        if changed:  # (on Redis, running instances once never saw this config's schedules)
            self.store.schedules_changed()
        await self.reload()

    def _check_module(self, schedule: Schedule) -> None:
        """Warn of a config schedule whose runs would be refused now (a module missing or
        refusing queue jobs): not an error, as the module may be added later."""
        try:
            self.store.check_schedule(schedule)
        except ServiceError as exc:
            log.warning("schedule %s: module %s refuses its runs for now (%d %s): each run "
                        "is lost until it takes them", schedule.name, schedule.module,
                        exc.code, exc.message)  # fmt: skip

    def stop(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._tick is not None:
            self._tick.cancel()

    async def reload(self) -> None:
        """Read the definitions again (at start, and when another instance changed them)."""
        while True:  # a change of ours stored while this read was on its way: read again
            changes = self._changes  # (else the older copy would replace it, for good)
            stored = await self.store.load_schedules()
            if changes == self._changes:
                break
        self.schedules = {name: schedule for name, (schedule, _) in stored.items()}
        # (names removed elsewhere go: a schedule made again under one starts afresh)
        self.last = {n: max(last, self.last.get(n, last)) for n, (_, last) in stored.items()}
        self._next.clear()
        self._slotted.clear()
        for name in self.schedules:
            self._plan(name)
        self._arm()

    # --- commands ---------------------------------------------------------------------

    async def command(self, cmd: Command, caller: str) -> bytes:
        """``queue:schedules``, ``queue:schedule?...:MODULE:DATA``, and
        ``queue:unschedule|pause|resume|fire:NAME`` (docs/queue.md); ``caller`` the
        client's source: what it makes or fires must be a job it could add itself."""
        if cmd.name == "schedules":
            if cmd.args:  # (queue:schedules:x once listed them all)
                raise BadRequest("queue:schedules takes no argument")
            return _json(self.describe())
        if cmd.name == "schedule":
            module, data = split_request(cmd.args)
            schedule = make_schedule({**cmd.options, "module": module}, data)
            return _json(await self.put(schedule, caller, "paused" in cmd.options))
        try:  # (as U+FFFD, \xff named a schedule really called "\ufffd")
            name = cmd.args.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest(f"queue:{cmd.name}: the name is not valid UTF-8 text") from None
        if not name:  # (once a 404 for the schedule named '')
            raise BadRequest(f"queue:{cmd.name}: name the schedule (queue:{cmd.name}:NAME)")
        if cmd.name == "unschedule":
            await self.remove(name)
            return b"removed"
        if cmd.name == "fire":
            return b"id:%d" % await self.fire_now(name, caller)
        return _json(await self.pause(name, cmd.name == "pause"))

    def describe(self) -> list[dict[str, Any]]:
        now = time.time()
        return [self.describe_one(name, now) for name in sorted(self.schedules)]

    def describe_one(self, name: str, now: float | None = None) -> dict[str, Any]:
        """One schedule as listed, from its planned next slot and what is known of its
        last one (whether it is a slot is worked out once per last slot)."""
        schedule, last = self.named(name), self.last.get(name)
        known = self._slotted.get(name)
        if last is not None and (known is None or known[0] != last):
            known = self._slotted[name] = (last, schedule.is_slot(last))
        is_slot = last is not None and known is not None and known[1]
        now = time.time() if now is None else now
        return schedule.describe(last, now, self._next.get(name), is_slot)

    async def fire_now(self, name: str, caller: str) -> int:
        """A run of schedule ``name`` now, for a client whose source is ``caller``: a job
        of its module it may add itself (QUEUE_FROM = {"scheduler"}: through the config's
        schedules only)."""
        schedule = self.named(name)
        self.store.check_schedule(schedule, caller)
        return await self.store.fire(schedule, None) or 0

    async def put(
        self, schedule: Schedule, caller: str | None = None, said_paused: bool = True
    ) -> dict[str, Any]:
        """Add or replace a run-time schedule; ``caller`` (its maker's source) must be
        allowed to add its module's jobs itself, or a run-time schedule let any client
        queue a module whose QUEUE_FROM admits the scheduler alone. A replace that does
        not say ``paused`` (``said_paused``) keeps the pause of the one it replaces: it
        is no resume (it unpaused the schedule, and fired a slot of the pause at once)."""
        old = self.schedules.get(schedule.name)
        if old is not None and old.origin == "config":
            raise Conflict(
                f"schedule {schedule.name} is defined in service.config: change it there"
            )
        self.store.check_schedule(schedule, caller)
        if old is not None and old.paused and not said_paused:
            schedule = _with(schedule, paused=True, paused_by=old.paused_by)
        if old is not None:  # replaced: its slots up to a resume stay unfired; a replace
            lifted = old.paused and not schedule.paused  # that lifts a pause is a resume
            schedule = _with(schedule, resumed=time.time() if lifted else old.resumed)
        # New times: from its first slot after now (a slot of them between its last and now
        # once fired at once, while the reply said its next run was later).
        retimed = old is not None and old.times != schedule.times
        new = old is None and schedule.name not in self._adding
        if new:
            if len(self.schedules.keys() | self._adding) >= self.max_schedules:
                raise Busy(f"Too many schedules ({self.max_schedules}, [queue] max_schedules)")
            self._adding.add(schedule.name)
        try:
            now = time.time()
            await self.store.put_schedule(schedule, now, reset=retimed)
            if old is None or retimed:  # (replaced with the same times: its last slot kept)
                self.last[schedule.name] = now
            self._changed(schedule)
        finally:
            if new:
                self._adding.discard(schedule.name)
        return self.describe_one(schedule.name)

    async def remove(self, name: str) -> None:
        schedule = self.named(name)
        if schedule.origin == "config":
            raise Conflict(f"schedule {name} is defined in service.config: remove it there")
        await self.store.remove_schedule(name)
        self._changed(None, name)

    async def pause(self, name: str, paused: bool) -> dict[str, Any]:
        schedule = self.named(name)
        now = time.time()
        # Resumed, it goes on from its next slot: none that fell while it was paused fires
        # (its last slot stays the one fired before the pause).
        resumed = now if schedule.paused and not paused else schedule.resumed
        by = "runtime" if paused else None  # a run-time pause outlasts the config's
        changed = _with(schedule, paused=paused, paused_by=by, resumed=resumed)
        await self.store.put_schedule(changed, now)
        self._changed(changed)
        return self.describe_one(name)

    def named(self, name: str) -> Schedule:
        schedule = self.schedules.get(name)
        if schedule is None:
            raise NotFound(f"Schedule {name[:64]!r} not found")
        return schedule

    def _changed(self, schedule: Schedule | None, removed: str = "") -> None:
        """This instance stored ``schedule`` (or removed one): the same in memory, the
        timer set again, the other instances told."""
        self._changes += 1
        self._slotted.pop(removed if schedule is None else schedule.name, None)
        if schedule is None:
            self.schedules.pop(removed, None)
            self.last.pop(removed, None)
            self._next.pop(removed, None)
        else:
            self.schedules[schedule.name] = schedule
            self._plan(schedule.name)
        self._arm()
        self.store.schedules_changed()

    def _plan(self, name: str) -> None:
        """Work out the next slot of schedule ``name`` (kept in ``_next``, which holds the
        schedules not paused). A slot already due (at start: one missed while the service
        was down) counts: the timer fires at once. With missed = "skip", only one still
        within GRACE."""
        schedule = self.schedules[name]
        if schedule.paused:
            self._next.pop(name, None)
            return
        now = time.time()
        since = schedule.since(self.last.get(name, now))
        since = max(now - GRACE, since) if schedule.missed == "skip" else since
        self._next[name] = schedule.next_slot(since)

    # --- firing ---------------------------------------------------------------------

    def _arm(self, delay: float | None = None) -> None:
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        if delay is None:
            now = time.time()
            soonest = min(self._next.values(), default=now + RECHECK)
            delay = min(max(soonest - now, 0.0), RECHECK) + 0.001
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_task(self._fire_due())

    async def _fire_due(self) -> None:
        failed = False
        now = time.time()
        for name in [n for n, slot in self._next.items() if slot <= now]:
            schedule = self.schedules.get(name)
            if schedule is None or schedule.paused:  # (changed while one before it fired)
                continue
            last = self.last.get(name, time.time())
            slot = schedule.due(last, time.time())
            if slot is None:  # not due after all (missed = "skip", past GRACE): again
                self._plan(name)
                continue
            try:
                jid = await self.store.fire(schedule, slot)
            except ServiceError as exc:
                if exc.code == 503:  # the queue is full, or Redis away: the slot waits
                    level = logging.DEBUG if name in self._retrying else logging.WARNING
                    self._retrying.add(name)  # (said once, not every RETRY seconds)
                    log.log(level, "schedule %s: the run of %s not added (%d %s): retrying",
                            schedule.name, _when(slot), exc.code, exc.message)  # fmt: skip
                    failed = True
                    continue
                # Refused for good (a module removed, or refusing jobs): this run is lost.
                log.error("schedule %s: the run of %s refused: %d %s",
                          schedule.name, _when(slot), exc.code, exc.message)  # fmt: skip
                jid = None
            except Exception:  # a bug of ours: logged, and the timer still re-armed
                log.exception("schedule %s: internal error firing it", schedule.name)
                failed = True
                continue
            self._retrying.discard(name)
            if name in self.schedules:  # (not removed while it was fired)
                # (nor replaced with new times, which start after their change: not before)
                self.last[name] = max(slot, self.last.get(name, slot))
                self._plan(name)
            if jid is not None:
                _log_missed(schedule, last, slot)
                log.info("schedule %s: run of %s is job %d", schedule.name, _when(slot), jid)
        self._arm(RETRY if failed else None)


def _log_missed(schedule: Schedule, last: float, slot: float) -> None:
    """Say how many slots before ``slot`` did not run (a downtime, a late timer): with
    missed = "skip" they were dropped, with "once" the latest of them runs for them all."""
    missed = schedule.missed_slots(last, slot)
    if missed:
        more = "+" if missed >= COUNT_MAX else ""
        log.info('schedule %s: %d%s missed slots before the run of %s not run (missed = "%s")',
                 schedule.name, missed, more, _when(slot), schedule.missed)  # fmt: skip


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _paused_at_run_time(stored: Schedule, configured: Schedule) -> bool:
    """A stored pause that outlasts the config's say. One stored by an older version does
    not tell where it came from: it is the config's while the config pauses it too."""
    if stored.paused_by is None:
        return not configured.paused
    return stored.paused_by == "runtime"


def _with(schedule: Schedule, **changes: Any) -> Schedule:
    return dataclasses.replace(schedule, **changes)


def _when(slot: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(slot))
