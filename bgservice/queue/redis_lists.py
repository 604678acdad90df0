"""``queue:list`` on the shared queue: each state's page of jobs in list order, read from
its sorted sets (a ZRANGE per page), the jobs then read back in one pipeline.

A filtered page (``module=``, ``name=``, ``tag=``) has no set of its own to read from: it
is found by walking the state in the same order, ``CHUNK`` jobs at a time (one pipeline
of HMGETs of their module, name and tags per chunk, ~1 ms of Redis, other clients answered
between chunks), until the page is full or ``SCANNED`` jobs of the state have been looked
at. A match further down is not listed (docs/queue.md): bounded, as an unfiltered page
is, and never every job of a large queue read for one page.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bgservice.queue.commands import JobFilter, ListSpec
from bgservice.queue.job import JobState, read_tags
from bgservice.queue.redis_db import RedisJobs, pipeline

CHUNK = 1000  # jobs of a state one step of a filtered list looks at
SCANNED = 10_000  # jobs of a state one filtered list looks at, at most
Placed = list[tuple[int, int | None]]  # job ids, each with its position (None: not ready)


async def listing(
    db: RedisJobs, spec: ListSpec, rates: dict[str, tuple[int, float]]
) -> dict[str, Any]:
    """``queue:list``: each state's page of jobs, described; a waiting job of a module
    with a rate window (``rates``: [queue] module_rates) says when it may start, as
    ``queue:status`` does (its module's window read once)."""
    states = [spec.state] if spec.state else ["waiting", "running", "failed"]
    now = time.time()
    out: dict[str, Any] = {}
    for state in states:
        placed = await (_matching(db, state, spec) if spec.where else _placed(db, state, spec))
        positions = dict(placed)
        # gathered: the reads of a page go to Redis as one pipeline (the Batcher)
        loaded = await asyncio.gather(*(db.load(jid) for jid, _ in placed))
        out[state] = [
            j.describe(now, positions[j.id] if j.state is JobState.WAITING else None)
            for j in loaded
            if j is not None
        ]
    waiting = [row for row in out.get("waiting", ()) if row["module"] in rates]
    free = {m: await db.free_at(m, rates[m]) for m in {row["module"] for row in waiting}}
    for row in waiting:
        row["throttled_until"] = free[row["module"]]
    return out


async def page(db: RedisJobs, state: str, offset: int, limit: int) -> tuple[list[int], int]:
    """Waiting jobs in the order they will run (due ones by priority, then delayed
    ones by time); running jobs by start; finished ones newest first. With the ids,
    how many of them (the first ones) are ready: the first is at position ``offset``."""
    stop = offset + limit - 1
    if state != "waiting":
        key = db.key(f"state:{state}")
        raw = await (
            db.redis.zrange(key, offset, stop)
            if state == "running"
            else db.redis.zrevrange(key, offset, stop)
        )
        return [int(m) for m in raw], 0
    await db.call("DUE")  # (a job come due sorts among the ready by priority and id)
    pipe = pipeline(db.redis, transaction=False)
    pipe.zcard(db.key("ready"))
    pipe.zrange(db.key("ready"), offset, stop)
    ready_count, raw = await pipe.execute()
    ready = [int(m) for m in raw]
    if len(ready) == limit:
        return ready, len(ready)
    skip = max(0, offset - ready_count)  # delayed ones after every ready one
    raw = await db.redis.zrange(db.key("delayed"), skip, skip + limit - len(ready) - 1)
    return ready + [int(m) for m in raw], len(ready)


async def _placed(db: RedisJobs, state: str, spec: ListSpec) -> Placed:
    ids, ready = await page(db, state, spec.offset, spec.limit)
    return [(jid, spec.offset + i if i < ready else None) for i, jid in enumerate(ids)]


async def _matching(db: RedisJobs, state: str, spec: ListSpec) -> Placed:
    """The page of the jobs of ``state`` that ``spec.where`` matches, from the first
    ``SCANNED`` in list order; each ready one with its position among all ready jobs."""
    found: Placed = []
    skip, at = spec.offset, 0
    while at < SCANNED and len(found) < spec.limit:
        asked = min(CHUNK, SCANNED - at)
        ids, ready = await page(db, state, at, asked)
        pipe = pipeline(db.redis, transaction=False)
        for jid in ids:
            pipe.hmget(db.key(f"job:{jid}"), "module", "name", "tags")
        for i, (jid, fields) in enumerate(zip(ids, await pipe.execute(), strict=True)):
            if not _fits(spec.where, fields):
                continue
            if skip:
                skip -= 1
            elif len(found) < spec.limit:
                found.append((jid, at + i if i < ready else None))
        if len(ids) < asked:  # (the state's last jobs)
            break
        at += len(ids)
    return found


def _fits(where: JobFilter, fields: list[bytes | None]) -> bool:
    """Whether a job's module, name and tags (HMGET's; no module: the job is gone) match."""
    module, name, tags = fields
    if module is None:
        return False
    return where.matches(module.decode(), None if name is None else name.decode(), read_tags(tags))
