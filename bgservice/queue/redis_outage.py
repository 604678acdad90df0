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

Redis back without the queue's data (``Ids``): restarted without persistence, flushed,
or a failover to a replica that did not have it. Its id counter starts at 1 again; the
instance moves it past the ids it knows of, and says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
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


# ARGV: P, now, the highest id the instance knows of. The id counter, moved up to that mark
# when below it (Redis lost it; next_id, redis_lua.py): {the counter found, 1 if moved}.
IDS = r"""
local key = ARGV[1] .. ':id'
local found = tonumber(redis.call('GET', key) or '0')
if found >= tonumber(ARGV[3]) then return {found, 0} end
redis.call('SET', key, ARGV[3])
return {found, 1}
"""


class Ids:
    """The highest job id this instance has handed out or seen (its adds, its claims, the
    counter as IDS read it): its mark. A client may hold any id up to it; if Redis loses
    its data and counts from 1 again, such an id would name another job, whose result the
    client would follow or collect. So ADD and FIRE take the mark (next_id, redis_lua.py),
    and IDS checks the counter at each new connection (a restart, a failover) and every
    ``every`` seconds (a FLUSHALL leaves the connections open): a counter below the mark
    is moved past it, and said once. What it cannot know: the ids of an earlier run of
    the service (no instance said it, and a new one starts from the counter it finds)."""

    def __init__(self, where: str, call: Callable[..., Awaitable[Any]]) -> None:
        self.where = where  # the url, redacted, for the line
        self.call = call  # (RedisJobs.call)
        self.mark = 0
        self.gone: Callable[[], None] = lambda: None  # told of a loss (the waiters: 404)
        self._opened = asyncio.Event()  # set: a new connection, to a Redis maybe emptied

    def seen(self, jid: int) -> None:
        if jid > self.mark:
            self.mark = jid

    def added(self, jid: int, new: bytes) -> int:
        """``jid``, from ADD's or FIRE's reply, whose ``new`` is ``lost:N`` when the script
        found the counter (N) below the mark it was sent and moved it."""
        self.seen(jid)
        if new.startswith(b"lost:"):
            self.lost(int(new[5:]), jid - 1)
        return jid

    def opened(self) -> None:
        """The pipelines' connection was made (again): the counter is checked now."""
        self._opened.set()

    async def watch(self, every: float) -> None:
        """Check the counter (IDS) every ``every`` seconds, and at once when ``opened``."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._opened.wait()
            self._opened.clear()
            mark = self.mark
            try:
                found, moved = await self.call("IDS", mark)
            except RedisError as exc:  # (Redis away: its outage has lines of its own)
                log.debug("job id counter not checked (%s)", exc)
                continue
            if moved:
                self.lost(found, mark)
            self.seen(found)  # ids another instance handed out: a client may hold them

    def lost(self, found: int, mark: int) -> None:
        self.gone()
        log.warning("Redis at %s has lost the queue's data (a restart without persistence, "
                    "FLUSHALL, a failover to a replica without it): its id counter was %d, "
                    "below the ids up to %d this instance has handed out or seen; ids go on "
                    "from %d, none given twice; jobs added before are gone",
                    self.where, found, mark, mark + 1)  # fmt: skip


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
