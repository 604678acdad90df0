"""The HTTP listener: aiohttp's TCP site with the socket protocol's limits.

aiohttp has no limit on open connections, so a client opening many and sending nothing
(slow loris) took every file descriptor the process had, the socket protocol's
included. Here ``[limits] max_connections`` bounds the HTTP connections too (counted
apart from the socket protocol's); one over it gets a 503 as JSON and is closed, as
uvicorn's ``limit_concurrency`` does. The deadlines for the request head and the idle
time between requests are aiohttp's keep-alive timer (set in api.py), which also runs
from a connection's opening; the body's is in api.py's guard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.web_server import Server

from bgservice.http.replies import PLAIN, error_response
from bgservice.logs import Sparse

log = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 16384  # bytes of a refused request read before the 503 goes out anyway
WAIT = 1.0  # seconds a refused connection gets to send its request head
LOG_EVERY = 60.0  # seconds between log lines about refused connections


def _refusal(limit: int) -> bytes:
    body = error_response(503, f"Too many connections (at most {limit})").body
    assert isinstance(body, bytes)
    # Written as bytes, past aiohttp: the headers every other reply gets, added here.
    extra = "".join(f"{name}: {value}\r\n" for name, value in PLAIN.items())
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    """One connection over the limit: its request head is read (closing a socket with
    unread bytes sends a reset, which may reach the client before the reply), then
    the 503 is written and the connection closed."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(WAIT, self.answer)

    def data_received(self, data: bytes) -> None:
        self.head += data
        if HEAD_END in self.head or len(self.head) > MAX_HEAD:
            self.answer()

    def answer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.reply)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


class LimitedSite(web.TCPSite):
    """A TCP site whose protocol factory refuses connections over ``max_connections``
    (logged at most once a minute)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int,
                 refused: Counter[str]) -> None:  # fmt: skip
        super().__init__(runner, host, port, backlog=128)
        self.max_connections = max_connections
        self.refused = refused  # Stats.refused: /metrics' bgservice_refused_total
        self._logged = Sparse(LOG_EVERY)  # the refusals' log line, at most a minute's
        self._reply = _refusal(max_connections)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._protocol(server), self._host, self._port, backlog=self._backlog
        )

    def _protocol(self, server: Server) -> Any:
        if len(server.connections) < self.max_connections:
            return server()
        self.refused["http_too_many_connections"] += 1
        if refused := self._logged.tick(time.monotonic()):
            log.warning(
                "HTTP: %d connections open ([limits] max_connections): refusing more with "
                "503 (%d refused since the last line)", len(server.connections), refused,
            )  # fmt: skip
        return _Refuse(self._reply)
