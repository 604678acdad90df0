"""Routes: the JSON API under /api/v1, /metrics and the dashboard's files.

Every route reads or drives the same objects the socket protocol does (the built-in
commands' modules and stats, the job queue's public methods), so an HTTP answer and a socket
answer never disagree. The API follows Google's API design guide where it can: AIP-193
errors (bgservice/http/replies.py) with the socket protocol's codes as HTTP statuses,
AIP-136 custom methods (``POST /jobs/{id}:cancel``), AIP-158 page tokens
(bgservice/http/paging.py) and a standard Delete. docs/http.md says what changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from bgservice.access import AccessList
from bgservice.commands import Commands
from bgservice.config import Settings
from bgservice.errors import (
    Busy,
    Forbidden,
    NotFound,
    ServiceError,
    UnknownRequest,
)
from bgservice.events import INTERNAL_ERROR, Events
from bgservice.http import inputs, openapi, replies
from bgservice.http.guard import Guard, Routes, close_unasked
from bgservice.http.metrics import Metrics
from bgservice.http.origins import BrowserGuard
from bgservice.http.paging import OLD, PARAMETERS, next_token, parse_page
from bgservice.http.replies import (
    DashboardFile,
    add_headers,
    error_response,
    service_error_response,
)
from bgservice.http.schedules import ScheduleRoutes
from bgservice.http.site import LimitedSite, RequestLog, server_log
from bgservice.http.tokens import Token, Tokens
from bgservice.queue.commands import FILTERS, parse_add, parse_list, parse_window
from bgservice.queue.engine import JobQueue, Result
from bgservice.stats import Stats

log = logging.getLogger(__name__)

API = "/api/v1"
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
FIRST = asyncio.FIRST_COMPLETED
# How often a ?wait= looks whether its client is still there (see _wait_connected).
HANG_UP_CHECK = 1.0
STOPPING = "Shutting down: ask again once the service is back"  # an open ?wait= at a stop
LIVE = ("waiting", "running")

# Any segment but a custom method's ":verb": "abc" reaches the handler and gets a 400
# naming it, rather than the router's generic 404.
JOB = f"{API}/jobs/{{id:[^/:]+}}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(value, status=status, headers=headers)


class HttpApi:
    """The aiohttp application and its site, started and stopped with the service."""

    def __init__(
        self,
        settings: Settings,
        commands: Commands,
        queue: JobQueue,
        metrics: Metrics,
        events: Events,
        stats: Stats,  # for /metrics: http_waiting (?wait= requests open), http_requests
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.commands = commands
        self.events = events
        self.queue = queue
        self.metrics = metrics
        self.tokens = Tokens.configured_in(settings.http.token, settings.http.tokens)
        self.access = AccessList.for_host(settings.http.host, settings.allow)
        self.browsers = BrowserGuard(settings.http.host, settings.http.allowed_hosts)
        self.app = self._make_app()
        self._openapi = openapi.document(settings)  # (with this service's limits)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()  # set as the shutdown grace runs out

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen on ``[http] host:port``; the address bound (port 0 picks a free one)."""
        # Stopping waits for open requests (a ?wait= one may be long) no more than the
        # shutdown grace, not aiohttp's 60 s per phase. The keep-alive timer, which runs
        # from a connection's opening and from each reply, is the deadline for the next
        # request's head: read_timeout, not aiohttp's default of an hour (site.py).
        limits = self.settings.limits
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, logger=server_log(),
            shutdown_timeout=limits.shutdown_grace, keepalive_timeout=limits.read_timeout,
        )  # fmt: skip
        await self._runner.setup()
        http = self.settings.http
        site = LimitedSite(self._runner, http.host, http.port, limits.max_connections,
                           self.stats.refused, self.access)  # fmt: skip
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return host, port

    async def stop(self) -> None:
        if self._runner is not None:
            # Open ?wait= requests get a 503 just before the grace runs out and aiohttp
            # cancels whatever is still open (a dropped connection, not an answer).
            grace = self.settings.limits.shutdown_grace
            cut = asyncio.get_running_loop().call_later(grace * 0.9, self._stopping.set)
            try:
                await self._runner.cleanup()
            finally:
                cut.cancel()

    # --- the application ----------------------------------------------------------------

    def _make_app(self) -> web.Application:
        # The query parameters each handler reads; the others' routes take none.
        parameters: dict[Handler, frozenset[str]] = {
            self.get_job: frozenset({"wait"}), self.list_jobs: PARAMETERS,
            self.queue_stats: frozenset({"window"}), self.retry_job: frozenset({"dependents"}),
        }  # fmt: skip
        guard = Guard(self.settings, self.access, self.tokens, self.browsers, parameters)
        log = RequestLog(self.stats).middleware  # (aiohttp's access log is off: it says more)
        app = web.Application(
            middlewares=[log, close_unasked, self._errors, guard.middleware],
            client_max_size=self.settings.limits.max_request_bytes,
        )
        app.on_response_prepare.append(add_headers)  # framing, sniffing, caching: replies.py
        r = Routes(app.router)
        r.get("/", self.index)
        r.get("/dashboard", self.index)
        r.get("/dashboard/", self.dashboard)
        r.get("/dashboard/{name}", self.static)
        r.get("/metrics", self.get_metrics)
        r.get(f"{API}/openapi.json", self.openapi)
        r.get(f"{API}/modules", self.list_modules)
        r.get(f"{API}/modules/{{name}}", self.get_module)
        r.get(f"{API}/jobs", self.list_jobs)
        r.post(f"{API}/jobs", self.add_job)
        r.get(JOB, self.get_job)
        r.delete(JOB, self.delete_job)
        r.post(f"{JOB}:cancel", self.cancel_job)
        r.post(f"{JOB}:retry", self.retry_job)
        # Deprecated: the paths before AIP-136, kept for one release (docs/http.md).
        r.post(f"{JOB}/cancel", self.cancel_job)
        r.post(f"{JOB}/retry", self.retry_job)
        r.get(f"{API}/stats", self.service_stats)
        r.get(f"{API}/queue/stats", self.queue_stats)
        ScheduleRoutes(self.queue).add_to(r)
        r.add_unmatched()  # (last: what no route above takes)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as JSON: the socket protocol's codes, aiohttp's own (404, 405)."""
        try:
            return await handler(request)
        except ServiceError as exc:
            return service_error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.reason, {"Allow": exc.headers["Allow"]}
                                  if "Allow" in exc.headers else None)  # fmt: skip
        except ConnectionError as exc:  # the client went away mid-request: not our error
            log.info("HTTP %s %s: client gone (%s)", request.method, request.path, exc)
            return error_response(400, "Connection lost")
        except Exception as exc:  # the boundary, as in dispatch: one reply, not the service
            log.exception("internal error serving HTTP %s %s", request.method, request.path)
            self.events.emit(
                INTERNAL_ERROR,
                title=f"internal error serving HTTP {request.method} {request.path}: {exc!r}",
                detail="".join(traceback.format_exception(exc)),
            )
            return error_response(500, f"Internal error: {type(exc).__name__}")

    # --- the dashboard and documents ------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        # Relative: behind a proxy that serves the service under /some/path/ too.
        raise web.HTTPFound("dashboard/")

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return DashboardFile(STATIC / "index.html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        """The page's own files, by name (a missing one: a JSON 404, as any other route;
        aiohttp's static route sent an empty one)."""
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise NotFound(f"No file {name[:100]!r} in the dashboard")
        return DashboardFile(STATIC / name)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._openapi, content_type="application/json")

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = await self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- modules and stats ----------------------------------------------------------------

    async def list_modules(self, request: web.Request) -> web.StreamResponse:
        return _json({"modules": self.commands.modules()})

    async def get_module(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        for row in self.commands.modules():
            if row["name"] == name:
                return _json(row)
        raise NotFound(f"Module {name} not found")

    async def service_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.commands.service_stats())

    async def queue_stats(self, request: web.Request) -> web.StreamResponse:
        window = parse_window(inputs.command("stats", inputs.query(request)))
        return _json(await self.queue.stats(window))

    # --- jobs -----------------------------------------------------------------------------

    async def add_job(self, request: web.Request) -> web.StreamResponse:
        body = await inputs.json_body(request)
        options, args = inputs.add_body(body, self.settings.queue.max_tags)
        token: Token | None = request.get("token")
        if "source" in options and (token is None or token.scope != "operate"):
            raise Forbidden("field source: only for a token of scope operate")
        options.setdefault("source", inputs.caller(request))
        spec = parse_add(inputs.command("add", options, args), limits=self.settings.queue)
        try:
            jid = await self.queue.add(spec)
        except UnknownRequest:  # (the socket's words, kept from the original, name nothing)
            raise inputs.unknown_module(spec.module) from None
        try:
            job = await self.queue.status(jid)
        except NotFound:  # ended and expired before this read (keep_results = 0): added
            job = replies.expired_job(jid, spec.module, await self._owed(jid))  # all the same
        return _json(job, 201, {"Location": f"jobs/{jid}"})  # (relative: docs/http.md)

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        jid = inputs.job_id(request)
        wait = inputs.query(request).get("wait")
        seconds = None if wait is None else inputs.wait_seconds(wait, self.settings.http.max_wait)
        job = await self.queue.status(jid)
        if job["state"] not in LIVE:  # (owed: just read, so an expiry since is no 404)
            return _json(job | replies.job_result((await self.queue.get(jid, owed=True))[1]))
        got = None if seconds is None else await self._wait(request, jid, seconds)
        if got is None:  # not finished (yet): its status says where it stands
            return _json(job if seconds is None else await self.queue.status(jid))
        try:
            job = await self.queue.status(jid)
        except NotFound:  # expired as it ended (keep_results = 0): what the wait got
            return _json(replies.expired_job(jid, job["module"], got))
        if job["state"] in LIVE:  # unfinished: the queue, stopping, let its waiters go
            raise Busy(STOPPING)  # (a 503 of its own)
        return _json(job | replies.job_result(got[1]))

    async def _wait(self, request: web.Request, jid: int, seconds: float) -> Result | None:
        """``?wait=``: queue:get's result (or error), None if unfinished after ``seconds``
        or the client hung up, 503 as the grace runs out. Owed: seen unfinished, so its
        result comes even if it expires as it ends (keep_results = 0), as to queue:get."""
        getting = asyncio.ensure_future(self.queue.get(jid, owed=True))
        stopping = asyncio.ensure_future(self._stopping.wait())
        self.stats.http_waiting += 1
        try:
            await _wait_connected(request, (getting, stopping), seconds)
        finally:
            self.stats.http_waiting -= 1
            for task in (getting, stopping):
                task.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()  # raises as queue:get does
        if stopping.done():
            raise Busy(STOPPING)
        return None

    async def _owed(self, jid: int) -> Result | None:
        """The result an add is owed though its job expired (as ?wait=1's); None once swept."""
        try:
            return await self.queue.get(jid, owed=True)
        except NotFound:
            return None

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        jid = inputs.job_id(request)
        state = await self.queue.cancel(jid)
        return _json({"id": jid, "state": state})

    async def retry_job(self, request: web.Request) -> web.StreamResponse:
        jid = await self.queue.retry(inputs.job_id(request), inputs.dependents(request))
        return _json(await self.queue.status(jid))

    async def delete_job(self, request: web.Request) -> web.StreamResponse:
        """AIP-135 Delete of a finished job: ``{}`` once gone. The queue says which jobs
        it can delete (finished ones; a waiting or running one is a 409)."""
        await self.queue.delete(inputs.job_id(request))
        return _json({})

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        """A page per state, ``next_page_token`` for the next (AIP-158). One more job
        than the page holds is asked for, so the last page has no token to a blank one.
        ``module``, ``name`` and ``tag`` filter it, as queue:list's options of those names."""
        limits, query = self.settings.queue, inputs.query(request)
        # The deprecated limit and offset checked even where page_size or page_token wins:
        # a value the document refuses must be a 400 (found by tests/test_http_fuzz.py).
        parse_page({k: v for k, v in query.items() if k in OLD}, limits.max_page)
        page = parse_page(query, limits.max_page)
        options = {k: v for k, v in query.items() if k in FILTERS}
        options |= {"state": page.state} if page.state else {}
        spec = parse_list(inputs.command("list", options | {"limit": page.size}), limits)
        spec = dataclasses.replace(spec, limit=page.size + 1, offset=page.offset)
        jobs = await self.queue.list_jobs(spec)
        more = any(len(rows) > page.size for rows in jobs.values())
        return _json({
            "jobs": {state: rows[: page.size] for state, rows in jobs.items()},
            "next_page_token": next_token(page, more),
            "limit": page.size,  # deprecated, with offset: what a page_token now carries
            "offset": page.offset,
        })  # fmt: skip


async def _wait_connected(
    request: web.Request, futures: tuple[asyncio.Future[Any], ...], seconds: float
) -> None:
    """Until one of ``futures`` is done, ``seconds`` pass or the client hangs up. aiohttp
    does not cancel a handler whose client left (cancelling any handler would cut adds
    midway), and the connection counts against ``max_connections`` until its handler
    ends: hung-up waits shut every client out of the API until they ran out."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0 and request.transport is not None:
        done, _ = await asyncio.wait(futures, timeout=min(left, HANG_UP_CHECK), return_when=FIRST)
        if done:
            return
