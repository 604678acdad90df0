"""The HTTP listener: aiohttp's TCP site with the socket protocol's limits, and its log.

aiohttp has no limit on open connections, so a client opening many and sending nothing
(slow loris) took every file descriptor the process had, the socket protocol's
included. Here ``[limits] max_connections`` bounds the HTTP connections too (counted
apart from the socket protocol's); one over it gets a 503 as JSON and is closed, as
uvicorn's ``limit_concurrency`` does. Off loopback, a peer outside ``allow`` is refused
(403) as it is accepted, before it holds a slot. The deadlines for the request head and the idle
time between requests are aiohttp's keep-alive timer (set in api.py), which also runs
from a connection's opening; the body's is in guard.py.

The log (``RequestLog``): with ``-v`` a debug line per request; always, an audit line
per write (who added, cancelled, deleted what) and a warning per refused credential
(a flood of them a line a minute). It also counts every request answered, by route,
method and status, and its seconds by route, for /metrics (``Stats.http_requests``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import urljoin

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_server import Server

from bgservice.access import AccessList
from bgservice.http.guard import unmatched
from bgservice.http.origins import SAFE_METHODS
from bgservice.http.replies import PLAIN, error_response
from bgservice.logs import Sparse
from bgservice.stats import Stats

log = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 16384  # bytes of a refused request read before the 503 goes out anyway
WAIT = 1.0  # seconds a refused connection gets to send its request head
LOG_EVERY = 60.0  # seconds between log lines about refused connections


def _refusal(status: int, message: str) -> bytes:
    """A whole reply of ``status`` (503 or 403) for a connection refused as it opens."""
    body = error_response(status, message).body
    assert isinstance(body, bytes)
    # Written as bytes, past aiohttp: the headers every other reply gets, added here.
    extra = "".join(f"{name}: {value}\r\n" for name, value in PLAIN.items())
    line = "503 Service Unavailable\r\nRetry-After: 1" if status == 503 else "403 Forbidden"
    head = (
        f"HTTP/1.1 {line}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
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


def listening_line(host: str, port: int, access: AccessList, tokens: bool) -> tuple[Any, ...]:
    """The start's line for the HTTP listener (level, format, args): who may use it. Off
    loopback without a token, any host in ``allow`` may add, cancel and delete jobs: a
    WARNING, not an INFO line among the others."""
    guard = "local peers only" if access.networks is None else "allow list enforced"
    token = "bearer token required" if tokens else "no token"
    level = logging.INFO
    if access.networks is not None and not tokens:
        level, token = logging.WARNING, "no token: any host in allow may add, cancel and delete"
    return level, "HTTP API and dashboard: http://%s:%d/ (%s, %s)", host, port, guard, token


class _Gate(asyncio.Protocol):
    """A connection to a listener off loopback, its peer checked against ``allow`` as it
    is accepted, before it takes a slot of ``max_connections``: checked only with the
    request, a peer outside the list, reconnecting as each read timeout dropped it, kept
    the allowed ones out with 503s. Then the connection goes to its real protocol."""

    def __init__(self, site: LimitedSite, server: Server) -> None:
        self.site, self.server = site, server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        if self.site.access.allows(host):
            protocol = self.site.admit(self.server)
        else:
            protocol = self.site.forbid(host)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class LimitedSite(web.TCPSite):
    """A TCP site whose protocol factory refuses connections over ``max_connections``
    (logged at most once a minute), and off loopback those from outside ``allow``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int,
                 refused: Counter[str], access: AccessList) -> None:  # fmt: skip
        super().__init__(runner, host, port, backlog=128)
        self.max_connections = max_connections
        self.refused = refused  # Stats.refused: /metrics' bgservice_refused_total
        self.access = access  # (no networks: loopback, every peer is local)
        self._logged = Sparse(LOG_EVERY)  # the refusals' log line, at most a minute's
        self._reply = _refusal(503, f"Too many connections (at most {max_connections})")
        self._forbidden = _refusal(403, "Forbidden")
        self._outsiders = Sparse(LOG_EVERY)  # (as the socket protocol's: a line a minute)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._protocol(server), self._host, self._port, backlog=self._backlog
        )

    def _protocol(self, server: Server) -> Any:
        if self.access.networks is not None:
            return _Gate(self, server)
        return self.admit(server)

    def forbid(self, host: str | None) -> _Refuse:
        """The protocol of a connection from ``host``, outside ``allow``: a 403's."""
        self.refused["http_forbidden"] += 1
        if refused := self._outsiders.tick(time.monotonic()):
            log.warning("HTTP: refused connection from %s: not in allow list (%d refused "
                        "since the last line)", host, refused)  # fmt: skip
        return _Refuse(self._forbidden)

    def admit(self, server: Server) -> Any:
        """The connection's protocol: aiohttp's, or a 503's over ``max_connections``."""
        if len(server.connections) < self.max_connections:
            return server()
        self.refused["http_too_many_connections"] += 1
        if refused := self._logged.tick(time.monotonic()):
            log.warning(
                "HTTP: %d connections open ([limits] max_connections): refusing more with "
                "503 (%d refused since the last line)", len(server.connections), refused,
            )  # fmt: skip
        return _Refuse(self._reply)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REFUSED = (401, 403)  # a credential, a peer, a Host or an Origin refused
# The methods /metrics labels as they are (RFC 9110's and PATCH); others (WebDAV's, and
# any token at all with aiohttp's pure-Python parser) count as one, "other": a label per
# method sent would let any client grow the series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                     "TRACE"})  # fmt: skip
OTHER_METHOD = "other"  # (no method of METHODS is lower case)
UNMATCHED = "unmatched"  # the route label of a request no route took (no template is)


class RequestLog:
    """aiohttp middleware (the outermost): one line per request as it ends, and its count
    and seconds in ``stats``. Reads ask for a level check only unless refused; the token's
    name is logged, never its secret."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._refusals = {code: Sparse(LOG_EVERY, partial(_more, code)) for code in REFUSED}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        write = request.method not in SAFE_METHODS
        start = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect, raised past the error middleware
            self._said(request, exc, start, write)
            raise
        self._said(request, response, start, write)
        return response

    def _said(
        self, request: web.Request, response: web.StreamResponse, start: float, write: bool
    ) -> None:
        status, seconds = response.status, time.perf_counter() - start
        self._count(request, status, seconds)
        if status in REFUSED:
            if self._refusals[status].tick(time.monotonic()):  # (those held back: _more)
                log.warning("HTTP %s: %d %s", _who(request), status, _message(response))
        elif write or log.isEnabledFor(logging.DEBUG):
            made = response.headers.get("Location", "")  # an added job or schedule
            made = made and urljoin(request.path, made)  # (relative: as the client reads it)
            log.log(logging.INFO if write else logging.DEBUG, "HTTP %s: %d%s %.2fms",
                    _who(request), status, f" {made}" if made else "",
                    seconds * 1000)  # fmt: skip

    def _count(self, request: web.Request, status: int, seconds: float) -> None:
        """/metrics' bgservice_http_requests_total and bgservice_http_request_seconds."""
        route = route_label(request)
        method = request.method if request.method in METHODS else OTHER_METHOD
        self.stats.http_requests[route, method, str(status)] += 1
        self.stats.http_durations.observe((route,), seconds)


def route_label(request: web.Request) -> str:
    """The route's template (``/api/v1/jobs/{id}``), never the path: a label per job id
    would be a series per job. A path no route takes (a 404, a 405) is ``unmatched``."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.handler is unmatched:
        return UNMATCHED
    return resource.canonical


def _who(request: web.Request) -> str:
    """Method, path (as sent: percent escapes stay, so no line break gets into the log)
    with its query's parameter names but not their values (a token sent as
    ``?access_token=`` went into the log), peer and token name."""
    token = request.get("token")
    name = f"token {token.name}" if token is not None else "no token"
    path, mark, query = request.raw_path.partition("?")
    names = "&".join(k + ("=*" if "=" in p else "") for p in query.split("&")
                     for k in (p.partition("=")[0],))  # fmt: skip
    return f"{request.method} {(path + mark + names)[:200]} from {request.remote} ({name})"


def _message(response: web.StreamResponse) -> str:
    """An error reply's message (ours are JSON: replies.error_response)."""
    body = getattr(response, "body", None)
    try:
        return str(json.loads(body)["error"]["message"])[:200] if body else ""
    except (ValueError, TypeError, KeyError):
        return ""


def _more(code: int, count: int) -> None:
    log.warning("HTTP: %d more requests refused with %d since the last line", count, code)


class _ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL byte in a header, a broken request
    line) at ERROR with a traceback, though it answers 400: the client's mistake, which
    anyone who can connect can make at will. One INFO line says what it was instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):  # a body that did not decode: the
            exc = exc.__cause__  # handler answered 400; aiohttp met it again draining it
        if isinstance(exc, HttpProcessingError) and exc.code < 500:
            detail = " ".join(line.strip() for line in str(exc.message).splitlines())
            record.args = (record.getMessage(), exc.code, detail[:300])
            record.msg = "%s: %d %s"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def server_log() -> logging.Logger:
    """The logger aiohttp's connection handler reports to, with client mistakes tamed."""
    server = logging.getLogger(f"{__name__}.server")
    if not any(isinstance(f, _ClientMistakes) for f in server.filters):
        server.addFilter(_ClientMistakes())
    return server
