"""Commands issued in one turn of the event loop go to Redis together: one pipeline, so
one write for all of them, instead of a pooled connection, a write and a wait for each
(the auto-pipelining of ioredis and coredis). Every caller gets its own reply, or its own
error; commands keep their order, as Redis runs them in order.

Only the queue's hot commands come through here (its scripts and the read of a job,
bgservice.queue.redis_db); the rest use the redis-py client directly. The pipelines share
one connection, which redis-py opens and which is read from then on as replies arrive
(bgservice.queue.redis_conn), straight to their callers' futures: no task, read or
timeout per pipeline. (Profiled in the Redis queue row: redis-py's per-command path, then
its per-pipeline one, a connection from the pool with a health check, a task and a
timeout each time, were a third, then a sixth, of the loop thread.) Redis that answers
nothing for ``timeout`` seconds while replies are owed fails them all, and the next
command opens a new connection.

Redis away (bgservice.queue.redis_outage): the commands that arrive while a connection
is being opened share that attempt's outcome; once one failed, or the connection went
silent, commands fail at once until a reconnection, tried in the background with backoff,
succeeds. (Each batch once made an attempt of its own, one after another: the Nth batch
of a frozen Redis waited N timeouts.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from bgservice.queue.redis_conn import Packed, TakenOver, connect, packed
from bgservice.queue.redis_outage import Outage

Queued = tuple[Packed, "asyncio.Future[Any]"]
RETRY_FIRST, RETRY_MAX = 0.1, 1.0  # s: the backoff of reconnections while Redis is away


class Batcher:
    def __init__(
        self,
        redis: aioredis.Redis,
        scripts: dict[str, AsyncScript],
        timeout: float,
        outage: Outage | None = None,
    ) -> None:
        """``redis``: the client whose connection settings open the pipelines' own
        connection; ``timeout``: how long Redis may stay silent while it owes replies,
        and how long opening a connection may take."""
        self.redis = redis
        self.scripts = scripts
        self.timeout = timeout
        self.outage = outage or Outage("Redis")
        self.outage.probe = self._probe
        self._tried = float("-inf")  # (loop clock) when the last attempt failed
        self._queued: list[Queued] = []
        self._link: Link | None = None
        self._opening: asyncio.Task[Link] | None = None  # the attempt every batch shares
        self._retrying: asyncio.Task[None] | None = None  # reconnections, Redis away
        self._closed = False
        self._pending: set[asyncio.Task[None]] = set()  # sends waiting for a connection
        self._reloading: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Told of each connection made: Redis may be back without its data (redis_outage.Ids).
        self.opened: Callable[[], None] = lambda: None

    def script(self, name: str, args: list[Any]) -> asyncio.Future[Any]:
        """Run script ``name`` (no keys: the engine's scripts take the prefix as ARGV)."""
        return self.execute("EVALSHA", self.scripts[name].sha, 0, *args)

    def execute(self, *command: Any) -> asyncio.Future[Any]:
        """Queue ``command`` for the pipeline sent at the end of this turn of the loop.
        An argument Redis cannot take (None, a list) raises here, for this caller alone."""
        return self._queue(packed(*command))

    async def close(self) -> None:
        """Answer what is in flight (its callers are owed a reply), then disconnect."""
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
        while self._pending or self._queued:
            if self._pending:
                await asyncio.wait(set(self._pending))
            else:
                await asyncio.sleep(0)  # the queued flush runs this turn
        if self._opening is not None:  # (a reconnection nobody waits for any more)
            self._opening.cancel()
        link = self._link
        if link is not None:
            owed = [future for _, future in link.waiting]
            if owed:
                await asyncio.wait(owed, timeout=self.timeout)
            link.close()

    # --- sending ------------------------------------------------------------------------

    def _queue(self, packed: Packed) -> asyncio.Future[Any]:
        if self._loop is None:  # kept: get_running_loop() is a system call on Python 3.11
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._queued.append((packed, future))
        if len(self._queued) == 1:
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        link = self._link
        if link is not None and link.open:
            link.send(batch)
        elif (down := self.outage.error()) is not None:  # Redis away: told at once
            _fail(batch, down)
        else:  # (no connection yet, or it was lost): every batch till then shares one try
            assert self._loop is not None
            task = self._loop.create_task(self._connect_then_send(batch))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connect_then_send(self, batch: list[Queued]) -> None:
        try:
            link = await asyncio.shield(self._attempt())
        except Exception as exc:  # Redis away: every caller of the batch hears it
            _fail(batch, exc)
            return
        if link.open:
            link.send(batch)
        else:  # lost already, in the turn the attempt ended
            _fail(batch, RedisConnectionError("Redis connection lost as it was opened"))

    def _attempt(self) -> asyncio.Task[Link]:
        """The connection being opened, shared by all who wait for one: a new attempt
        only when none is under way."""
        if self._opening is None or self._opening.done():
            assert self._loop is not None
            self._opening = self._loop.create_task(self._open())
            self._opening.add_done_callback(_retrieved)
        return self._opening

    async def _open(self) -> Link:
        try:
            link = Link(await connect(self.redis, self.timeout), self)
        except Exception as exc:  # (redis-py's errors; anything else: as a connection lost)
            self._tried = asyncio.get_running_loop().time()
            self.went_down(exc if isinstance(exc, RedisError) else RedisConnectionError(exc))
            raise
        self._link = link
        self.opened()
        self.outage.down = None
        self.outage.back()
        return link

    # --- Redis away -----------------------------------------------------------------------

    def went_down(self, exc: RedisError, said: bool = False) -> None:
        """Redis does not answer: commands fail at once from now on, and a connection is
        tried again in the background until one is made (``_open`` ends the outage)."""
        self.outage.down = exc
        self.outage.lost(exc, said)
        if not self._closed and (self._retrying is None or self._retrying.done()):
            self._loop = self._loop or asyncio.get_running_loop()
            self._retrying = self._loop.create_task(self._retry())

    def reached(self) -> None:
        """Another connection to Redis was just made (the channel's): if Redis was found
        away, try ours now, not at the end of the backoff; else the outage is over."""
        if self.outage.down is None:
            self.outage.back()
        elif not self._closed:
            self._attempt()

    def _probe(self) -> None:
        """A command found Redis away: try a connection now, unless one is under way or
        the last failed less than RETRY_FIRST ago (commands come faster than that)."""
        if self._closed or (self._opening is not None and not self._opening.done()):
            return
        if self._loop is not None and self._loop.time() - self._tried >= RETRY_FIRST:
            self._attempt()

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while self.outage.down is not None:
            await self.outage.wait(delay)
            if self.outage.down is None:
                return
            try:
                await asyncio.shield(self._attempt())
            except Exception:  # (the outage is said once, by its own line)
                delay = min(delay * 2, RETRY_MAX)

    # --- scripts Redis lost (a restart, SCRIPT FLUSH) -------------------------------------

    def again(self, packed: Packed, future: asyncio.Future[Any]) -> None:
        """``packed`` found its script gone (NOSCRIPT: it did not run): load the scripts,
        then send it again, its reply to ``future``."""
        assert self._loop is not None
        task = self._loop.create_task(self._again(packed, future))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _again(self, packed: Packed, future: asyncio.Future[Any]) -> None:
        try:
            if self._reloading is None or self._reloading.done():
                assert self._loop is not None
                self._reloading = self._loop.create_task(self.load_scripts())
            await asyncio.shield(self._reloading)
            reply = await self._queue(packed)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(reply)

    async def load_scripts(self) -> None:
        loads = [self.execute("SCRIPT", "LOAD", s.script) for s in self.scripts.values()]
        await asyncio.gather(*loads)


class Link(TakenOver):
    """The pipelines' connection: writes go straight to its transport, replies are
    parsed as they arrive and handed out in order."""

    def __init__(self, conn: Any, batcher: Batcher) -> None:
        super().__init__(conn)
        self.batcher = batcher
        self.waiting: deque[Queued] = deque()  # sent, in order, each owed its reply
        self.heard = self.loop.time()  # when Redis last answered, or we began to wait
        self.timer: asyncio.TimerHandle | None = None
        self.open = True

    def send(self, batch: list[Queued]) -> None:
        if not self.waiting:
            self.heard = self.loop.time()
        self.waiting.extend(batch)
        self.transport.write(b"".join([packed for packed, _ in batch]))
        if self.timer is None:
            self.timer = self.loop.call_later(self.batcher.timeout, self._check)

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        parser, waiting = self.parser, self.waiting
        parser.feed(data)
        while waiting:
            reply = parser.gets()
            if reply is False:  # the rest of it is still on its way
                return
            packed, future = waiting.popleft()
            if isinstance(reply, ResponseError):
                if str(reply).startswith("NOSCRIPT"):
                    self.batcher.again(packed, future)
                elif not future.done():
                    future.set_exception(reply)
            elif not future.done():  # done: its caller gave up (cancelled)
                future.set_result(reply)

    def close(self) -> None:
        self._end(RedisConnectionError("Redis connection closed"))

    def _check(self) -> None:
        self.timer = None
        if not self.waiting or not self.open:
            return
        silent = self.loop.time() - self.heard
        if silent >= self.batcher.timeout:  # Redis away: said before its callers hear it
            timeout = RedisTimeout(f"no reply from Redis in {self.batcher.timeout:g} s")
            self.batcher.went_down(timeout)
            self._end(timeout)
        else:
            self.timer = self.loop.call_later(self.batcher.timeout - silent, self._check)

    def _end(self, exc: Exception) -> None:
        """Fail what is owed and drop the connection (replies still on their way would
        answer the wrong commands); the next command opens a new one."""
        if not self.open:
            return
        self.open = False
        if self.timer is not None:
            self.timer.cancel()
        owed, self.waiting = list(self.waiting), deque()
        _fail(owed, exc)
        self._drop()


def _fail(batch: list[Queued], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():  # (its failure is what the batches waiting on it heard)
        task.exception()
