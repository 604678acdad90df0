"""The embedded queue: scheduling in memory, every change written through a store.

Heaps of ready and delayed jobs and a map of jobs blocked on a dependency live in memory;
the store (sqlite.py) makes every change durable: ``id:N`` is sent once the insert is
committed. A result is awaited on a future per job, shared by every ``queue:get`` on it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import Future
from typing import Any

from bgservice import eager
from bgservice.cancelling import cancel_all
from bgservice.config import QueueSettings
from bgservice.errors import Busy, Cancelled, Conflict, DependencyFailed, Interrupted
from bgservice.events import Events
from bgservice.protocol import OK
from bgservice.queue import reports
from bgservice.queue.commands import AddSpec, ListSpec
from bgservice.queue.cuts import handed_back, interrupted, interrupted_run
from bgservice.queue.dependencies import Dependencies
from bgservice.queue.engine import (
    JobQueue,
    JobRunner,
    Result,
    finished_result,
    not_found,
    refuse_waiters,
    run_record,
)
from bgservice.queue.finished import FinishedJobs
from bgservice.queue.job import Job, JobState
from bgservice.queue.live import LiveJobs
from bgservice.queue.pump import Pump
from bgservice.queue.retries import Retries
from bgservice.queue.schedule import WaitingLine
from bgservice.queue.store import Run, Store, StoredSchedules, Writes, stored, unstored
from bgservice.queue.unique import UniqueKeys
from bgservice.stats import Stats

log = logging.getLogger(__name__)

CASCADE = 500  # jobs that waited on ended ones settled in one turn of the loop (~5 ms)
# Saves in flight to the store beyond which the cascade and the pump wait for it (the
# bench's busiest row peaks at about 900).
BEHIND = 4 * CASCADE


class LocalQueue(StoredSchedules, JobQueue):
    """One host: scheduling in memory, durability through the store (schedules too:
    StoredSchedules; their runs come through add)."""

    def __init__(
        self,
        settings: QueueSettings,
        module_limits: dict[str, int],
        store: Store,
        runner: JobRunner,
        stats: Stats,
        events: Events,
    ) -> None:
        super().__init__(settings, runner, stats, events)
        self.store = store
        self.jobs = LiveJobs()  # waiting and running
        self._line = WaitingLine(self._waiting, lambda: self._pump())
        self._running: dict[int, asyncio.Task[None] | None] = {}  # None: running at once
        self._pump = Pump(self._line, settings.workers, module_limits, lambda: self.rates,
                          lambda: len(self._running), self._start,
                          lambda: len(self._writes) > BEHIND)  # fmt: skip
        self._waiters: dict[int, asyncio.Future[Result]] = {}
        self._keys = UniqueKeys()
        self._finished = FinishedJobs(settings, store)
        self._deps = Dependencies(self.jobs, self._finished)
        self._live = reports.Live(self.jobs, self._line, self._running, self._deps.blocked,
                                  self._deps.blocked_ids, lambda: self.rates,
                                  self._pump.held)  # fmt: skip
        self._writes = Writes(store)
        self._retries = Retries(self.jobs, self._finished, self._keys, self._writes, self._deps,
                                store, self._place_new, self._pump, CASCADE)  # fmt: skip
        self._cascading = False  # _cascade is at work, now or in the next turn
        self._expiry: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        recovered = await self.store.open()
        poisoned: dict[int, str] = {}  # cut once too often: they fail
        for job in recovered:
            if job.state is JobState.RUNNING:  # a crash cut its run (a stop hands them back)
                run = interrupted_run(job)
                if (error := interrupted(job, self.settings.max_interruptions)) is not None:
                    poisoned[job.id] = error
                self._writes.save(job, ("state", "attempts", "interruptions"), run)
            self.jobs[job.id] = job
            self._keys.recovered(job)
        async for job in self._deps.recovering(recovered):  # their dependencies read at once
            if job.cancel_requested:  # acknowledged ("cancelling"): the crash ended its run
                self._finish(job, JobState.CANCELLED, Cancelled.code, f"Job {job.id} cancelled")
            elif job.id in poisoned:  # it may be what crashes the service: not run again
                self.failed(job, Interrupted.code, poisoned[job.id].encode())
                self._finish(job, JobState.FAILED, Interrupted.code, poisoned[job.id])
            elif job.started is not None:  # its dependencies were met when it first started
                self._line.place(job)
            else:
                await self._place_new(job)
        if recovered:
            log.info("job queue: %d unfinished jobs recovered", len(recovered))
        self._expiry = self._loop.create_task(self._finished.expire_forever(self._deps.failing))
        self._pump()

    async def stop(self, grace: float) -> None:
        """Start nothing new; give running jobs ``grace`` seconds, then hand those still
        running back: waiting again, for the next start."""
        self.close()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._running:
            tasks = {task for task in self._running.values() if task is not None}
            _, pending = await asyncio.wait(tasks, timeout=grace)
            cut = [self.jobs[jid] for jid, task in self._running.items() if task in pending]
            await cancel_all(pending, "jobs")  # (again, if one loses its cancellation)
            for job in (j for j in cut if j.state is JobState.RUNNING):  # (else: it ended)
                self._writes.save(job, ("state", "attempts"), handed_back(job))  # (no crash)
            refuse_waiters(self._waiters, ())  # theirs
        self._cascade(sys.maxsize)  # (a chain grows it as it goes)
        await self._writes.drain(5)
        await self.store.close()

    def close(self, grace: float = 0.0) -> None:
        self._pump.closed = True
        refuse_waiters(self._waiters, self._running)  # they can start no more: told now
        self._line.close()

    def outlived(self, job: Job, going_on: Future[Any]) -> None:
        self._pump.hold(job.module, going_on)

    # --- commands ---------------------------------------------------------------------

    async def add(self, spec: AddSpec) -> int:
        self.runner.check(spec.module, spec.source)  # unknown, refusing, not from here
        # Checked (name, tags, key) before the key is claimed: a 400 after it held it for ever.
        job, size = Job.new(spec, self.settings, time.time()), len(spec.data)
        # The key before the room: an add of a held key adds nothing, so it gets the
        # holder's id from a full queue too (as on Redis), not 503.
        if spec.unique and (existing := await self._keys.claim(spec.unique)) is not None:
            return existing
        try:  # the key is this add's now (claim): the adds of it that wait learn the outcome
            # Room held until stored: adds sharing a commit all passed a count without them.
            self.jobs.admit(size, self.settings.max_waiting, self.settings.max_waiting_bytes)
        except BaseException:
            self._keys.stored(spec.unique, None)
            raise
        try:
            return await self._insert(spec, job)
        finally:
            self.jobs.admitted(size)

    async def _insert(self, spec: AddSpec, job: Job) -> int:
        """Store the new ``job``, its key claimed and its room held (``add``)."""
        try:
            await self._deps.check(spec.after)
        except BaseException:  # no job made: the adds waiting on its key look again
            self._keys.stored(spec.unique, None)
            raise
        try:
            job.id = await self.store.insert(job, spec.mark)
        except BaseException as exc:  # cancelled too: the adds waiting on its key must end
            why = unstored(exc, "job")
            self._keys.stored(spec.unique, Busy(why))
            if not isinstance(exc, Exception):
                raise
            raise Busy(why) from None
        self.jobs[job.id] = job
        self._keys.stored(spec.unique, job.id)
        await self._place_new(job)
        self._pump()
        return job.id

    async def get(self, jid: int, owed: bool = False) -> Result:
        if jid not in self.jobs:
            # (owed: still in memory or the store if expired; add?wait=1 asks at once)
            job = await self._finished.lookup(jid, expired=owed)
            if job is None:
                raise not_found(jid)
            # Stored unfinished, not in self.jobs: its add or retry awaits the store; its
            # _finish settles the waiter below (or did meanwhile: looked up with no await).
            if jid not in self.jobs and (job := self._finished.recent(jid) or job).state.finished:
                return finished_result(job)
        waiter = self._waiters.get(jid)
        if waiter is None:
            assert self._loop is not None
            waiter = self._waiters[jid] = self._loop.create_future()
        # Shielded: one client hanging up must not cancel the result for the others.
        return await asyncio.shield(waiter)

    async def check(self, jid: int) -> str:
        return (await self._finished.require(jid, self.jobs)).state.check_code

    async def status(self, jid: int) -> dict[str, Any]:
        job = await self._finished.require(jid, self.jobs)
        position = await self._line.position(job) if self._ready(job) else None
        # Read after the count, which may give the loop back: the job may have started,
        # or ended, meanwhile (a finished job with a position, else).
        now = time.time()
        waiting = job.state is JobState.WAITING
        throttled = self.rates.free_at(job.module, now) if waiting else None
        return job.describe(now, position if self._ready(job) else None, throttled)

    async def cancel(self, jid: int) -> str:
        job = self.jobs.get(jid)
        if job is None:
            finished = await self._finished.lookup(jid)
            if (job := self.jobs.get(jid)) is None:  # (an add stored meanwhile is ours now)
                if finished is None:
                    raise not_found(jid)
                raise Conflict(f"Job {jid} already finished ({finished.state})")
        if job.state is JobState.RUNNING:
            job.cancel_requested = True
            # Its work is given up (even if the write fails: the flag is set), so the next
            # add of its key makes a job (at its end it frees the key only if it holds it).
            self._keys.release(job.unique_key, jid)
            await stored(self._writes.save(job, ("cancel_requested",)), "cancel")
            return "cancelling"
        written = self._finish(job, JobState.CANCELLED, Cancelled.code, f"Job {jid} cancelled")
        await stored(written, "cancel")  # acknowledged once on disk, as an add is
        return "cancelled"

    async def retry(self, jid: int, dependents: bool = False) -> int:
        return await self._retries.retry(jid, dependents)

    async def delete(self, jid: int) -> None:
        await self._finished.delete(jid, self.jobs)

    async def list_jobs(self, spec: ListSpec) -> dict[str, Any]:
        return await reports.list_page(self._live, self.store, spec)

    async def stats(self, window: float) -> dict[str, Any]:
        if (cause := self.store.failing) is not None:  # (/metrics: bgservice_queue_up 0)
            raise Busy(f"Job store unavailable: {cause}")
        return await reports.stats(self._live, self.store, self.settings, window, self._writes)

    async def save_checkpoint(self, job: Job, value: str) -> None:
        job.checkpoint = value
        await self.store.save(job, fields=("checkpoint",))

    # --- scheduling -------------------------------------------------------------------

    async def _place_new(self, job: Job) -> None:
        """Place a waiting job, checking its dependencies (which may be in the store)."""
        failure = await self._deps.wait_on(job)
        if failure is not None:
            self._finish(job, JobState.FAILED, DependencyFailed.code, failure, None)
        elif not self._deps.blocked(job.id):
            self._line.place(job)

    def _waiting(self, jid: int) -> Job | None:
        return job if (job := self.jobs.get(jid)) and job.state is JobState.WAITING else None

    def _ready(self, job: Job) -> bool:
        """Whether ``job`` has a position: due, waiting, and not on another job (nor about
        to fail with one)."""
        due = job.state is JobState.WAITING and job.run_at <= time.time()
        return due and not self._deps.blocked(job.id)

    # --- running ----------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        job.move(JobState.RUNNING)
        job.started, job.progress = time.time(), None
        job.attempts += 1
        self._pump.per_module[job.module] += 1
        self._writes.save(job, ("state", "started", "attempts"))
        loop = self.loop
        # No wait: it runs to its end right here, no task (bgservice.eager); else in one.
        self._running[job.id] = None
        try:
            done, task = eager.start(self._execute(job), loop.create_task, loop, self.root)
        except Exception:  # a bug of ours in _execute: reported, the job is failed there
            log.exception("job %d (%s): internal error running it", job.id, job.module)
            return
        if not done:
            self._running[job.id] = task

    async def _execute(self, job: Job) -> None:
        try:
            status, body = await self.run_job(job)
        finally:
            self._running.pop(job.id, None)
            self._pump.per_module[job.module] -= 1
        try:
            self._outcome(job, status, body)
        except Exception as exc:  # a bug here must fail this job, not stop the service
            log.exception("job %d (%s): internal error concluding it", job.id, job.module)
            if job.id in self.jobs:
                message = f"Internal error: {type(exc).__name__}"
                self._finish(job, JobState.FAILED, 500, message, time.time())
        self._pump()

    def _outcome(self, job: Job, status: int, body: bytes) -> None:
        now = time.time()
        outcome = self.conclude(job, status, body, now)
        if outcome.state is not JobState.WAITING:
            self._finish(job, outcome.state, outcome.status, outcome.body, now)
            return
        assert outcome.run_at is not None
        job.move(JobState.WAITING)
        job.run_at = outcome.run_at
        job.error = body.decode("utf-8", "replace")
        log.info("job %d (%s) failed (%d), retry %d of %d in %.3g s", job.id, job.module,
                 status, job.attempts, job.max_retries, outcome.run_at - now)  # fmt: skip
        self._writes.save(job, ("state", "run_at", "error"), run_record(job, outcome, now))
        self._line.place(job)

    def _finish(
        self, job: Job, state: JobState, status: int, body: bytes | str,
        ran_until: float | None = None,
    ) -> asyncio.Future[Any]:  # fmt: skip
        """End ``job`` (the future of its write); the jobs that fail with it end after it
        (``_cascade``)."""
        now = time.time()
        result = body.encode() if isinstance(body, str) else body
        job.move(state)
        job.finished, job.status, job.result = now, status, result
        if status != OK:
            job.error = result.decode("utf-8", "replace")
        job.expires = now + self.settings.keep_results
        self.jobs.pop(job.id, None)
        self._line.drop(job.id)  # (a waiting job cancelled, or failed by a dependency)
        self._keys.release(job.unique_key, job.id)
        self._finished.remember(job)
        run = None
        if ran_until is not None and job.started is not None:
            run = Run(job.id, job.module, job.attempts, job.started, ran_until, str(state))
        fields = ("state", "finished", "status", "result", "error", "expires", "progress")
        written = self._writes.save(job, fields, run)
        waiter = self._waiters.pop(job.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result((status, result))
        if self._deps.finished(job.id, state) and not self._cascading:
            self._cascade()
        return written

    def _cascade(self, turn: int = CASCADE) -> None:
        """Settle the jobs that waited on ended ones, ``turn`` a turn of the loop (100,000
        after= one held the loop in one step: 1.07 s failed, 0.3 s placed), none while the
        store is behind: saves held for it in memory are walked by every full collection
        (100,000 failed: 60 ms more). At stop, all at once (recovered, they would meet
        their dependency expired, or retried)."""
        self._cascading, placed = True, False
        behind = turn == CASCADE and len(self._writes) > BEHIND  # (waits 5 ms a turn)
        for jid, failure in self._deps.settled(0 if behind else turn):
            if (job := self.jobs.get(jid)) is None:
                continue
            if failure is None:
                self._line.place(job)
                placed = True
            else:
                self._finish(job, JobState.FAILED, DependencyFailed.code, failure)
        self._cascading = self._deps.unsettled  # (goes on in the next turn)
        if self._cascading:
            later = 0.005 if len(self._writes) > BEHIND else 0
            asyncio.get_running_loop().call_later(later, self._cascade)
        if placed:
            self._pump()
