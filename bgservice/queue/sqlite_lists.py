"""``queue:list``'s filtered pages of finished jobs in the embedded store (``module=``,
``name=``, ``tag=``): the jobs of one state, newest finished first, as the unfiltered page
has them, looked at ``SCAN`` rows at a time.

Each chunk is one operation of the writer thread (sqlite_writer.py), ~6 ms, so the commits
queued meanwhile go between them: one query for a name that none of a million finished
jobs has held every write for 0.5 s. Read through the writer, not the reader connection,
as the unfiltered page is: a job's end queued before the list is in it. No index of its
own: a chunk walks jobs_finished, and only the rows of the page are read whole.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from bgservice.queue.commands import JobFilter

FINISHED = "('done', 'failed', 'cancelled')"  # as jobs_finished's WHERE has it, to the letter
SCAN = 10_000  # finished rows one operation looks at (a million: 100 of them, ~0.6 s in all)
# The rows of a state from the top of a chunk (finished, id) down: a range of jobs_finished,
# whose entries end with the id.
_BELOW = (f"state = :state AND state IN {FINISHED}"
          " AND finished <= :top AND (finished < :top OR id < :top_id)")  # fmt: skip
_ORDER = " ORDER BY finished DESC, id DESC"
_EDGE = f"SELECT finished, id FROM jobs WHERE {_BELOW}{_ORDER} LIMIT 1 OFFSET :last"
_HITS = (f"SELECT id FROM jobs WHERE {_BELOW}"
         " AND finished >= :end AND (finished > :end OR id >= :end_id)")  # fmt: skip
_MATCH = {
    "module": " AND module = :module",
    "name": " AND name = :name",
    "tag": " AND instr(',' || tags || ',', :tag) > 0",  # tags are stored "a,b": a whole one
}

Read = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]


async def matching(
    submit: Read, state: str, limit: int, offset: int, where: JobFilter
) -> list[int]:
    """The ids of the page: the ``limit`` jobs of ``state`` that ``where`` matches after
    the first ``offset`` of them, newest finished first. ``submit`` runs an operation in
    the writer thread."""
    given = {k: v for k, v in vars(where).items() if v is not None}
    values = {"state": state, **given}
    if "tag" in given:
        values["tag"] = f",{given['tag']},"
    sql = _HITS + "".join(_MATCH[k] for k in given) + _ORDER
    ids: list[int] = []
    top: tuple[float, int] | None = (math.inf, 0)
    while top is not None and len(ids) < limit:
        hits, top = await submit(partial(_chunk, sql, values, top))
        ids += hits[offset:][: limit - len(ids)]
        offset = max(0, offset - len(hits))
    return ids


def _chunk(
    sql: str, values: dict[str, Any], top: tuple[float, int], c: sqlite3.Connection
) -> tuple[list[int], tuple[float, int] | None]:
    """The ids ``sql`` matches among the ``SCAN`` rows from ``top`` down, and the top of
    the next chunk (None: none left)."""
    below = {**values, "top": top[0], "top_id": top[1]}
    edge = c.execute(_EDGE, {**below, "last": SCAN - 1}).fetchone()
    end, end_id = edge or (-math.inf, 0)
    hits = [row[0] for row in c.execute(sql, {**below, "end": end, "end_id": end_id})]
    return hits, None if edge is None else (edge[0], edge[1])
