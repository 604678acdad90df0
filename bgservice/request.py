"""The object a module's handler receives, and ``request.job`` in a queued run.

See docs/modules.md. A request is made complete by whoever creates it (a transport, the
queue, the alert sender, a worker process): where streamed output goes, the loop it belongs
to and the queue it may add jobs to are constructor arguments, never set afterwards.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bgservice.errors import BadRequest, HandlerError, did_you_mean
from bgservice.origin import Origin
from bgservice.queue.commands import (
    ADD_OPTIONS,
    AddSpec,
    Command,
    ParseLimits,
    check_options,
    parse_add,
)

if TYPE_CHECKING:
    from bgservice.queue.job import Job


class JobAdder(Protocol):
    @property
    def settings(self) -> ParseLimits: ...  # [queue]: add_job is bounded as queue:add is

    async def add(self, spec: AddSpec) -> int: ...


Sink = Callable[[bytes], None]
Saver = Callable[["Job", str], Coroutine[Any, Any, None]]  # the queue's save_checkpoint


def to_bytes(value: Any) -> bytes:
    """A handler's return value or streamed chunk as bytes; None is empty."""
    if type(value) is bytes:  # the common cases first, by exact type: the cheapest test
        return value
    if type(value) is str:
        return value.encode("utf-8")
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a reply must be str, bytes or None, not {type(value).__name__}")


def running(loop: asyncio.AbstractEventLoop) -> bool:
    """Called where ``loop`` runs (an ``async def`` handler), not from a ``def`` handler's
    thread. (Asked when needed, not remembered in every request: few ask.)"""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False


def reply_bytes(module: str, value: Any) -> bytes:
    """A handler's return value as its reply's body, in every execution mode: a value of
    the wrong type is the module's error (500), named as such."""
    try:
        return to_bytes(value)
    except TypeError as exc:
        raise HandlerError(f"Module {module} returned a bad reply: {exc}") from None


class AttemptOver(RuntimeError):
    """``save_checkpoint`` from an attempt that is over (timed out, cut, or followed by a
    later attempt): nothing was stored."""


class JobContext:
    """``request.job`` in a queued call: the job's id, progress reports, cancel requests,
    checkpoints, for one attempt. Once that attempt is over (a ``def`` handler's thread
    runs on past its timeout), its progress reports and checkpoints are not kept and
    ``cancelled`` is true: the job's next attempt sees none of it."""

    def __init__(
        self,
        job: Job,
        loop: asyncio.AbstractEventLoop,
        on_progress: Callable[[Job], None] | None = None,
        saver: Saver | None = None,
        max_checkpoint_bytes: int = 65536,
        on_outlived: Callable[[Job, Future[Any]], None] | None = None,
    ) -> None:
        self.id = job.id
        self.attempt = job.attempts
        self.source = job.source  # where the job was added from (Request.source)
        self._job = job
        self.ended = False  # set by the queue when the attempt's call returns
        self._loop = loop
        self._on_progress = on_progress
        self._saver = saver
        self._max_checkpoint = max_checkpoint_bytes
        self._on_outlived = on_outlived

    @property
    def checkpoint(self) -> str | None:
        """What this job last saved with ``save_checkpoint`` (in this attempt or an earlier
        one: a run cut by a crash, a killed worker, a retry), or None."""
        return self._job.checkpoint

    def save_checkpoint(self, value: str) -> Awaitable[None] | None:
        """Save ``value`` (text; ``json.dumps`` a structure) for a later attempt to resume
        from. On the loop (an ``async def`` handler) it returns an awaitable: once awaited,
        the checkpoint is stored (committed to SQLite, written to Redis). From a thread (a
        ``def`` handler) it blocks until then. Larger than ``[queue]
        max_checkpoint_bytes``: ``ValueError``. From an attempt that is over:
        ``AttemptOver`` (a ``RuntimeError``), and nothing is stored."""
        text = check_checkpoint(value, self._max_checkpoint)
        if self._saver is None:
            raise RuntimeError("this queue does not keep checkpoints")
        if running(self._loop):
            return asyncio.ensure_future(self._save(text))
        asyncio.run_coroutine_threadsafe(self._save(text), self._loop).result()
        return None

    async def _save(self, text: str) -> None:
        # On the loop, where attempts start and end: the test and the store are one step.
        if self.ended:
            raise AttemptOver(
                f"job {self.id}: attempt {self.attempt} is over (timed out or cut): "
                "its checkpoint is not saved"
            )
        assert self._saver is not None
        await self._saver(self._job, text)

    @property
    def cancelled(self) -> bool:
        """True once ``queue:cancel`` asked this running job to stop, or once this attempt
        is over (its timeout passed, or a later attempt runs)."""
        return self._job.cancel_requested or self.ended

    def progress(self, done: float, total: float = 100, message: str | None = None) -> None:
        """Report progress; ``queue:status`` shows it at once. Safe from any thread.
        Ignored once this attempt is over. ``done`` or ``total`` not a finite number, or a
        message that is not valid text (a lone surrogate): ``ValueError``."""
        value = check_progress(done, total, message)
        if running(self._loop):
            self._set(value)
        else:
            self._loop.call_soon_threadsafe(self._set, value)

    def _set(self, value: tuple[float, float, str | None]) -> None:
        if self.ended:
            return
        self._job.progress = value
        if self._on_progress is not None:
            self._on_progress(self._job)

    def outlived(self, going_on: Future[Any]) -> None:
        """The attempt is over (its timeout) while its handler goes on, done when
        ``going_on`` is: a ``def`` handler's thread, an ``async def`` one that caught its
        cancellation. The queue keeps the job's worker and module slot taken until then
        (the embedded engine's ``Pump.hold``; on Redis, ``RedisLeases.outlived``)."""
        if self._on_outlived is not None:
            self._on_outlived(self._job, going_on)


def check_progress(
    done: float, total: float, message: object
) -> tuple[float, float, str | None]:
    """A progress report as it is kept: numbers from 0 that JSON can carry (NaN and
    infinities are not JSON; a string or a bool is a caller's slip, not a count), a message
    of at most 500 characters that UTF-8 can encode."""
    numbers = (_count(done), _count(total))
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise ValueError(f"progress: done and total must be finite numbers from 0, not "
                         f"{done!r:.40}, {total!r:.40}")  # fmt: skip
    text = None if message is None else str(message)[:500]
    if text is not None:
        utf8(text, "progress message")
    # Whole numbers stay whole: progress(3, 10) is {"done": 3, "total": 10}, not 3.0, 10.0.
    whole = [int(n) if n.is_integer() and abs(n) < 2**53 else n for n in numbers]
    return (whole[0], whole[1], text)


def _count(n: object) -> float:
    """``n`` as a float; NaN for what is no number (a str, a bool), an infinity for an int
    past a float's range (float() raises OverflowError)."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return math.nan
    try:
        return float(n)
    except OverflowError:
        return math.inf


def utf8(text: str, what: str) -> bytes:
    """``text`` in UTF-8; ``ValueError`` naming the character (a lone surrogate, which a
    Python string may hold) that UTF-8 cannot encode, and so no store can keep."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what}: character {exc.start} ({text[exc.start]!r}) is a lone surrogate, not"
            " text UTF-8 can encode"
        ) from None


def check_checkpoint(value: object, limit: int) -> str:
    if not isinstance(value, str):
        kind = type(value).__name__
        raise TypeError(f"a checkpoint is text (json.dumps a structure), not {kind}")
    size = len(utf8(value, "checkpoint"))
    if size > limit:
        raise ValueError(f"checkpoint of {size} bytes: [queue] max_checkpoint_bytes is {limit}")
    return value


@dataclass(eq=False)
class Request:
    """One call of a module.

    ``data`` is the raw bytes after the first colon, ``text`` the same decoded as UTF-8
    (undecodable bytes become U+FFFD). ``transport`` is where it came from: ``tcp``,
    ``udp``, ``unix``, ``unix_dgram``, ``queue`` or ``alert``; ``peer`` is the client's
    ``host:port`` where there is one.
    """

    module: str
    data: bytes
    origin: Origin
    peer: str = ""
    sink: Sink | None = field(default=None, repr=False)  # where write() sends, None: nowhere
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    jobs: JobAdder | None = field(default=None, repr=False)  # add_job's queue
    job: JobContext | None = None
    _text: str | None = field(default=None, init=False, repr=False)

    @property
    def transport(self) -> str:
        return self.origin.transport

    @property
    def source(self) -> str:
        """Where it came from, as jobs record it: ``tcp:127.0.0.1:50312``, ``unix``; in a
        queued run, where its job was added from (``scheduler:nightly``, ``http:site``)."""
        if self.job is not None and self.job.source:
            return self.job.source
        return f"{self.transport}:{self.peer}" if self.peer else self.transport

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode("utf-8", errors="replace")
        return self._text

    @property
    def parts(self) -> list[str]:
        """The original's ``[module name, data]``."""
        return [self.module, self.text]

    def write(self, chunk: str | bytes) -> None:
        """Stream part of the reply now (TCP); the handler's return value follows it.

        Safe to call from a handler's thread. Over UDP there is no reply, so it does nothing.
        """
        if self.sink is None:
            return
        data = to_bytes(chunk)
        if not data:
            return
        if self.loop is None or running(self.loop):
            self.sink(data)
        else:
            self.loop.call_soon_threadsafe(self.sink, data)

    def add_job(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        """Queue another job (fan-out) from a synchronous handler; returns its id.

        Options are those of ``queue:add`` (priority, delay, at, retries, backoff, timeout,
        unique, after). From an ``async def`` handler use ``await add_job_async(...)``.
        """
        if self.loop is None or running(self.loop):
            raise RuntimeError("on the event loop use: await request.add_job_async(...)")
        future = asyncio.run_coroutine_threadsafe(
            self.add_job_async(module, data, **options), self.loop
        )
        return future.result()

    async def add_job_async(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        """Queue another job from an ``async def`` handler; returns its id."""
        if self.jobs is None:
            raise RuntimeError("the job queue is not available")
        # Checked as queue:add checks them (the same parser): a priority of "high" once
        # went to the store unchecked, broke queue:list and stopped the next start.
        unknown = sorted(set(options) - JOB_OPTIONS)
        if unknown:
            raise BadRequest(f"add_job: unknown option {unknown[0]!r}"
                             f"{did_you_mean(unknown[0], JOB_OPTIONS)} "
                             f"(options: {', '.join(sorted(JOB_OPTIONS))})")  # fmt: skip
        # (None, and no ids or tags at all, as the option left out)
        text = {k: _option_text(k, v) for k, v in options.items() if v not in (None, [], ())}
        # As queue:add refuses them: unique="" was taken for no key, silently (and name="",
        # tags="" for none), and a lone surrogate is no text a store can keep.
        check_options("add", text.items())
        # A job's module adds as "job:ID"; a direct call's as where the call came from,
        # the same source a queue:add over that connection records (tcp:HOST:PORT, unix).
        source = f"job:{self.job.id}" if self.job is not None else self.source
        command = Command("add", text, module.encode() + b":" + to_bytes(data))
        spec: AddSpec = parse_add(command, source=source, limits=self.jobs.settings)
        return await self.jobs.add(spec)


JOB_OPTIONS = ADD_OPTIONS - {"wait", "source"}  # what add_job takes (the job is the source)


def _option_text(key: str, value: Any) -> str:
    """An ``add_job`` option as ``queue:add`` would have it in its text form."""
    if key in ("after", "tags") and isinstance(value, list | tuple):
        value = ",".join(map(str, value))  # several ids (all done first), several tags
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"add_job: option {key}: expected a number or text, "
                         f"got {type(value).__name__}")  # fmt: skip
    return repr(value) if isinstance(value, float) else str(value)
