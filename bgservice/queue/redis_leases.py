"""Mixed into RedisQueue: what an instance keeps telling Redis about the jobs it runs.
Every ``lease / 3`` seconds it renews their leases (learning which were cancelled
meanwhile) and takes back to the queue the jobs whose instance stopped renewing theirs;
and it copies their progress reports."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError, ResponseError

from bgservice.config import QueueSettings, RedisSettings
from bgservice.queue.job import Job
from bgservice.queue.redis_db import RedisJobs

log = logging.getLogger(__name__)


class RedisLeases:
    db: RedisJobs
    conf: RedisSettings
    settings: QueueSettings
    owner: str
    _running: dict[int, tuple[Job, asyncio.Task[Any]]]
    _ending: set[int]
    _progress_pending: set[int]
    _spawn: Callable[[Coroutine[Any, Any, None]], None]  # RedisQueue's

    def progressed(self, job: Job) -> None:
        """A handler reported progress: copy it to Redis, coalescing quick reports."""
        if job.id not in self._progress_pending:
            self._progress_pending.add(job.id)
            self._spawn(self._write_progress(job))

    async def _write_progress(self, job: Job) -> None:
        await asyncio.sleep(0.05)  # reports within 50 ms share one write
        self._progress_pending.discard(job.id)
        try:
            key = self.db.key(f"job:{job.id}")
            await self.db.redis.hset(key, "progress", json.dumps(job.progress))
        except RedisError as exc:
            log.debug("job %d: progress not written: %s", job.id, exc)

    async def _leases(self) -> None:
        """Renew our leases; take over jobs whose instance stopped renewing theirs."""
        interval = self.conf.lease / 3
        reap_from = 0.0  # after an outage: once every live instance has renewed again
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
                if time.monotonic() < reap_from:
                    continue
                taken = await self.db.call("REAP", repr(self.conf.lease), self._expires())
            except (RedisError, ResponseError) as exc:
                log.warning("cannot renew job leases: %s", exc)
                # Leases ran out while nobody could reach Redis, not because their
                # instances died: each gets a full lease to renew before we reap.
                reap_from = time.monotonic() + self.conf.lease + interval
                continue
            if taken:
                log.warning(
                    "jobs %s: their instance stopped renewing their lease; they run again",
                    ", ".join(t.decode() for t in taken),
                )

    async def hand_back(self, ids: list[str]) -> None:
        """Stopping: our unfinished jobs wait again for any instance (or end cancelled)."""
        await self.db.call("RELEASE", self.owner, self._expires(), *ids)

    async def _heard_cancel(self, jid: int) -> None:
        """A cancel published for a job id we run: the channel is server-wide (a service
        on another db number with the same prefix publishes on it too): it is ours only
        if the job hash in our db says so."""
        try:
            key = self.db.key(f"job:{jid}")
            asked, owner = await self.db.redis.hmget(key, "cancel_requested", "owner")
        except RedisError:
            return  # the next renewal reports it
        if asked == b"1" and owner == self.owner.encode() and jid in self._running:
            self._running[jid][0].cancel_requested = True

    def _expires(self) -> str:  # a job that ends now: when its result goes
        return repr(time.time() + self.settings.keep_results)

    async def _renew(self) -> None:
        if not self._running:
            return
        deadline = repr(time.time() + self.conf.lease)
        ids = [str(jid) for jid in self._running]
        lost, cancel = await self.db.call("RENEW", self.owner, deadline, *ids)
        for raw in cancel:
            entry = self._running.get(int(raw))
            if entry is not None:
                entry[0].cancel_requested = True
        for jid in map(int, lost):  # not a job whose end was recorded meanwhile
            if jid in self._running and jid not in self._ending:
                log.warning("job %d: lease lost (taken over by another instance): its "
                            "handler is told to stop (request.job.cancelled)", jid)  # fmt: skip
                self._running[jid][0].cancel_requested = True
