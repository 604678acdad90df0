"""The gate every HTTP request passes before its route: the ``allow`` list (off loopback),
a browser's cross-site request, the bearer token and its scope, the query's parameters,
then the body (its encoding, its size, read within read_timeout).

A client that sends ``Expect: 100-continue`` hears ``100 Continue`` only once all of these
let its body in. aiohttp's own expect handler sent it as soon as the path matched, before
any check: a client without a token, or one announcing 100 MB, was asked for its body and
refused only after sending it (16 MB read before the 413)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from bgservice.access import AccessList
from bgservice.config import Settings
from bgservice.errors import BadRequest, RequestTimeout, TooLarge
from bgservice.http import inputs
from bgservice.http.origins import BrowserGuard
from bgservice.http.replies import error_response
from bgservice.http.tokens import Tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC = ("/", "/dashboard")  # the dashboard's files: no secrets, no token needed
ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate", "br"})  # br: with Brotli
CONTINUE = "bgservice.continue"  # a request item: its client waits for 100 Continue
_CONTINUE_LINE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def expect_later(request: web.Request) -> web.StreamResponse | None:
    """Every route's expect handler: an unknown expectation is a 417, as aiohttp's own
    handler has it (but in JSON); ``100-continue`` is answered by the guard, after its
    checks."""
    if request.version != HttpVersion11:  # (HTTP/1.0 has no Expect: ignored)
        return None
    expect = request.headers.get("Expect", "").strip().lower()
    if expect != "100-continue":
        return error_response(417, f"Expectation Failed: {expect[:40]!r} (only 100-continue)")
    request[CONTINUE] = True
    return None


class Routes:
    """The router's ``add_*`` with ``expect_later`` on every route (aiohttp takes it per
    route only)."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self.router = router

    def get(self, path: str, handler: Handler) -> None:
        self.router.add_get(path, handler, expect_handler=expect_later)

    def post(self, path: str, handler: Handler) -> None:
        self.router.add_post(path, handler, expect_handler=expect_later)

    def delete(self, path: str, handler: Handler) -> None:
        self.router.add_delete(path, handler, expect_handler=expect_later)


class Guard:
    """The middleware; ``parameters``: the query parameters each handler reads (the
    other routes take none)."""

    def __init__(
        self,
        settings: Settings,
        access: AccessList,
        tokens: Tokens,
        browsers: BrowserGuard,
        parameters: Mapping[Any, frozenset[str]],
    ) -> None:
        self.limits = settings.limits
        self.access = access
        self.tokens = tokens
        self.browsers = browsers
        self.parameters = parameters

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.access.allows(request.remote):
            return error_response(403, "Forbidden")
        if not self.tokens.configured:
            refusal = self.browsers.refusal(request.method, request.headers)
            if refusal is not None:
                return error_response(403, f"Forbidden: {refusal}")
        public = request.path in PUBLIC or request.path.startswith("/dashboard/")
        if self.tokens.configured and not public:
            token = self.tokens.find(request.headers.get("Authorization", ""))
            if token is None:
                return error_response(
                    401, "Unauthorized: send Authorization: Bearer TOKEN",
                    {"WWW-Authenticate": 'Bearer realm="bgservice"'},
                )  # fmt: skip
            request["token"] = token  # (its scope goes out on a refusal too: replies.py)
            if not token.permits(request.method, request.path):
                where = f"{request.method} {request.path}"
                problem = f"token {token.name} has scope {token.scope}: not {where}"
                return error_response(403, f"Forbidden: {problem}")
        if not public and request.match_info.http_exception is None:  # (404, 405: theirs)
            accepted = self.parameters.get(request.match_info.handler, frozenset())
            inputs.known_parameters(request, accepted)
        if request.body_exists:
            coding = request.headers.get("Content-Encoding", "identity").lower().strip()
            if coding not in ENCODINGS:  # RFC 9110: 415; aiohttp took it for identity
                return error_response(
                    415, f"Content-Encoding {coding[:40]!r}: send gzip, deflate or none"
                )
            await self._read_body(request)
        return await handler(request)

    async def _read_body(self, request: web.Request) -> None:
        """Read the body within read_timeout (aiohttp has no deadline of its own: a
        client sending a byte a minute held its connection for ever); handlers then
        read it from memory. One announced larger than max_request_bytes is a 413 at
        once, unread (a compressed one can still grow past it: aiohttp counts that)."""
        if (request.content_length or 0) > self.limits.max_request_bytes:
            raise self._too_large()
        if request.get(CONTINUE):
            await request.writer.write(_CONTINUE_LINE)
            request.writer.output_size = 0  # (not the reply's: as aiohttp's own handler)
        timeout = self.limits.read_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.read()
        except TimeoutError:
            raise RequestTimeout(f"Request body not received within {timeout:g} s") from None
        except web.HTTPRequestEntityTooLarge:  # (its own text names neither limit nor key)
            raise self._too_large() from None
        except (HttpProcessingError, web.RequestPayloadError) as exc:  # e.g. broken gzip
            raise BadRequest(f"the body could not be read ({type(exc).__name__})") from None

    def _too_large(self) -> TooLarge:
        most = self.limits.max_request_bytes
        return TooLarge(f"Request too large (limit {most} bytes, [limits] max_request_bytes)")
