"""Where the shared queue's jobs are kept: the Redis client, the engine's scripts, and
reading jobs back (bgservice.queue.redis schedules and runs them)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from bgservice.config import QueueSettings, RedisSettings
from bgservice.config_checks import redact_url
from bgservice.errors import Busy, ConfigError, Conflict, DependencyFailed, NotFound, ServiceError
from bgservice.protocol import OK
from bgservice.queue import redis_scripts
from bgservice.queue.commands import STATES
from bgservice.queue.engine import Result, name_counts, not_found, queue_stats
from bgservice.queue.history import summarise
from bgservice.queue.job import Job, JobState
from bgservice.queue.redis_batch import Batcher
from bgservice.queue.redis_hash import job_from_hash, pairs
from bgservice.queue.redis_lines import SPLIT, STRANDED, WORKERS, keep_lines
from bgservice.queue.redis_lua import CASCADE, COMMON
from bgservice.queue.redis_outage import IDS, Ids, Outage
from bgservice.queue.redis_revive import REVIVE
from bgservice.queue.store import Run

log = logging.getLogger(__name__)
EXPIRE_BATCH = 1000  # finished jobs one EXPIRE script deletes
SWEEP_LATE = 5.0  # s past their expiry that finished jobs are deleted (expire_forever)
# ARGV: P, now. When the waiting job due longest became due (its creation, or its run_at
# if later; jobs waiting on another job are not due), '' for none. The oldest by creation
# are looked at first, at most 1000, until no later one can have been due longer.
OLDEST = (
    COMMON
    + r"""
local best = nil
local waiting = redis.call('ZRANGE', P .. ':state:waiting', 0, 999, 'WITHSCORES')
for i = 1, #waiting, 2 do
  local created = tonumber(waiting[i + 1])
  if best and created >= best then break end
  local f = redis.call('HMGET', jkey(waiting[i]), 'run_at', 'blockers')
  local due = math.max(created, tonumber(f[1]) or created)
  if due <= now and not f[2] and (not best or due < best) then best = due end
end
return best and string.format('%.6f', best) or ''
"""
)

# ARGV: P, now. Moves delayed jobs now due (1000 at most) to the ready line, as the next
# claim would, for a listing or position to show the order they will run in.
DUE = COMMON + "promote_due(1000)\n"

# ARGV: P, now, the instance, what to try. What the engine's scripts do, done once at start
# and harmlessly (check_access): nothing; read and write a key of the prefix and read
# Redis's clock; publish on the channel (instances ignore ``hello``).
ACCESS = (
    COMMON
    + r"""
if ARGV[4] == 'keys' then
  redis.call('EXISTS', P .. ':id')
  clock()  -- (then a write, as a claim does)
  redis.call('DEL', P .. ':access')
elseif ARGV[4] == 'publish' then
  redis.call('PUBLISH', P .. ':events', 'hello:' .. ARGV[3])
end
return 1
"""
)
# Error replies that a wait may end (out of memory, a replica, a failover, a dataset still
# loading): at start an outage, not a configuration error.
PASSING = ("OOM", "READONLY", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS",
           "TRYAGAIN", "CLUSTERDOWN")  # fmt: skip

NAMES_SCANNED = 1000
REVIVE_PARENTS = 500  # jobs whose dependents one REVIVE script may look for (ARGV bounded)


def refusal(exc: RedisError) -> bool:
    """Redis refused what the url or its user asks for (a password, a permission, a db
    number): waiting will not change it. Not an error reply that a wait may end."""
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return True
    if isinstance(exc, OutOfMemoryError | ReadOnlyError):  # (redis-py drops their prefix)
        return False
    return isinstance(exc, ResponseError) and not str(exc).startswith(PASSING)


def script_error(code: int, message: str) -> ServiceError:
    kinds: dict[int, type[ServiceError]]
    kinds = {404: NotFound, 409: Conflict, 424: DependencyFailed, 503: Busy}
    return kinds.get(code, Conflict)(message)


def pipeline(redis: Any, transaction: bool = True) -> Any:
    """A redis-py pipeline whose errors say what Redis replied: redis-py 6.4's own replace
    it with a literal "{exception.args}" (a message that lost its f-string)."""
    pipe = redis.pipeline(transaction=transaction)
    pipe.annotate_exception = _annotated
    return pipe


def _annotated(exception: Exception, number: int, command: Iterable[object]) -> None:
    said, name = exception.args[0] if exception.args else "", next(iter(command), "?")
    exception.args = (f"{said} (pipeline command {number}, {name})", *exception.args[1:])


def _client(conf: RedisSettings, **options: Any) -> Any:
    """A redis-py client for ``conf``'s server. (Any, as from_url gives: redis-py's Redis
    class types each command as sync-or-async.)"""
    return aioredis.from_url(
        conf.url, socket_connect_timeout=conf.connect_timeout, health_check_interval=15, **options
    )


class RedisJobs:
    def __init__(self, conf: RedisSettings, settings: QueueSettings) -> None:
        self.prefix = conf.prefix
        self.settings = settings
        self.where = redact_url(conf.url)  # for log lines
        self.named = f"{conf.url_from} {self.where}"  # for errors: which setting, and its URL
        # How long Redis may take to answer a command or a pipeline (and to answer a ping
        # on the subscription after as long without a message): [redis] command_timeout,
        # 5 s unless set (a shorter one takes a busy Redis's pause for an outage).
        self.timeout = timeout = conf.command_timeout
        # Retried when a pooled connection turns out closed (Redis restarted), not after
        # a timeout: three of them made a command wait three times the bound Redis has.
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), 2, (RedisConnectionError,))
        self.redis = _client(conf, socket_timeout=timeout, retry=retry)
        self.scripts = {
            name: self.redis.register_script(getattr(redis_scripts, name))
            for name in redis_scripts.NAMES
        }
        self.scripts["OLDEST"] = self.redis.register_script(OLDEST)  # (stats only)
        self.scripts["ACCESS"] = self.redis.register_script(ACCESS)
        self.scripts["DUE"] = self.redis.register_script(DUE)
        self.scripts["CASCADE"] = self.redis.register_script(CASCADE)
        self.scripts["SPLIT"] = self.redis.register_script(SPLIT)
        self.scripts["STRANDED"] = self.redis.register_script(STRANDED)
        self.scripts["WORKERS"] = self.redis.register_script(WORKERS)
        self.scripts["IDS"] = self.redis.register_script(IDS)
        self.scripts["REVIVE"] = self.redis.register_script(REVIVE)
        self.lease = conf.lease
        self.cascades = asyncio.Event()  # set: some jobs waiting on ended ones may be left
        self.cascades.set()  # (an instance may have stopped before it ended them all)
        self.left_over = False  # some are known to be left (a script said so)
        # The pipelines' own client: no socket timeout (the Batcher bounds each pipeline)
        # and no retry (a pipeline cut after its write may have run: never sent twice).
        self.outage = Outage(self.where)  # Redis found away, and what the log says of it
        self.batch = Batcher(_client(conf), self.scripts, timeout, self.outage)
        self.ids = Ids(self.where, self.call)  # the highest job id known here
        self.batch.opened = self.ids.opened

    async def gone(self, me: str) -> None:
        """Stopping: this instance's workers leave queue:stats' cluster_workers now, not a
        lease on (a restart counted them twice for a lease: it starts under a new name)."""
        try:
            await self.batch.execute("HDEL", self.key("instances"), me)
        except RedisError as exc:  # (they expire)
            log.debug("this instance's workers not taken off the count (%s)", exc)

    async def close(self) -> None:
        await self.batch.close()  # the pipelines in flight are answered first
        await self.batch.redis.aclose()
        await self.redis.aclose()

    async def check_access(self, owner: str, subscribe: Callable[[], Awaitable[None]]) -> None:
        """Do once what the engine does with Redis: load its scripts, run one that reads
        and writes a key of the prefix, reads Redis's clock and publishes on the channel,
        subscribe to the channel (``subscribe``). A permission the Redis user lacks is a
        ConfigError naming it (else every queue command would reply 503, for ever); an
        error reply that a wait may end (``refusal``: no) is raised as it came."""
        events = self.key("events")

        def access(what: str) -> Callable[[], Awaitable[Any]]:
            return lambda: self.call("ACCESS", owner, what)

        steps: tuple[tuple[str, Callable[[], Awaitable[Any]]], ...] = (
            ("load Lua scripts (SCRIPT LOAD)", self.batch.load_scripts),
            ("run Lua scripts (EVALSHA)", access("")),
            (f"read and write the keys {self.prefix}:* (ACL ~{self.prefix}:*)", access("keys")),
            (f"publish on channel {events} (ACL &{events})", access("publish")),
            (f"subscribe to channel {events} (ACL &{events})", subscribe),
        )
        for what, step in steps:
            try:
                await step()
            except ResponseError as exc:
                if refusal(exc):
                    raise ConfigError(f"{self.named}: the Redis user may not {what} "
                                      f"(docs/deploy.md, Redis): {exc}") from None  # fmt: skip
                raise

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def call(self, script: str, *args: Any, now: float | None = None) -> Any:
        return await self.send(script, *args, now=now)

    def send(self, script: str, *args: Any, now: float | None = None) -> asyncio.Future[Any]:
        """``call`` as the future of its reply, for a caller that must see the reply even
        if it stops waiting (what an ADD claimed must be run or handed back)."""
        when = repr(time.time() if now is None else now)
        return self.batch.script(script, [self.prefix, when, *args])

    async def checked(self, script: str, *args: Any) -> bytes:
        """A script that replies {code, text}: the text, or its error reply raised."""
        code, text = await self.call(script, *args)
        if code:
            raise script_error(code, text.decode())
        return bytes(text)

    def added(self, reply: list[Any]) -> int:
        """ADD's or FIRE's reply: the job's id, or its error raised; a counter the script
        found below the instance's mark of ids, and moved, is said (Ids)."""
        jid, text, *_ = reply
        if jid < 0:
            raise script_error(-jid, text.decode())
        return self.ids.added(int(jid), text)

    async def load(self, jid: int) -> Job | None:
        fields = pairs(await self.batch.execute("HGETALL", self.key(f"job:{jid}")))
        if not fields:
            return None
        job = job_from_hash(jid, fields)
        if job.expires is not None and job.expires < time.time():
            return None
        return job

    async def result(self, jid: int, owed: bool = False) -> Result | Literal[True] | None:
        """What a waiter needs of job ``jid``: its result once finished, True while it
        waits or runs, None when there is no such job (or it expired, unless ``owed``: it
        ended while the waiter waited). Four fields, not the whole job read back."""
        fields = ("state", "status", "result", "expires")
        state, status, body, expires = await self.batch.execute(
            "HMGET", self.key(f"job:{jid}"), *fields
        )
        if state is None or (not owed and expires is not None and float(expires) < time.time()):
            return None
        if not JobState(state.decode()).finished:
            return True
        return (int(status) if status else 0) or OK, body or b""

    async def require(self, jid: int) -> Job:
        job = await self.load(jid)
        if job is None:
            raise not_found(jid)
        return job

    async def position(self, job: Job) -> int | None:
        if job.state is not JobState.WAITING:
            return None
        await self.call("DUE")  # (a job come due sorts among the ready by priority and id)
        rank = await self.redis.zrank(self.key("ready"), f"{job.id:020d}")
        return None if rank is None else int(rank)

    async def free_at(self, module: str, rate: tuple[int, float] | None) -> float | None:
        """When a waiting job of ``module`` may start, by its rate window; None: now."""
        if rate is None:
            return None
        count, per = rate
        since = time.time() - per
        starts = await self.redis.zrangebyscore(
            self.key(f"rate:{module}"), f"({since!r}", "+inf", withscores=True
        )
        return None if len(starts) < count else float(starts[0][1]) + per

    async def stats(self, window: float, workers: int) -> dict[str, Any]:
        """``queue:stats`` from the shared counts and run history (engine.queue_stats)."""
        now = time.time()
        pipe = pipeline(self.redis, transaction=False)  # (not the Batcher's connection:
        for state in STATES:  # a week's history would hold every job's reply up behind it)
            pipe.zcard(self.key(f"state:{state}"))
        pipe.zrangebyscore(self.key("runs"), now - max(window, 60), "+inf")
        *counts, raw_runs = await pipe.execute()
        oldest = await self.call("OLDEST", now=now)
        every = await self.call("WORKERS")  # (the live instances': this one's in a moment)
        # A thread: a week's history of a busy queue is a great many records to decode.
        history = await asyncio.to_thread(_history, raw_runs, now, window)
        counted = dict(zip(STATES, counts, strict=True))
        first = float(oldest) if oldest else None
        return queue_stats(counted, first, history, workers, max(every, workers))

    async def names(self) -> dict[str, Any]:
        """``queue:stats``' ``names``: waiting and running jobs per job name (the first
        ``NAMES_SCANNED`` of each state: a summary, not a scan of a huge backlog)."""
        pipe = pipeline(self.redis, transaction=False)
        for state in ("waiting", "running"):
            pipe.zrange(self.key(f"state:{state}"), 0, NAMES_SCANNED - 1)
        waiting, running = await pipe.execute()
        pipe = pipeline(self.redis, transaction=False)
        for jid in [*waiting, *running]:
            pipe.hget(self.key(f"job:{int(jid)}"), "name")
        found = await pipe.execute()
        states = ["waiting"] * len(waiting) + ["running"] * len(running)
        return {"names": name_counts(zip(found, states, strict=True))}

    def upkeep(self, runnable: Callable[[], str], me: str) -> tuple[Coroutine[Any, Any, None], ...]:
        """What each instance (named ``me``) does for the queue as a whole, for as long as
        it runs; ``runnable``: the modules it runs, as CLAIM takes them (none with no
        workers)."""
        workers = self.settings.workers
        mine = runnable if workers else lambda: "[]"
        lines = keep_lines(self.call, mine, self.lease, self.outage, me, workers)
        return self.expire_forever(), self.cascade_forever(), lines, self.ids.watch(self.lease / 3)

    async def cascade_forever(self) -> None:
        """Each time ``cascades`` is set (``cascade`` heard, a lease renewed, the channel
        followed again): end the jobs waiting on ended ones that their script left over,
        one CASCADE script after another until none is left. Every instance may at once:
        each script is atomic. When Redis fails, again after a backoff (not at the next
        trigger: after an outage that may be a lease round away), at once when it
        answers again. Said only when some are known to be left (``left_over``), once an
        outage: a round that only looks, at every renewal, has nothing to say."""
        delay, said = 0.1, False
        while True:
            await self.cascades.wait()
            self.cascades.clear()
            try:
                while await self.call("CASCADE", repr(time.time() + self.settings.keep_results)):
                    self.left_over = True
                self.left_over, delay, said = False, 0.1, False
            except RedisError as exc:
                level = logging.WARNING if self.left_over and not said else logging.DEBUG
                said = said or self.left_over
                log.log(level, "jobs waiting on ended ones not ended yet (%s): again in %.1f s",
                        exc, delay)  # fmt: skip
                await self.outage.wait(delay)
                delay = min(delay * 2, 5.0)
                self.cascades.set()

    async def revive(self, jid: int) -> None:
        """After job ``jid``'s RETRY with dependents=1: the jobs that failed because it did,
        and because they did, and so on, waiting again (REVIVE scripts, 500 jobs each, a
        job's before the jobs that failed because of it are looked at)."""
        parents, cursor, back = deque([jid]), b"0", 0
        while parents:
            expires = repr(time.time() + self.settings.keep_results)  # (of those failed again)
            heads = itertools.islice(parents, REVIVE_PARENTS)
            done, cursor, revived, kept = await self.call("REVIVE", expires, cursor, *heads)
            for _ in range(done):
                parents.popleft()
            parents.extend(int(d) for d in revived)
            back += len(revived)
            for d in kept:
                log.warning("job %d not brought back with job %d: a job added since holds its "
                            "unique key", int(d), jid)  # fmt: skip
        log.info("job %d retried with %d jobs that had failed because it did", jid, back)

    async def expire_forever(self) -> None:
        """Delete finished jobs SWEEP_LATE seconds past their expiry: reads answer 404 from
        their expiry all the same, but a get that was waiting when its job ended on
        another instance reads the result it is owed first (keep_results = 0 included)."""
        interval = min(60.0, max(0.5, self.settings.keep_results / 4))
        while True:
            await asyncio.sleep(interval)
            now, gone = time.time() - SWEEP_LATE, 0
            try:  # in batches (each one script, a few ms of Redis), until one is not full:
                while True:  # one batch a tick fell behind any queue past 17 jobs/s
                    batch = await self.call("EXPIRE", repr(now - self.settings.keep_history),
                                            EXPIRE_BATCH, now=now)  # fmt: skip
                    gone += batch
                    if batch < EXPIRE_BATCH:
                        break
            except RedisError as exc:
                log.log(self.outage.level, "job expiry failed: %s", exc)
            if gone:
                log.info("job queue: %d finished jobs expired", gone)


def _history(raw_runs: list[bytes], now: float, window: float) -> dict[str, Any]:
    return summarise([Run(**json.loads(r)) for r in raw_runs], now, window)
