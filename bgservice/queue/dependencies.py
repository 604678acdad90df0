"""The embedded engine's dependencies (``after=``): which waiting jobs wait for which.

A job runs once every job it names is done, and fails (424) as soon as one fails or is
cancelled. A dependency whose record is gone (expired and swept while the job waited)
was done: had it failed, the job would have failed with it. One that failed, expired
and is still stored fails it: a crash in the middle of its cascade leaves jobs waiting
on it, and no sweep deletes it while its cascade goes on (``failing``) or the service is
down. Two maps, both emptied as jobs finish: dependency -> the jobs waiting for it, and
waiting job -> the dependencies it still waits for. A job that finished (failed by one
dependency, cancelled, retried) leaves the second map, so the entries it leaves under its
other dependencies are ignored when those finish. When a dependency ends, its dependents
are handed to the engine, which settles them a few at a time (``settled``): until then
each stays blocked, never placed, and listed among the jobs that wait on others.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator

from bgservice.errors import DependencyFailed
from bgservice.queue.engine import not_found
from bgservice.queue.finished import FinishedJobs
from bgservice.queue.job import Job, JobState
from bgservice.queue.live import LiveJobs

TURN = 1000  # recovered jobs placed between two turns of the loop


def failure(dependency: int, state: JobState) -> str:
    """The error of a job that fails (424) because ``dependency`` ended in ``state``: what
    a retry with dependents=1 finds it by (retries.py)."""
    return f"Dependency: job {dependency} {state}"


class Dependencies:
    def __init__(self, jobs: LiveJobs, finished: FinishedJobs) -> None:
        self._jobs = jobs  # the jobs that wait or run
        self._live: Callable[[int], bool] = jobs.__contains__
        self._finished = finished
        self._blocked: dict[int, set[int]] = {}  # dependency id -> job ids
        # job id -> dependency ids not done yet: tuples, which the garbage collector stops
        # tracking (a set per job: 100,000 more objects each full collection walks)
        self._pending: dict[int, tuple[int, ...]] = {}
        # (an ended job, its state, the jobs that waited on it, left to settle)
        self._ending: deque[tuple[int, JobState, Iterator[int]]] = deque()
        self._through: asyncio.Event | None = None  # set when one is through, for settle

    async def check(self, after: tuple[int, ...]) -> None:
        """At ``queue:add``: 404 for an unknown dependency, 424 for one that did not
        succeed, before anything is stored."""
        for dep in after:
            if (live := self._jobs.get(dep)) is not None:
                if live.cancel_requested:  # "cancelling": it ends cancelled (its dependents
                    raise DependencyFailed(f"Job {dep} cancelled")  # failed at the cancel)
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
            d for job in jobs if job.started is None for d in job.after if not self._live(d)
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
                dependency = await self._finished.lookup(dep, expired=True)
                state = dependency and dependency.state
                if state and state.finished and state is not JobState.DONE:
                    return failure(dep, state)
        pending = tuple(d for d in dict.fromkeys(job.after) if self._live(d))
        if pending:
            self._pending[job.id] = pending
            for dep in pending:
                self._blocked.setdefault(dep, set()).add(job.id)
        return None

    def blocked(self, jid: int) -> bool:
        return jid in self._pending

    def blocked_ids(self) -> Collection[int]:
        """The waiting jobs that wait on another (for queue:list)."""
        return self._pending.keys()

    def finished(self, jid: int, state: JobState) -> bool:
        """Job ``jid`` ended in ``state``: the jobs that waited for it are queued to be
        ``settled``, in id order; whether there are any. Forgets ``jid``'s own wait."""
        self._pending.pop(jid, None)
        dependents = self._blocked.pop(jid, None)
        if dependents:
            self._ending.append((jid, state, iter(sorted(dependents))))
        return bool(dependents)

    async def settle(self, jids: Collection[int]) -> None:
        """Return once the jobs that waited on the ended jobs ``jids`` are settled
        (``settled`` takes a few a turn): a retry with dependents=1 finds them failed with
        theirs only then."""
        while any(ended in jids for ended, _, _ in self._ending):
            if self._through is None:
                self._through = asyncio.Event()
            await self._through.wait()

    def failing(self) -> list[int]:
        """The failed or cancelled jobs whose dependents are not all failed yet: the sweep
        keeps their records, which a restart would judge those dependents by."""
        return [jid for jid, state, _ in self._ending if state is not JobState.DONE]

    @property
    def unsettled(self) -> bool:
        return bool(self._ending)

    def settled(self, most: int) -> Iterator[tuple[int, str | None]]:
        """At most ``most`` of the queued jobs settled, each with what becomes of it: (id,
        None) free to run, (id, why) to fail with its dependency. Those that wait on others
        still, or stopped waiting (finished, retried) meanwhile, are passed over. The ones
        the caller fails queue their own dependents behind the rest (a chain may be long)."""
        while most > 0 and self._ending:
            jid, state, dependents = self._ending[0]
            some = list(itertools.islice(dependents, most))
            if len(some) < most:
                self._ending.popleft()
                if self._through is not None:  # (woken once this step is over: all settled)
                    self._through.set()
                    self._through = None
            most -= len(some)
            done, why = state is JobState.DONE, failure(jid, state)
            for dependent in some:
                pending = self._pending.get(dependent)
                if pending is None:
                    continue
                if done and (rest := tuple(d for d in pending if d != jid)):
                    self._pending[dependent] = rest
                    continue
                del self._pending[dependent]
                yield dependent, None if done else why
