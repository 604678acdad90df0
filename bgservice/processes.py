"""Pools of worker processes for ``EXECUTION = "process"`` modules.

A compile that holds the GIL (libsass, an embedded JavaScript engine) would freeze every
thread of the service; in another process it freezes nothing. Each module gets its own
pool (``PROCESSES`` or ``[workers] processes``); a worker runs one call at a time.
A call past its timeout kills its worker (a thread cannot be stopped, a process can), a
worker that dies costs only the call it was running, and the pool refills itself.
Workers are recycled after ``max_calls`` calls or above ``max_memory_mb`` of memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any

from bgservice import process_messages as msg
from bgservice.config import WorkerSettings
from bgservice.errors import (
    CallTimeout,
    HandlerError,
    ModuleLoadFailed,
    ReplyError,
    ServiceError,
    WorkerDied,
)
from bgservice.registry import ModuleVersion
from bgservice.request import Request

log = logging.getLogger(__name__)
_PAGE = os.sysconf("SC_PAGE_SIZE")
# The service may run from a checkout (python service.py) with any working directory:
# workers must import this same bgservice package.
_ROOT = str(Path(__file__).resolve().parent.parent)
_CHILD_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p),
}
_ids = itertools.count(1)


class WorkerProcess:
    """One worker process and the call it is running, if any."""

    def __init__(self, proc: asyncio.subprocess.Process, pool: ProcessPool) -> None:
        self.proc = proc
        self.pool = pool
        self.loaded: dict[str, str] = {}  # module name -> digest it has imported
        self.calls = 0
        self.killed = False
        self.current: tuple[int, asyncio.Future[msg.Ending], Request] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.returncode is None and not self.reader.done()

    def send(self, message: msg.ToWorker) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(msg.pack(message))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                (length,) = msg.HEADER.unpack(await stdout.readexactly(msg.HEADER.size))
                self._handle(msg.unpack(await stdout.readexactly(length)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await self.proc.wait()
        if self.current is not None:
            _, future, _ = self.current
            if not future.done():
                future.set_exception(WorkerDied(_death(self.pool.name, code)))
        self.pool.lost(self)

    def _handle(self, message: msg.FromWorker) -> None:
        if isinstance(message, msg.Log):
            logging.getLogger(message.logger).log(message.level, "%s", message.text)
            return
        if self.current is None or message.cid != self.current[0]:
            return  # a late message of a call that already timed out
        _, future, request = self.current
        if isinstance(message, msg.Chunk):
            request.write(message.data)
        elif isinstance(message, msg.Progress):
            if request.job is not None:
                request.job.progress(message.done, message.total, message.message)
        elif isinstance(message, msg.AddJob | msg.SaveCheckpoint):
            answer = self._add_job if isinstance(message, msg.AddJob) else self._save
            task = asyncio.get_running_loop().create_task(answer(request, message))  # type: ignore[arg-type]
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
        elif not future.done():
            future.set_result(message)

    async def _add_job(self, request: Request, message: msg.AddJob) -> None:
        """A module in this worker adds a job: the queue is here, the answer goes back."""
        try:
            jid = await request.add_job_async(message.module, message.data, **message.options)
            answer = msg.JobAdded(jid, 0, "")
        except ServiceError as exc:
            answer = msg.JobAdded(0, exc.code, exc.message)
        except (TypeError, ValueError, RuntimeError) as exc:  # bad options from the module
            answer = msg.JobAdded(0, 400, f"add_job: {exc}")
        if self.alive and self.current is not None and self.current[0] == message.cid:
            self.send(answer)

    async def _save(self, request: Request, message: msg.SaveCheckpoint) -> None:
        """A job in this worker saves a checkpoint: stored here, then the worker goes on."""
        answer = msg.Saved(0, "")
        try:
            assert request.job is not None
            await request.job.save_checkpoint(message.value)  # type: ignore[misc]
        except ServiceError as exc:
            answer = msg.Saved(exc.code, exc.message)
        except (TypeError, ValueError) as exc:  # not text, or over max_checkpoint_bytes
            answer = msg.Saved(400, str(exc))
        except Exception as exc:  # e.g. the store failed: the module hears of it
            answer = msg.Saved(500, f"checkpoint not saved: {exc}")
        if self.alive and self.current is not None and self.current[0] == message.cid:
            self.send(answer)

    def kill(self) -> None:
        self.killed = True
        if self.proc.returncode is None:
            self.proc.kill()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE / 2**20
        except (OSError, IndexError, ValueError):
            return 0.0


class ProcessPool:
    """The worker processes of one module."""

    def __init__(self, name: str, folder: Path, settings: WorkerSettings) -> None:
        self.name = name
        self.folder = folder
        self.settings = settings
        self.size = settings.processes
        self.workers: set[WorkerProcess] = set()
        self.idle: list[WorkerProcess] = []
        self.waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self.closing = False
        self.spawned = 0
        self._spawning: set[asyncio.Task[None]] = set()

    async def _spawn(self) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bgservice.process_main",
            str(self.folder),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_CHILD_ENV,
        )
        worker = WorkerProcess(proc, self)
        self.workers.add(worker)
        self.spawned += 1
        log.debug("module %s: worker process %d started", self.name, proc.pid)
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
        return await future

    def release(self, worker: WorkerProcess) -> None:
        worker.current = None
        if not worker.alive:
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
        self.idle.append(worker)

    def _recycle_reason(self, worker: WorkerProcess) -> str | None:
        if self.settings.max_calls and worker.calls >= self.settings.max_calls:
            return f"{worker.calls} calls"
        if self.settings.max_memory_mb and worker.rss_mb() > self.settings.max_memory_mb:
            return f"{worker.rss_mb():.0f} MB resident"
        return None

    def _retire(self, worker: WorkerProcess) -> None:
        self.workers.discard(worker)
        try:
            worker.send(msg.Stop())
        except (ConnectionError, RuntimeError):
            worker.kill()

    def lost(self, worker: WorkerProcess) -> None:
        """A worker's process ended (killed, crashed, recycled)."""
        self.workers.discard(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        self._refill()

    def _refill(self) -> None:
        # Someone waits for a worker and the pool is short: start one at once.
        if self.closing or not self.waiters:
            return
        if len(self.workers) + len(self._spawning) >= self.size:
            return
        task = asyncio.get_running_loop().create_task(self._spawn_for_waiter())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _spawn_for_waiter(self) -> None:
        try:
            worker = await self._spawn()
        except OSError as exc:
            log.error("module %s: cannot start a worker process: %s", self.name, exc)
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(WorkerDied(f"Cannot start a worker: {exc}"))
            return
        self.release(worker)

    async def close(self) -> None:
        self.closing = True
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(WorkerDied(f"Module {self.name}: worker pool closed"))
        for worker in list(self.workers):
            if worker.current is None:
                self._retire(worker)
        readers = [w.reader for w in self.workers] + [w.reader for w in self.idle]
        if readers:
            _, pending = await asyncio.wait(set(readers), timeout=3)
            for worker in list(self.workers):
                worker.kill()
            if pending:
                await asyncio.wait(pending, timeout=2)


class ProcessPools:
    """Execution's way into worker processes: one pool per process-mode module."""

    def __init__(self, folder: Path, settings: WorkerSettings) -> None:
        self.folder = folder.resolve()
        self.settings = settings
        self.pools: dict[str, ProcessPool] = {}

    def stats(self) -> dict[str, Any]:
        return {
            name: {
                "processes": len(pool.workers),
                "busy": sum(1 for w in pool.workers if w.current is not None),
                "started": pool.spawned,
            }
            for name, pool in self.pools.items()
        }

    async def __call__(self, version: ModuleVersion, request: Request, timeout: float) -> Any:
        pool = self.pools.get(version.name)
        if pool is None:
            pool = self.pools[version.name] = ProcessPool(version.name, self.folder, self.settings)
        pool.size = version.processes or self.settings.processes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            worker = await asyncio.wait_for(pool.acquire(), timeout)
        except TimeoutError:
            raise CallTimeout(
                f"Module {version.name} timed out after {timeout:g} s (no free worker)"
            ) from None
        try:
            return await self._run(worker, version, request, deadline - loop.time(), timeout)
        finally:
            pool.release(worker)

    async def _run(
        self,
        worker: WorkerProcess,
        version: ModuleVersion,
        request: Request,
        left: float,
        timeout: float,
    ) -> Any:
        cid = next(_ids)
        future: asyncio.Future[msg.Ending] = asyncio.get_running_loop().create_future()
        worker.current = (cid, future, request)
        worker.calls += 1
        name = version.name
        source = None if worker.loaded.get(name) == version.digest else version.source
        job = None
        if request.job is not None:
            j = request.job
            job = (j.id, j.attempt, j.checkpoint, j.source)
        worker.send(
            msg.Call(cid, name, str(version.path), version.digest, source, request.module,
                     request.data, request.transport, request.peer, job)
        )  # fmt: skip
        worker.loaded[name] = version.digest
        try:
            reply = await asyncio.wait_for(future, max(left, 0.001))
        except TimeoutError:
            log.warning("module %s: call timed out; killing worker %d", name, worker.proc.pid)
            worker.kill()
            raise CallTimeout(f"Module {name} timed out after {timeout:g} s") from None
        return _result(name, worker, reply)

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))

    async def drop(self, name: str) -> None:
        pool = self.pools.pop(name, None)
        if pool is not None:
            await pool.close()


def _result(name: str, worker: WorkerProcess, reply: msg.Ending) -> bytes:
    if isinstance(reply, msg.Returned):
        return reply.body
    if isinstance(reply, msg.Refused):
        raise ReplyError(reply.code, reply.message)
    if isinstance(reply, msg.LoadFailed):
        worker.loaded.pop(name, None)
        raise ModuleLoadFailed(f"Module {name} failed to load in a worker: {reply.error}")
    log.error("module %s raised in worker %d:\n%s", name, worker.proc.pid, reply.trace)
    raise HandlerError(f"Module {name} raised {reply.summary}")


def _death(name: str, code: int) -> str:
    if code < 0:
        try:
            how = f"signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"signal {-code}"
    else:
        how = f"exit code {code}"
    return f"Worker process of module {name} died ({how})"

