"""A new stream connection: admitted or refused, then handed to the protocol its first
bytes name.

``Sniffer`` checks the peer and the connection limit, reads until the first bytes tell
the two formats apart (docs/protocol.md), and hands the transport over
(``transport.set_protocol``, as uvicorn does for an upgrade) to ``OneShot`` (oneshot.py,
the original's one request per connection) or ``Framed`` (framed.py, pipelined
length-prefixed requests).
"""

from __future__ import annotations

import asyncio
import logging

from bgservice.origin import Origin, peer_address
from bgservice.protocol import PREFACE, Mode, one_shot_error, sniff
from bgservice.stream.base import StreamProtocol
from bgservice.stream.framed import Framed
from bgservice.stream.oneshot import OneShot

log = logging.getLogger(__name__)


class Sniffer(StreamProtocol):
    """A new connection: admit it, then read until its first bytes name its protocol."""

    buf = b""  # what came before the first bytes named the protocol
    reads = 0  # data_received calls so far: one-shot's evidence of a whole write

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        host = None
        if isinstance(peer, tuple):
            host = peer[0]
            self.peer = peer_address(host, peer[1])
        access = ctx.access
        if access.networks is not None and ctx.origin is Origin.TCP and not access.allows(host):
            ctx.stats.refused["tcp_forbidden"] += 1
            if refused := ctx.forbidden.tick(self.started):  # a flood is a line a minute
                log.warning("refused TCP connection from %s: not in allow list (%d refused "
                            "since the last line)", self.peer, refused)  # fmt: skip
            self.fail(403, "Forbidden")
            return
        if len(ctx.connections) >= ctx.limits.max_connections:
            ctx.stats.refused["too_many_connections"] += 1
            self.fail(503, "Too many connections")
            return
        ctx.connections.add(self)
        stats = ctx.stats
        stats.connections += 1
        stats.connections_total += 1
        self.deadline = ctx.deadlines.arm(self, self.started + ctx.limits.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self.draining:
            return
        self.last_data = self.loop.time()
        self.reads += 1
        head = self.buf + data if self.buf else data
        mode = sniff(head)
        if mode is None:
            self.buf = head  # a few bytes of the preface so far
        elif mode is Mode.FRAMED:
            self._hand_over_framed(head[len(PREFACE) :])
        else:
            self._hand_over_one_shot(head, eof=False)

    def eof_received(self) -> bool:
        if self.draining or not self.buf:
            self.close()  # connected and left without a word
        else:
            self._hand_over_one_shot(self.buf, eof=True)
        return True  # keep our side open: the reply still has to go out

    def error_reply(self, status: int, message: str) -> bytes:
        return one_shot_error(status, message)

    def shutdown(self) -> None:
        if not self.buf and not self.draining:
            # Connected, nothing sent yet: its request may be on its way. It gets the
            # documented answer rather than an empty reply (fail: not lost to a reset).
            self.fail(503, "Shutting down")

    def _hand_over_one_shot(self, head: bytes, eof: bool) -> None:
        OneShot(self.ctx).start(self, head, eof, self.reads)

    def _hand_over_framed(self, rest: bytes) -> None:
        Framed(self.ctx).start(self, rest)
