"""The stream transport (TCP and Unix stream sockets): bytes in, requests to dispatch,
replies out. Callbacks only parse and schedule; modules run in tasks.

Where a one-shot request ends (docs/protocol.md, "Finding the end of a one-shot request"):
at the client's half-close, or, for clients that never half-close (the original's PHP
examples), once no byte has arrived for ``quiet_ms`` (``quiet_large_ms`` once the request
is over ``large_bytes``, where a large write arrives in several bursts).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from bgservice.access import AccessList
from bgservice.config import Limits
from bgservice.dispatch import Dispatcher
from bgservice.protocol import (
    OK,
    PREFACE,
    FrameDecoder,
    Mode,
    Oversized,
    framed_reply,
    one_shot_error,
    sniff,
    split_request,
)
from bgservice.request import Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StreamContext:
    """What every connection of one listener shares."""

    dispatcher: Dispatcher
    limits: Limits
    stats: Stats
    access: AccessList
    transport_name: str
    tasks: set[asyncio.Task[Any]]
    connections: set[Connection] = field(default_factory=set)
    # Kept, not looked up per request: on Python 3.11 every get_running_loop() is a getpid
    # system call, a measurable share of a small request's cost.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not "never retrieved" at garbage collection: reported now, to the global policy.
            task.get_loop().call_exception_handler(
                {"message": "unexpected error in a connection task", "exception": exc}
            )


class Connection(asyncio.Protocol):
    """One client connection, in one-shot or framed mode (decided by its first bytes)."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.mode: Mode | None = None
        self.buf = bytearray()
        self.closed = False
        self.done = False  # one-shot: the request is complete
        self.draining = False  # an error was sent; input is discarded until close
        self.started = self.loop.time()
        self.last_data = self.started
        self.frame_started: float | None = None
        self.quiet_timer: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.decoder: FrameDecoder | None = None
        self.pending: deque[asyncio.Task[bytes]] = deque()
        self.paused = False  # reading paused: max_pipeline requests in progress
        self.write_blocked = False  # reading paused: the client is not reading its replies
        self.eof = False

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        host = None
        if isinstance(peer, tuple):
            host = peer[0]
            self.peer = f"{peer[0]}:{peer[1]}"
        if ctx.transport_name == "tcp" and not ctx.access.allows(host):
            ctx.stats.refused["tcp_forbidden"] += 1
            log.warning("refused TCP connection from %s: not in allow list", self.peer)
            self._fail(403, "Forbidden")
            return
        if len(ctx.connections) >= ctx.limits.max_connections:
            ctx.stats.refused["too_many_connections"] += 1
            self._fail(503, "Too many connections")
            return
        ctx.connections.add(self)
        ctx.stats.connections += 1
        ctx.stats.connections_total += 1
        self.deadline = self.loop.call_later(ctx.limits.read_timeout, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        if self.draining or self.done:
            return
        self.last_data = self.loop.time()
        if self.mode is None:
            self.buf += data
            mode = sniff(bytes(self.buf[: len(PREFACE)]))
            if mode is None:
                return
            self.mode = mode
            if mode is Mode.FRAMED:
                rest = bytes(self.buf[len(PREFACE) :])
                self.buf = bytearray()
                self.decoder = FrameDecoder(self.ctx.limits.max_request_bytes)
                assert self.transport is not None
                self.transport.write(PREFACE)
                self._frames(rest)
            else:
                self._one_shot(b"")
        elif self.mode is Mode.ONE_SHOT:
            self._one_shot(data)
        else:
            self._frames(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.mode is Mode.FRAMED:
            if not self.pending:
                self._close()
        elif not self.done and not self.draining:
            if self.buf or self.mode is not None:
                self._complete_one_shot()
            else:
                self._close()  # connected and left without a word
        elif self.draining:
            self._close()
        return True  # keep our side open: the reply still has to go out

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self.quiet_timer, self.deadline):
            if timer is not None:
                timer.cancel()
        if self in self.ctx.connections:
            self.ctx.connections.discard(self)
            self.ctx.stats.connections -= 1

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self.write_blocked = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()

    # --- one-shot mode ----------------------------------------------------------------

    def _one_shot(self, data: bytes) -> None:
        self.buf += data
        limits = self.ctx.limits
        if len(self.buf) > limits.max_request_bytes:
            self.buf = bytearray()
            self._fail(413, f"Request too large (limit {limits.max_request_bytes} bytes)")
            return
        if self.quiet_timer is None:
            self.quiet_timer = self.loop.call_later(self._quiet(), self._check_quiet)

    def _quiet(self) -> float:
        limits = self.ctx.limits
        large = len(self.buf) > limits.large_bytes
        return (limits.quiet_large_ms if large else limits.quiet_ms) / 1000

    def _check_quiet(self) -> None:
        # One timer per connection, re-armed for the rest of the gap instead of being
        # cancelled and created again for every chunk of a large request.
        self.quiet_timer = None
        if self.done or self.closed or self.draining:
            return
        remaining = self.last_data + self._quiet() - self.loop.time()
        if remaining > 0:
            self.quiet_timer = self.loop.call_later(remaining, self._check_quiet)
        else:
            self._complete_one_shot()

    def _complete_one_shot(self) -> None:
        self.done = True
        for timer in (self.quiet_timer, self.deadline):
            if timer is not None:
                timer.cancel()
        self.quiet_timer = self.deadline = None
        module, data = split_request(bytes(self.buf))
        self.buf = bytearray()
        request = Request(module, data, self.ctx.transport_name, self.peer)
        request.bind(self._write, self.loop)
        self.ctx.spawn(self._serve_one_shot(request))

    async def _serve_one_shot(self, request: Request) -> None:
        status, body = await self.ctx.dispatcher.call(request)
        if self.closed or self.transport is None:
            return
        if status == OK:
            self.transport.write(body)
        else:
            self.transport.write(one_shot_error(status, body.decode("utf-8", "replace")))
        self.transport.close()

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    # --- framed mode ------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        assert self.decoder is not None
        was_partial = self.decoder.partial
        items = self.decoder.feed(data)
        for item in items:
            if isinstance(item, Oversized):
                limit = self.ctx.limits.max_request_bytes
                self._queue_reply(
                    self._fixed(413, f"Request too large ({item.length} bytes, limit {limit})")
                )
                continue
            module, payload = split_request(item)
            request = Request(module, payload, self.ctx.transport_name, self.peer)
            self._queue_reply(self._serve_frame(request))
        if not self.decoder.partial:
            self.frame_started = None
        elif items or not was_partial:  # a new frame began in this chunk
            self.frame_started = self.last_data
            self._arm_deadline(self.last_data + self.ctx.limits.read_timeout)
        if len(self.pending) >= self.ctx.limits.max_pipeline and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _queue_reply(self, coro: Coroutine[Any, Any, bytes]) -> None:
        task = self.ctx.spawn(coro)
        self.pending.append(task)
        task.add_done_callback(self._flush)

    async def _fixed(self, status: int, message: str) -> bytes:
        return framed_reply(status, message.encode())

    async def _serve_frame(self, request: Request) -> bytes:
        return framed_reply(*await self.ctx.dispatcher.call_whole(request))

    def _flush(self, _: object = None) -> None:
        # Replies go out in request order: only a finished head of the line is written.
        # Pipelined requests often finish together: their replies share one send.
        ready: list[bytes] = []
        transport = None if self.closed else self.transport
        while self.pending and self.pending[0].done():
            task = self.pending.popleft()
            if transport is not None and not task.cancelled():
                ready.append(task.result())
        if transport is None:
            return
        if ready:
            transport.write(ready[0] if len(ready) == 1 else b"".join(ready))
        if self.paused and len(self.pending) < self.ctx.limits.max_pipeline:
            self.paused = False
            if not self.write_blocked:  # else resume_writing resumes reading
                transport.resume_reading()
        if not self.pending and (self.eof or self.ctx.dispatcher.shutting_down):
            self._close()

    # --- deadlines and closing --------------------------------------------------------

    def _check_deadline(self) -> None:
        """Read timeout (request not complete in time) and idle timeout, one timer."""
        self.deadline = None
        if self.closed or self.done or self.draining:
            return
        limits = self.ctx.limits
        now = self.loop.time()
        if self.mode is not Mode.FRAMED:
            due = self.started + limits.read_timeout
        elif self.frame_started is not None:
            due = self.frame_started + limits.read_timeout
        elif self.pending:
            due = now + limits.idle_timeout
        else:
            due = self.last_data + limits.idle_timeout
            if due <= now:
                self._close()
                return
        if due <= now:
            self.ctx.stats.refused["read_timeout"] += 1
            log.info("read timeout: %s %s", self.ctx.transport_name, self.peer or "local")
            self._fail(408, f"Request not received within {limits.read_timeout:g} s")
            return
        self.deadline = self.loop.call_later(due - now, self._check_deadline)

    def _arm_deadline(self, due: float) -> None:
        if self.deadline is not None and self.deadline.when() <= due:
            return
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_at(due, self._check_deadline)

    def _fail(self, status: int, message: str) -> None:
        """Send an error and close without losing it to a reset.

        Closing with unread input makes the kernel send RST, which can destroy the reply
        before the client reads it; so we half-close, discard what still arrives, and close
        when the client does (or after a short linger).
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        self.draining = True
        if self.mode is Mode.FRAMED:
            transport.write(framed_reply(status, message.encode()))
        else:
            transport.write(one_shot_error(status, message))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(min(self.ctx.limits.read_timeout, 2.0), self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_if_idle(self) -> None:
        """At shutdown: close a connection with no request received or in progress."""
        if (self.mode is Mode.FRAMED and not self.pending) or (self.mode is None and not self.buf):
            self._close()
