"""The embedded engine's ``queue:retry``: a failed or cancelled job back in line, and with
``dependents=1`` the jobs that failed with 424 because it did, and because they did, and
so on, each waiting on its ``after=`` jobs again (docs/queue.md, retry).

Those are found in the store by the error that names the job they failed with
(``Dependency: job N failed``: an index of its own, sqlite_schema.py), ``turn`` (500, the
cascade's) at a time: each chunk is a store read and one commit of their saves, so the
loop serves others between chunks. Breadth first: a job is back before the jobs that
failed because of it are looked for, so they find it waiting and wait on it; they are
looked for ``turn`` jobs brought back at a time, in one read (a read each took 20,000
jobs brought back 5.5 s, mostly waiting on the store). A job's own are looked for once
its cascade is through (``Dependencies.settle``): before, some that waited on it are still
waiting, and fail with it later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

from bgservice.errors import Busy, Conflict, DependencyFailed
from bgservice.queue.dependencies import Dependencies, failure
from bgservice.queue.engine import not_found
from bgservice.queue.finished import FinishedJobs
from bgservice.queue.job import Job, JobState
from bgservice.queue.live import LiveJobs
from bgservice.queue.store import Store, Writes, stored, unstored
from bgservice.queue.unique import UniqueKeys

log = logging.getLogger(__name__)

ENDS = (JobState.FAILED, JobState.CANCELLED)  # how a job that retries ended


class Retries:
    def __init__(
        self, jobs: LiveJobs, finished: FinishedJobs, keys: UniqueKeys, writes: Writes,
        deps: Dependencies, store: Store, place: Callable[[Job], Awaitable[None]],
        pump: Callable[[], None], turn: int,
    ) -> None:  # fmt: skip
        self.jobs = jobs  # waiting and running
        self._finished = finished
        self._keys = keys
        self._writes = writes
        self._deps = deps
        self._store = store
        self._place = place  # a waiting job placed: in line, behind its dependencies, or failed
        self._pump = pump
        self._turn = turn

    async def retry(self, jid: int, dependents: bool = False) -> int:
        if dependents:  # (the jobs that waited on it are all failed with it then)
            await self._deps.settle((jid,))
        if jid in self.jobs:
            raise Conflict(f"Job {jid} is {self.jobs[jid].state}, not failed")
        job = await self._finished.lookup(jid)
        if job is None:
            raise not_found(jid)
        if job.state not in ENDS:
            raise Conflict(f"Job {jid} is {job.state}: only failed or cancelled jobs retry")
        unsaved = await self._back(job, ())  # it no longer waits: the operator's decision
        if dependents:
            unsaved = await self._dependents(jid) or unsaved
        if unsaved is not None:
            raise unsaved
        return jid

    async def _back(self, job: Job, after: tuple[int, ...]) -> Busy | None:
        """``job``, failed or cancelled, waiting again (attempts from zero, nothing of its
        last run kept, waiting for ``after``), placed once its save is stored. Returns the
        503 to raise if its commit failed (memory keeps the retry, the store its save);
        raises 409 if another job holds its unique key or another retry took it back
        (nothing changed), 503 if the store refused its row (undone)."""
        jid, key = job.id, job.unique_key
        if jid in self.jobs:  # another retry of it took it back while this one read it
            raise Conflict(f"Job {jid} is {self.jobs[jid].state}, not failed")
        self._keys.retaking(key, jid)  # (409 if another job holds it)
        self._finished.forget(jid)
        was = job.state  # (its row holds it so until the retry is written)
        job.move(JobState.WAITING)
        job.attempts, job.interruptions, job.run_at = 0, 0, time.time()
        job.finished = job.expires = job.status = job.result = job.started = job.progress = None
        job.cancel_requested, job.after = False, after
        # Ours before the store answers: a cancel, get, retry or after= meanwhile finds it
        # waiting (the store applies writes in order: a cancel's lands after this one).
        self.jobs[jid] = job
        self._keys.hold(key, jid)
        try:  # its commit failed (Busy): the store keeps the save, memory the retry
            await stored(self._writes.retry(job, was), "retry")
            unsaved = None
        except Busy as exc:
            if not isinstance(exc.__cause__, Busy):  # a row the store refused: undone
                self.jobs.pop(jid, None)  # the store still has it as it was: lookups read that
                self._writes.refused(jid)
                self._keys.release(key, jid)
                raise Busy(unstored(exc.__cause__, "retry")) from None
            unsaved = exc
        if job.state is JobState.WAITING:  # else cancelled while it was saved
            await self._place(job)
            self._pump()
        return unsaved

    async def _dependents(self, root: int) -> Busy | None:
        """Bring back the jobs that failed because ``root`` did, transitively; the 503 of a
        commit that failed, if one did."""
        parents, unsaved, back = deque([root]), None, 0
        while parents:
            heads = {parents.popleft() for _ in range(min(len(parents), self._turn))}
            await self._deps.settle(heads)
            async for chunk in self._failed_by(heads):
                # Saved together (one commit), each placed once its save is stored.
                outcomes = await asyncio.gather(
                    *(self._back(job, job.after) for job in chunk), return_exceptions=True
                )
                for job, outcome in zip(chunk, outcomes, strict=True):
                    # Its key taken since, or its row refused (undone): it stays failed.
                    if isinstance(outcome, Conflict | Busy):
                        log.warning("job %d not brought back with job %d: %s", job.id, root,
                                    outcome.message)  # fmt: skip
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        unsaved = unsaved or outcome
                        if not _failed_again(job):  # (else so do the jobs after it)
                            back += 1
                            parents.append(job.id)
        log.info("job %d retried with %d jobs that had failed because it did", root, back)
        return unsaved

    async def _failed_by(self, parents: Collection[int]) -> AsyncIterator[list[Job]]:
        """The jobs that failed with 424 because one of ``parents`` did (failed or
        cancelled) and still are, ``turn`` at most a chunk, in id order: as memory has
        them, the store's rows of those not in memory any more."""
        whys = {failure(parent, ended): parent for parent in parents for ended in ENDS}
        after = 0
        while True:
            rows = await self._store.failed_with(list(whys), after, self._turn)
            now = time.time()
            jobs = [self._finished.recent(row.id) or row for row in rows]
            chunk = [job for job in jobs if job.id not in self.jobs
                     and job.state is JobState.FAILED and job.error in whys
                     and job.status == DependencyFailed.code
                     and whys[job.error] in job.after and (job.expires or now) >= now]  # fmt: skip
            if chunk:
                yield chunk
            if len(rows) < self._turn:
                break
            after = rows[-1].id


def _failed_again(job: Job) -> bool:
    """Brought back, ``job`` failed at once: another of its dependencies did not succeed."""
    return job.state is JobState.FAILED and job.status == DependencyFailed.code
