"""The framed form: after the preface, length-prefixed requests, pipelined, each answered
with a status and a length in request order (docs/protocol.md)."""

from __future__ import annotations

import asyncio
from collections import deque

from bgservice.protocol import (
    PREFACE,
    FrameDecoder,
    Oversized,
    Reply,
    framed_reply,
    split_request,
    whole,
)
from bgservice.request import Request
from bgservice.stream.base import FlowControl, StreamProtocol


class Framed(StreamProtocol):
    """A connection that carries framed requests until the client closes it."""

    decoder: FrameDecoder
    flow: FlowControl
    # Replies in request order: the bytes of one served at once, or the task serving it
    # with the chunks its handler streams (sent in front of its reply).
    pending: deque[bytes | tuple[asyncio.Task[Reply], list[bytes]]]
    frame_started: float | None = None  # loop time the unfinished frame began
    eof = False
    stopping = False  # the service is shutting down: close once answered
    # An error that ends the connection (408, 503) while earlier requests still wait
    # for their replies: it is sent after them, in request order, as the last reply.
    last_words: tuple[int, str] | None = None

    def start(self, previous: StreamProtocol, rest: bytes) -> None:
        """Take the connection over after its preface, with the bytes that followed it."""
        self.decoder = FrameDecoder(self.ctx.limits.max_request_bytes)
        self.pending = deque()
        self.take_over(previous)
        self.flow = self.flow_control()
        self.arm_deadline(self.loop.time() + self.ctx.limits.idle_timeout)
        self.transport.write(PREFACE)
        self._frames(rest)

    # --- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.draining or self.last_words is not None:
            return
        self.last_data = self.loop.time()
        self._frames(data)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.pending:
            self.close()
        return True  # keep our side open: replies still have to go out

    # --- StreamProtocol ---------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        limits = self.ctx.limits
        if self.frame_started is not None:
            return self.frame_started + limits.read_timeout
        if self.pending:
            return now + limits.idle_timeout
        due = self.last_data + limits.idle_timeout
        return None if due <= now else due

    def error_reply(self, status: int, message: str) -> bytes:
        return framed_reply(status, message.encode())

    def fail(self, status: int, message: str) -> None:
        """End the connection with an error, after the replies earlier requests are owed
        (a client pairs replies with requests in order: sent ahead of them, the error
        would be read as the answer to the oldest)."""
        if self.closed or self.draining or self.last_words is not None:
            return
        self._flush()  # what is finished goes out first
        if not self.pending:
            super().fail(status, message)
            return
        self.last_words = (status, message)  # sent by _flush when the line is empty
        self.stop_timers()  # each waiting call has its own timeout
        self.hold(0)  # the unfinished request is given up: it no longer counts

    def shutdown(self) -> None:
        self.stopping = True
        if not self.pending:
            self.close()

    def unanswered(self) -> int:
        self._flush()  # replies already finished go out first, in order
        count = len(self.pending)
        self.pending.clear()
        return count

    # --- requests and replies -----------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        decoder = self.decoder
        was_partial = decoder.partial
        items = decoder.feed(data)
        for item in items:
            if isinstance(item, Oversized):
                limit = self.ctx.limits.max_request_bytes
                message = f"Request too large ({item.length} bytes, limit {limit})"
                self.pending.append(framed_reply(413, message.encode()))
                continue
            self._serve(*split_request(item))
        if items and (not self.pending or type(self.pending[0]) is bytes):
            # What was served at once goes out in one send. (A task at the head of the
            # line flushes when it is done: its callback.)
            self._flush()
        if not self.hold(decoder.buffered):
            return
        if not decoder.partial:
            self.frame_started = None
        elif items or not was_partial:  # a new frame began in this chunk
            self.frame_started = self.last_data
            self.arm_deadline(self.last_data + self.ctx.limits.read_timeout)
        if len(self.pending) >= self.ctx.limits.max_pipeline:
            self.flow.busy(True)

    def _serve(self, module: str, payload: bytes) -> None:
        """Serve one request: its reply now if it needs no wait (bgservice.eager), else
        the task that finishes it, in line for ``_flush``."""
        chunks: list[bytes] = []
        request: Request = self.ctx.request(module, payload, self.peer, chunks.append)
        done, reply = self.ctx.start(self.ctx.commands.call(request))
        if not done:
            self.pending.append((reply, chunks))
            reply.add_done_callback(self._flush)
        elif reply is None:  # a bug of ours, reported by ctx.start
            self.pending.append(framed_reply(500, b"Internal"))
        else:
            self.pending.append(framed_reply(*whole(reply, chunks)))

    def _flush(self, _: object = None) -> None:
        # Replies go out in request order: only a finished head of the line is written.
        # Pipelined requests often finish together: their replies share one send.
        ready: list[bytes] = []
        pending = self.pending
        while pending:
            head = pending[0]
            if type(head) is bytes:
                ready.append(head)
                pending.popleft()
                continue
            assert isinstance(head, tuple)
            task, chunks = head
            if not task.done():
                break
            pending.popleft()
            if task.cancelled():
                continue
            if task.exception() is not None:  # a bug of ours: reported by the task's callback
                ready.append(framed_reply(500, b"Internal"))
            else:
                ready.append(framed_reply(*whole(task.result(), chunks)))
        if self.closed or self.draining:  # an error ended it; our write side is shut
            return
        if ready:
            self.transport.write(ready[0] if len(ready) == 1 else b"".join(ready))
        if self.flow.too_busy and len(pending) < self.ctx.limits.max_pipeline:
            self.flow.busy(False)
        if not pending:
            self._answered()

    def _answered(self) -> None:
        """Every request so far is answered: end with the error kept for last, or close
        if the client or the service is done."""
        if self.last_words is not None:
            StreamProtocol.fail(self, *self.last_words)
        elif self.eof or self.stopping:
            self.close()
