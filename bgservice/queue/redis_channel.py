"""Following the queue's pub/sub channel (``wake``, ``done:ID``, ``cancel:ID``,
``schedules``) on a connection of its own, messages handed over as they arrive; and
``Following``, mixed into RedisQueue: what an instance does with them (wakes its runner,
settles the ``queue:get`` callers waiting for a job).

redis-py opens the connection; this protocol takes it over (bgservice.queue.redis_conn),
subscribes, and hands each message on from ``data_received``: no task, read or timeout
per message. (Profiled in the Redis
queue row: redis-py's ``get_message`` path for the one or two messages each job sends was
a ninth of the loop thread.) A quiet channel is not a lost connection: after ``idle``
seconds without a byte it pings Redis, and only a ping unanswered for as long again
counts as lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from bgservice.queue.engine import Result, not_found
from bgservice.queue.redis_conn import TakenOver, connect, packed

if TYPE_CHECKING:
    from bgservice.queue.redis_db import RedisJobs
    from bgservice.queue.redis_leases import Attempt
    from bgservice.queue.scheduler import Scheduler

log = logging.getLogger(__name__)

_BACKOFF_MAX = 5.0
Waiter = asyncio.Future[Result]  # what queue:get callers of one job wait on together


class Subscription(TakenOver):
    """One channel followed: ``on_message(data)`` for each message, in order."""

    def __init__(
        self, conn: Any, channel: str, idle: float, on_message: Callable[[bytes], None]
    ) -> None:
        super().__init__(conn)
        self.idle = idle
        self.on_message = on_message
        self.subscribed: asyncio.Future[None] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.heard = self.loop.time()
        self.pinged: float | None = None  # when our ping went out, while it has no answer
        self.transport.write(packed("SUBSCRIBE", channel))
        self.timer = self.loop.call_later(idle, self._check)

    @classmethod
    async def open(
        cls,
        redis: aioredis.Redis,
        channel: str,
        idle: float,
        on_message: Callable[[bytes], None],
    ) -> Subscription:
        """Subscribed once Redis confirmed it (so nothing published after is missed)."""
        subscription = cls(await connect(redis, idle), channel, idle, on_message)
        try:
            async with asyncio.timeout(idle):
                await asyncio.shield(subscription.subscribed)
        except BaseException as exc:
            subscription.close()
            if isinstance(exc, TimeoutError):  # a RedisError, as the caller expects
                raise RedisTimeout(f"no answer to SUBSCRIBE in {idle:g} s") from None
            raise
        return subscription

    async def until_lost(self) -> None:
        """Return never: raise RedisConnectionError once the connection is lost."""
        await asyncio.shield(self.lost)

    def close(self) -> None:
        self._end(RedisConnectionError("subscription closed"))

    # --- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        self.pinged = None  # anything heard proves the connection
        parser = self.parser
        parser.feed(data)
        while (reply := parser.gets()) is not False:
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind == b"message":
                self.on_message(reply[2])
            elif kind == b"subscribe":
                if not self.subscribed.done():
                    self.subscribed.set_result(None)
            elif isinstance(reply, ResponseError):  # (a missing permission: said as such)
                self._end(RedisConnectionError(f"subscription refused: {reply}"), reply)
                return
            # else the answer to our ping ("pong"): heard is all it was for

    # --- a quiet connection -------------------------------------------------------------

    def _check(self) -> None:
        now = self.loop.time()
        if self.pinged is not None and now - self.pinged >= self.idle:
            self._end(RedisConnectionError(f"no answer to a ping in {self.idle:g} s"))
            return
        if self.pinged is None and now - self.heard >= self.idle:
            self.transport.write(packed("PING", "bgservice"))
            self.pinged = now
        due = self.pinged if self.pinged is not None else self.heard
        self.timer = self.loop.call_at(due + self.idle, self._check)

    def _end(self, exc: Exception, refused: Exception | None = None) -> None:
        """Fail what waits on the connection and drop it; ``open`` raises ``refused``, the
        error reply to SUBSCRIBE, if any."""
        if self.lost.done():
            return
        self.timer.cancel()
        for future, error in ((self.subscribed, refused or exc), (self.lost, exc)):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: the waiters raise it themselves
        self._drop()


class Following:
    """Mixed into RedisQueue: the channel followed, and the waiters of ``queue:get``."""

    db: RedisJobs
    owner: str
    scheduler: Scheduler | None
    _waiters: dict[int, Waiter]
    _running: dict[int, Attempt]
    _wake: asyncio.Event
    _missed: bool
    _freed: Callable[[], None]
    _spawn: Callable[[Coroutine[Any, Any, None]], None]
    _heard_cancel: Callable[[int], Coroutine[Any, Any, None]]

    def _settle(self, jid: int, answers: Waiter | None, result: Result | None = None,
                exception: Exception | None = None) -> None:  # fmt: skip
        """Settle ``jid``'s waiter with what a read or write sent while ``answers`` was its
        waiter found; a waiter made since (after a retry sent meanwhile) reads again."""
        waiter = self._waiters.get(jid)
        if waiter is None or waiter is not answers or self._waiters.pop(jid).done():
            return
        if exception is not None:
            waiter.set_exception(exception)
            waiter.exception()  # retrieved: each waiter re-raises it itself
        else:
            assert result is not None
            waiter.set_result(result)

    async def _deliver(self, jid: int, quiet: bool = True, owed: bool = True) -> None:
        """If job ``jid`` has finished (or is unknown), settle its waiters. ``owed``: they
        waited when it ended (a ``done``, a look after an outage), so its result is read
        even if it expired at once (keep_results = 0), as the embedded engine hands it."""
        waiter = self._waiters.get(jid)
        try:
            result = await self.db.result(jid, owed)
        except RedisError:
            if quiet:
                return  # the next resubscription delivers it
            raise
        if result is None:
            self._settle(jid, waiter, exception=not_found(jid))
        elif result is not True:
            self._settle(jid, waiter, result=result)

    async def _deliver_all(self) -> None:
        """Settle every waiter whose job has finished, or is gone (Redis lost its data: a
        FLUSHALL sends no ``done``, and keeps the subscription)."""
        for jid in list(self._waiters):
            await self._deliver(jid)

    async def _subscribe(self, on_message: Callable[[bytes], None]) -> Subscription:
        """Follow the queue's channel (``P:events``): ``on_message(data)`` for each."""
        db = self.db
        channel = await Subscription.open(db.redis, db.key("events"), db.timeout, on_message)
        db.cascades.set()  # a 'cascade' may have gone by while we were away
        return channel

    async def _subscribes(self) -> None:
        """Whether Redis lets us follow the channel (RedisJobs.check_access): raises if not."""
        (await self._subscribe(lambda _: None)).close()

    async def _listen(self) -> None:
        """Follow the queue's channel; reconnect with backoff when Redis goes away (at
        once when the pipelines' connection finds it back). A subscription lost is made
        again, quietly: only one that cannot be made says Redis is away (the outage's
        one line, whose end is said too), or that it was refused."""
        delay = 0.1
        while True:
            channel: Subscription | None = None
            try:
                channel = await self._subscribe(self._event)
                delay = 0.1
                self.db.batch.reached()  # Redis answers: the outage, if any, is over
                self._wake.set()  # missed events while away: look again
                await self._deliver_all()
                await channel.until_lost()
            except RedisError as exc:
                if channel is not None:  # it was followed: lost (a restart, a freeze)
                    log.debug("subscription lost (%s): following the channel again", exc)
                elif isinstance(exc, ResponseError):
                    log.warning("subscription refused (%s): again in %.1f s", exc, delay)
                else:
                    self.db.outage.lost(exc)
                    log.debug("no subscription (%s): again in %.1f s", exc, delay)
                await self.db.outage.wait(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            finally:
                if channel is not None:
                    channel.close()

    def _event(self, data: bytes) -> None:
        kind, _, arg = data.decode().partition(":")
        if kind == "wake":  # with no worker free, the next one freed looks
            self._missed = True
            self._freed()
        elif kind == "done" and int(arg) in self._waiters:
            self._spawn(self._deliver(int(arg)))
        elif kind == "cancel" and int(arg) in self._running:
            self._spawn(self._heard_cancel(int(arg)))
        elif kind == "cascade":  # jobs waiting on an ended one, left over by its script
            self.db.left_over = True
            self.db.cascades.set()
        elif kind == "schedules" and arg != self.owner and self.scheduler is not None:
            self._spawn(self.scheduler.reload())
