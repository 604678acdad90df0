"""Commands issued in one turn of the event loop go to Redis together: one pipeline, so
one write and one read for all of them, instead of a pooled connection, a write and a
wait for each (the auto-pipelining of ioredis and coredis). Every caller gets its own
reply, or its own error; commands keep their order, as Redis runs a pipeline in order.

Only the queue's hot commands come through here (its scripts and the read of a job,
bgservice.queue.redis_db); the rest use the redis-py client directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Command = tuple[Any, ...]


class Batcher:
    def __init__(self, redis: aioredis.Redis, scripts: dict[str, AsyncScript]) -> None:
        self.redis = redis
        self.scripts = scripts
        self._queued: list[tuple[Command, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def script(self, name: str, args: list[Any]) -> asyncio.Future[Any]:
        """Run script ``name`` (no keys: the engine's scripts take the prefix as ARGV)."""
        return self.execute("EVALSHA", self.scripts[name].sha, 0, *args)

    def execute(self, *command: Any) -> asyncio.Future[Any]:
        """Queue ``command`` for the pipeline sent at the end of this turn of the loop."""
        if self._loop is None:  # kept: get_running_loop() is a system call on Python 3.11
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._queued.append((command, future))
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

    async def _send(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipeline([command for command, _ in batch])
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # Redis restarted or flushed its scripts: load them, send those again
                for script in self.scripts.values():
                    await self.redis.script_load(script.script)
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

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
