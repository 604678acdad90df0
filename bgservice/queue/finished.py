"""The embedded engine's finished jobs: the recent ones in memory, all of them in the
store, and their expiry (``[queue] keep_results`` and ``keep_history``); finding a job
for ``queue:check``, ``status`` and ``delete`` (waiting, running or finished).

A finished job read from the store is kept with the recent ones: the jobs that wait on
it (``after=``) ask again and again, and each store read is a round trip to its writer
thread (start-up, 100,000 jobs waiting on one finished job: 10 s of reads one after
another). At start-up ``lookup_many`` reads every dependency of the recovered jobs at
once; what it found (or did not) is kept until the first expiry sweep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from bgservice.config import QueueSettings
from bgservice.errors import Busy, Conflict
from bgservice.queue.engine import not_found
from bgservice.queue.job import Job
from bgservice.queue.live import LiveJobs
from bgservice.queue.store import Store

log = logging.getLogger(__name__)

CACHE = 10_000  # finished jobs kept in memory, newest last


class FinishedJobs:
    def __init__(self, settings: QueueSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._recent: OrderedDict[int, Job] = OrderedDict()
        self._known: dict[int, Job | None] = {}  # lookup_many's answers, until expiry starts
        self._forgotten = 0  # forget calls: a store read one overlapped is not kept

    def remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > CACHE:
            self._recent.popitem(last=False)

    def forget(self, jid: int) -> None:
        self._recent.pop(jid, None)
        self._known.pop(jid, None)
        self._forgotten += 1

    def recent(self, jid: int) -> Job | None:
        """The job if it finished recently (no store read, so no await)."""
        return self._recent.get(jid)

    async def lookup(self, jid: int, *, expired: bool = False) -> Job | None:
        """A job that is not waiting or running: recently finished, or asked of the store;
        None when unknown, or expired (unless ``expired``: then while still stored)."""
        job = self._recent.get(jid)
        if job is None and jid in self._known:
            job = self._known[jid]
        elif job is None:
            forgotten = self._forgotten
            job = await self.store.get(jid)
            # Kept if finished, and if no retry or delete (forget) began while it was read.
            # (one in _recent now finished meanwhile: it is newer than the one read)
            if job is not None and job.state.finished and forgotten == self._forgotten:
                if jid not in self._recent:
                    self.remember(job)
        if expired or job is None or job.expires is None or job.expires >= time.time():
            return job
        return None

    async def require(self, jid: int, live: LiveJobs) -> Job:
        """Job ``jid``, one of the ``live`` (waiting or running) or finished; 404 when
        unknown or expired."""
        if (job := live.get(jid) or await self.lookup(jid)) is None:
            raise not_found(jid)
        return job

    async def delete(self, jid: int, live: LiveJobs) -> None:
        """``queue:delete``: forget finished job ``jid``, here and in the store; 409 while
        it is one of the ``live`` (waiting or running), 404 when unknown or expired."""
        found = jid in live or await self.lookup(jid) is not None
        if (job := live.get(jid)) is not None:  # (also when retried while we looked)
            raise Conflict(f"Job {jid} is {job.state}: cancel it first")
        if not found:
            raise not_found(jid)
        self.forget(jid)
        await self.store.delete(jid)

    async def lookup_many(self, ids: Iterable[int]) -> None:
        """Read the ``ids`` not known yet in one go, for the ``lookup`` of each to answer
        with no store read (start-up: the recovered jobs' dependencies)."""
        wanted = sorted({j for j in ids if j not in self._recent and j not in self._known})
        if not wanted:
            return
        forgotten = self._forgotten
        found = {job.id: job for job in await self.store.get_many(wanted)}
        if forgotten != self._forgotten:  # a retry or delete meanwhile: ask one by one
            return
        for jid in wanted:
            job = found.get(jid)
            if job is None or job.state.finished:  # (unfinished: its add is on its way)
                self._known[jid] = job

    async def expire_forever(self, keep: Callable[[], Sequence[int]]) -> None:
        """Delete expired jobs and old history, every few seconds, until cancelled; not the
        jobs ``keep()`` names (failed ones whose dependents are still to fail with them)."""
        interval = min(60.0, max(0.5, self.settings.keep_results / 4))
        self._known.clear()  # start-up is over
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for jid in [j for j, job in self._recent.items() if (job.expires or now) < now]:
                del self._recent[jid]
            try:
                gone = await self.store.expire(now, now - self.settings.keep_history, keep())
            except Exception as exc:
                if not isinstance(exc, Busy):  # (its commit failed: the store says that)
                    log.error("job expiry failed: %s", exc)
                continue
            if gone:
                log.info("job queue: %d finished jobs expired", gone)
