"""The embedded engine's pump: which ready jobs start now.

It takes ready jobs from the waiting line, best first, while workers are free, and
passes over the jobs of a module at its ``[queue] module_limits`` or over its
``module_rates`` (they go back in line; a rate's window wakes the line when it frees).
A job whose handler outlived its timeout keeps its worker and its module's slot until the
handler really ends (``hold``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

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
        self._outlived: Counter[str] = Counter()  # handlers past their job, per module (hold)
        self._outlived_total = 0

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

    def hold(self, module: str, going_on: Future[Any]) -> None:
        """A job of ``module`` ended at its timeout while its handler goes on until
        ``going_on`` is done: a ``def`` handler's thread (Python cannot stop it), an
        ``async def`` one that caught its cancellation. Its worker and its module's slot
        stay taken until then, as Celery holds a worker past a soft time limit (freed at
        the timeout, ``workers = 1`` or a module limit of 1 ran the next job, the job's
        own retry too, beside it); then look again for a job to start."""
        self._outlived[module] += 1
        self._outlived_total += 1
        loop = asyncio.get_running_loop()  # (the callback may run in the handler's thread)

        def released(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the service stopped
                loop.call_soon_threadsafe(self._released, module)

        going_on.add_done_callback(released)

    def held(self) -> int:
        """Workers taken by handlers past their job's timeout (``hold``): ``queue:stats``'
        ``workers_held``, else a queue that starts nothing with every worker idle on paper."""
        return self._outlived_total

    def _released(self, module: str) -> None:
        self._outlived[module] -= 1
        if not self._outlived[module]:
            del self._outlived[module]
        self._outlived_total -= 1
        self()

    def _taken(self, module: str) -> int:
        """Slots of ``module`` taken: its running jobs, and handlers past their job (hold)."""
        return self.per_module[module] + self._outlived[module]

    def _busy(self) -> bool:
        """No worker is free: jobs run on every one, or handlers past their job hold it."""
        return self._running() + self._outlived_total >= self._workers

    def _once(self) -> None:
        if self._busy():
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
            elif limit is not None and self._taken(job.module) >= limit:
                held.append(job)
                skip.add(job.module)
            else:
                rates.started(job.module, now)
                self._started.add(job.id)
                self._start(job)
                if len(self._started) >= PER_TURN:
                    self._again = True  # (the call's loop ends on the bound, then goes on soon)
                    break
            if self._busy():
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

