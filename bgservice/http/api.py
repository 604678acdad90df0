"""Routes: the JSON API under /api/v1, /metrics and the dashboard's files.

Every route reads or drives the same objects the socket protocol does (the dispatcher's
modules and stats, the job queue's public methods), so an HTTP answer and a socket
answer never disagree. Errors are JSON, ``{"error": {"code": 404, "message": "..."}}``,
with the socket protocol's codes as HTTP statuses (docs/protocol.md lists them), plus
401 for a missing or wrong bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bgservice.access import AccessList
from bgservice.config import Settings
from bgservice.dispatch import Dispatcher
from bgservice.errors import BadRequest, NotFound, ServiceError
from bgservice.http.metrics import Metrics
from bgservice.jobs import JobQueue
from bgservice.queue_commands import (
    ADD_OPTIONS,
    Command,
    parse_add,
    parse_id,
    parse_list,
    parse_window,
)

log = logging.getLogger(__name__)

API = "/api/v1"
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
OPENAPI = HERE / "openapi.json"
TOKEN_ENV = "BGSERVICE_HTTP_TOKEN"
MAX_WAIT = 300.0  # seconds GET /jobs/{id}?wait= may hold a request
PUBLIC = ("/", "/dashboard")  # the dashboard's files: no secrets, no token needed
# A module name as the modules folder allows it. The socket protocol silently drops other
# bytes from a name (the original did); the JSON API refuses them instead.
MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")
WHOLE_OPTIONS = frozenset({"priority", "retries", "after"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=code, text=body, content_type="application/json", headers=headers)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(value, status=status, headers=headers)


class HttpApi:
    """The aiohttp application and its site, started and stopped with the service."""

    def __init__(
        self, settings: Settings, dispatcher: Dispatcher, queue: JobQueue, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.queue = queue
        self.metrics = metrics
        self.token = os.environ.get(TOKEN_ENV) or settings.http.token
        self.access = AccessList.for_host(settings.http.host, settings.allow)
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen on ``[http] host:port``; the address bound (port 0 picks a free one)."""
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, logger=_server_log()
        )
        await self._runner.setup()
        http = self.settings.http
        site = web.TCPSite(self._runner, http.host, http.port, backlog=128)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return host, port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- the application ----------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._guard],
            client_max_size=self.settings.limits.max_request_bytes,
        )
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/dashboard/", self.dashboard)
        r.add_static("/dashboard/", STATIC)
        r.add_get("/metrics", self.get_metrics)
        r.add_get(f"{API}/openapi.json", self.openapi)
        r.add_get(f"{API}/modules", self.list_modules)
        r.add_get(f"{API}/modules/{{name}}", self.get_module)
        r.add_get(f"{API}/jobs", self.list_jobs)
        r.add_post(f"{API}/jobs", self.add_job)
        r.add_get(f"{API}/jobs/{{id:\\d+}}", self.get_job)
        r.add_post(f"{API}/jobs/{{id:\\d+}}/cancel", self.cancel_job)
        r.add_post(f"{API}/jobs/{{id:\\d+}}/retry", self.retry_job)
        r.add_get(f"{API}/stats", self.service_stats)
        r.add_get(f"{API}/queue/stats", self.queue_stats)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The ``allow`` list (off loopback), then the bearer token (API and metrics)."""
        if not self.access.allows(request.remote):
            return error_response(403, "Forbidden")
        public = request.path == "/" or request.path.startswith("/dashboard/")
        if self.token and not public and not self._token_matches(request):
            return error_response(
                401, "Unauthorized: send Authorization: Bearer TOKEN",
                {"WWW-Authenticate": 'Bearer realm="bgservice"'},
            )  # fmt: skip
        return await handler(request)

    def _token_matches(self, request: web.Request) -> bool:
        assert self.token is not None
        """``Authorization: Bearer TOKEN``, compared as bytes in constant time. aiohttp
        decodes header bytes that are not UTF-8 as lone surrogates (surrogateescape), so
        they are encoded back the same way: a stray byte is a wrong token, not a 500."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        try:
            raw = given.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no parser produces: no token of ours
            return False
        expected = self.token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(raw, expected)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as JSON: the socket protocol's codes, aiohttp's own (404, 405)."""
        try:
            return await handler(request)
        except ServiceError as exc:
            return error_response(exc.code, exc.message)
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
            self.dispatcher.alert(
                "error",
                f"internal error serving HTTP {request.method} {request.path}: {exc!r}",
                "".join(traceback.format_exception(exc)),
            )
            return error_response(500, f"Internal error: {type(exc).__name__}")

    # --- the dashboard and documents ------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard/")

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(OPENAPI, headers={"Content-Type": "application/json"})

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        body, content_type = await self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- modules and stats ----------------------------------------------------------------

    async def list_modules(self, request: web.Request) -> web.StreamResponse:
        return _json({"modules": self.dispatcher.modules()})

    async def get_module(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        for row in self.dispatcher.modules():
            if row["name"] == name:
                return _json(row)
        raise NotFound(f"Module {name} not found")

    async def service_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(self.dispatcher.service_stats())

    async def queue_stats(self, request: web.Request) -> web.StreamResponse:
        window = parse_window(_command("stats", _query(request)))
        return _json(await self.queue.stats(window))

    # --- jobs -----------------------------------------------------------------------------

    async def add_job(self, request: web.Request) -> web.StreamResponse:
        spec = parse_add(_command("add", *_add_body(await _json_body(request))))
        jid = await self.queue.add(spec)
        job = await self.queue.status(jid)
        return _json(job, 201, {"Location": f"{API}/jobs/{jid}"})

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        jid = _job_id(request)
        wait = _query(request).get("wait")
        if wait is not None:
            seconds = _seconds("wait", wait)
            try:
                async with asyncio.timeout(seconds):
                    await self.queue.get(jid)
            except TimeoutError:
                pass  # not finished yet: its status says where it stands
        job = await self.queue.status(jid)
        if job["state"] not in ("waiting", "running"):
            _, body = await self.queue.get(jid)
            job.update(_result(body))
        return _json(job)

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        jid = _job_id(request)
        state = await self.queue.cancel(jid)
        return _json({"id": jid, "state": state})

    async def retry_job(self, request: web.Request) -> web.StreamResponse:
        jid = await self.queue.retry(_job_id(request))
        return _json(await self.queue.status(jid))

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        spec = parse_list(_command("list", _query(request)))
        jobs = await self.queue.list_jobs(spec)
        return _json({"jobs": jobs, "limit": spec.limit, "offset": spec.offset})


class _ClientMistakes(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL byte in a header, a broken request
    line) at ERROR with a traceback, though it answers 400: the client's mistake, which
    anyone who can connect can make at will. One INFO line says what it was instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and exc.code < 500:
            detail = " ".join(line.strip() for line in str(exc.message).splitlines())
            record.args = (record.getMessage(), exc.code, detail[:300])
            record.msg = "%s: %d %s"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def _server_log() -> logging.Logger:
    """The logger aiohttp's connection handler reports to, its client mistakes tamed."""
    server_log = logging.getLogger(f"{__name__}.server")
    if not any(isinstance(f, _ClientMistakes) for f in server_log.filters):
        server_log.addFilter(_ClientMistakes())
    return server_log


def _command(name: str, options: dict[str, Any], args: bytes = b"") -> Command:
    """A query string or body as the ``queue:`` command it stands for, so both front
    doors validate alike (bgservice.queue_commands)."""
    return Command(name, {str(k): str(v) for k, v in options.items()}, args)


def _query(request: web.Request) -> dict[str, str]:
    """The query string, each parameter at most once and never empty: in
    ``window=false&window=`` the last value used to win silently, and ``window=`` to
    mean the default; both are mistakes worth a 400."""
    query: dict[str, str] = {}
    for name, value in request.query.items():
        if name in query:
            raise BadRequest(f"query parameter {name}: given more than once")
        if not value:
            raise BadRequest(f"query parameter {name}: empty (leave it out for the default)")
        query[name] = value
    return query


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except RecursionError:
        # The json module recurses once per level; no valid body nests at all, so a deep
        # one is refused whole rather than bounding the depth in a scan of our own.
        raise BadRequest("the body must be a JSON object (nested too deeply)") from None
    except (ValueError, LookupError, HttpProcessingError, web.RequestPayloadError) as exc:
        # ValueError: not JSON, not in its charset, or a number over Python's digit limit;
        # LookupError: an unknown charset; the others: a body aiohttp cannot decode (gzip).
        raise BadRequest(f"the body must be a JSON object ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _add_body(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """``{"module", "data" | "data_base64", options...}`` -> (options, ``MODULE:DATA``)."""
    known = ADD_OPTIONS | {"module", "data", "data_base64"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    module = body.get("module")
    if not isinstance(module, str) or not MODULE_NAME.fullmatch(module):
        raise BadRequest("field module: expected a module name (A-Z a-z 0-9 _ -)")
    data = _add_data(body)
    options = {key: _option(key, body[key]) for key in ADD_OPTIONS & body.keys()}
    present = {key: value for key, value in options.items() if value is not None}
    return present, _utf8("module", module) + b":" + data


def _option(key: str, value: Any) -> str | int | float | None:
    """One option, of the JSON type the OpenAPI document gives it (null: not given).
    Numbers as strings were once let through; the document never allowed them."""
    if value is None:
        return None
    if key == "unique":
        if not isinstance(value, str):
            raise BadRequest("field unique: expected a string")
        _utf8(key, value)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"field {key}: expected a number")
    if key in WHOLE_OPTIONS and isinstance(value, float):
        if not value.is_integer():  # 5.0 is a JSON Schema integer; 5.5 is not
            raise BadRequest(f"field {key}: expected a whole number")
        return int(value)
    return value


def _add_data(body: dict[str, Any]) -> bytes:
    """The job's data: ``data`` (text) or ``data_base64`` (bytes), not both."""
    if "data_base64" in body and "data" in body:
        raise BadRequest("fields data and data_base64: give one, not both")
    if "data_base64" not in body:
        text = body.get("data", "")
        if not isinstance(text, str):
            raise BadRequest("field data: expected a string (or data_base64 for bytes)")
        return _utf8("data", text)
    encoded = body["data_base64"]
    if not isinstance(encoded, str):
        raise BadRequest("field data_base64: expected a base64 string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field data_base64: not valid base64") from None


def _utf8(field: str, text: str) -> bytes:
    """JSON strings may hold lone surrogates (\\ud800), which are no text: refused."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise BadRequest(f"field {field}: not valid Unicode (a lone surrogate)") from None


def _job_id(request: web.Request) -> int:
    return parse_id(request.match_info["id"], request.path)


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}: expected seconds, got {text[:40]!r}") from None
    if not 0 <= value <= MAX_WAIT:
        raise BadRequest(f"{name}: must be 0-{MAX_WAIT:g} seconds")
    return value


def _result(body: bytes) -> dict[str, str]:
    """A finished job's reply: as text when it is UTF-8, else as base64."""
    try:
        return {"result": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"result_base64": base64.b64encode(body).decode("ascii")}
