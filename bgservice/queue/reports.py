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
the last of them, and a filter that matches none walks nothing.

A walk that goes deep (a page at offset 99,900 of 100,000, or a filter's last match at
the line's end: ~0.4 s) and a filter's count do not hold the loop for it: they give it
back to the other clients every ``WALK_SLICE`` jobs walked (``COUNT_SLICE`` counted),
about a millisecond each, the walk reading a snapshot of the line. The jobs waiting on
another job (in no line: a fan-out may leave 100,000 after one) are read only by a page
that goes past the line, 1,000 a turn."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from bgservice.config import QueueSettings
from bgservice.queue.commands import STATES, JobFilter, ListSpec
from bgservice.queue.engine import queue_stats
from bgservice.queue.job import Job, JobState
from bgservice.queue.live import LiveJobs
from bgservice.queue.rates import Windows
from bgservice.queue.schedule import WaitingLine
from bgservice.queue.slices import slices
from bgservice.queue.store import Store, Writes

# How much a page's walk reads between two turns of the loop given back to the other
# clients (each about 1 ms here): jobs walked in line, and jobs a filter's count reads.
WALK_SLICE = 250
COUNT_SLICE = 5_000


@dataclass(frozen=True)
class Live:
    """What the reports read of the embedded engine, handed to them when it is made."""

    jobs: LiveJobs  # waiting and running
    line: WaitingLine  # the waiting ones in line, in run order
    running: Mapping[int, object]  # the running jobs' ids
    blocked: Callable[[int], bool]  # waits on another job (after=)
    blocked_ids: Callable[[], Collection[int]]  # the ids of those
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
            out[state] = await _waiting_page(live, spec, now)
        elif state == "running":
            running = [j for j in _running(live) if _kept(spec.where, j)]
            out[state] = [j.describe(now) for j in running[spec.offset : spec.offset + spec.limit]]
        else:
            page = await store.list_jobs(state, spec.limit, spec.offset, spec.where)
            out[state] = [j.describe(now) for j in page]
    return out


def _kept(where: JobFilter, job: Job) -> bool:
    return where.matches(job.module, job.name, job.tags)


async def _waiting_page(live: Live, spec: ListSpec, now: float) -> list[dict[str, Any]]:
    """Read from the line as far as the page goes (filtered: or as far as the last job in
    line that matches); the jobs waiting on another job (in no line) only when the page
    goes past every job in line that it lists. A walk that may pass ``WALK_SLICE`` jobs
    reads a snapshot of the line, and gives the loop back after each ``WALK_SLICE``."""
    end, index, ahead, where = spec.offset + spec.limit, 0, 0, spec.where
    keep = (lambda job: _kept(where, job)) if where else None
    line = live.line.in_order(now, snapshot=end > WALK_SLICE or keep is not None)
    # In line: at most every job in memory; filtered, at most the matches not blocked,
    # counted after the snapshot (a job placed meanwhile would be met, not counted).
    left = await _in_line_matching(live, where) if where else len(live.jobs)
    rows: list[dict[str, Any]] = []
    for walked, job in enumerate(line if left else (), 1):
        if index >= end:
            return rows
        position = None
        if job.run_at <= now:  # the due ones come first, the delayed ones after
            position, ahead = ahead, ahead + 1
        if keep is None or keep(job):
            if index >= spec.offset:  # throttled_until: as queue:status has it
                rows.append(job.describe(now, position, live.rates().free_at(job.module, now)))
            index, left = index + 1, left - 1
            if not left:  # (each in line met: no match further on)
                break
        if walked % WALK_SLICE == 0:
            await asyncio.sleep(0)
    if index >= end:
        return rows
    behind = await _behind(live, where, now, end - index)  # (index: how many are in line)
    return rows + [j.describe(now, None, live.rates().free_at(j.module, now))
                   for j in behind[max(0, spec.offset - index) :]]  # fmt: skip


async def _in_line_matching(live: Live, where: JobFilter) -> int:
    """At most how many waiting jobs in line ``where`` matches: the waiting ones in memory
    that it matches and that wait on no other job (one pass: ~25 ms for 100,000, the loop
    given back after each ``COUNT_SLICE``), read after the line's snapshot was taken. A
    job that changes meanwhile can only make the count too high (the walk then goes on to
    the line's end), never too low: one the walk meets has stayed in line since the
    snapshot (else it was dropped, or placed again under a new number, and is skipped),
    so it waited, in no other job's wait, when it was counted."""
    count, matches = 0, where.matches
    async for part in slices(list(live.jobs.values()), COUNT_SLICE):
        blocked = live.blocked_ids()  # (its own: at C speed)
        count += sum(1 for job in part
                     if job.state is JobState.WAITING and job.id not in blocked
                     and matches(job.module, job.name, job.tags))  # fmt: skip
    return count


async def _behind(live: Live, where: JobFilter, now: float, most: int) -> list[Job]:
    """The first ``most``, in run order, of the waiting jobs that wait on another job and
    that ``where`` matches (a fan-out may leave 100,000 waiting on one job: the loop is
    given back after each ``COUNT_SLICE // 5`` read, their order then taken at C speed)."""
    keyed = []
    async for part in slices(list(live.blocked_ids()), COUNT_SLICE // 5):
        for job in map(live.jobs.get, part):
            if job is not None and job.state is JobState.WAITING and _kept(where, job):
                keyed.append((_run_order(job, now, live.blocked), job))  # (ids differ)
    return [job for _, job in heapq.nsmallest(most, keyed, key=itemgetter(0))]


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
    names, left_out = _names(live.jobs.names, running, settings.max_page)
    summary = queue_stats(counts, oldest, history, settings.workers)
    return {**summary, "workers_held": live.held(), "names": names, "names_left_out": left_out}


def _names(
    named: Counter[str], running: list[Job], most: int
) -> tuple[dict[str, dict[str, int]], int]:
    """``names``: the jobs in memory by name (``named``, kept as they come and go: a
    count of them at each call, even at C speed, held the loop 9 ms per 100,000), less
    the running ones, which are few: the rest wait. Only the ``most`` names with the most
    jobs ([queue] max_page), and how many were left out: 90,000 waiting jobs of distinct
    names made a 4.7 MB reply, asked for by every open dashboard every 2 s."""
    busy = Counter(j.name for j in running if j.name)
    top = heapq.nlargest(most, named.items(), key=itemgetter(1))  # (ties: the first seen)
    rows = {name: {"waiting": n - busy[name], "running": busy[name]} for name, n in top}
    return rows, len(named) - len(rows)
