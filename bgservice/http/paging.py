"""AIP-158 paging for ``GET /api/v1/jobs``: ``page_size`` and ``page_token`` in,
``next_page_token`` out, with the older ``limit`` and ``offset`` still read (deprecated).

A token is opaque to clients but not secret: base64url of a small JSON object holding
the offset of the next page and the ``state`` filter it was made for. Asking with a
token under another filter is a 400, as AIP-158 asks. Jobs change state between pages,
so, as with any offset, a job may show on two pages or on none; the dashboard and a
person paging through failures do not mind, and a cursor would need the queue's help.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from bgservice.errors import BadRequest
from bgservice.queue.commands import MAX_INT, MAX_PAGE

DEFAULT_SIZE = 100
# The largest page unless told ([queue] max_page): larger sizes are coerced down
# (AIP-158), and the reply says so.
MAX_SIZE = MAX_PAGE
NEW = ("page_size", "page_token")
OLD = ("limit", "offset")  # deprecated
PARAMETERS = frozenset({"state", *NEW, *OLD})  # all GET /jobs reads (any other is a 400)


@dataclass(frozen=True)
class Page:
    state: str | None
    size: int
    offset: int


def parse_page(query: dict[str, str], max_size: int = MAX_SIZE) -> Page:
    """The page a query asks for (``state`` is checked by the queue's own parser), of at
    most ``max_size`` jobs per state ([queue] max_page; the default page is no larger).
    With ``page_size`` or ``page_token`` present, ``limit`` and ``offset`` are ignored:
    a document cannot say "not both" of query parameters, so precedence it can say."""
    state = query.get("state")
    default = str(min(DEFAULT_SIZE, max_size))
    if not any(k in query for k in NEW) and any(k in query for k in OLD):
        size = _whole("limit", query.get("limit", default), 1)
        return Page(state, min(size, max_size), _whole("offset", query.get("offset", "0"), 0))
    size = _whole("page_size", query.get("page_size", "0"), 0) or int(default)
    offset = _decode(query["page_token"], state) if "page_token" in query else 0
    return Page(state, min(size, max_size), offset)


def next_token(page: Page, more: bool) -> str:
    """The token for the page after ``page``; empty when it was the last (AIP-158)."""
    if not more:
        return ""
    raw = json.dumps({"offset": page.offset + page.size, "state": page.state or ""})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(token: str, state: str | None) -> int:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset, made_for = raw["offset"], raw["state"]
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error):
        raise BadRequest("page_token: not a token this API gave out") from None
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_INT:
        raise BadRequest("page_token: not a token this API gave out")
    if made_for != (state or ""):
        raise BadRequest(
            f"page_token: made for state={made_for or '(all)'}; keep the other parameters "
            "as they were on the first page"
        )
    return offset


def _whole(name: str, text: str, minimum: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_INT:
        raise BadRequest(f"{name}: expected a whole number from {minimum} to {MAX_INT}")
    value = int(text)
    if value < minimum:
        raise BadRequest(f"{name}: must be at least {minimum}")
    return value
