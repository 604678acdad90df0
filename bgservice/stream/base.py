"""What the stages of a stream connection share: the listener's context, flow control,
and ``StreamProtocol`` (the read deadline, sending an error without losing it to a reset,
closing, handing the transport on to the next stage)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from bgservice import eager
from bgservice.access import AccessList
from bgservice.config import Limits
from bgservice.logs import Sparse
from bgservice.origin import Origin
from bgservice.protocol import Reply
from bgservice.request import JobAdder, Request
from bgservice.stats import Stats
from bgservice.stream.deadlines import Deadlines

log = logging.getLogger(__name__)


class Caller(Protocol):
    """What a stream listener hands requests to (bgservice.commands.Commands)."""

    def begin(self, request: Request) -> Reply | Coroutine[Any, Any, Reply]: ...


@dataclass(eq=False)
class StreamContext:
    """What every connection of one listener shares."""

    commands: Caller
    limits: Limits
    stats: Stats
    access: AccessList
    origin: Origin
    jobs: JobAdder  # what handlers' add_job() adds to
    tasks: set[asyncio.Task[Any]]
    connections: set[StreamProtocol] = field(default_factory=set)
    segments: dict[str, int] = field(default_factory=dict)  # peer host -> TCP segment size
    forbidden: Sparse = field(default_factory=lambda: Sparse(60.0))  # refused peers, logged
    # Kept, not looked up per request: on Python 3.11 every get_running_loop() is a getpid
    # system call, a measurable share of a small request's cost.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    deadlines: Deadlines = field(init=False)  # every connection's read and idle deadline

    def __post_init__(self) -> None:
        self.deadlines = Deadlines(self.loop)

    def spawn(self, coro: Coroutine[Any, Any, Any], context: Any = None) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro, context=context)
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

    def start(self, request: Request) -> tuple[bool, Any]:
        """Serve now what needs no wait: ``(True, reply)``, else ``(False, task)`` for
        the rest (bgservice.eager). A bug of ours is reported as a task's would be, and
        is ``(True, None)``."""
        try:
            return eager.start_call(self.commands.begin, request, self.spawn, self.loop)
        except Exception as exc:
            self.loop.call_exception_handler(
                {"message": "unexpected error serving a connection", "exception": exc}
            )
            return True, None

    def request(self, module: str, data: bytes, peer: str, sink: Any) -> Request:
        return Request(module, data, self.origin, peer, sink=sink, loop=self.loop, jobs=self.jobs)


class FlowControl:
    """Reading from a client pauses while either holds: too many of its requests are in
    progress (``max_pipeline``), or it does not read its replies (the transport's write
    buffer is full); it resumes when neither does (uvicorn's FlowControl, for two causes)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.too_busy = False  # too many requests in progress
        self._blocked = False  # the client is not reading its replies
        self._paused = False

    def busy(self, busy: bool) -> None:
        self.too_busy = busy
        self._update()

    def blocked(self, blocked: bool) -> None:
        self._blocked = blocked
        self._update()

    def _update(self) -> None:
        pause = self.too_busy or self._blocked
        if pause != self._paused:
            self._paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()


class StreamProtocol(asyncio.Protocol):
    """What every stage of a connection shares: its deadline, flow control and closing."""

    transport: asyncio.Transport
    # Defaults kept on the class: a connection sets only what it changes (a one-shot
    # connection is two of these objects, made and gone within one request).
    flow: FlowControl | None = None  # made when first needed (framed, or a stalled reply)
    peer = ""
    closed = False
    draining = False  # an error was sent; input is discarded until close
    deadline: int | None = None  # its slot in ctx.deadlines
    write_timer: asyncio.TimerHandle | None = None
    unsent = 0  # the reply bytes waiting to be sent when write_timer was last armed
    held = 0  # bytes of an unfinished request this connection holds

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.started = self.last_data = self.loop.time()

    def take_over(self, previous: StreamProtocol) -> None:
        """Carry on the connection ``previous`` began (its transport, peer and clock)."""
        self.transport, self.flow, self.peer = previous.transport, previous.flow, previous.peer
        self.started, self.last_data = previous.started, previous.last_data
        if previous.deadline is not None:
            previous.stop_timers()
        connections = self.ctx.connections
        connections.discard(previous)
        connections.add(self)
        self.transport.set_protocol(self)

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_timers()
        if self.write_timer is not None:
            self._stop_write_timer()
        if self.held:
            self.hold(0)
        if self in self.ctx.connections:
            self.ctx.connections.discard(self)
            self.ctx.stats.connections -= 1

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does,
        # and drop it if it takes nothing for write_timeout (its slot and its unsent reply
        # would otherwise be held for ever, even after we closed our side).
        self.flow_control().blocked(True)
        if self.write_timer is None:
            self._arm_write_timer()

    def _arm_write_timer(self) -> None:
        self.unsent = self.transport.get_write_buffer_size()
        self.write_timer = self.loop.call_later(
            self.ctx.limits.write_timeout, self._write_timed_out
        )

    def flow_control(self) -> FlowControl:
        if self.flow is None:
            self.flow = FlowControl(self.transport)
        return self.flow

    def resume_writing(self) -> None:
        self.flow_control().blocked(False)
        self._stop_write_timer()

    def _stop_write_timer(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _write_timed_out(self) -> None:
        self.write_timer = None
        if self.closed:
            return
        if self.transport.get_write_buffer_size() < self.unsent:
            self._arm_write_timer()  # it reads, if slowly (a large reply): not stuck
            return
        self.ctx.stats.refused["write_timeout"] += 1
        log.info(
            "write timeout: %s %s took none of its reply for %g s: dropped",
            self.ctx.origin.value, self.peer or "local", self.ctx.limits.write_timeout,
        )  # fmt: skip
        # A reset, not a close: the kernel would go on sending what it holds and end with
        # a FIN, and a one-shot client (its reply has no length) would take a cut reply
        # for a whole one. Zero linger drops it and resets the connection.
        sock = self.transport.get_extra_info("socket")
        if sock is not None and self.ctx.origin is not Origin.UNIX:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()  # close() would wait for the client to read the rest

    # --- what each stage decides ------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When the read timeout strikes (loop time), or None: close now, quietly (idle)."""
        return self.started + self.ctx.limits.read_timeout

    def error_reply(self, status: int, message: str) -> bytes:
        raise NotImplementedError

    def shutdown(self) -> None:
        """The service is stopping: close now if nothing was asked, else once answered."""

    def last_replies(self) -> bytes:
        """What is still owed, with ``503: Shutting down`` for each call still running
        (they are about to be cancelled: whatever they would write is dropped)."""
        return b""

    def cut(self) -> None:
        """The shutdown grace ran out: answer every request still running with the
        documented ``503: Shutting down`` (not 0 bytes), then close."""
        if self.closed:
            return
        # After an error our write side is shut (draining): nothing more can be sent.
        if not self.draining and not self.transport.is_closing():
            if last := self.last_replies():
                self.transport.write(last)
        self.close()

    # --- memory ---------------------------------------------------------------------

    def hold(self, size: int) -> bool:
        """This connection's unfinished request now holds ``size`` bytes.

        ``max_request_bytes`` bounds one request; this bounds them all together
        (``max_buffered_bytes``, counted in ``stats.buffered_bytes``): the connection whose
        bytes take the total past it is refused with a 503 and drops what it held, so a
        crowd of clients sending large requests slowly cannot hold unbounded memory.
        """
        if size == self.held:
            return True
        stats = self.ctx.stats
        grew = size > self.held
        stats.buffered_bytes += size - self.held
        self.held = size
        limit = self.ctx.limits.max_buffered_bytes
        if not grew or stats.buffered_bytes <= limit:
            return True
        stats.buffered_bytes -= size
        self.held = 0
        stats.refused["buffer_full"] += 1
        log.warning(
            "refused %s %s: unfinished requests hold more than %d bytes",
            self.ctx.origin.value, self.peer or "local", limit,
        )  # fmt: skip
        self.fail(503, f"Too many bytes in unfinished requests (limit {limit})")
        return False

    # --- deadlines --------------------------------------------------------------------

    def stop_timers(self) -> None:
        if self.deadline is not None:
            self.ctx.deadlines.cancel(self, self.deadline)
            self.deadline = None

    def arm_deadline(self, due: float) -> None:
        deadlines = self.ctx.deadlines
        if self.deadline is not None:
            if self.deadline <= deadlines.slot(due):
                return
            deadlines.cancel(self, self.deadline)
        self.deadline = deadlines.arm(self, due)

    def deadline_passed(self) -> None:
        """Read timeout (request not complete in time) and idle timeout, one deadline."""
        self.deadline = None
        if self.closed or self.draining:
            return
        now = self.loop.time()
        due = self.next_deadline(now)
        if due is None:
            self.close()
            return
        if due <= now:
            limits = self.ctx.limits
            self.ctx.stats.refused["read_timeout"] += 1
            log.info("read timeout: %s %s", self.ctx.origin.value, self.peer or "local")
            self.fail(408, f"Request not received within {limits.read_timeout:g} s")
            return
        self.deadline = self.ctx.deadlines.arm(self, due)

    # --- closing ----------------------------------------------------------------------

    def fail(self, status: int, message: str) -> None:
        """Send an error and close without losing it to a reset.

        Closing with unread input makes the kernel send RST, which can destroy the reply
        before the client reads it; so we half-close, discard what still arrives, and close
        when the client does (or after a short linger).
        """
        if self.closed:
            return
        self.draining = True
        self.stop_timers()
        self.hold(0)  # the unfinished request is given up: it no longer counts
        transport = self.transport
        transport.write(self.error_reply(status, message))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(min(self.ctx.limits.read_timeout, 2.0), self.close)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
