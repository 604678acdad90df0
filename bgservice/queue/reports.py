"""What ``queue:list`` and ``queue:stats`` report of the embedded engine: the jobs in memory
(waiting and running) and, for finished ones and the run history, the store.

The engine's waiting line (schedule.py) holds its waiting jobs in run order already: a
page is read from it as far as ``offset + limit`` goes, the job due longest from its top,
the running jobs from the engine's few. Sorting or counting every job in memory on each
call held the loop 40-60 ms with 100,000 waiting (0.5 s with 1,000,000), every other
client waiting meanwhile; a dashboard open asks for both every 2 s.

A filtered page (``module=``, ``name=``, ``tag=``) is read from the line the same way,
as far as the page goes or the line's last match: the waiting jobs that match are counted
first (one pass over the jobs in memory: ~20 ms for 100,000), so that the walk stops at
the last of them, and a filter that matches none walks nothing (the whole line of 100,000
took ~0.4 s to walk, as a page at its end does)."""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

from bgservice.config import QueueSettings
from bgservice.queue.commands import STATES, JobFilter, ListSpec
from bgservice.queue.engine import queue_stats
from bgservice.queue.job import Job, JobState
from bgservice.queue.live import LiveJobs
from bgservice.queue.rates import Windows
from bgservice.queue.schedule import WaitingLine
from bgservice.queue.store import Store, Writes


@dataclass(frozen=True)
class Live:
    """What the reports read of the embedded engine, handed to them when it is made."""

    jobs: LiveJobs  # waiting and running
    line: WaitingLine  # the waiting ones in line, in run order
    running: Mapping[int, object]  # the running jobs' ids
    blocked: Callable[[int], bool]  # waits on another job (after=)
    blocked_ids: Callable[[], Iterable[int]]  # the ids of those
    # The engine's rate windows ([queue] module_rates), asked at each call (they are set
    # after the engine is made): when a waiting job's module has room again.
    rates: Callable[[], Windows] = lambda: Windows({})
    # Workers held by handlers past their job's timeout (Pump.hold): taken, yet no job of
    # theirs counts as running.
    held: Callable[[], int] = lambda: 0


async def list_page(live: Live, store: Store, spec: ListSpec) -> dict[str, Any]:
    """One page per state asked (waiting, running and failed by default). Waiting jobs in
    the order they will run: the ones due now as the waiting line takes them, then the
    delayed ones by due time, then the ones waiting on another job. A waiting job that is
    in line (due, and waiting on no other job) has a position: how many such jobs run
    before it, counted in the one pass that reads the page (of every job in line, the
    page filtered or not)."""
    states = [spec.state] if spec.state else ["waiting", "running", "failed"]
    now = time.time()
    out: dict[str, Any] = {}
    for state in states:
        if state == "waiting":
            out[state] = _waiting_page(live, spec, now)
        elif state == "running":
            running = [j for j in _running(live) if _kept(spec.where, j)]
            out[state] = [j.describe(now) for j in running[spec.offset : spec.offset + spec.limit]]
        else:
            page = await store.list_jobs(state, spec.limit, spec.offset, spec.where)
            out[state] = [j.describe(now) for j in page]
    return out


def _kept(where: JobFilter, job: Job) -> bool:
    return where.matches(job.module, job.name, job.tags)


def _waiting_page(live: Live, spec: ListSpec, now: float) -> list[dict[str, Any]]:
    """Read from the line as far as the page goes (filtered: or as far as the last job in
    line that matches); the jobs waiting on another job (in no line) only when the page
    goes past every job in line that it lists."""
    end, index, ahead, where = spec.offset + spec.limit, 0, 0, spec.where
    blocked = [j for j in map(live.jobs.get, live.blocked_ids())
               if j is not None and j.state is JobState.WAITING and _kept(where, j)]  # fmt: skip
    keep = (lambda job: _kept(where, job)) if where else None
    # In line: at most every job in memory; filtered, exactly the matches not blocked.
    left = _in_line_matching(live, where, blocked) if where else len(live.jobs)
    rows: list[dict[str, Any]] = []
    for job in live.line.in_order(now) if left else ():
        if index >= end:
            return rows
        position = None
        if job.run_at <= now:  # the due ones come first, the delayed ones after
            position, ahead = ahead, ahead + 1
        if keep is not None and not keep(job):
            continue
        if index >= spec.offset:  # throttled_until: as queue:status has it
            rows.append(job.describe(now, position, live.rates().free_at(job.module, now)))
        index, left = index + 1, left - 1
        if not left:  # (each in line met: no match further on)
            break
    behind = sorted(blocked, key=lambda j: _run_order(j, now, live.blocked))
    start = max(0, spec.offset - index)  # (index: how many are in line)
    return rows + [j.describe(now, None, live.rates().free_at(j.module, now))
                   for j in behind[start : end - index]]  # fmt: skip


def _in_line_matching(live: Live, where: JobFilter, blocked: Collection[Job]) -> int:
    """How many waiting jobs in line ``where`` matches: the waiting ones in memory that it
    matches (one pass: ~20 ms for 100,000), less ``blocked``, those of them that wait on
    another job."""
    matching = sum(1 for job in live.jobs.values()
                   if job.state is JobState.WAITING and _kept(where, job))  # fmt: skip
    return matching - len(blocked)


def _running(live: Live) -> list[Job]:
    """The running jobs (as many as there are workers at most), by priority, then id."""
    jobs = [j for j in map(live.jobs.get, live.running) if j is not None]
    return sorted(jobs, key=lambda j: (-j.priority, j.id))


def _run_order(job: Job, now: float, blocked: Callable[[int], bool]) -> tuple[int, float, int, int]:
    """Jobs due now by priority, then arrival (id), as the waiting line takes them; then
    the delayed ones by due time; then the ones waiting on another job (by due time, then
    as the line would take them). Running jobs: by priority, then id."""
    if blocked(job.id):
        return (2, max(job.run_at, now), -job.priority, job.id)
    if job.run_at > now:
        return (1, job.run_at, -job.priority, job.id)
    return (0, 0.0, -job.priority, job.id)


async def stats(
    live: Live,
    store: Store,
    settings: QueueSettings,
    window: float,
    writes: Writes,
) -> dict[str, Any]:
    """``writes``: the saves in flight, for the store's counts to hold each job once."""
    now = time.time()
    counts = {s: 0 for s in STATES}
    # As memory has them in the step of the store's answer: with the jobs that ended but
    # are not written yet (else counted by neither: 10,000 jobs ending, 2,000 short), less
    # the retried ones still written finished (else by both: 64 retries at once, 64 over).
    counts.update(await store.counts(writes))
    running = _running(live)
    counts["waiting"] = len(live.jobs) - len(running)  # the jobs in memory wait or run
    counts["running"] = len(running)
    # The age of the longest due: a delayed job counts from its due time, and one waiting
    # on another job not at all (an alert on this gauge is about a backlog).
    oldest = live.line.due_since(now)
    history = await store.run_history(now, window)
    names, left_out = _names(live.jobs.values(), running, settings.max_page)
    summary = queue_stats(counts, oldest, history, settings.workers)
    return {**summary, "workers_held": live.held(), "names": names, "names_left_out": left_out}


def _names(
    jobs: Collection[Job], running: list[Job], most: int
) -> tuple[dict[str, dict[str, int]], int]:
    """``names``: the jobs in memory counted by name at C speed (4 ms per 100,000, where
    a loop over them took 60), less the running ones, which are few: the rest wait. Only
    the ``most`` names with the most jobs ([queue] max_page), and how many were left out:
    90,000 waiting jobs of distinct names made a 4.7 MB reply, asked for by every open
    dashboard every 2 s."""
    named = Counter(filter(None, map(attrgetter("name"), jobs)))
    busy = Counter(j.name for j in running if j.name)
    top = heapq.nlargest(most, named.items(), key=itemgetter(1))  # (ties: the first seen)
    rows = {name: {"waiting": n - busy[name], "running": busy[name]} for name, n in top}
    return rows, len(named) - len(rows)
