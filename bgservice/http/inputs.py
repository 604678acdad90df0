"""What a request says, read strictly: query strings, JSON bodies, job ids and seconds.

Pure functions over what aiohttp parsed, each raising ``BadRequest`` (a 400) that names
the parameter or field, so every route refuses bad input alike and before any work.
A job's body becomes the ``queue:add`` command it stands for, so the socket protocol and
HTTP share one parser of options (bgservice.queue.commands).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bgservice.errors import BadRequest, did_you_mean
from bgservice.protocol import MODULE_NAME
from bgservice.queue.commands import (
    ADD_OPTIONS,
    TAG,
    Command,
    ascii_number,
    parse_id,
    parse_retry,
    unrepeated,
)
from bgservice.queue.schedules import OPTIONS as SCHEDULE_OPTIONS

# A module name (protocol.MODULE_NAME): the socket protocol silently drops other bytes
# from a name (the original did); the JSON API refuses them instead.
WHOLE_OPTIONS = frozenset({"priority", "retries", "after"})


def command(name: str, options: dict[str, Any], args: bytes = b"") -> Command:
    """A query string or body as the ``queue:`` command it stands for, so both front
    doors validate alike (bgservice.queue.commands)."""
    return Command(name, {str(k): str(v) for k, v in options.items()}, args)


def query(request: web.Request) -> dict[str, str]:
    """The query string, each parameter at most once and never empty: in
    ``window=false&window=`` the last value used to win silently, and ``window=`` to
    mean the default; both are mistakes worth a 400."""
    for name, value in request.query.items():
        if not value:
            raise BadRequest(f"query parameter {name}: empty (leave it out for the default)")
    return unrepeated(list(request.query.items()), "query parameter")


def known_parameters(request: web.Request, accepted: frozenset[str]) -> None:
    """A query parameter the route does not read is a 400 naming it and those it reads, as
    the socket refuses an unknown option: ``?wiat=10`` answered at once, the client sure
    it had waited; ``?stat=failed`` listed every state."""
    unknown = sorted(set(request.query) - accepted)
    if unknown:
        takes = f"parameters: {', '.join(sorted(accepted))}" if accepted else "it takes none"
        guess = did_you_mean(unknown[0], accepted)
        raise BadRequest(f"unknown query parameter {unknown[0][:40]!r}{guess} ({takes})")


def caller(request: web.Request) -> str:
    """The source of what an HTTP request adds: ``http:NAME`` for a named token
    ([http] tokens), else ``http`` (docs/deploy.md, Sources)."""
    token = request.get("token")
    return f"http:{token.name}" if token else "http"


def unknown_module(name: str) -> BadRequest:
    """The socket's ``Unknown request`` for a job of no loaded module, naming both."""
    shown = repr(name[:100]) + ("..." if len(name) > 100 else "")  # (a name of 8 MB: the reply)
    return BadRequest(f"field module: unknown module {shown} (see GET /api/v1/modules)")


def job_id(request: web.Request) -> int:
    """The ``{id}`` in the path: digits within SQLite's INTEGER, else a 400 (not the
    generic 404 of a route that does not match)."""
    return parse_id(request.match_info["id"], request.path)


def dependents(request: web.Request) -> bool:
    """``:retry?dependents=true``: as ``queue:retry?dependents=1`` reads it (1/0, true/false,
    yes/no), the jobs that failed because the job did brought back too."""
    return parse_retry(command("retry", query(request)))


def seconds(name: str, text: str, maximum: float) -> float:
    try:
        value = float(ascii_number(text))
    except ValueError:
        raise BadRequest(f"{name}: expected seconds, got {text[:40]!r}") from None
    if not 0 <= value <= maximum:  # also false for NaN
        raise BadRequest(f"{name}: must be 0-{maximum:g} seconds")
    return value


def wait_seconds(text: str, maximum: float) -> float:
    """``?wait=S``: out of range (NaN too), the message names the key that bounds it."""
    try:
        return seconds("wait", text, maximum)
    except BadRequest as exc:
        if not exc.message.startswith("wait: must be"):
            raise
        raise BadRequest(f"{exc.message} ([http] max_wait)") from None


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=_loads)
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


def _loads(text: str) -> Any:
    # A key given twice in an object ({"after": 1, "after": 2}) once kept the last one,
    # silently, as json.loads does: refused, as a repeated option is on the socket.
    return json.loads(text, object_pairs_hook=lambda pairs: unrepeated(pairs, "field"))


def add_body(body: dict[str, Any], max_tags: int) -> tuple[dict[str, Any], bytes]:
    """``{"module", "data" | "data_base64", options...}`` -> (options, ``MODULE:DATA``);
    more than ``max_tags`` tags are refused before any is checked (a string of 8,000,000
    commas held the loop 3 s, a regex a tag, for the same 400)."""
    tags = body.get("tags")
    if (len(tags) > max_tags if isinstance(tags, list)
            else isinstance(tags, str) and tags.count(",") >= max_tags):  # fmt: skip
        raise BadRequest(f"option tags: at most {max_tags} tags")
    options_known = ADD_OPTIONS - {"wait"}  # GET /jobs/{id}?wait=S is HTTP's way to wait
    known = options_known | {"module", "data", "data_base64"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
    module = body.get("module")
    if not isinstance(module, str) or not MODULE_NAME.fullmatch(module):
        raise BadRequest("field module: expected a module name (A-Z a-z 0-9 _ -)")
    data = _add_data(body)
    options = {key: _option(key, body[key]) for key in options_known & body.keys()}
    present = {key: value for key, value in options.items() if value is not None}
    return present, module.encode() + b":" + data


# POST /schedules: each field's JSON type, as the OpenAPI document's NewSchedule gives it
# (the job options among them as for POST /jobs); make_schedule checks the values. No
# "options" table, as service.config's [[schedule]] has: its values went past these
# checks ("5" for 5) and lost silently to a field of the same name; a field each is one way.
_SCHEDULE_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "module": str, "data": str, "cron": str, "tz": str, "missed": str,
    "paused": bool,
}  # fmt: skip
SCHEDULE_FIELDS = frozenset(_SCHEDULE_TYPES) | {"every"} | SCHEDULE_OPTIONS
# The fields a schedule cannot be without, the only ones the document does not let be
# null: dropped as "not given" with the others, a null name reached make_schedule as
# none at all and was refused as "got ''", a name the client never sent.
SCHEDULE_REQUIRED = ("name", "module")


def schedule_body(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """``{"name", "module", "data", "cron" | "every", ...}`` -> (make_schedule's values,
    the data), each field of the JSON type the document gives it."""
    unknown = sorted(set(body) - SCHEDULE_FIELDS)
    if unknown:
        fields = ", ".join(sorted(SCHEDULE_FIELDS))
        raise BadRequest(f"unknown field {unknown[0][:40]!r} (fields: {fields})")
    for key in SCHEDULE_REQUIRED:
        if body.get(key) is None:
            given = "got null" if key in body else "not given"
            raise BadRequest(f"field {key}: required, {given}")
    values = {key: value for key, value in body.items() if value is not None}  # null: not given
    for key, value in values.items():
        wanted = _SCHEDULE_TYPES.get(key)
        if wanted is not None and not isinstance(value, wanted):
            raise BadRequest(f"field {key}: expected {_JSON_NAMES[wanted]}")
        if wanted is None:  # every and the job options: numbers
            values[key] = _option(key, value)
    module = values.get("module")
    if isinstance(module, str) and not MODULE_NAME.fullmatch(module):
        raise BadRequest("field module: expected a module name (A-Z a-z 0-9 _ -)")
    return values, _utf8("data", values.pop("data", ""))


_JSON_NAMES: dict[Any, str] = {str: "a string", bool: "true or false"}


def _option(key: str, value: Any) -> str | int | float | None:
    """One option, of the JSON type the OpenAPI document gives it (null: not given).
    Numbers as strings were once let through; the document never allowed them."""
    if value is None:
        return None
    if key == "after" and isinstance(value, list):  # several: all done first (a fan-in)
        if not value or any(item is None or isinstance(item, list) for item in value):
            raise BadRequest("field after: expected a job id or a non-empty list of job ids")
        return ",".join(str(_option(key, item)) for item in value)
    if key in ("unique", "name", "tags", "source"):
        return _text(key, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"field {key}: expected a number")
    if key in WHOLE_OPTIONS and isinstance(value, float):
        if not value.is_integer():  # 5.0 is a JSON Schema integer; 5.5 is not
            raise BadRequest(f"field {key}: expected a whole number")
        return int(value)
    return value


def _text(key: str, value: Any) -> str:
    """A string option; ``tags`` also as a list of strings. Empty (``""``, ``[]``) is
    refused with the socket's words: ``"unique": ""`` was taken for no key, so two jobs
    "unique" alike were both added; null is the way to say "not given". Tags as one
    string ("a,b") are each checked as a list's items are: the socket's parser trimmed
    " a , b " to a and b, which the document's pattern refuses."""
    if key == "tags" and isinstance(value, list):
        value = ",".join(_tag(item) for item in value)
    elif key == "tags" and isinstance(value, str) and value:
        value = ",".join(_tag(item) for item in value.split(","))
    if not isinstance(value, str):
        raise BadRequest(f"field {key}: expected a string")
    if not value:
        raise BadRequest(f"option {key}: empty (leave it out for the default)")
    _utf8(key, value)
    return value


def _tag(item: Any) -> str:
    """One tag of a list, whole: joined with commas for the socket's parser, a comma in
    it made two tags (``["a,b"]``) and a space around it was trimmed, where the document's
    pattern refuses both. Its length is the parser's to check ([queue] max_tag_chars)."""
    if not isinstance(item, str):
        raise BadRequest("field tags: expected a list of strings")
    if not TAG.fullmatch(item):
        raise BadRequest("field tags: each tag is one of A-Z a-z 0-9 _ . : - "
                         f'(a string "a,b" or a list for several), not {item[:70]!r}')  # fmt: skip
    return item


def _add_data(body: dict[str, Any]) -> bytes:
    """The job's data: ``data`` (text) or ``data_base64`` (bytes), not both; null is not
    given (empty data), as for every optional field and a schedule's data."""
    body = {key: body[key] for key in ("data", "data_base64") if body.get(key) is not None}
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
