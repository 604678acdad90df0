"""The embedded engine's pump: which ready jobs start now.

It takes ready jobs from the waiting line, best first, while workers are free, and
passes over the jobs of a module at its ``[queue] module_limits`` or over its
``module_rates`` (they go back in line; a rate's window wakes the line when it frees).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from bgservice.queue.job import Job
from bgservice.queue.rates import Windows
from bgservice.queue.schedule import WaitingLine

# Jobs one call starts at most; the rest on the loop's next turns. A job whose handler
# replies without waiting frees its worker at once, so without a bound a backlog of them
# coming due together ran whole in one turn (100,000 `test` jobs: 3.7 s of no answer to
# anyone else).
PER_TURN = 100
# While the store is behind (``behind()``), the pump waits this long before it looks again:
# each job started now is two more saves waiting in memory for the store, and every full
# collection of the garbage collector walks them (100,000 jobs freed at once: 14,666
# saves in flight a second in, collections of 60-130 ms).
BEHIND_WAIT = 0.005


class Pump:
    def __init__(
        self,
        line: WaitingLine,
        workers: int,
        module_limits: dict[str, int],
        rates: Callable[[], Windows],
        running: Callable[[], int],
        start: Callable[[Job], None],
        behind: Callable[[], bool] = lambda: False,
    ) -> None:
        self._line = line
        self._workers = workers
        self._limits = module_limits
        self._rates = rates  # the queue's (set after it is made)
        self._running = running  # how many jobs run now
        self._start = start
        self._behind = behind  # the store has too many saves in flight
        self.per_module: Counter[str] = Counter()  # running jobs per module: the queue counts
        self.closed = False
        self._pumping = False
        self._again = False
        self._started: set[int] = set()  # by this call: none starts twice in one
        self._soon = False  # a call is due on the loop's next turn
        self._waiting = False  # a call is due once the store has caught up a little

    def __call__(self) -> None:
        """Start ready jobs while there are free workers, best priority first, at most
        ``PER_TURN`` of them (the next call comes on the loop's next turn).

        A job that finishes at once (``start``) calls this again from inside: that call
        only asks the running one to look once more. A job starts at most once per call:
        one that failed at once and is due again (a retry without backoff) waits for the
        loop's next turn, or it would keep the loop to itself."""
        if self.closed:
            return
        if self._pumping:
            self._again = True
            return
        if self._behind():
            if not self._waiting:
                self._waiting = True
                asyncio.get_running_loop().call_later(BEHIND_WAIT, self._caught_up)
            return
        self._pumping = True
        self._started.clear()
        try:
            self._again = True
            while self._again and len(self._started) < PER_TURN:
                self._again = False
                self._once()
            if self._again:  # stopped by PER_TURN with jobs perhaps ready: go on soon
                self._go_on_soon()
        finally:
            self._pumping = False

    def _once(self) -> None:
        if self._running() >= self._workers:
            return
        held: list[Job] = []
        skip: set[str] = set()  # modules at their limit or rate: their jobs stay in line
        rates = self._rates()
        now, throttled = time.time(), float("inf")
        for job in self._line.ready(skip):
            if job.id in self._started:
                held.append(job)
                self._go_on_soon()
                break
            limit = self._limits.get(job.module)
            free_at = rates.free_at(job.module, now)
            if free_at is not None:  # over its module's rate: it waits for the window
                throttled = min(throttled, free_at)
                held.append(job)
                skip.add(job.module)
            elif limit is not None and self.per_module[job.module] >= limit:
                held.append(job)
                skip.add(job.module)
            else:
                rates.started(job.module, now)
                self._started.add(job.id)
                self._start(job)
                if len(self._started) >= PER_TURN:
                    self._again = True  # (the call's loop ends on the bound, then goes on soon)
                    break
            if self._running() >= self._workers:
                break
        self._line.put_back(held)
        if throttled < float("inf"):
            self._line.wake_at(throttled + 0.001)

    def _go_on_soon(self) -> None:
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._later)

    def _later(self) -> None:
        self._soon = False
        self()

    def _caught_up(self) -> None:
        self._waiting = False
        self()
