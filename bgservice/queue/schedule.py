"""The embedded engine's waiting line: which waiting job runs next, and when a delayed one
becomes due.

Ready jobs wait in a heap per module, by priority, then id (arrival), so that the pump
passes over a module at its limit without taking out each of its jobs; delayed ones in a
heap by their due time, with one loop timer for the soonest. Entries are never removed
from the middle: each placement of a job gets a number, and only the entry with the
job's latest number is live; the rest (a job cancelled while it waited, then retried and
placed again) are skipped as the reader meets them, as are jobs ``waiting`` no longer
returns.

What ``queue:list``, ``queue:stats`` and ``queue:status`` report is read from these heaps
without sorting or scanning them (reports.py): a heap is walked in its order from its
top, as far as a page goes; a third heap, by the time each job came due, gives the one
due longest. A list or stats call costs what it shows (a page of ``offset + limit``), not
what waits; a position, a walk from the top, or for one deep in line a comparison of each
ready entry at C speed, ``SLICE`` at a time with the loop given back between (100,000
ahead: 9 ms in one turn before).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bgservice.queue.job import Job
from bgservice.queue.slices import slices

Entry = tuple[int, int, int]  # (-priority, id, placement): heapq's order is the run order
Timed = tuple[float, int, int]  # (a time, id, placement): delayed ones, and due since
_NUMBER = operator.itemgetter(2)  # an entry's placement number
SLICE = 5_000  # entries a position compares in one turn of the loop (~1 ms here)
WALKED = 200  # at most, steps a position walks from a heap's top (~0.4 ms) before comparing


def walk(heap: list[Any]) -> Iterator[Any]:
    """A heap's entries in order, without taking any out: each step costs log(steps)."""
    if not heap:
        return
    frontier = [(heap[0], 0)]
    size = len(heap)
    while frontier:
        entry, at = heapq.heappop(frontier)
        yield entry
        for child in (2 * at + 1, 2 * at + 2):
            if child < size:
                heapq.heappush(frontier, (heap[child], child))


def below(heap: list[Any], bound: tuple[Any, ...]) -> Iterator[Any]:
    """The entries of a heap less than ``bound``, in no order: the heap's subtrees whose
    top is not below it are not visited."""
    stack = [0] if heap else []
    size = len(heap)
    while stack:
        at = stack.pop()
        if heap[at] < bound:
            yield heap[at]
            stack += [c for c in (2 * at + 1, 2 * at + 2) if c < size]


class WaitingLine:
    def __init__(self, waiting: Callable[[int], Job | None], on_due: Callable[[], None]) -> None:
        self._waiting = waiting  # id -> the job if it still waits
        self._on_due = on_due  # called when delayed jobs became ready
        self._ready: dict[str, list[Entry]] = {}  # module -> its ready jobs
        self._delayed: list[Timed] = []  # (run_at, id, placement)
        self._due: list[Timed] = []  # (max(created, run_at), id, placement): every placement
        self._placed: dict[int, int] = {}  # id -> its live entry's placement number
        self._live_numbers: set[int] = set()  # the same numbers: counted at C speed
        self._numbers = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when (wall clock) it fires
        self._closed = False

    def place(self, job: Job) -> None:
        """Put a waiting job in line (again: any earlier entry of it is dropped)."""
        self.drop(job.id)
        number = self._placed[job.id] = next(self._numbers)
        self._live_numbers.add(number)
        heapq.heappush(self._due, (max(job.created, job.run_at), job.id, number))
        if len(self._due) > 2 * len(self._placed) + 4096:  # mostly started or placed again
            self._due = [e for e in self._due if self._placed.get(e[1]) == e[2]]
            heapq.heapify(self._due)
        if job.run_at > time.time():
            heapq.heappush(self._delayed, (job.run_at, job.id, number))
            self._arm_timer()
        else:
            heapq.heappush(self._ready.setdefault(job.module, []), (-job.priority, job.id, number))

    def ready(self, skip: set[str]) -> Iterator[Job]:
        """Ready jobs, best first, each taken off the line as it is yielded; one the reader
        does not start now goes back with ``put_back``. Modules in ``skip`` (which the
        reader may add to as it goes) are passed over, their jobs left in line."""
        while True:
            best, empty = None, []
            for module, heap in self._ready.items():
                while heap and not self._live(heap[0]):
                    entry = heapq.heappop(heap)  # stale: placed again since, or gone
                    if self._placed.get(entry[1]) == entry[2]:
                        self.drop(entry[1])
                if not heap:
                    empty.append(module)
                elif module not in skip and (best is None or heap[0] < best[0]):
                    best = (heap[0], heap)
            for module in empty:
                del self._ready[module]
            if best is None:
                return
            _, jid, _ = heapq.heappop(best[1])
            self.drop(jid)
            yield self._waiting(jid)  # type: ignore[misc]  # live: it waits

    def put_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.place(job)

    def drop(self, jid: int) -> None:
        """Take a job out of line: it stopped waiting (cancelled, failed) or was taken."""
        number = self._placed.pop(jid, None)
        if number is not None:
            self._live_numbers.discard(number)

    async def position(self, job: Job) -> int:
        """How many ready jobs run before this ready one (reading no Python object per
        job ahead of it: 100,000 ahead took 49 ms so). The delayed jobs whose time came
        are counted first; then each heap, walked from its top while few are ahead, else
        copied (in a turn of its own) and counted ``SLICE`` entries a turn. The timer
        moves jobs that came due into the heaps meanwhile, under the same placement
        number: those counted first are not counted again (they were, read live). Jobs
        started or gone meanwhile are not counted, and jobs placed meanwhile may be: as a
        moment earlier or later."""
        now, bound = time.time(), (-job.priority, job.id)
        came = {e[2] for e in self._came(now) if e < bound}  # their placement numbers
        ahead, live = len(came), self._live_numbers.__contains__
        for heap in list(self._ready.values()):
            walked = self._walked(heap, bound, came)
            if walked is not None:
                ahead += walked
                continue
            await asyncio.sleep(0)
            # (a copy: the loop moves entries between two slices)
            async for part in slices(list(heap), SLICE):
                numbers: Iterable[int] = map(_NUMBER, filter(bound.__gt__, part))
                if came:  # (rarely any: the timer moves them as they come due)
                    numbers = list(numbers)
                    ahead -= len(came.intersection(numbers))
                ahead += sum(map(live, numbers))
        return ahead

    def _walked(self, heap: list[Entry], bound: tuple[int, int], came: set[int]) -> int | None:
        """Live entries of ``heap`` below ``bound`` but those ``came`` numbers, walked
        from the top; None when there are too many to walk (then compared, at C speed)."""
        live = self._live_numbers.__contains__
        # A step of walk costs ~25 entries compared: a walk given up wastes ~10 % of a scan.
        count, steps = 0, min(len(heap) // 256, WALKED)
        for entry in walk(heap):
            if not entry < bound:
                return count
            count += live(entry[2]) and entry[2] not in came
            steps -= 1
            if steps < 0:
                return None
        return count

    def _live(self, entry: tuple[float, int, int]) -> bool:
        return self._placed.get(entry[1]) == entry[2] and self._waiting(entry[1]) is not None

    # --- what reports.py reads ----------------------------------------------------------

    def in_order(self, now: float, snapshot: bool = False) -> Iterator[Job]:
        """The waiting jobs in line as they will run: the ones due now, then the delayed
        ones by due time (then priority, then id). A reader that gives the loop back
        between two jobs asks for a ``snapshot``: the heaps as they are now (a copy, at C
        speed, made in this call), each job still waiting when its turn comes."""
        ready = [list(heap) if snapshot else heap for heap in self._ready.values()]
        delayed = list(self._delayed) if snapshot else self._delayed
        return self._in_order(now, ready, delayed, sorted(self._came(now)))

    def _in_order(
        self, now: float, ready: list[list[Entry]], delayed: list[Timed], came: list[Entry]
    ) -> Iterator[Job]:
        # The ready entries, with the delayed ones whose time came (the timer moves them in
        # a moment) among them; then the delayed ones still to come, a due time at a time.
        for entry in filter(self._live, heapq.merge(*map(walk, ready), came)):
            yield self._waiting(entry[1])  # type: ignore[misc]  # live
        later = (e for e in walk(delayed) if e[0] > now and self._live(e))
        for _, group in itertools.groupby(later, key=lambda e: e[0]):
            jobs: Iterable[Job] = map(self._waiting, (e[1] for e in group))  # type: ignore[arg-type]
            yield from sorted(jobs, key=lambda j: (-j.priority, j.id))

    def _came(self, now: float) -> list[Entry]:
        """Delayed entries whose time came, as the ready entries they are about to be."""
        return [(-j.priority, j.id, e[2]) for e in below(self._delayed, (now, float("inf")))
                if self._live(e) and (j := self._waiting(e[1]))]  # fmt: skip

    def due_since(self, now: float) -> float | None:
        """When the job in line due longest came due (created, or its delay's end)."""
        while self._due and not self._live(self._due[0]):
            heapq.heappop(self._due)  # started, placed again since, or gone
        return self._due[0][0] if self._due and self._due[0][0] <= now else None

    # --- the timer ----------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()

    def wake_at(self, when: float) -> None:
        """Call ``on_due`` again by ``when`` (wall clock): a rate window frees then."""
        self._arm_timer(when)

    def _arm_timer(self, extra: float | None = None) -> None:
        times = [self._delayed[0][0]] if self._delayed else []
        times += [] if extra is None else [extra]
        if not times or self._closed:
            return
        when = min(times)
        if self._timer is not None:
            if self._timer_at <= when + 1e-3:  # both wall-clock times (run_at is one)
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # At most a day ahead: _wake arms it again (very far times stay within the loop's
        # timer range, and a wall clock that was set meanwhile is followed).
        now = time.time()
        wait = min(max(0.0, when - now), 86400.0)
        self._timer_at = now + wait
        self._timer = loop.call_later(wait, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, jid, number = heapq.heappop(self._delayed)
            if self._placed.get(jid) != number:
                continue  # an earlier placement
            job = self._waiting(jid)
            if job is None:
                self.drop(jid)
            else:
                heapq.heappush(self._ready.setdefault(job.module, []), (-job.priority, jid, number))
        self._arm_timer()
        self._on_due()
