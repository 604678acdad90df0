"""The embedded engine's dependencies (``after=``): which waiting jobs wait for which.

A job runs once every job it names is done, and fails (424) as soon as one fails or is
cancelled. A dependency that expired while the job waited (over a restart, say) was done:
had it failed, the job would have failed with it. Two maps, both emptied as jobs finish:
dependency -> the jobs waiting for it, and waiting job -> the dependencies it still
waits for. A job that finished (failed by one dependency, cancelled, retried) leaves the
second map, so the entries it leaves under its other dependencies are ignored when those
finish. A job failed by a dependency stays blocked (``doomed``) until the engine ends it:
never placed meanwhile, and listed among the jobs that wait on others.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterable

from bgservice.errors import DependencyFailed
from bgservice.queue.engine import not_found
from bgservice.queue.finished import FinishedJobs
from bgservice.queue.job import Job, JobState

TURN = 1000  # recovered jobs placed between two turns of the loop


class Dependencies:
    def __init__(self, live: Callable[[int], bool], finished: FinishedJobs) -> None:
        self._live = live  # id -> whether that job waits or runs
        self._finished = finished
        self._blocked: dict[int, set[int]] = {}  # dependency id -> job ids
        self._pending: dict[int, set[int]] = {}  # job id -> dependency ids not done yet
        self._doomed: set[int] = set()  # failed with a dependency, not ended yet

    async def check(self, after: tuple[int, ...]) -> None:
        """At ``queue:add``: 404 for an unknown dependency, 424 for one that did not
        succeed, before anything is stored."""
        for dep in after:
            if self._live(dep):
                continue
            dependency = await self._finished.lookup(dep)
            if dependency is None:
                raise not_found(dep)
            # Unfinished in the store, not live: its own add is on its way (pipelined).
            if dependency.state.finished and dependency.state is not JobState.DONE:
                raise DependencyFailed(f"Job {dep} {dependency.state}")

    async def recovering(self, jobs: list[Job]) -> AsyncIterator[Job]:
        """Start-up's recovered ``jobs``, to place: first every dependency of theirs that
        is not live is read in one go (one store round trip a job: 10 s for 100,000), then
        each job that is still live (a call may cancel one meanwhile), a turn of the loop
        every ``TURN`` (calls waited 2.4 s while 1,000,000 were placed)."""
        # (a job that started before waits on nothing: its dependencies were met then)
        await self._finished.lookup_many(
            d for job in jobs if not job.attempts for d in job.after if not self._live(d)
        )
        for placed, job in enumerate(jobs, 1):
            if placed % TURN == 0:
                await asyncio.sleep(0)
            if self._live(job.id):
                yield job

    async def wait_on(self, job: Job) -> str | None:
        """Put ``job`` behind its unfinished dependencies; the reason it fails instead, if
        one did not succeed. Afterwards ``blocked(job.id)`` says whether it must wait."""
        looked: set[int] = set()
        while gone := [d for d in job.after if d not in looked and not self._live(d)]:
            # Awaited lookups let other jobs finish meanwhile: look again until none did.
            for dep in gone:
                looked.add(dep)
                state = (dependency := await self._finished.lookup(dep)) and dependency.state
                if state and state.finished and state is not JobState.DONE:
                    return f"Dependency: job {dep} {state}"
        pending = {d for d in job.after if self._live(d)}
        if pending:
            self._pending[job.id] = pending
            for dep in pending:
                self._blocked.setdefault(dep, set()).add(job.id)
        return None

    def blocked(self, jid: int) -> bool:
        return jid in self._pending or jid in self._doomed

    def doomed(self, jid: int) -> bool:
        """Whether ``jid`` is to fail with a dependency and has not ended yet."""
        return jid in self._doomed

    def blocked_ids(self) -> Iterable[int]:
        """The waiting jobs that wait on another (for queue:list)."""
        return itertools.chain(self._pending.keys(), self._doomed)

    def finished(self, jid: int, state: JobState) -> tuple[list[int], list[int]]:
        """Job ``jid`` ended in ``state``: (the jobs now free to run, the jobs that fail
        with it). Forgets ``jid``'s own wait, if it was still waiting for others."""
        self._pending.pop(jid, None)
        self._doomed.discard(jid)
        ready: list[int] = []
        failed: list[int] = []
        for dependent in sorted(self._blocked.pop(jid, ())):
            pending = self._pending.get(dependent)
            if pending is None:  # finished meanwhile: a stale entry
                continue
            if state is not JobState.DONE:
                failed.append(dependent)
                del self._pending[dependent]
                self._doomed.add(dependent)
                continue
            pending.discard(jid)
            if not pending:
                del self._pending[dependent]
                ready.append(dependent)
        return ready, failed
