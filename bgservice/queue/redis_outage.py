"""Redis away, as an instance tells it and rides it out.

The pipelines' connection (bgservice.queue.redis_batch) finds Redis away: silent past
the command timeout while it owes replies, or a connection it could not open. From then
on (``down``) queue commands fail at once, 503, instead of each waiting a timeout of its
own (web clients need a prompt answer), until one of its reconnections, made in the
background, succeeds. The channel (bgservice.queue.redis_channel) may find it first.

What the log says of it: one WARNING when Redis is lost; the queue commands that fail
meanwhile counted, not a line each (a line a minute while it lasts); one INFO line when
it answers again, after how long and how many commands failed. ``level`` is the level
of the lines of the background loops (claims, renewals, cascades): DEBUG while the
outage is said already, so that they do not repeat it at every retry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from redis.exceptions import RedisError, ResponseError

from bgservice.errors import Busy
from bgservice.logs import Sparse

log = logging.getLogger(__name__)

STILL_EVERY = 60.0  # s: while Redis stays away, a line this often with the count so far
FAILED_EVERY = 60.0  # s: commands failing while Redis is not known away (it refuses
# them: out of memory, a permission): a line at most this often, with how many


class Outage:
    """Whether Redis answers, as this instance last found; the outage's log lines."""

    def __init__(self, where: str) -> None:
        self.where = where  # the url, redacted, for the lines
        self.down: RedisError | None = None  # set: commands fail with it at once (Batcher)
        self.probe: Callable[[], None] | None = None  # asks for a new try now (Batcher)
        self.since: float | None = None  # (monotonic) when found away; None: answering
        self.failed = 0  # queue commands failed since
        self._back: asyncio.Future[None] | None = None  # done when it answers again
        self._still: asyncio.TimerHandle | None = None
        self._refused = Sparse(FAILED_EVERY, self._more_failed)

    @property
    def away(self) -> bool:
        return self.since is not None

    def error(self) -> RedisError | None:
        """What a command fails with while Redis is ``down``: a copy of what found it
        away (one raised again and again would grow its traceback at each raise). The
        command asks for a new try meanwhile (``probe``): under traffic, Redis back is
        found at once, not at the end of the backoff."""
        down = self.down
        if down is None:
            return None
        if self.probe is not None:
            self.probe()
        return type(down)(*down.args)

    @property
    def level(self) -> int:
        """The level of a retry's line: DEBUG while the outage is said already."""
        return logging.DEBUG if self.since is not None else logging.WARNING

    def lost(self, exc: Exception, said: bool = False) -> None:
        """Redis does not answer (``exc`` says how it showed): the outage's one WARNING,
        unless ``said`` (the start's own line) or said already."""
        if self.since is not None:
            return
        self.since, self.failed = time.monotonic(), 0
        loop = asyncio.get_running_loop()
        self._back = loop.create_future()
        self._still = loop.call_later(STILL_EVERY, self._still_away)
        if not said:
            log.warning("Redis at %s does not answer (%s): queue commands reply 503 until "
                        "it does", self.where, exc)  # fmt: skip

    def back(self) -> None:
        """Redis answered a new connection: the outage, if any, is over."""
        if self.since is None:
            return
        log.info("Redis reachable again after %.1f s (%d queue commands failed meanwhile)",
                 time.monotonic() - self.since, self.failed)  # fmt: skip
        self.since = None
        if self._still is not None:
            self._still.cancel()
        if self._back is not None and not self._back.done():
            self._back.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, less if Redis is away and answers again meanwhile: a retry
        (a claim, a resubscription, a load of the schedules) is then made at once."""
        back = self._back
        if self.since is None or back is None:
            await asyncio.sleep(seconds)
            return
        await asyncio.wait([back], timeout=seconds)  # (not cancelled by the timeout)

    def failed_command(self, exc: RedisError) -> Busy:
        """A queue command Redis did not run: its 503, counted during an outage, else
        logged (a line a minute at most: Redis refusing every command is a flood too)."""
        busy = unavailable(exc)
        if self.since is not None and not isinstance(exc, ResponseError):
            self.failed += 1
        elif self._refused.tick(time.monotonic()):
            log.warning("queue command failed: %s (%s)", busy.message, exc)
        return busy

    def _more_failed(self, count: int) -> None:
        log.warning("%d more queue commands failed (503) in the last %.0f s",
                    count, FAILED_EVERY)  # fmt: skip

    def _still_away(self) -> None:
        if self.since is None:
            return
        log.warning("Redis at %s still does not answer after %.0f s (%d queue commands failed "
                    "so far)", self.where, time.monotonic() - self.since, self.failed)  # fmt: skip
        self._still = asyncio.get_running_loop().call_later(STILL_EVERY, self._still_away)


def unavailable(exc: RedisError | None = None) -> Busy:
    """The 503 for a command Redis did not run: it does not answer, or it said why not (an
    error reply: out of memory, read-only, a permission), which the reply quotes."""
    if isinstance(exc, ResponseError):
        return Busy(f"Queue unavailable: Redis refused: {str(exc).partition(chr(10))[0]}")
    return Busy("Queue unavailable: Redis does not answer")


class _Db(Protocol):
    @property
    def outage(self) -> Outage: ...


class OnRedis(Protocol):
    """What a command ``available`` wraps is a method of: the engine, with its ``db``."""

    @property
    def db(self) -> _Db: ...


S = TypeVar("S", bound=OnRedis)
P = ParamSpec("P")
T = TypeVar("T")


def available(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Redis unreachable or refusing -> 503 for this command; at once while Redis is
    known away (``down``), not after a timeout of its own. Started eagerly
    (bgservice.eager), it sends its Redis commands in its first step."""

    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        outage = self.db.outage
        try:
            if (down := outage.error()) is not None:
                raise down
            return await method(self, *args, **kwargs)
        except RedisError as exc:
            raise outage.failed_command(exc) from None

    return wrapper
