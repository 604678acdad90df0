"""What ``queue:list`` and ``queue:stats`` report of the embedded engine: the jobs in memory
(waiting and running) and, for finished ones and the run history, the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from bgservice.config import QueueSettings
from bgservice.queue.commands import STATES, ListSpec
from bgservice.queue.engine import name_counts, queue_stats
from bgservice.queue.job import Job, JobState
from bgservice.queue.store import Store


async def list_page(
    live: Collection[Job],
    store: Store,
    spec: ListSpec,
    blocked: Callable[[int], bool],
) -> dict[str, Any]:
    """One page per state asked (waiting, running and failed by default). Waiting jobs in
    the order they will run: the ones due now as the waiting line takes them, then the
    delayed ones by due time, then the ones waiting on another job. A waiting job that is
    in line (due, and waiting on no other job) has a position: how many such jobs run
    before it, counted in the one pass that sorts them."""
    states = [spec.state] if spec.state else ["waiting", "running", "failed"]
    now = time.time()
    out: dict[str, Any] = {}
    for state in states:
        if state not in ("waiting", "running"):
            page = await store.list_jobs(state, spec.limit, spec.offset)
            out[state] = [j.describe(now) for j in page]
            continue
        in_state = sorted(
            (j for j in live if j.state == state), key=lambda j: _run_order(j, now, blocked)
        )
        ahead, rows = 0, []
        for index, job in enumerate(in_state[: spec.offset + spec.limit]):
            position = None
            if state == "waiting" and job.run_at <= now and not blocked(job.id):
                position, ahead = ahead, ahead + 1
            if index >= spec.offset:
                rows.append(job.describe(now, position))
        out[state] = rows
    return out


def _run_order(
    job: Job, now: float, blocked: Callable[[int], bool]
) -> tuple[int, float, int, int]:
    """Jobs due now by priority, then arrival (id), as the waiting line takes them; then
    the delayed ones by due time; then the ones waiting on another job (by due time, then
    as the line would take them). Running jobs: by priority, then id."""
    if blocked(job.id):
        return (2, max(job.run_at, now), -job.priority, job.id)
    if job.run_at > now:
        return (1, job.run_at, -job.priority, job.id)
    return (0, 0.0, -job.priority, job.id)


async def stats(
    live: Collection[Job],
    running: int,
    store: Store,
    settings: QueueSettings,
    window: float,
    in_line: Callable[[Job, float], bool],
) -> dict[str, Any]:
    now = time.time()
    counts = {s: 0 for s in STATES}
    counts.update(await store.counts())
    counts["waiting"] = sum(1 for j in live if j.state is JobState.WAITING)
    counts["running"] = running
    # The age of the longest due: a delayed job counts from its due time, and one waiting
    # on another job not at all (an alert on this gauge is about a backlog).
    oldest = min((max(j.created, j.run_at) for j in live if in_line(j, now)), default=None)
    history = await store.run_history(now, window)
    names = name_counts((j.name, str(j.state)) for j in live if not j.state.finished)
    return {**queue_stats(counts, oldest, history, settings.workers), "names": names}
