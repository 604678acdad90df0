"""Error replies in the shape of Google's AIP-193:
``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}``; the headers
every reply carries (framing, sniffing, caching: docs/http.md "Headers on every reply");
and a finished job's result in a job resource.

``code`` stays the socket protocol's code (docs/protocol.md), which is also the HTTP
status, so a client reading either front door sees the same number; ``status`` is the
canonical name (google.rpc.Code) closest in meaning, for clients written to Google's
style. Where the two tables disagree (409 for a job in the wrong state is
FAILED_PRECONDITION, whose own HTTP code would be 400) the socket's number wins.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aiohttp import web

from bgservice.errors import Cancelled, ServiceError
from bgservice.protocol import OK, Reply

STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",  # this method on this resource: not implemented
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",  # e.g. retry of a waiting job, delete of a running one
    410: "CANCELLED",
    413: "INVALID_ARGUMENT",  # max_request_bytes, or a job past [queue] max_waiting_bytes
    415: "INVALID_ARGUMENT",  # a Content-Encoding other than gzip, deflate (or br)
    417: "INVALID_ARGUMENT",  # an Expect other than 100-continue
    422: "FAILED_PRECONDITION",  # a job for a module that takes none (the socket's 405)
    424: "FAILED_PRECONDITION",  # the job it depends on failed
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",  # the module failed to load
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_name(code: int) -> str:
    return STATUS.get(code, "UNKNOWN")


def error_response(code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message, "status": status_name(code)}})
    return web.Response(status=code, text=body, content_type="application/json", headers=headers)


# The socket's 405 (a module whose ACCEPTS leaves out queue: POST /jobs, a schedule) is a
# 422 here. HTTP's 405 says this path does not serve the method, and must list in Allow
# those it does; POST is served. 422, not 403: nothing about the caller's rights or
# token is wrong, the request is understood and its module takes no jobs.
HTTP_CODES = {405: 422}
# 503s a client may simply ask again after, by how their message starts: the seconds
# Retry-After says (docs/http.md). A restart takes a few seconds; a full queue frees
# room as jobs end. (Not "Too many schedules": only a delete makes room.)
RETRY_AFTER = {
    "Shutting down": 5, "Queue full": 1, "Queue unavailable": 5, "Job store unavailable": 5,
    "Schedules not loaded yet": 1,
}  # fmt: skip


def service_error_response(exc: ServiceError) -> web.Response:
    """A ``ServiceError`` as its socket code says, bar the codes HTTP gives another
    meaning; a passing 503 says when to ask again."""
    code = HTTP_CODES.get(exc.code, exc.code)
    wait = next((s for start, s in RETRY_AFTER.items() if exc.message.startswith(start)), None)
    headers = {"Retry-After": str(wait)} if code == 503 and wait else None
    return error_response(code, exc.message, headers)


# Headers on every reply (added as each is sent, errors and redirects too): no page of
# another site may frame these (clickjacking: a click on a hidden Cancel), no browser may
# guess a type other than the one sent, and no reply of the API is kept by a cache.
SECURITY = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The API, /metrics and the rest: they load nothing, and no cache keeps a job's result.
PLAIN = {**SECURITY, "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
         "Cache-Control": "no-store"}  # fmt: skip
# The dashboard's files: the page loads its own script and style and talks to its own API,
# nothing else (its progress bars are sized through the DOM, not style attributes; the
# icon is a data: URL). Revalidated on each load, so an upgrade is seen at once.
DASHBOARD = {
    **SECURITY,
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}
SCOPE_HEADER = "Bgservice-Token-Scope"  # what the token used may do (docs/http.md)


async def add_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """aiohttp's ``on_response_prepare``: the headers above, and the scope of the token the
    request carried, so the dashboard offers only the buttons that token may use."""
    dashboard = request.path == "/dashboard" or request.path.startswith("/dashboard/")
    for name, value in (DASHBOARD if dashboard else PLAIN).items():
        response.headers.setdefault(name, value)
    token = request.get("token")
    if token is not None:
        response.headers[SCOPE_HEADER] = token.scope


class DashboardFile(web.FileResponse):
    """One of the dashboard's files. A ``Range`` aiohttp cannot serve as one byte range
    (another unit, several ranges, no valid syntax) is ignored and the whole file sent:
    RFC 9110 14.2 (a unit a server does not know MUST be ignored); aiohttp answered each
    with a 416. So are two it would serve wrongly: ``bytes=-0`` (no byte at all: it sent
    the whole file as a 206) and an ``If-Range`` of an entity tag (aiohttp compares dates
    only: a stale tag got a 206 of the new file). Ignoring a Range is always allowed. One
    it can read but the file cannot meet (past its end) is still a 416."""

    async def prepare(self, request: web.BaseRequest) -> Any:
        if "Range" in request.headers and not _servable(request):
            headers = request.headers.copy()
            del headers["Range"]
            request = request.clone(headers=headers)
        return await super().prepare(request)


def _servable(request: web.BaseRequest) -> bool:
    if request.headers.get("If-Range", "").lstrip().startswith(('"', "W/")):
        return False
    try:
        request.http_range  # noqa: B018 (parsed to see whether aiohttp can serve it)
    except ValueError:
        return False
    return _NO_BYTE.fullmatch(request.headers["Range"]) is None


_NO_BYTE = re.compile(r"\s*bytes\s*=\s*-0+\s*")  # the last 0 bytes


# A finished job's state by the code of its result (queue:get's): the 410 of a cancel.
ENDS = {OK: "done", Cancelled.code: "cancelled"}


def job_result(body: bytes) -> dict[str, str]:
    """A finished job's reply: as text when it is UTF-8, else as base64."""
    try:
        return {"result": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"result_base64": base64.b64encode(body).decode("ascii")}


def expired_job(jid: int, module: str, got: Reply | None) -> dict[str, Any]:
    """Job ``jid``, whose record expired as it ended (``[queue] keep_results``), as far as
    the add or wait that ``got`` its result knows it: 201/200 and the id, not a 404 (a
    client told its add failed adds it again). ``state`` from the result's code (200
    done, 410 cancelled, any other failed), or ``expired`` if even that was swept."""
    job: dict[str, Any] = {"id": jid, "module": module, "state": "expired", "expired": True}
    if got is None:
        return job
    status, body = got
    return job | {"state": ENDS.get(status, "failed"), "status": status} | job_result(body)
