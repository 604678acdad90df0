"""The embedded engine's waiting line: which waiting job runs next, and when a delayed one
becomes due.

Ready jobs wait in a heap per module, by priority, then id (arrival), so that the pump
passes over a module at its limit without taking out each of its jobs; delayed ones in a
heap by their due time, with one loop timer for the soonest. Entries are never removed
from the middle: each placement of a job gets a number, and only the entry with the
job's latest number is live; the rest (a job cancelled while it waited, then retried and
placed again) are skipped as the reader meets them, as are jobs ``waiting`` no longer
returns.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterator

from bgservice.queue.job import Job

Entry = tuple[int, int, int]  # (-priority, id, placement): heapq's order is the run order


class WaitingLine:
    def __init__(self, waiting: Callable[[int], Job | None], on_due: Callable[[], None]) -> None:
        self._waiting = waiting  # id -> the job if it still waits
        self._on_due = on_due  # called when delayed jobs became ready
        self._ready: dict[str, list[Entry]] = {}  # module -> its ready jobs
        self._delayed: list[tuple[float, int, int]] = []  # (run_at, id, placement)
        self._placed: dict[int, int] = {}  # id -> its live entry's placement number
        self._numbers = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when (wall clock) it fires
        self._closed = False

    def place(self, job: Job) -> None:
        """Put a waiting job in line (again: any earlier entry of it is dropped)."""
        number = self._placed[job.id] = next(self._numbers)
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
                        del self._placed[entry[1]]
                if not heap:
                    empty.append(module)
                elif module not in skip and (best is None or heap[0] < best[0]):
                    best = (heap[0], heap)
            for module in empty:
                del self._ready[module]
            if best is None:
                return
            _, jid, _ = heapq.heappop(best[1])
            del self._placed[jid]
            yield self._waiting(jid)  # type: ignore[misc]  # live: it waits

    def put_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.place(job)

    def position(self, job: Job) -> int:
        """How many ready jobs run before this ready one."""
        key = (-job.priority, job.id)
        return sum(
            1 for heap in self._ready.values() for e in heap if e[:2] < key and self._live(e)
        )

    def _live(self, entry: tuple[float, int, int]) -> bool:
        return self._placed.get(entry[1]) == entry[2] and self._waiting(entry[1]) is not None

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
                del self._placed[jid]
            else:
                heapq.heappush(self._ready.setdefault(job.module, []), (-job.priority, jid, number))
        self._arm_timer()
        self._on_due()
