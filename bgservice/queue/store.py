"""Where jobs are kept: the small interface every store implements.

The embedded queue engine (local.py) schedules in memory and writes every change through a
store; a store answers only for durability and for finished jobs that have left memory.
``SqliteStore`` (sqlite.py) is the embedded default.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bgservice.errors import Busy
from bgservice.queue.commands import NO_FILTER, JobFilter
from bgservice.queue.job import Job, JobState
from bgservice.queue.schedules import Schedule

log = logging.getLogger(__name__)


# Not frozen, though a value: made for every attempt, and a frozen dataclass's __init__ calls
# object.__setattr__ once per field (AddSpec: 2.3 us, 0.55 us unfrozen).
@dataclass
class Run:
    """One attempt of a job, for the history behind ``queue:stats``."""

    job: int
    module: str
    attempt: int
    started: float
    finished: float
    outcome: str  # done, retry, failed, cancelled


class Store(Protocol):
    @property
    def failing(self) -> str | None:
        """While the store's commits fail as a whole, why (None: they succeed)."""
        ...

    async def open(self) -> list[Job]:
        """Open (creating if needed) and return every unfinished job."""
        ...

    def insert(self, job: Job, mark: tuple[str, float] | None = None) -> Awaitable[int]:
        """Store a new job, giving it its id (never used before) at once; resolves to the
        id once committed. Writes are queued when called, so they apply in call order.
        ``mark``: the (schedule, slot) the job is the run of, recorded in the same commit."""
        ...

    def save(
        self, job: Job, run: Run | None = None, *, fields: tuple[str, ...] | None = None
    ) -> Awaitable[None]:
        """Store the job's ``fields`` as they are now (None: all of them), and an attempt's
        record; resolves once committed."""
        ...

    async def delete(self, job_id: int) -> None:
        """Forget a finished job (its run records stay, for the history)."""
        ...

    async def get(self, job_id: int) -> Job | None: ...

    async def get_many(self, ids: Sequence[int]) -> list[Job]:
        """The stored jobs of ``ids``, those there are (start-up's dependencies)."""
        ...

    async def failed_with(self, errors: Sequence[str], after: int, most: int) -> list[Job]:
        """At most ``most`` of the jobs that failed with 424 and one of ``errors``
        (``Dependency: job N failed``: a retry's dependents), in id order from the first
        id above ``after``."""
        ...

    async def list_jobs(
        self, state: str, limit: int, offset: int, where: JobFilter = NO_FILTER
    ) -> list[Job]:
        """A page of the finished jobs of ``state`` that ``where`` matches, newest first."""
        ...

    async def counts(self, writes: Writes | None = None) -> dict[str, int]:
        """The stored jobs by state; with ``writes``, as memory has them when answered:
        plus the jobs that ended whose ends are not committed yet (``unwritten_ends``),
        less the rows of jobs retried whose retry is not (``retrying``): each counted once
        by the store or by memory."""
        ...

    async def run_history(self, now: float, window: float) -> dict[str, Any]:
        """``queue:stats``' summary of the attempts that ended lately (history.py)."""
        ...

    async def expire(self, now: float, history_before: float, keep: Sequence[int] = ()) -> int:
        """Delete finished jobs past their ``expires``, but those in ``keep``, and older
        history; returns jobs gone."""
        ...

    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]: ...

    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None: ...

    async def remove_schedule(self, name: str) -> bool: ...

    async def close(self) -> None: ...


class StoredSchedules:
    """Mixed into LocalQueue: the JobQueue schedule methods, kept in its store (as
    RedisSchedules keeps the Redis engine's in Redis)."""

    store: Store

    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]:
        return await self.store.load_schedules()

    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None:
        await self.store.put_schedule(schedule, last, reset)

    async def remove_schedule(self, name: str) -> bool:
        return await self.store.remove_schedule(name)


class Writes:
    """The saves in flight through a store: one that fails is logged (the change may be
    nobody's to await) unless the store said it (``Busy``: its commit failed, and the store
    keeps the change to write it once it can), and ``drain`` waits for them all (stopping)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pending: dict[asyncio.Future[Any], Job] = {}  # a save, and the job it writes
        # a retry's save, its job id and the state the job's row holds meanwhile
        self._retries: dict[asyncio.Future[Any], tuple[int, str | None]] = {}

    def save(
        self, job: Job, fields: tuple[str, ...], run: Run | None = None
    ) -> asyncio.Future[Any]:
        future = asyncio.ensure_future(self.store.save(job, run, fields=fields))
        self._pending[future] = job
        future.add_done_callback(self._done)
        return future

    def __len__(self) -> int:
        return len(self._pending)

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._pending.pop(future, None)
        if not future.cancelled() and (exc := future.exception()) is not None:
            if not isinstance(exc, Busy):  # (a row the store refused: lost)
                log.error("job store write failed: %s", exc)

    def unwritten_ends(self) -> Counter[str]:
        """The jobs that ended and whose ends the store has not committed, by state (each
        once, however many of its saves are pending): ``Store.counts`` adds them."""
        ended = {job.id: job.state for future, job in self._pending.items()
                 if job.state.finished and not future.done()}  # fmt: skip
        return Counter(map(str, ended.values()))

    def retry(self, job: Job, was: JobState) -> Awaitable[None]:
        """Save a retried job whole: until that commits, its row still holds it as it
        ``was`` while memory has it waiting (``retrying``). Rare: no cost to other saves."""
        ending = any(j.id == job.id and not f.done() for f, j in self._pending.items())
        future = asyncio.ensure_future(self.store.save(job))
        self._retries[future] = (job.id, None if ending else str(was))  # (row: not ended)
        future.add_done_callback(self._saved)
        return asyncio.shield(future)  # tracked until it commits, whoever stops waiting

    def _saved(self, future: asyncio.Future[Any]) -> None:
        # A retry the store refused (a row it cannot write) stays until its caller has
        # taken the job out of memory again (refused): till then memory and the row both
        # hold it. One whose commit failed stays in memory, and the store keeps its save
        # for a later commit: until that one, the job counts twice (waiting, and as its
        # row was).
        failed = None if future.cancelled() else future.exception()
        if failed is None or isinstance(failed, Busy):  # (a save merged into another
            self._retries.pop(future, None)  # of its job shares its future: said twice)

    def refused(self, jid: int) -> None:
        """The retry of ``jid`` failed and memory let the job go: its row counts it."""
        for future in [f for f, (j, _) in self._retries.items() if j == jid and f.done()]:
            del self._retries[future]

    def retrying(self) -> dict[int, str | None]:
        """The retried jobs that memory holds and whose row may still have them as they
        were (not committed, or refused), with the finished state such a row holds (None:
        the job's end was not written either). Safe to call from the store's thread."""
        return dict(list(self._retries.values()))

    async def drain(self, timeout: float) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)


def unstored(exc: BaseException | None, what: str | None = None) -> str:
    """The 503's message for what the store did not write: the store's own (its commit
    failed: it says why, once), else ``exc`` as the cause, logged if it refused a ``what``."""
    if isinstance(exc, Busy):
        return exc.message
    if not isinstance(exc, Exception):  # (cancelled)
        return "Job store unavailable"
    if what is not None:
        log.error("job store refused a %s: %s", what, exc)
    return f"Job store unavailable: {exc}"


async def stored(write: Awaitable[Any], what: str) -> None:
    """Await the save a client's reply waits for (a cancel, a retry), shielded: a client
    hanging up does not cancel it. Failed, 503; memory has the change, and the store keeps
    it to write once it can: it is lost only if the service stops before that."""
    try:
        await asyncio.shield(write)
    except Exception as exc:
        raise Busy(f"{unstored(exc)} (the {what} may not survive a restart)") from exc
