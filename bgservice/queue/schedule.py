"""The embedded engine's waiting line: which waiting job runs next, and when a delayed one
becomes due.

Ready jobs wait in a heap by priority, then id (arrival); delayed ones in a heap by their
due time, with one loop timer for the soonest. Entries are never removed from the middle:
a job cancelled while it waits leaves a stale entry that the reader skips (``waiting``
decides what is live).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Iterator

from bgservice.queue.job import Job

Entry = tuple[int, int]  # (-priority, id): heapq's order is the order jobs run in


class WaitingLine:
    def __init__(self, waiting: Callable[[int], Job | None], on_due: Callable[[], None]) -> None:
        self._waiting = waiting  # id -> the job if it still waits
        self._on_due = on_due  # called when delayed jobs became ready
        self._ready: list[Entry] = []
        self._delayed: list[tuple[float, int]] = []  # (run_at, id)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when (wall clock) it fires
        self._closed = False

    def place(self, job: Job) -> None:
        if job.run_at > time.time():
            heapq.heappush(self._delayed, (job.run_at, job.id))
            self._arm_timer()
        else:
            heapq.heappush(self._ready, (-job.priority, job.id))

    def ready(self) -> Iterator[Job]:
        """Ready jobs, best first, each taken off the line as it is yielded; one the reader
        does not start now goes back with ``put_back``."""
        while self._ready:
            job = self._waiting(heapq.heappop(self._ready)[1])
            if job is not None:  # else cancelled while it waited
                yield job

    def put_back(self, jobs: list[Job]) -> None:
        for job in jobs:
            heapq.heappush(self._ready, (-job.priority, job.id))

    def position(self, job: Job) -> int:
        """How many ready jobs run before this ready one."""
        key = (-job.priority, job.id)
        return sum(1 for entry in self._ready if entry < key and self._waiting(entry[1]))

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
            _, jid = heapq.heappop(self._delayed)
            job = self._waiting(jid)
            if job is not None:
                heapq.heappush(self._ready, (-job.priority, jid))
        self._arm_timer()
        self._on_due()
