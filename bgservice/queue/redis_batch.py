"""Commands issued in one turn of the event loop go to Redis together: one pipeline, so
one write and one read for all of them, instead of a pooled connection, a write and a
wait for each (the auto-pipelining of ioredis and coredis). Every caller gets its own
reply, or its own error; commands keep their order, as Redis runs a pipeline in order.

Only the queue's hot commands come through here (its scripts and the read of a job,
bgservice.queue.redis_db); the rest use the redis-py client directly. The pipeline is
written on a connection of redis-py's pool (which connects, authenticates and replaces
stale connections) and its replies read by redis-py's hiredis parser; the commands are
packed by hiredis, in C, and one timeout bounds the whole pipeline. (redis-py's own
Pipeline packs each argument in Python and, with a socket timeout, runs every write in
a task and every reply under a timeout of its own: py-spy put those at a fifth of the
loop thread in the Redis queue row.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

Packed = bytes  # one command in Redis's protocol (hiredis.pack_command)


class Batcher:
    def __init__(
        self, redis: aioredis.Redis, scripts: dict[str, AsyncScript], timeout: float
    ) -> None:
        """``redis``: a client of its own without a socket timeout (``timeout`` bounds
        each pipeline instead)."""
        self.redis = redis
        self.scripts = scripts
        self.timeout = timeout
        self._queued: list[tuple[Packed, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def script(self, name: str, args: list[Any]) -> asyncio.Future[Any]:
        """Run script ``name`` (no keys: the engine's scripts take the prefix as ARGV)."""
        return self.execute("EVALSHA", self.scripts[name].sha, 0, *args)

    def execute(self, *command: Any) -> asyncio.Future[Any]:
        """Queue ``command`` for the pipeline sent at the end of this turn of the loop.
        An argument Redis cannot take (None, a list) raises here, for this caller alone."""
        packed = pack_command(command)
        if self._loop is None:  # kept: get_running_loop() is a system call on Python 3.11
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._queued.append((packed, future))
        if len(self._queued) == 1:
            self._loop.call_soon(self._flush)
        return future

    async def close(self) -> None:
        """Wait for the pipelines in flight (their callers are owed a reply)."""
        if self._sending:
            await asyncio.wait(set(self._sending))

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        assert self._loop is not None
        task = self._loop.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Packed, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipeline([command for command, _ in batch])
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # Redis restarted or flushed its scripts: load them, send those again
                loads: list[Any] = [("SCRIPT", "LOAD", s.script) for s in self.scripts.values()]
                await self._pipeline([pack_command(load) for load in loads])  # under its timeout
                again = await self._pipeline([batch[i][0] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except Exception as exc:  # the connection failed: every caller of the batch hears it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, commands: list[Packed]) -> list[Any]:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_packed_command(b"".join(commands), check_health=False)
                return [await _reply(conn) for _ in commands]
        except BaseException as exc:
            # Replies left unread would answer the next pipeline's commands: drop it.
            await conn.disconnect()
            if isinstance(exc, TimeoutError):  # a RedisError, as redis-py's own: a 503
                raise RedisTimeout(f"no reply from Redis in {self.timeout:g} s") from None
            raise
        finally:
            await pool.release(conn)


async def _reply(conn: Any) -> Any:
    """The next reply on ``conn``; an error reply (a script's error, NOSCRIPT) as a value,
    for its caller alone."""
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc
