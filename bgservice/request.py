"""The object a module's handler receives. See docs/modules.md."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bgservice.queue_commands import AddSpec

if TYPE_CHECKING:
    from bgservice.jobs import JobContext


class JobAdder(Protocol):
    async def add(self, spec: AddSpec) -> int: ...


Sink = Callable[[bytes], None]


def to_bytes(value: Any) -> bytes:
    """A handler's return value or streamed chunk as bytes; None is empty."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a reply must be str, bytes or None, not {type(value).__name__}")


@dataclass(eq=False)
class Request:
    """One call of a module.

    ``data`` is the raw bytes after the first colon, ``text`` the same decoded as UTF-8
    (undecodable bytes become U+FFFD). ``transport`` is ``tcp``, ``udp``, ``unix``,
    ``unix_dgram`` or ``queue``; ``peer`` is the client's ``host:port`` where there is one.
    """

    module: str
    data: bytes
    transport: str
    peer: str = ""
    _sink: Sink | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _loop_thread: int = field(default=0, repr=False)
    _text: str | None = field(default=None, repr=False)
    job: JobContext | None = None
    _queue: JobAdder | None = field(default=None, repr=False)

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
        if self._sink is None:
            return
        data = to_bytes(chunk)
        if not data:
            return
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._sink(data)
        else:
            self._loop.call_soon_threadsafe(self._sink, data)

    def add_job(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        """Queue another job (fan-out) from a synchronous handler; returns its id.

        Options are those of ``queue:add`` (priority, delay, at, retries, backoff, timeout,
        unique, after). From an ``async def`` handler use ``await add_job_async(...)``.
        """
        if self._loop is None or threading.get_ident() == self._loop_thread:
            raise RuntimeError("on the event loop use: await request.add_job_async(...)")
        future = asyncio.run_coroutine_threadsafe(
            self.add_job_async(module, data, **options), self._loop
        )
        return future.result()

    async def add_job_async(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        """Queue another job from an ``async def`` handler; returns its id."""
        if self._queue is None:
            raise RuntimeError("the job queue is not available")
        delay = options.pop("delay", None)
        at = options.pop("at", None)
        run_at = at if at is not None else (time.time() + delay if delay else None)
        spec = AddSpec(module=module, data=to_bytes(data), run_at=run_at, **options)
        return await self._queue.add(spec)

    def bind(self, sink: Sink | None, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the transport's writer (done by the service, not by modules)."""
        self._sink = sink
        self.attach(loop, self._queue)

    def attach(self, loop: asyncio.AbstractEventLoop, queue: JobAdder | None) -> None:
        """Attach the loop and the job queue (done by the service, not by modules)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._queue = queue
