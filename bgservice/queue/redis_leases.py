"""Mixed into RedisQueue: what an instance keeps telling Redis about the jobs it runs.
Every ``lease / 3`` seconds it renews their leases (learning which were cancelled
meanwhile) and takes back to the queue the jobs whose instance stopped renewing theirs;
and it copies their progress reports. A handler that runs on past its job's timeout
holds its worker here, and its module's slot in Redis under a lease of its own, until it
returns (``outlived``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, NamedTuple

from redis.exceptions import RedisError, ResponseError

from bgservice.config import QueueSettings, RedisSettings
from bgservice.queue.job import Job
from bgservice.queue.redis_db import RedisJobs, refusal

log = logging.getLogger(__name__)

_BACKOFF_MAX = 5.0
CHECKPOINT_WAIT = 60.0  # s: how long a checkpoint waits for Redis (docs/queue.md)


class Attempt(NamedTuple):
    """A job this instance runs, and the token of the claim it runs under: every write
    of the attempt (end, lease, progress, checkpoint) names it, and Redis takes it only
    while the job's ``owner`` is still that token."""

    job: Job
    task: asyncio.Task[Any]
    token: str


class Held(NamedTuple):
    """A handler running on past its attempt (its timeout): its P:held member (MODULE|TOKEN),
    and whether Redis holds its module's slot (not if the attempt's lease was lost)."""

    member: str
    in_redis: bool


class RedisLeases:
    failed: Callable[[Job, int, bytes], None]  # (JobQueue's: a failed job's alert)
    db: RedisJobs
    conf: RedisSettings
    settings: QueueSettings
    owner: str
    _running: dict[int, Attempt]
    _ending: set[int]
    _lost: set[str]  # claim tokens of running attempts whose lease was taken over
    _progress_pending: set[int]
    _outliving: dict[str, asyncio.Future[Any]]  # claim token -> its handler, past its timeout
    _held: dict[str, Held]  # claim token -> a handler past its ended attempt, still running
    _wake: asyncio.Event
    loop: asyncio.AbstractEventLoop
    _closing: bool
    _spawn: Callable[[Coroutine[Any, Any, None]], None]  # RedisQueue's
    declare: Callable[[], Coroutine[Any, Any, None]]  # RedisSchedules': its config's schedules

    def progressed(self, job: Job) -> None:
        """A handler reported progress: copy it to Redis, coalescing quick reports."""
        if job.id not in self._progress_pending:
            self._progress_pending.add(job.id)
            self._spawn(self._write_progress(job))

    async def _write_progress(self, job: Job) -> None:
        await asyncio.sleep(0.05)  # reports within 50 ms share one write
        self._progress_pending.discard(job.id)
        try:
            await self.note(job, "progress", json.dumps(job.progress))
        except RedisError as exc:
            log.debug("job %d: progress not written: %s", job.id, exc)

    def outlived(self, job: Job, going_on: Future[Any]) -> None:
        """The attempt ends at its timeout while its handler goes on (JobQueue.outlived):
        its end (``_execute``) then keeps the worker, and the module's slot in Redis."""
        attempt = self._running.get(job.id)
        if attempt is not None and attempt.job is job:
            self._outliving[attempt.token] = asyncio.wrap_future(going_on, loop=self.loop)

    def _keep_slot(
        self, token: str, module: str, going_on: asyncio.Future[Any], in_redis: bool
    ) -> None:
        """An attempt ended (recorded as END was told, with the slot held in Redis if
        ``in_redis``) while its handler runs on: its worker stays taken until it returns."""
        self._held[token] = Held(f"{module}|{token}", in_redis)
        self._spawn(self._unhold_when(token, going_on))

    async def _unhold_when(self, token: str, going_on: asyncio.Future[Any]) -> None:
        await asyncio.wait([going_on])
        held = self._held.get(token)
        if held is None:  # (given back at a stop)
            return
        if held.in_redis:
            try:
                await self.db.call("HELD", "", held.member)
            except RedisError as exc:
                log.warning("cannot free %s's module slot in Redis (%s): it frees when its "
                            "lease runs out", held.member, exc)  # fmt: skip
        self._held.pop(token, None)  # (a stop meanwhile gave every slot back)
        self._wake.set()  # a worker is free

    def _held_in_redis(self) -> list[str]:  # the P:held members this instance keeps
        return [held.member for held in self._held.values() if held.in_redis]

    async def _unhold_all(self) -> None:
        """Stopping: the module slots held by handlers still running here are given back
        (the handlers end with the process)."""
        members = self._held_in_redis()
        self._held.clear()
        if members:
            try:
                await self.db.call("HELD", "", *members)
            except RedisError as exc:
                log.warning("cannot free %d held module slots (%s): their leases run out",
                            len(members), exc)  # fmt: skip

    async def note(self, job: Job, field: str, value: str) -> bool:
        """Write a running attempt's progress or checkpoint, unless the attempt no longer
        holds the job (its lease was taken over: the value belongs to no attempt)."""
        attempt = self._running.get(job.id)
        if attempt is None or attempt.job is not job:
            return False
        return bool(await self.db.call("NOTE", job.id, attempt.token, field, value))

    async def checkpoint(self, job: Job, value: str) -> bool:
        """``note`` a checkpoint, through a short outage (a restart, a failover): while
        Redis does not answer, or answers with an error a wait may end (``refusal``: no),
        again as soon as it does, for CHECKPOINT_WAIT seconds at most and while the
        attempt runs (False once it ended: its timeout); then the handler is raised the
        503. (Not written once the attempt's end is: an attempt over writes nothing.)"""
        deadline, delay = time.monotonic() + CHECKPOINT_WAIT, 0.1
        while True:
            try:
                return await self.note(job, "checkpoint", value)
            except RedisError as exc:
                left = deadline - time.monotonic()
                if left <= 0 or refusal(exc):
                    raise self.db.outage.failed_command(exc) from None
                await self.db.outage.wait(min(delay, left))
                delay = min(delay * 2, 1.0)
            if job.id in self._ending:  # (its end is being recorded: the attempt is over)
                return False

    async def _leases(self) -> None:
        """Renew our leases; take over jobs whose instance stopped renewing theirs."""
        interval = self.conf.lease / 3
        reap_from = 0.0  # after an outage: once every live instance has renewed again
        while True:
            await asyncio.sleep(interval)
            taken: list[bytes] = []
            freed: list[bytes] = []
            try:
                asked = time.monotonic()
                await self._renew()
                self.db.cascades.set()  # what an instance that died left over, say
                reap_from = self._if_late(asked, reap_from)
                await self.declare()
                if time.monotonic() >= reap_from:
                    asked = time.monotonic()
                    taken, failed, freed = await self.db.call(
                        "REAP", repr(self.conf.lease), self._expires(),
                        self.settings.max_interruptions,
                    )  # fmt: skip
                    await self._poisoned(failed)
                    reap_from = self._if_late(asked, reap_from)
            except (RedisError, ResponseError) as exc:  # (an outage: said once, elsewhere)
                log.log(self.db.outage.level, "cannot renew job leases: %s", exc)
                # Leases ran out while nobody could reach Redis, not because their
                # instances died: each gets a full lease to renew before we reap.
                reap_from = self._hold()
                continue
            if taken:
                log.warning(
                    "jobs %s: their instance stopped renewing their lease; they run again",
                    ", ".join(t.decode() for t in taken),
                )
            if freed:  # (MODULE|TOKEN: a handler past its job's timeout, as jobs are told)
                log.warning("module slots held past a job's timeout by instances that stopped "
                            "renewing them are free again: %s",
                            ", ".join(f.decode() for f in freed))  # fmt: skip

    async def _poisoned(self, ids: list[bytes]) -> None:
        """Jobs REAP failed: their runs were cut once too often ([queue] max_interruptions).
        Told as a failed job is (engine.failed: the alert), from their record."""
        for jid in ids:
            job = await self.db.load(int(jid))
            if job is not None and job.error:
                self.failed(job, job.status or 500, job.error.encode())

    def _if_late(self, asked: float, reap_from: float) -> float:
        """When reaping may resume, after a round trip asked at ``asked``. Redis answering
        later than a renewal's interval (frozen, or swamped) held every instance's
        renewals up as an outage does, with no error to say so: each gets a full lease
        to renew before we reap. (A reap sent meanwhile judged by the time it was sent.)"""
        took = time.monotonic() - asked
        if took <= self.conf.lease / 3:
            return reap_from
        log.warning("Redis took %.1f s to answer: no job is taken over for a lease", took)
        return self._hold()

    def _hold(self) -> float:
        """When reaping may resume after Redis held every instance up: a full lease and
        one renewal interval from now, so each live instance renews before we reap."""
        return time.monotonic() + self.conf.lease + self.conf.lease / 3

    async def hand_back(self, claims: list[tuple[int, str]]) -> None:
        """Stopping: our unfinished jobs (id, claim token) wait again for any instance
        (or end cancelled)."""
        await self.db.call("RELEASE", self._expires(), *[v for c in claims for v in c])

    async def _heard_cancel(self, jid: int) -> None:
        """A cancel published for a job id we run: the channel is server-wide (a service
        on another db number with the same prefix publishes on it too): it is ours only
        if the job hash in our db says so."""
        try:
            key = self.db.key(f"job:{jid}")
            asked, owner = await self.db.redis.hmget(key, "cancel_requested", "owner")
        except RedisError:
            return  # the next renewal reports it
        attempt = self._running.get(jid)
        if asked == b"1" and attempt is not None and owner == attempt.token.encode():
            attempt.job.cancel_requested = True

    async def _end(self, job: Job, args: tuple[Any, ...], now: float) -> tuple[bool, Any]:
        """Record the attempt's end; keep trying through an outage (the result is here),
        while the service stops too, until its shutdown grace runs out. (False, None)
        when the lease was lost; else (True, the next job's claim, or None when none was
        asked for)."""
        delay, level = 0.1, logging.WARNING  # said once a job, the retries at DEBUG
        try:
            while True:
                try:
                    reply = await self.db.call("END", *args, now=now)
                except RedisError as exc:
                    until = " until the shutdown grace runs out" if self._closing else ""
                    log.log(level, "job %d: cannot record its end (%s): retrying%s",
                            job.id, exc, until)  # fmt: skip
                    level = logging.DEBUG
                    await self.db.outage.wait(delay)  # (at once when Redis is back)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                if not reply:  # the lease was lost while it ran
                    log.warning("job %d (%s): lease lost while it ran (another attempt runs "
                                "it, or Redis lost the job): this result is discarded", job.id,
                                job.module)  # fmt: skip
                    return False, None
                if reply[0] == 2:  # a cancel recorded while it ran: the job ended cancelled
                    job.cancel_requested = True
                return True, (reply[1] if len(reply) > 1 else None)
        except asyncio.CancelledError:
            if self._closing:  # the grace ran out with Redis still away
                log.warning("job %d (%s): its end not recorded before the shutdown grace ran "
                            "out (Redis away): this result is lost; the job runs again once "
                            "its lease runs out", job.id, job.module)  # fmt: skip
            raise

    def _expires(self) -> str:  # a job that ends now: when its result goes
        return repr(time.time() + self.settings.keep_results)

    async def _renew(self) -> None:
        members = self._held_in_redis()
        if members:
            await self.db.call("HELD", repr(self.conf.lease), *members)
        # The attempts asked about, not newer ones, nor those already found lost (told
        # once: a handler deaf to its cancel would be logged at every renewal).
        self._lost &= {attempt.token for attempt in self._running.values()}
        held = {jid: a for jid, a in self._running.items() if a.token not in self._lost}
        if not held:
            return
        claims = [v for jid, attempt in held.items() for v in (jid, attempt.token)]
        lost, cancel = await self.db.call("RENEW", repr(self.conf.lease), *claims)
        for raw in cancel:
            held[int(raw)].job.cancel_requested = True
        for jid in map(int, lost):  # not an attempt whose end was recorded meanwhile
            if self._running.get(jid) is held[jid] and jid not in self._ending:
                log.warning("job %d: lease lost (taken over by another attempt, or Redis lost "
                            "the job): its handler is told to stop (request.job.cancelled)",
                            jid)  # fmt: skip
                held[jid].job.cancel_requested = True
                self._lost.add(held[jid].token)
