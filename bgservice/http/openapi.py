"""The OpenAPI document served at ``/api/v1/openapi.json``: ``openapi.json`` with the
limits this service was configured with. Its numbers are the defaults; a service with
``[http] max_wait = 600`` or ``[queue] max_tags = 20`` accepts more, and a client that
validates against the served document (generated clients do) must accept it too. Its
``servers`` entry is relative ("/"): the address the document was fetched from, behind a
proxy too, where no configured host and port would be right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bgservice.config import Settings

FILE = Path(__file__).resolve().parent / "openapi.json"
_DEFAULT_PAGE = "more than 1000 are answered as 1000"


def document(settings: Settings) -> bytes:
    doc = json.loads(FILE.read_text())
    queue = settings.queue
    job = doc["components"]["schemas"]["NewJob"]["properties"]
    job["name"]["maxLength"] = queue.max_name_chars
    job["tags"]["maxItems"] = queue.max_tags
    job["tags"]["items"]["pattern"] = f"^[A-Za-z0-9_.:-]{{1,{queue.max_tag_chars}}}$"
    job["after"]["oneOf"][1]["maxItems"] = queue.max_dependencies
    for parameter in _parameters(doc, "/api/v1/jobs/{id}", "wait"):
        parameter["schema"]["maximum"] = settings.http.max_wait
    page = f"more than {queue.max_page} are answered as {queue.max_page}"
    for name in ("page_size", "limit"):
        for parameter in _parameters(doc, "/api/v1/jobs", name):
            parameter["description"] = parameter["description"].replace(_DEFAULT_PAGE, page)
    doc["servers"] = [{"url": "/"}]
    return json.dumps(doc, indent=2).encode()


def _parameters(doc: dict[str, Any], path: str, name: str) -> list[dict[str, Any]]:
    operation = doc["paths"][path]["get"]
    return [p for p in operation["parameters"] if p["name"] == name]
