"""The OpenAPI document served at ``/api/v1/openapi.json``: ``openapi.json`` with the
limits this service was configured with. Its numbers are the defaults; a service with
``[http] max_wait = 600`` or ``[queue] max_tags = 20`` accepts more, and a client that
validates against the served document (generated clients do) must accept it too. Its
``servers`` entry is relative ("/"): the address the document was fetched from, behind a
proxy too, where no configured host and port would be right."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bgservice.config import Settings
from bgservice.queue.commands import LATEST_RUN_AT

FILE = Path(__file__).resolve().parent / "openapi.json"
_DEFAULT_PAGE = "more than 1000 are answered as 1000"
_REGEX_BOUND = 1000  # the largest {m,n} put in a pattern (ECMA-262 engines differ past it)
_YEAR = 365 * 86400


def document(settings: Settings) -> bytes:
    doc = json.loads(FILE.read_text())
    queue = settings.queue
    job = doc["components"]["schemas"]["NewJob"]["properties"]
    job["name"]["maxLength"] = job["unique"]["maxLength"] = queue.max_name_chars
    listed, joined, _ = job["tags"]["oneOf"]  # a list of tags, a string "a,b", null
    listed["maxItems"] = queue.max_tags
    # The length apart from the pattern: {1,5000000000} is past what regex engines take.
    tag = listed["items"]
    tag["pattern"], tag["maxLength"] = "^[A-Za-z0-9_.:-]+$", queue.max_tag_chars
    joined |= _joined_tags(queue.max_tags, queue.max_tag_chars)
    # A delay must end before the end of 9999, as `at`: its most from now, less a century
    # (so that a document served for years does not promise what the service refuses).
    job["delay"]["maximum"] = int(LATEST_RUN_AT - time.time()) - 100 * _YEAR
    job["after"]["oneOf"][1]["maxItems"] = queue.max_dependencies
    for parameter in _parameters(doc, "/api/v1/jobs", "tag"):  # (the filter: one tag)
        parameter["schema"]["maxLength"] = queue.max_tag_chars
    for parameter in _parameters(doc, "/api/v1/jobs/{id}", "wait"):
        parameter["schema"]["maximum"] = settings.http.max_wait
    page = f"more than {queue.max_page} are answered as {queue.max_page}"
    first = f"0 or absent: {min(100, queue.max_page)};"  # (a page is never over max_page)
    for name in ("page_size", "limit"):
        for parameter in _parameters(doc, "/api/v1/jobs", name):
            text = parameter["description"].replace(_DEFAULT_PAGE, page)
            parameter["description"] = text.replace("0 or absent: 100;", first)
            if "default" in parameter["schema"]:
                parameter["schema"]["default"] = min(100, queue.max_page)
    doc["servers"] = [{"url": "/"}]
    return json.dumps(doc, indent=2).encode()


def _joined_tags(most: int, chars: int) -> dict[str, Any]:
    """The schema of ``"a,b"``: at most ``most`` tags of at most ``chars`` characters,
    in the pattern while the numbers are ones regex engines take, else by length only."""
    if most == 0:
        return {"maxLength": 0, "minLength": 1}  # (none: no string is one)
    tag = "[A-Za-z0-9_.:-]"
    if most <= _REGEX_BOUND and chars <= _REGEX_BOUND:
        return {"pattern": f"^{tag}{{1,{chars}}}(,{tag}{{1,{chars}}}){{0,{most - 1}}}$"}
    return {"pattern": f"^{tag}+(,{tag}+)*$", "maxLength": most * (chars + 1) - 1}


def _parameters(doc: dict[str, Any], path: str, name: str) -> list[dict[str, Any]]:
    operation = doc["paths"][path]["get"]
    return [p for p in operation["parameters"] if p["name"] == name]
