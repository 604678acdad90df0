"""The shared queue: jobs kept and scheduled in Redis, run by any number of instances.

Every state change is one Lua script (redis_scripts.py), so instances never race: ids come
from one counter, a job is claimed by exactly one instance, unique keys and dependencies
are checked and applied atomically. Each instance runs up to ``[queue] workers`` jobs.

No polling for work or results: a change that makes work available publishes ``wake`` on
the queue's channel, a finished job publishes ``done:ID``, and an idle instance sleeps
until one arrives (or until its earliest delayed job is due). A running job holds a lease
that its instance renews every ``lease / 3`` seconds; when an instance dies, the others
find its leases run out and run its jobs again (at least once, attempts counted), and an
instance that lost its lease during an outage discards its late result instead of
running the job's ending twice.

Redis away: calls that do not touch the queue carry on; queue commands reply 503; the
client reconnects with backoff and the instance resumes where it was.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

from bgservice.cancelling import cancel_all
from bgservice.config import QueueSettings, RedisSettings
from bgservice.errors import ConfigError
from bgservice.events import MODULE_RELOADED, MODULE_REMOVED, Events
from bgservice.protocol import OK
from bgservice.queue.commands import AddSpec, ListSpec
from bgservice.queue.engine import JobQueue, JobRunner, Result, decide, refuse_waiters, run_record
from bgservice.queue.job import Job, JobState, stored_after
from bgservice.queue.redis_channel import Following, Waiter
from bgservice.queue.redis_db import RedisJobs, refusal
from bgservice.queue.redis_hash import hash_of, job_from_hash, pairs
from bgservice.queue.redis_leases import Attempt, Held, RedisLeases
from bgservice.queue.redis_lists import listing
from bgservice.queue.redis_outage import available, unavailable
from bgservice.queue.redis_schedules import RedisSchedules
from bgservice.queue.schedules import Schedule
from bgservice.request import AttemptOver
from bgservice.stats import Stats

log = logging.getLogger(__name__)

_BACKOFF_MAX = 5.0
RUNNABLE_EVERY = 1.0  # s: the modules this instance can run are looked up again this often


class RedisQueue(RedisSchedules, RedisLeases, Following, JobQueue):
    def __init__(
        self,
        settings: QueueSettings,
        module_limits: dict[str, int],
        redis_settings: RedisSettings,
        runner: JobRunner,
        stats: Stats,
        events: Events,
    ) -> None:
        super().__init__(settings, runner, stats, events)
        self.module_limits = module_limits
        self.conf = redis_settings
        self.db = RedisJobs(redis_settings, settings)
        self.db.ids.gone = lambda: self._spawn(self._deliver_all())  # (Redis lost its data)
        self.register_schedule_scripts()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[int, Attempt] = {}
        self._claims = itertools.count(1)  # numbers this instance's claim tokens
        self._ending: set[int] = set()  # running jobs whose end is being recorded
        self._lost: set[str] = set()  # (RedisLeases._renew)
        self._waiters: dict[int, Waiter] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._progress_pending: set[int] = set()
        self._outliving: dict[str, asyncio.Future[Any]] = {}  # (RedisLeases: outlived)
        self._held: dict[str, Held] = {}
        self._closing = False
        self._next_delayed: float | None = None
        # Module limits, rates and the modules this instance can run, as CLAIM takes them.
        self._limits = ("{}", "{}", "[]")
        self._lease = repr(self.conf.lease)
        self._claiming = 0  # workers held for claims on their way (_claim_args)
        self._missed = False  # a wake came while no worker was free (_freed)
        self._declared: set[str] = set()  # (RedisSchedules)
        self._elsewhere: set[str] = set()  # (RedisSchedules.fire)
        for event in (MODULE_RELOADED, MODULE_REMOVED):  # (a first load is no event)
            events.subscribe(event, lambda name: self._runnable())

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.db.redis.ping()
            await self.db.check_access(self.owner, self._subscribes)  # refused: ConfigError
            await self.undeclare(starting=True)
        except (AuthenticationError, AuthorizationError, ResponseError) as exc:
            if not refusal(exc):  # out of memory, read-only (a replica), loading: it may pass
                log.error("Redis at %s refuses commands (%s): queue commands reply 503 "
                          "until it takes them", self.db.where, exc)  # fmt: skip
            else:  # not an outage: waiting will not fix a wrong password, user or db number
                raise ConfigError(f"{self.db.named}: Redis refuses it: {exc}") from None
        except RedisError as exc:
            log.error("Redis at %s does not answer (%s): queue commands reply 503 until it "
                      "does", self.db.where, exc)  # fmt: skip
            self.db.batch.went_down(exc, said=True)  # (its reconnection says when it does)
        self._loop = loop = asyncio.get_running_loop()
        self._limits = (json.dumps(self.module_limits), json.dumps(self.rates.rates), "[]")
        self._runnable()
        tasks = (self._listen(), self._runner(), self._leases(), self._modules())
        for coro in (*tasks, *self.db.upkeep(lambda: self._limits[2], self.owner)):
            self._tasks.append(loop.create_task(coro))

    async def stop(self, grace: float) -> None:
        """Start nothing new; give running jobs ``grace`` seconds, then hand the rest back
        to the queue so another instance (or the next start) runs them."""
        self.close()
        running = {attempt.task for attempt in self._running.values()}
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            await cancel_all(pending, "jobs")
        left = [(jid, attempt.token) for jid, attempt in self._running.items()]
        if left:
            try:
                await self.hand_back(left)
            except RedisError as exc:
                log.warning("could not hand %d jobs back (%s): their leases expire", len(left), exc)
        await self._unhold_all()
        await self.undeclare()
        await self.db.gone(self.owner)
        await cancel_all(self._tasks, "job queue tasks")
        await self.db.close()

    def close(self, grace: float = 0.0) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        # Another instance may still finish a job someone here waits for: the waiter hears
        # the grace out, and is told just before it ends (the calls are cut then).
        self.loop.call_later(0.9 * grace, refuse_waiters, self._waiters, ())

    async def start_scheduler(self, configured: tuple[Schedule, ...]) -> None:
        # Redis away: loaded once it answers again (RedisSchedules.loading), not 30 s on.
        await self.loading(functools.partial(super().start_scheduler, configured))

    # --- commands ---------------------------------------------------------------------

    @available
    async def add(self, spec: AddSpec) -> int:
        self.runner.check(spec.module, spec.source)  # unknown, refusing, not from here
        now = time.time()
        flat = hash_of(Job.new(spec, self.settings, now))
        mark = (spec.mark[0], repr(spec.mark[1])) if spec.mark else ()  # a schedule's run
        unique, after = spec.unique or "", stored_after(spec.after) or ""
        script, waiting = "FIRE" if mark else "ADD", self.settings.max_waiting
        claim = self._claim_args()  # a free worker here takes the job in the same script
        # wait=1: the result is kept a lease at least, for this add to read (ADD_BODY)
        owed = repr(self.conf.lease) if spec.wait else ""
        ids = str(self.db.ids.mark)  # ids a client may hold: none given again (next_id)
        future = self.db.send(script, waiting, unique, after, *claim, owed, ids, *flat, *mark,
                              now=now)  # fmt: skip
        if claim[0]:  # what it claimed runs even if this add is cancelled meanwhile
            future.add_done_callback(self._added)
            future = asyncio.shield(future)
        return self.db.added(await future)

    def _added(self, future: asyncio.Future[Any]) -> None:
        self._claiming -= 1
        reply = None if future.cancelled() or future.exception() else future.result()
        if reply is not None and len(reply) > 2 and not self._closing:  # claimed with the add
            self._take(reply[2])
        elif reply is not None and len(reply) > 2:
            self._spawn(self._start_or_return(reply[2]))  # hands it back
        self._freed()

    @available
    async def get(self, jid: int, owed: bool = False) -> Result:  # (owed: Redis kept it)
        waiter = self._waiters.get(jid)
        if waiter is None:
            # The waiter exists before we look, so a ``done`` published meanwhile is not
            # lost; later waiters on the same job share it without asking Redis again.
            waiter = self._waiters[jid] = self.loop.create_future()
            try:
                await self._deliver(jid, quiet=False, owed=owed)
            except RedisError as exc:  # every get sharing the waiter hears it (503), not just us
                self._settle(jid, waiter, exception=unavailable(exc))
                raise
        # Shielded: one client hanging up must not cancel the result for the others.
        return await asyncio.shield(waiter)

    @available
    async def check(self, jid: int) -> str:
        return (await self.db.require(jid)).state.check_code

    @available
    async def status(self, jid: int) -> dict[str, Any]:
        job = await self.db.require(jid)
        throttled = None
        if job.state is JobState.WAITING:
            throttled = await self.db.free_at(job.module, self.rates.rates.get(job.module))
        return job.describe(time.time(), await self.db.position(job), throttled)

    @available
    async def cancel(self, jid: int) -> str:
        return (await self.db.checked("CANCEL", jid, self._expires())).decode()

    @available
    async def retry(self, jid: int, dependents: bool = False) -> int:
        await self.db.checked("RETRY", jid)
        if dependents:
            await self.db.revive(jid)
        return jid

    @available
    async def delete(self, jid: int) -> None:
        await self.db.checked("DELETE", jid)

    async def save_checkpoint(self, job: Job, value: str) -> None:
        job.checkpoint = value
        if not await self.checkpoint(job, value):  # (through a short outage: RedisLeases)
            raise AttemptOver(f"job {job.id}: this attempt no longer holds the job (its lease "
                              "was taken over): its checkpoint is not saved")  # fmt: skip

    @available
    async def list_jobs(self, spec: ListSpec) -> dict[str, Any]:
        return await listing(self.db, spec, self.rates.rates)  # (filtered: a bounded scan)

    @available
    async def stats(self, window: float) -> dict[str, Any]:
        stats = await self.db.stats(window, self.settings.workers)
        # This instance's, as ``workers`` is: the workers its handlers past their job's
        # timeout hold (_held: their jobs ended, no job counts them), and the jobs it runs.
        here = {"workers_held": len(self._held), "instance_running": len(self._running)}
        return {**stats, **here, **await self.db.names()}

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- running ----------------------------------------------------------------------

    async def _runner(self) -> None:
        """Claim jobs while this instance has free workers; sleep until woken."""
        delay = 0.1
        while not self._closing:
            self._wake.clear()
            claimed = False
            if self._free():
                try:
                    claimed = await self._claim()
                    delay = 0.1
                except RedisError as exc:  # (an outage is said once, by its own lines)
                    log.log(self.db.outage.level, "cannot claim jobs (%s): retrying in %.1f s",
                            exc, delay)  # fmt: skip
                    await self.db.outage.wait(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
            if claimed:
                continue
            due = self._next_delayed
            timeout = None if due is None else max(0.0, due - time.time()) + 0.001
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _freed(self) -> None:
        """A claim came back: a ``wake`` heard while no worker was free wakes the runner
        now (Redis may have run that claim before the add that woke us)."""
        if self._missed and self._free():
            self._missed = False
            self._wake.set()

    def _free(self) -> bool:
        """A worker is free: neither running a job, held for a claim on its way, nor held
        by a handler past its job's timeout."""
        return len(self._running) + self._claiming + len(self._held) < self.settings.workers

    def _claim_args(self) -> tuple[str, ...]:
        """What a script needs to claim a job for this instance (CLAIM's arguments), with
        a worker held for it until the reply (the caller releases it); five empty strings
        when no worker is free or the service is stopping."""
        if self._closing or not self._free():
            return ("", "", "", "", "")
        self._claiming += 1
        return (self._lease, self._token(), *self._limits)

    def _runnable(self) -> None:
        """Tell CLAIM the modules a job can run on here now (it skips other modules' jobs,
        which wait for an instance that can run them); one new here may have jobs waiting."""
        runnable = json.dumps(sorted(self.runner.runnable()), separators=(",", ":"))
        if runnable != self._limits[2]:
            self._limits = (*self._limits[:2], runnable)
            self._wake.set()

    async def _modules(self) -> None:
        while True:  # (a lookup costs microseconds a module: not done for every claim)
            await asyncio.sleep(RUNNABLE_EVERY)
            self._runnable()

    def _token(self) -> str:
        """A fresh claim token: what a job's ``owner`` is while this claim holds it."""
        return f"{self.owner}/{next(self._claims)}"

    async def _claim(self) -> bool:
        args = self._claim_args()
        if not args[0]:
            return False
        try:
            return self._take(await self.db.call("CLAIM", *args))
        finally:
            self._claiming -= 1
            self._freed()

    def _take(self, reply: list[Any]) -> bool:
        """Start the job a claim returned (CLAIM's reply, or the second part of END's)."""
        jid, due = int(reply[0]), float(reply[1]) if reply[1] else None
        if due is not None and (self._next_delayed is None or due < self._next_delayed):
            self._wake.set()  # the runner sleeps until the earliest delayed job: sooner now
        self._next_delayed = due
        if not jid:
            return False
        self.db.ids.seen(jid)
        fields = pairs(reply[2])
        job = job_from_hash(jid, fields)
        earlier = self._running.get(jid)
        if earlier is not None:  # its lease ran out in an outage, and we claimed it again
            log.warning("job %d: claimed again while an earlier attempt of it runs here: "
                        "that one is told to stop", jid)  # fmt: skip
            earlier.job.cancel_requested = True
        token = fields[b"owner"].decode()
        self._running[jid] = Attempt(job, self.loop.create_task(self._execute(job, token)), token)
        return True

    async def _execute(self, job: Job, token: str) -> None:
        status, body = await self.run_job(job)
        going_on = self._outliving.pop(token, None)  # its handler, on past its timeout
        hold = going_on is not None and not going_on.done()
        now = time.time()
        outcome = self.conclude(job, status, body, now)
        run = run_record(job, outcome, now)
        claim: tuple[str, ...] = ("",)  # the worker this attempt frees claims the next
        if not self._closing and not hold:  # job in the same script
            claim = (self._lease, self._token(), *self._limits)
        args = (
            job.id,
            token,
            str(outcome.state),
            outcome.status,
            outcome.body,
            outcome.body.decode("utf-8", "replace") if outcome.status != OK else "",
            repr(now + self.settings.keep_results),
            repr(outcome.run_at or now),
            json.dumps(run.__dict__),
            json.dumps(job.progress) if job.progress is not None else "",
            self._lease if hold else "",
            *claim,
        )
        self._ending.add(job.id)  # a renewal racing this end must not call it lost
        waiter = self._waiters.get(job.id)
        recorded, claimed = await self._end(job, args, now)
        if recorded and job.cancel_requested and outcome.state is not JobState.CANCELLED:
            outcome = decide(job, status, body, now, self.settings.backoff_max)  # as END did
        self._ending.discard(job.id)
        attempt = self._running.get(job.id)
        if attempt is not None and attempt.job is job:  # (not a newer attempt of the job)
            del self._running[job.id]
        if going_on is not None and hold:  # its worker, and its module's slot, stay taken
            self._keep_slot(token, job.module, going_on, recorded)
        if recorded and outcome.state.finished:
            self._settle(job.id, waiter, result=(outcome.status or OK, outcome.body))  # no read
        if claimed is not None:  # the freed worker's next job, or none ready
            await self._start_or_return(claimed)
            self._freed()
        else:
            self._wake.set()  # no claim came with the end: the runner looks

    async def _start_or_return(self, claimed: list[Any]) -> None:
        """Run the job a script claimed; while stopping, hand it back at once instead."""
        if not self._closing:
            self._take(claimed)
        elif int(claimed[0]):
            try:
                await self.hand_back([(int(claimed[0]), pairs(claimed[2])[b"owner"].decode())])
            except RedisError as exc:  # its lease runs out: another start runs it
                log.warning("job %s not handed back (%s): its lease expires", claimed[0], exc)
