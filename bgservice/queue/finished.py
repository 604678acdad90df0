"""The embedded engine's finished jobs: the recent ones in memory, all of them in the
store, and their expiry (``[queue] keep_results`` and ``keep_history``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from bgservice.config import QueueSettings
from bgservice.queue.job import Job
from bgservice.queue.store import Store

log = logging.getLogger(__name__)

CACHE = 10_000  # finished jobs kept in memory, newest last


class FinishedJobs:
    def __init__(self, settings: QueueSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._recent: OrderedDict[int, Job] = OrderedDict()

    def remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > CACHE:
            self._recent.popitem(last=False)

    def forget(self, jid: int) -> None:
        self._recent.pop(jid, None)

    def recent(self, jid: int) -> Job | None:
        """The job if it finished recently (no store read, so no await)."""
        return self._recent.get(jid)

    async def lookup(self, jid: int) -> Job | None:
        """A job that is not waiting or running: recently finished, or asked of the store;
        None when unknown or expired."""
        job = self._recent.get(jid)
        if job is None:
            job = await self.store.get(jid)
        if job is not None and job.expires is not None and job.expires < time.time():
            return None
        return job

    async def expire_forever(self) -> None:
        """Delete expired jobs and old history, every few seconds, until cancelled."""
        interval = min(60.0, max(0.5, self.settings.keep_results / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for jid in [j for j, job in self._recent.items() if (job.expires or now) < now]:
                del self._recent[jid]
            try:
                gone = await self.store.expire(now, now - self.settings.keep_history)
            except Exception as exc:
                log.error("job expiry failed: %s", exc)
                continue
            if gone:
                log.info("job queue: %d finished jobs expired", gone)
