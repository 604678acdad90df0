"""Pools of worker processes for ``EXECUTION = "process"`` modules.

A compile that holds the GIL (libsass, an embedded JavaScript engine) would freeze every
thread of the service; in another process it freezes nothing. Each module gets its own
pool (``PROCESSES`` or ``[workers] processes``); a worker runs one call at a time.
A call past its timeout kills its worker (a thread cannot be stopped, a process can), a
worker that dies costs only the call it was running, and the pool refills itself. A call
that waited for a worker until too little of its timeout was left is not started (a
worker is killed only for a call that had a chance to finish), nor is a cut call's worker
used again.
Workers are recycled after ``max_calls`` calls or above ``max_memory_mb`` of memory; a
stopping worker (running its unload() hooks) still counts against the pool's size, so a
slow hook makes calls wait rather than pile up processes.
A module that is deleted or leaves process mode has its pool retired: no new calls, the
running ones finish (each under its own timeout), then the workers stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgservice import process_messages as msg
from bgservice.config import WorkerSettings
from bgservice.errors import CallTimeout, WorkerDied
from bgservice.logs import Sparse
from bgservice.process_worker import WorkerProcess
from bgservice.registry import ModuleVersion
from bgservice.request import Request

log = logging.getLogger(__name__)
# A call that gets a worker with less than this share of its timeout left is not started.
START_FLOOR = 0.1
DEATH_LINES = 5.0  # s: a pool's worker deaths (a crash loop), a log line at most this often


class ProcessPool:
    """The worker processes of one module.

    A retired pool (``drain``) takes no new calls: the calls it has already taken finish
    (those waiting for a worker get one), then its workers stop and ``on_empty`` runs.
    """

    def __init__(self, name: str, folder: Path, settings: WorkerSettings, grace: float) -> None:
        self.name = name
        self.folder = folder
        self.settings = settings
        self.grace = grace  # for a stopped worker to run its unload() hooks and exit
        self.size = settings.processes
        self.workers: set[WorkerProcess] = set()
        self.stopping: set[WorkerProcess] = set()  # sent Stop, not yet exited
        self.idle: list[WorkerProcess] = []
        self.waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self.closing = False  # shutdown: waiters fail, workers stop
        self.on_empty: Callable[[ProcessPool], None] | None = None  # set once retired
        self.spawned = 0
        self._spawning: set[asyncio.Task[None]] = set()
        self._deaths = Sparse(DEATH_LINES, self._more_deaths)

    async def _spawn(self) -> WorkerProcess:
        worker = await WorkerProcess.start(self.folder, self.name, self.lost, self.grace)
        self.workers.add(worker)
        self.spawned += 1
        log.debug("module %s: worker process %d started", self.name, worker.proc.pid)
        return worker

    async def acquire(self) -> WorkerProcess:
        while self.idle:
            worker = self.idle.pop()
            if worker.alive:
                return worker
        # Wait in line; a short pool starts a worker in a task of its own, so a caller
        # that gives up (timeout) never leaves a half-started process behind.
        future: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self._refill()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (its timeout) after a worker was handed to it, before it
            # could run again: the worker goes on to the next caller, or it is lost.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise

    def release(self, worker: WorkerProcess) -> None:
        worker.current = None
        if not worker.alive:
            self._settle()
            return
        reason = self._recycle_reason(worker)
        if reason or self.closing or len(self.workers) > self.size:
            if reason:
                log.info("module %s: recycling worker %d (%s)", self.name, worker.proc.pid, reason)
            self._retire(worker)
            self._refill()
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        if self.on_empty is not None:  # retired: no call will come for it
            self._retire(worker)
            return
        self.idle.append(worker)

    def _recycle_reason(self, worker: WorkerProcess) -> str | None:
        if self.settings.max_calls and worker.calls >= self.settings.max_calls:
            return f"{worker.calls} calls"
        if self.settings.max_memory_mb and worker.rss_mb() > self.settings.max_memory_mb:
            return f"{worker.rss_mb():.0f} MB resident"
        return None

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop an idle worker: it runs its unload() hooks and exits (killed after grace)."""
        self.workers.discard(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        self.stopping.add(worker)
        worker.stopped = True
        loop = asyncio.get_running_loop()
        worker.stop_timer = loop.call_later(self.grace, self._cut, worker, self.grace)
        try:
            worker.send(msg.Stop())
        except (ConnectionError, RuntimeError):
            worker.kill()

    def _cut(self, worker: WorkerProcess, after: float) -> None:
        """Kill a worker; one stopped and still running its unload() hooks (at the end of
        its grace) is logged."""
        if worker.alive and worker.stopped:
            log.warning("module %s: worker %d still running its unload() hooks after %g s "
                        "([limits] shutdown_grace): killed", self.name, worker.proc.pid,
                        after)  # fmt: skip
        worker.kill()

    def lost(self, worker: WorkerProcess) -> None:
        """A worker's process ended (killed, crashed, recycled)."""
        code = worker.proc.returncode
        if not worker.killed and (not worker.stopped or code):  # no one asked it to end
            self._tell_death(worker, code or 0)
        self.workers.discard(worker)
        self.stopping.discard(worker)
        if worker.stop_timer is not None:
            worker.stop_timer.cancel()
        if worker in self.idle:
            self.idle.remove(worker)
        self._refill()
        self._settle()

    def _tell_death(self, worker: WorkerProcess, code: int) -> None:
        # A line each, or of a crash loop one every DEATH_LINES s saying how many more.
        if count := self._deaths.tick(time.monotonic()):
            log.warning(
                "module %s: worker process %d died (%s) %s%s", self.name, worker.proc.pid,
                msg.ending(code), "running a call" if worker.current is not None else "idle",
                f" ({count - 1} more since the last line)" if count > 1 else "",
            )  # fmt: skip

    def _more_deaths(self, count: int) -> None:
        log.warning("module %s: %d more worker processes died since the last line",
                    self.name, count)  # fmt: skip

    def _waiting(self) -> bool:  # a call waits for a worker (not one that gave up)
        return any(not w.done() for w in self.waiters)

    def _refill(self) -> None:
        # Someone waits for a worker and the pool is short: start one at once.
        if self.closing or not self._waiting():
            return
        if len(self.workers) + len(self.stopping) + len(self._spawning) >= self.size:
            return  # (a stopping worker still holds its place until it has exited)
        task = asyncio.get_running_loop().create_task(self._spawn_for_waiter())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)  # (cancelled at shutdown)

    async def _spawn_for_waiter(self) -> None:
        worker = None
        try:
            worker = await self._spawn()
        except OSError as exc:
            log.error("module %s: cannot start a worker process: %s", self.name, exc)
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(WorkerDied(f"Cannot start a worker: {exc}"))
        # Counted in self.workers now: no longer as spawning too, or a call that waits
        # meanwhile would find the pool full and get no worker of its own.
        self._spawning.discard(asyncio.current_task())
        if worker is not None:
            self.release(worker)
        self._settle()

    def drain(self, on_empty: Callable[[ProcessPool], None]) -> None:
        """Retire the pool: idle workers stop now, busy ones once their call has ended
        (each call is bounded by its own timeout); ``on_empty`` runs when none is left."""
        self.on_empty = on_empty
        for worker in list(self.idle):
            self._retire(worker)
        self._settle()

    def _settle(self) -> None:
        if self.on_empty is None or self.workers or self.stopping or self._spawning:
            return
        if not self._waiting():
            on_empty, self.on_empty = self.on_empty, None
            on_empty(self)

    async def close(self, grace: float) -> None:
        """Shutdown: the service has already waited for its calls; stop every worker, and
        kill those still running their unload() hooks after ``grace`` seconds."""
        self.closing = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(WorkerDied(f"Module {self.name}: worker pool closed"))
        for worker in [w for w in self.workers if w.current is None]:
            self._retire(worker)
        readers = [w.reader for w in self.workers | self.stopping]
        if readers:
            _, pending = await asyncio.wait(set(readers), timeout=grace)
            for worker in list(self.workers | self.stopping):
                self._cut(worker, grace)
            if pending:
                await asyncio.wait(pending, timeout=2)

    def stats(self) -> dict[str, int]:
        busy = sum(1 for w in self.workers if w.current is not None)
        waiting = sum(not f.done() for f in self.waiters)  # calls in line for a worker
        return {"processes": len(self.workers), "busy": busy, "started": self.spawned,
                "stopping": len(self.stopping), "waiting": waiting}  # fmt: skip

    def no_free_worker(self) -> str:
        """Why a call found no free worker, past the pool being busy: workers importing
        the module, or stopping (running their unload() hooks), keep calls waiting too."""
        importing = sum(1 for w in self.workers if w.is_importing)
        parts = [f"{importing} importing the module"] if importing else []
        parts += [f"{len(self.stopping)} stopping"] if self.stopping else []
        return "no free worker" + (f": {', '.join(parts)}" if parts else "")


class ProcessPools:
    """Execution's way into worker processes: one pool per process-mode module."""

    def __init__(
        self, folder: Path, settings: WorkerSettings, grace: float = 10.0,
        import_timeout: float = 30.0,
    ) -> None:  # fmt: skip
        self.folder = folder.resolve()
        self.settings = settings
        self.grace = grace  # [limits] shutdown_grace: a stopped worker's time to exit
        self.import_timeout = import_timeout  # [reload] import_timeout: a worker's import
        self.pools: dict[str, ProcessPool] = {}
        self.retiring: set[ProcessPool] = set()  # finishing their calls, then stopping

    def stats(self) -> dict[str, Any]:
        out = {name: pool.stats() for name, pool in self.pools.items()}
        for pool in self.retiring:
            empty = {"processes": 0, "busy": 0, "started": 0, "stopping": 0, "waiting": 0}
            row = out.setdefault(pool.name, empty)
            row["retiring"] = row.get("retiring", 0) + len(pool.workers | pool.stopping)
            row["waiting"] += pool.stats()["waiting"]  # (calls it still owes a worker)
        return out

    async def __call__(self, version: ModuleVersion, request: Request, timeout: float) -> Any:
        pool = self.pools.get(version.name)
        throwaway = False
        if pool is None:
            pool = ProcessPool(version.name, self.folder, self.settings, self.grace)
            # A call that began before its module was dropped gets a pool of its own,
            # drained once the call is over: drained before, it would end at once and
            # keep the worker the call then starts idle until the service stops.
            throwaway = version.retired
            if throwaway:
                self.retiring.add(pool)
            else:
                self.pools[version.name] = pool
        pool.size = version.processes or self.settings.processes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            worker: WorkerProcess | None = None
            with contextlib.suppress(TimeoutError):
                worker = await asyncio.wait_for(pool.acquire(), timeout)
            left = deadline - loop.time()
            if worker is not None and left < timeout * START_FLOOR:
                # Too late to start: the call would time out and kill a healthy worker
                # (under overload, one a call), so the next caller in line gets it.
                pool.release(worker)
                worker = None
            if worker is None:
                raise CallTimeout(
                    f"Module {version.name} timed out after {timeout:g} s "
                    f"({pool.no_free_worker()})"
                )
            try:
                return await worker.call(version, request, left, timeout, self.import_timeout)
            finally:
                pool.release(worker)
        finally:
            if throwaway:
                self._drain(pool)

    def reloaded(self, version: ModuleVersion) -> None:
        """A new version of a module serves: one that left process mode retires its pool
        (a new process-mode version reaches each worker with its next call)."""
        if version.execution != "process":
            self.retire(version.name, "it no longer runs in worker processes")

    def retire(self, name: str, why: str = "its file was deleted") -> None:
        """No new call goes to the module's pool; its running calls finish, then its
        workers stop."""
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        # Those waiting for a worker finish on it too (the busy ones alone said 2 calls
        # with 6 to go).
        stats = pool.stats()
        running, waiting = stats["busy"], stats["waiting"]
        log.info("module %s: retiring its worker processes (%s; %d calls to finish first: "
                 "%d running, %d waiting for a worker)", name, why, running + waiting,
                 running, waiting)  # fmt: skip
        self._drain(pool)

    def _drain(self, pool: ProcessPool) -> None:
        self.retiring.add(pool)
        pool.drain(self.retiring.discard)

    async def close(self, grace: float | None = None) -> None:
        """Stop every worker; those still running their unload() hooks after ``grace``
        (what is left of ``[limits] shutdown_grace``; all of it by default) are killed."""
        pools = [*self.pools.values(), *self.retiring]
        grace = self.grace if grace is None else grace
        await asyncio.gather(*(pool.close(grace) for pool in pools))
