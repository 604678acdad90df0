"""The original's one-shot form: one request per connection, the reply, then close.

Where a one-shot request ends (docs/protocol.md, "Finding the end of a one-shot request"):
at the client's half-close; for clients that never half-close (the original's PHP
examples), at once when the request came in one read shorter than one segment of the
connection (a single write that small always arrives whole, in one segment), else once no
byte has arrived for ``quiet_ms`` (``quiet_large_ms`` once the request is over
``large_bytes``, where a large write arrives in several bursts).
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import socket
import termios

from bgservice.origin import Origin
from bgservice.protocol import OK, Reply, one_shot_error, split_request
from bgservice.stream.base import StreamProtocol

# The longest first read taken as a whole request: one Ethernet segment's payload. A longer
# write never arrives in a smaller first piece: over a network its first segment is a full
# MSS; over loopback (MSS 32 KiB or more) and Unix sockets its first piece is bounded by
# the sender's send buffer, which Linux never makes smaller than about 4.6 KB. (Found the
# hard way: with the loopback MSS as the bound, a 900 KB write was once read as a 16 KB
# first piece under load, and cut.)
SHORT_WRITE = 1448
# The longest reply closed on at once: what TCP sends in its first flight (an initial
# window of 10 segments), so none of it waits in the kernel when the connection closes. A
# longer one may: a byte the client writes after the close then makes the kernel reset
# the connection and drop the rest of the reply (docs/protocol.md, One-shot requests).
SENT_AT_ONCE = 10 * SHORT_WRITE


class OneShot(StreamProtocol):
    """A connection that carries one request, in the original's format."""

    buf: bytearray
    done = False  # the request is complete
    eof = False  # the client half-closed
    trailing = False  # bytes came after the request's end
    quiet_timer: asyncio.TimerHandle | None = None

    def start(self, previous: StreamProtocol, head: bytes, eof: bool, reads: int) -> None:
        """Take the connection over with the bytes read so far (in ``reads`` reads), and
        whether the client half-closed already."""
        self.take_over(previous)
        self.eof = eof
        whole = eof or (reads == 1 and self._whole_write(len(head)))
        if whole and len(head) <= self.ctx.limits.max_request_bytes:
            if eof:
                self.ctx.stats.one_shot_half_close += 1
            else:
                self.ctx.stats.one_shot_short_write += 1
            self._complete(head)
            return
        self.buf = bytearray()
        self.arm_deadline(self.started + self.ctx.limits.read_timeout)
        self._add(head)

    def _whole_write(self, size: int) -> bool:
        """True when a first read of ``size`` bytes must be a whole request: shorter than
        one segment, it was one write (a longer write comes as full segments first)."""
        if self.ctx.limits.one_shot_end != "segment" or size > SHORT_WRITE:
            return False
        return self.ctx.origin is Origin.UNIX or size < self._segment()

    def _segment(self) -> int:
        """The connection's TCP segment size (0: unknown). Asked of the kernel once per
        loopback host (getting at the socket costs four system calls a connection), and
        for every connection of a network peer: its path may change (a VPN, a new MTU,
        several hosts behind one NAT), and a size kept from before cut requests."""
        segments = self.ctx.segments
        host = self.peer.rpartition(":")[0]
        size = segments.get(host)
        if size is None:
            sock = self.transport.get_extra_info("socket")
            try:
                size = int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
            except (OSError, AttributeError):
                size = 0  # no segment size: the quiet gap decides
            if _loopback(host):
                if len(segments) >= 1024:  # bounded, whatever the names
                    segments.clear()
                segments[host] = size
        return size

    # --- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.draining or self.done:
            if self.done and not self.trailing:  # (what was cut off shows here)
                self.trailing = True
                self.ctx.stats.one_shot_after_end += 1
            return
        self.last_data = self.loop.time()
        self._add(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.draining:
            self.close()
        elif not self.done:
            self.ctx.stats.one_shot_half_close += 1
            self._complete(bytes(self.buf))
        return True  # keep our side open: the reply still has to go out

    # --- StreamProtocol ---------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        return self.started + self.ctx.limits.read_timeout

    def error_reply(self, status: int, message: str) -> bytes:
        return one_shot_error(status, message)

    def last_replies(self) -> bytes:
        return self.error_reply(503, "Shutting down") if self.done else b""

    def fail(self, status: int, message: str) -> None:
        self.buf = bytearray()  # given up: let go now, not when the connection closes
        super().fail(status, message)

    def stop_timers(self) -> None:
        super().stop_timers()
        if self.quiet_timer is not None:
            self.quiet_timer.cancel()
            self.quiet_timer = None

    # --- the request --------------------------------------------------------------------

    def _add(self, data: bytes) -> None:
        self.buf += data
        limits = self.ctx.limits
        if len(self.buf) > limits.max_request_bytes:
            self.buf = bytearray()
            self.fail(413, f"Request too large (limit {limits.max_request_bytes} bytes)")
            return
        if not self.hold(len(self.buf)):
            self.buf = bytearray()
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
        elif self._unread():  # the loop was held up: the gap is its, not the client's
            self.quiet_timer = self.loop.call_later(self._quiet(), self._check_quiet)
        else:
            self.ctx.stats.one_shot_gap += 1
            self._complete(bytes(self.buf))

    def _unread(self) -> bool:
        """Bytes the kernel holds that the loop has not read yet. After a loop turn held
        up past the gap, its timers run before its reads: the request's next bytes, there
        all along, were cut off (8 ms handlers cut 28 of 30 60 KB requests)."""
        try:
            fd = self.transport.get_extra_info("socket").fileno()
            return fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0") != b"\0\0\0\0"
        except (OSError, AttributeError, ValueError):
            return False

    def _complete(self, raw: bytes) -> None:
        self.done = True
        if self.deadline is not None or self.quiet_timer is not None:
            self.stop_timers()
        module, data = split_request(raw)
        if self.held:
            self.buf = bytearray()
            self.hold(0)
        request = self.ctx.request(module, data, self.peer, self._write)
        # Served like a frame (framed.py): most calls finish in their first step, and are
        # answered here, without a task or a coroutine of the connection's own.
        done, reply = self.ctx.start(request)
        if not done:
            reply.add_done_callback(self._answer_later)
        elif reply is not None:  # None: a bug of ours, reported by ctx.start
            self._answer(reply)
        else:
            self._answer((500, b"Internal"))

    def _answer_later(self, task: asyncio.Task[Reply]) -> None:
        if not task.cancelled():  # cancelled: the service is stopping (see cut)
            self._answer(task.result() if task.exception() is None else (500, b"Internal"))

    def _answer(self, reply: Reply) -> None:
        if self.closed:
            return
        transport = self.transport
        status, body = reply
        if status != OK:
            body = one_shot_error(status, body.decode("utf-8", "replace"))
        transport.write(body)
        # The end of the reply (FIN) sent now, behind it: close() sends it only after the
        # connection's callbacks have run, and by then the client that read the reply has
        # gone to sleep waiting for the end, so the FIN had to wake it a second time
        # (perf: 8 us of kernel time a connection; alternating rounds of the original's
        # clients' row: 48.5 -> 46.2 us of service CPU a connection, p50 191 -> 183 us).
        # (Not on a transport an error is closing: uvloop raises there.)
        if not transport.is_closing():
            transport.write_eof()
        if self.eof or not (
            self.trailing or len(body) > SENT_AT_ONCE or transport.get_write_buffer_size()
        ):
            transport.close()
            return
        # Bytes came after the request, or the reply may still be going out (reading
        # paused meanwhile; or all of it in the kernel's buffer, not sent yet): closing with
        # input unread, or input coming after the close, makes the kernel reset the
        # connection and drop what is not sent yet (a PHP client's 4 MB reply, cut at 2.3
        # MB, because of a newline written after the request). As fail() does: input
        # discarded until the client closes, or a while.
        self.draining = True
        if self.flow is not None:
            self.flow.busy(False)
            self.flow.blocked(False)
        self.loop.call_later(self.ctx.limits.read_timeout, self.close)

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
