"""A connection to Redis that redis-py opens and a protocol of ours then reads.

redis-py connects, authenticates, negotiates TLS and selects the database, whatever the
URL asks; then the protocol takes the transport over (``transport.set_protocol``, as
uvicorn hands a connection to another protocol) and hiredis parses what arrives in
``data_received``: no task, read or timeout per reply. The pipelines
(bgservice.queue.redis_batch) and the queue's channel (bgservice.queue.redis_channel) are
read this way; redis-py's own per-command paths were most of the engine's loop time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from hiredis import Reader, pack_command
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

Packed = bytes  # one command in Redis's protocol (hiredis.pack_command)


async def connect(redis: aioredis.Redis, timeout: float) -> Any:
    """A new connection to ``redis``'s server, opened by redis-py (connected,
    authenticated, its database selected), for a ``TakenOver`` protocol.

    Without redis-py's socket timeout (``timeout`` bounds it all): with one, redis-py
    writes each command through ``asyncio.wait_for``, where on Python 3.11 a cancellation
    can be lost (bgservice.cancelling): cancelled while it connected (the service
    stopping), the engine's listener went on to follow its channel, and the stop never
    ended."""
    conn = redis.connection_pool.make_connection()
    conn.socket_timeout = None
    try:
        async with asyncio.timeout(timeout):
            await conn.connect()
    except TimeoutError:
        raise RedisTimeout(f"no connection to Redis in {timeout:g} s") from None
    return conn


def packed(*command: Any) -> Packed:
    """A command in Redis's protocol, packed by hiredis (raises for what Redis cannot take)."""
    return pack_command(command)


class TakenOver(asyncio.Protocol):
    """A connection from ``connect``, read from now on by this protocol: nothing else
    reads it. Error replies come out of ``parser`` as ResponseError values."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # redis-py's, kept to close its record of the streams
        self.loop = asyncio.get_running_loop()
        self.parser = Reader(replyError=ResponseError)
        self.transport: asyncio.Transport = conn._writer.transport
        self.transport.set_protocol(self)

    def eof_received(self) -> bool:
        return False  # close: Redis hung up

    def connection_lost(self, exc: Exception | None) -> None:
        # (said once: the lines that quote it say it is Redis)
        said = f"connection lost: {exc}" if exc else "connection closed by Redis"
        self._end(RedisConnectionError(said))

    def _end(self, exc: Exception) -> None:
        """The connection is over (``exc`` says why): fail what waits on it, ``_drop``."""
        raise NotImplementedError

    def _drop(self) -> None:
        self.transport.abort()
        self.conn._close()  # redis-py's record of the streams (else "unclosed" at exit)
