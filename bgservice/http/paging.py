"""AIP-158 paging for ``GET /api/v1/jobs``: ``page_size`` and ``page_token`` in,
``next_page_token`` out, with the older ``limit`` and ``offset`` still read (deprecated).

A token is opaque to clients but not secret: base64url of a small JSON object holding
the offset of the next page and the filters it was made for (``state``, and ``module``,
``name``, ``tag`` where given). Asking with a token under another filter is a 400, as
AIP-158 asks: its offset counts the jobs of that filter. Jobs change state between pages,
so, as with any offset, a job may show on two pages or on none; the dashboard and a
person paging through failures do not mind, and a cursor would need the queue's help.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from bgservice.errors import BadRequest
from bgservice.queue.commands import FILTERS, MAX_INT, MAX_PAGE

DEFAULT_SIZE = 100
# The largest page unless told ([queue] max_page): larger sizes are coerced down
# (AIP-158), and the reply says so.
MAX_SIZE = MAX_PAGE
NEW = ("page_size", "page_token")
OLD = ("limit", "offset")  # deprecated
KEPT = ("state", *sorted(FILTERS))  # the filters: each page's as the first page's
PARAMETERS = frozenset({*KEPT, *NEW, *OLD})  # all GET /jobs reads (any other is a 400)


@dataclass(frozen=True)
class Page:
    state: str | None
    size: int
    offset: int
    filters: tuple[tuple[str, str], ...] = ()  # KEPT's given, for the next page's token


def parse_page(query: dict[str, str], max_size: int = MAX_SIZE) -> Page:
    """The page a query asks for (``state`` is checked by the queue's own parser), of at
    most ``max_size`` jobs per state ([queue] max_page; the default page is no larger).
    With ``page_size`` or ``page_token`` present, ``limit`` and ``offset`` are ignored:
    a document cannot say "not both" of query parameters, so precedence it can say."""
    state = query.get("state")
    filters = tuple((k, query[k]) for k in KEPT if query.get(k))
    default = str(min(DEFAULT_SIZE, max_size))
    if not any(k in query for k in NEW) and any(k in query for k in OLD):
        size = _whole("limit", query.get("limit", default), 1)
        offset = _whole("offset", query.get("offset", "0"), 0)
        return Page(state, min(size, max_size), offset, filters)
    size = _whole("page_size", query.get("page_size", "0"), 0) or int(default)
    offset = _decode(query["page_token"], dict(filters)) if "page_token" in query else 0
    return Page(state, min(size, max_size), offset, filters)


def next_token(page: Page, more: bool) -> str:
    """The token for the page after ``page``; empty when it was the last (AIP-158)."""
    if not more:
        return ""
    raw = json.dumps({"offset": page.offset + page.size, "state": "", **dict(page.filters)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(token: str, filters: dict[str, str]) -> int:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = raw["offset"]
        made_for = {k: raw.get(k, "") for k in KEPT}  # (a token without them: none given)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, binascii.Error):
        raise BadRequest("page_token: not a token this API gave out") from None
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_INT:
        raise BadRequest("page_token: not a token this API gave out")
    for key in KEPT:
        if made_for[key] != filters.get(key, ""):
            shown = made_for[key] if isinstance(made_for[key], str) else ""
            raise BadRequest(
                f"page_token: made for {key}={shown[:40] or '(all)'}; keep the other "
                "parameters as they were on the first page"
            )
    return offset


def _whole(name: str, text: str, minimum: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_INT:
        raise BadRequest(f"{name}: expected a whole number from {minimum} to {MAX_INT}")
    value = int(text)
    if value < minimum:
        raise BadRequest(f"{name}: must be at least {minimum}")
    return value
