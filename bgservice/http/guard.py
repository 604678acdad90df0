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
_CONTINUE_LINE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A request item: its Expect header, for the guard to answer; CONTINUED once it sent
# 100 Continue.
EXPECT, CONTINUED = "bgservice.expect", "continued"


async def expect_later(request: web.Request) -> None:
    """Every route's expect handler: the expectation is kept for the guard, which
    answers it after its checks (an unknown one: a 417, as aiohttp's own handler has it,
    but in JSON, logged and counted as any reply)."""
    if request.version == HttpVersion11:  # (HTTP/1.0 has no Expect: ignored)
        request[EXPECT] = request.headers.get("Expect", "").strip().lower()


# The last route: any path and method no other route takes. aiohttp answers those with
# a route of its own, whose expect handler sent 100 Continue before any check; this one
# answers them as aiohttp did (404, or 405 with Allow), after the guard.
UNMATCHED_PATH = "/{unmatched:(?s:.*)}"  # (?s: a path with %0A in it too)


async def unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]  # (the methods it takes here)
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


@web.middleware
async def close_unasked(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A reply to a request whose client waits for 100 Continue, sent instead of it: the
    body was never asked for, so the connection ends with the reply (kept, the next
    request's bytes were read as that body: a 400, then closed)."""
    response = await handler(request)
    if request.get(EXPECT, CONTINUED) != CONTINUED and request.body_exists:
        response.force_close()
    return response


class Routes:
    """The router's ``add_*`` with ``expect_later`` on every route (aiohttp takes it per
    route only); ``unmatched`` last."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self.router = router

    def add_unmatched(self) -> None:
        self.router.add_route("*", UNMATCHED_PATH, unmatched, expect_handler=expect_later)

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
        public = request.path in PUBLIC or request.path.startswith("/dashboard/")
        refusal = self._refusal(request, public)
        if refusal is not None:
            return refusal
        handler_of = request.match_info.handler
        if handler_of is unmatched or request.match_info.http_exception is not None:
            return await handler(request)  # a 404 or 405: its query and body go unread
        if not public:
            inputs.known_parameters(request, self.parameters.get(handler_of, frozenset()))
        if request.body_exists:
            coding = request.headers.get("Content-Encoding", "identity").lower().strip()
            if coding not in ENCODINGS:  # RFC 9110: 415; aiohttp took it for identity
                return error_response(
                    415, f"Content-Encoding {coding[:40]!r}: send gzip, deflate or none"
                )
            await self._read_body(request)
        return await handler(request)

    def _refusal(self, request: web.Request, public: bool) -> web.StreamResponse | None:
        """Who may not ask: off the allow list, an expectation not met, a browser's
        cross-site request (no token configured), no token or one of another scope."""
        if not self.access.allows(request.remote):
            return error_response(403, "Forbidden")
        if request.get(EXPECT, "100-continue") != "100-continue":
            expected = request[EXPECT][:40]
            return error_response(417, f"Expectation Failed: {expected!r} (only 100-continue)")
        if not self.tokens.configured:
            refusal = self.browsers.refusal(request.method, request.headers)
            return None if refusal is None else error_response(403, f"Forbidden: {refusal}")
        if public:
            return None
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
        return None

    async def _read_body(self, request: web.Request) -> None:
        """Read the body within read_timeout (aiohttp has no deadline of its own: a
        client sending a byte a minute held its connection for ever); handlers then
        read it from memory. One announced larger than max_request_bytes is a 413 at
        once, unread (a compressed one can still grow past it: aiohttp counts that)."""
        if (request.content_length or 0) > self.limits.max_request_bytes:
            raise self._too_large()
        if request.get(EXPECT) == "100-continue":
            request[EXPECT] = CONTINUED
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
