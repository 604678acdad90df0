"""Following the queue's pub/sub channel (``wake``, ``done:ID``, ``cancel:ID``,
``schedules``) on a connection of its own, messages handed over as they arrive.

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
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from bgservice.queue.redis_conn import TakenOver, connect, packed


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
            elif isinstance(reply, ResponseError):
                self._end(RedisConnectionError(f"subscription refused: {reply}"))
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

    def _end(self, exc: Exception) -> None:
        if self.lost.done():
            return
        self.timer.cancel()
        for future in (self.subscribed, self.lost):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: the waiters raise it themselves
        self._drop()
