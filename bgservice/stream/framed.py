"""The framed form: after the preface, length-prefixed requests, pipelined, each answered
with a status and a length in request order (docs/protocol.md).

At most ``max_pipeline`` requests of a connection are in progress (or answered, waiting
for an earlier one's reply); frames read beyond that wait in ``backlog`` with reading
paused, and no more than that many are started in one turn of the loop, so a client
writing thousands of frames at once neither runs them all at once nor holds up the
other connections."""

from __future__ import annotations

import asyncio
import os
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
    backlog: deque[bytes | Oversized] | None = None  # read, not started (max_pipeline)
    backlog_bytes = 0
    backlog_soon = False  # its next part is served in the next turn of the loop
    frame_started: float | None = None  # loop time the unfinished frame began
    last_reply = 0.0  # loop time every request so far was answered
    eof = False
    stopping = False  # the service is shutting down: close once answered
    # An error that ends the connection (408, 503) while earlier requests still wait
    # for their replies: it is sent after them, in request order, as the last reply.
    last_words: tuple[int, str] | None = None

    def start(self, previous: StreamProtocol, rest: bytes) -> None:
        """Take the connection over after its preface, with the bytes that followed it."""
        sock = previous.transport.get_extra_info("socket")
        self.fd = -1 if sock is None else sock.fileno()  # for _send
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
        if not self.pending and not self.backlog:
            self.close()
        return True  # keep our side open: replies still have to go out

    # --- StreamProtocol ---------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        limits = self.ctx.limits
        if self.frame_started is not None:
            return self.frame_started + limits.read_timeout
        if self.pending or self.backlog:
            return now + limits.idle_timeout
        # Idle since its last request arrived or its last reply went, whichever is later
        # (a call longer than idle_timeout must not leave the connection about to close).
        due = max(self.last_data, self.last_reply) + limits.idle_timeout
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
        if not self.pending and not self.backlog:  # (frames read but not started: owed too)
            super().fail(status, message)
            return
        self.last_words = (status, message)  # sent by _flush when the line is empty
        self.stop_timers()  # each waiting call has its own timeout
        # The unfinished request is given up: its bytes are let go, not only uncounted
        # (a call still running before it would hold them as long as it runs).
        self.decoder = FrameDecoder(self.ctx.limits.max_request_bytes)
        self.hold(self.backlog_bytes)

    def shutdown(self) -> None:
        self.stopping = True
        if not self.pending and not self.backlog:
            self.close()

    def last_replies(self) -> bytes:
        """Every reply owed, in order: a call that finished gets its own (it may have
        stored a job: a 503 would make the client add it again), the others 503."""
        out: list[bytes] = []
        for entry in self.pending:
            if type(entry) is bytes:
                out.append(entry)
            elif isinstance(entry, tuple) and entry[0].done() and not entry[0].cancelled():
                out.append(self._reply_of(*entry))
            else:
                out.append(self.error_reply(503, "Shutting down"))
        out += [self.error_reply(503, "Shutting down")] * len(self.backlog or ())
        self.pending.clear()
        self.backlog = None
        return b"".join(out)

    # --- requests and replies -----------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        decoder = self.decoder
        was_partial = decoder.partial
        items = decoder.feed(data)
        if items:
            if self.backlog or len(self.pending) + len(items) > self.ctx.limits.max_pipeline:
                if self.backlog is None:
                    self.backlog = deque()
                self.backlog.extend(items)
                self.backlog_bytes += sum(len(i) for i in items if type(i) is bytes)
                self._serve_backlog()
            else:
                self._start(items)
        if not self.hold(decoder.buffered + self.backlog_bytes):
            return
        if not decoder.partial:
            self.frame_started = None
        elif items or not was_partial:  # a new frame began in this chunk
            self.frame_started = self.last_data
            self.arm_deadline(self.last_data + self.ctx.limits.read_timeout)
        if len(self.pending) >= self.ctx.limits.max_pipeline:
            self.flow.busy(True)

    def _start(self, items: list[bytes | Oversized] | deque[bytes | Oversized]) -> None:
        for item in items:
            if type(item) is bytes:
                self._serve(*split_request(item))
            else:
                assert isinstance(item, Oversized)
                limit = self.ctx.limits.max_request_bytes
                message = f"Request too large ({item.length} bytes, limit {limit})"
                self.pending.append(framed_reply(413, message.encode()))
        if items and (not self.pending or type(self.pending[0]) is bytes):
            # What was served at once goes out in one send. (A task at the head of the
            # line flushes when it is done: its callback.)
            self._flush()

    def _serve_backlog(self) -> None:
        """Start as many waiting frames as there is room for, at most ``max_pipeline``
        in this turn; reading stays paused while any wait."""
        self.backlog_soon = False
        backlog = self.backlog
        if backlog is None or self.closed:
            return
        limit = self.ctx.limits.max_pipeline
        batch = [backlog.popleft() for _ in range(min(limit - len(self.pending), len(backlog)))]
        self.backlog_bytes -= sum(len(i) for i in batch if type(i) is bytes)
        if backlog:
            self.flow.busy(True)
        else:  # _start's flush finds none waiting: it resumes reading, or ends
            self.backlog = None
            self.hold(self.decoder.buffered)
        if batch:
            self._start(batch)
        if self.backlog and not self.backlog_soon and len(self.pending) < limit:
            self.backlog_soon = True  # room, but this turn's share is done
            self.loop.call_soon(self._serve_backlog)

    def _serve(self, module: str, payload: bytes) -> None:
        """Serve one request: its reply now if it needs no wait (bgservice.eager), else
        the task that finishes it, in line for ``_flush``."""
        chunks: list[bytes] = []
        request: Request = self.ctx.request(module, payload, self.peer, chunks.append)
        done, reply = self.ctx.start(request)
        if not done:
            self.pending.append((reply, chunks))
            reply.add_done_callback(self._flush)
        elif reply is None:  # a bug of ours, reported by ctx.start
            self.pending.append(framed_reply(500, b"Internal"))
        else:
            self.pending.append(framed_reply(*whole(reply, chunks)))

    def _flush(self, _: object = None) -> None:
        ready = self._finished()
        if self.closed or self.draining:  # an error ended it; our write side is shut
            return
        if ready:
            self._send(ready[0] if len(ready) == 1 else b"".join(ready))
        pending = self.pending
        if self.backlog:  # room for more of them now
            if not self.backlog_soon and len(pending) < self.ctx.limits.max_pipeline:
                self.backlog_soon = True
                self.loop.call_soon(self._serve_backlog)
            return
        if self.flow.too_busy and len(pending) < self.ctx.limits.max_pipeline:
            self.flow.busy(False)
        if not pending:
            self.last_reply = self.loop.time()
            self._answered()

    def _send(self, data: bytes) -> None:
        """``data`` to the peer: straight to the socket with ``os.write`` while the
        transport has nothing queued, the rest (or all, when it has) through it. uvloop
        writes holding the GIL, and on loopback a send does the reader's TCP work too:
        the store's thread waited on it (the lock-step queue row, py-spy --gil: 41 us a
        job); ``os.write`` releases the GIL for the system call (alternating rounds of
        that row: 3,705 -> 4,099 jobs/s). Only while the transport is open: after a
        close the descriptor's number may be another connection's."""
        transport = self.transport
        if self.fd >= 0 and not transport.is_closing() and not transport.get_write_buffer_size():
            try:
                sent = os.write(self.fd, data)
            except OSError:  # would block, or a reset: the transport's write knows what to do
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def _finished(self) -> list[bytes]:
        """The replies at the head of the line that are finished, taken out of it: only
        those can be written (replies go in request order). Pipelined requests often
        finish together: their replies share one send."""
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
            if not task.cancelled():
                ready.append(self._reply_of(task, chunks))
        return ready

    @staticmethod
    def _reply_of(task: asyncio.Task[Reply], chunks: list[bytes]) -> bytes:
        if task.exception() is not None:  # a bug of ours: reported by the task's callback
            return framed_reply(500, b"Internal")
        return framed_reply(*whole(task.result(), chunks))

    def _answered(self) -> None:
        """Every request so far is answered: end with the error kept for last, or close
        if the client or the service is done."""
        if self.last_words is not None:
            StreamProtocol.fail(self, *self.last_words)
        elif self.eof or self.stopping:
            self.close()
