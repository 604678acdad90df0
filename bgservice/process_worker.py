"""The service's side of one worker process (see processes.py for the pools).

It sends the process its calls, reads back what the module says while it runs (reply
chunks, progress, jobs it adds, checkpoints it saves, log lines) and its end, and tells
its pool when the process has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bgservice import process_messages as msg
from bgservice.errors import (
    CallTimeout,
    HandlerError,
    ModuleLoadFailed,
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
_ids = itertools.count(1)  # call ids: a late message of a timed-out call is told apart


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process has exited, whatever its pipe does: a process the worker
    forked (without exec) holds the pipe open after the worker is gone, and asyncio's
    own ``wait()`` waits for the pipes too."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)  # (asyncio's default)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class WorkerProcess:
    """One worker process and the call it is running, if any."""

    @classmethod
    async def start(
        cls, folder: Path, name: str, on_exit: Callable[[WorkerProcess], None], grace: float
    ) -> WorkerProcess:
        loop = asyncio.get_running_loop()
        # A pipe only the service writes to (its end is not inherited): it ends when the
        # service does, even killed, and the worker's guard then kills the worker's group,
        # programs its calls started included (bgservice.process_main.guard_group).
        guard, keep = os.pipe()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(loop),
                sys.executable, "-m", "bgservice.process_main", str(folder), str(os.getpid()),
                str(guard), pass_fds=(guard,),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
                env=_CHILD_ENV,
                start_new_session=True,  # its own group: a kill takes what its calls started
            )  # fmt: skip
        except BaseException:
            os.close(keep)
            raise
        finally:
            os.close(guard)
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        return cls(proc, protocol.exited, name, on_exit, grace, keep)

    def __init__(
        self, proc: asyncio.subprocess.Process, exited: asyncio.Future[None], name: str,
        on_exit: Callable[[WorkerProcess], None], grace: float = 10.0, guard: int = -1,
    ) -> None:  # fmt: skip
        self.proc = proc
        self.guard = guard  # the service's end of the guard's pipe (-1: none)
        self.exited = exited  # done once the process has exited (its pipe may stay open)
        self.name = name  # the module it serves
        self.on_exit = on_exit  # its pool hears of the process's end
        self.grace = grace  # [limits] shutdown_grace: for what it wrote, once it has exited
        # name -> version imported: the object, as a helper change re-imports the same digest
        self.loaded: dict[str, ModuleVersion] = {}
        self.calls = 0
        self.killed = False  # by the service (a timeout, a cut call, a stop past its grace)
        self.stopped = False  # sent Stop: it runs its unload() hooks and exits
        self.current: tuple[int, asyncio.Future[msg.Ending], Request] | None = None
        self.importing: asyncio.Future[None] | None = None  # the current call's import
        self.stop_timer: asyncio.TimerHandle | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self.reader = asyncio.get_running_loop().create_task(self._watch())

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.returncode is None and not self.reader.done()

    @property
    def is_importing(self) -> bool:
        return self.importing is not None and not self.importing.done()

    def send(self, message: msg.ToWorker) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(msg.pack(message))

    async def _watch(self) -> None:
        """Wait for the process's end: its exit, not its pipe's end, which a process it
        forked may hold open for as long as it runs. Then what is left of its group is
        killed, and what it wrote before it ended is read before its call is failed."""
        reading = asyncio.get_running_loop().create_task(self._read())
        await asyncio.wait({reading, self.exited}, return_when=asyncio.FIRST_COMPLETED)
        await self.exited  # (its pipe closed: it has exited, or is about to)
        self._kill_leftovers()
        if self.guard >= 0:  # (its guard was in the group: gone with it)
            os.close(self.guard)
            self.guard = -1
        if not reading.done():  # the leftovers are dying: the pipe closes with them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reading), self.grace)
        if not reading.done():
            log.warning("module %s: worker %d exited but a process that left its group "
                        "holds its pipe open; giving up on what is left in it",
                        self.name, self.proc.pid)  # fmt: skip
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        code = self.proc.returncode
        assert code is not None
        if self.current is not None:
            _, future, _ = self.current
            if not future.done():
                future.set_exception(WorkerDied(msg.death(self.name, code)))
        self.on_exit(self)

    def _kill_leftovers(self) -> None:
        # The worker is reaped: its pid, the group's id, is free once the group is empty.
        # While a member lives it cannot be reused, so a group found is still its own;
        # an empty one is looked for at once, before the pid could come round again.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # none left
            pass

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                (length,) = msg.HEADER.unpack(await stdout.readexactly(msg.HEADER.size))
                self._handle(msg.unpack(await stdout.readexactly(length)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:  # e.g. a module's object that fails to unpickle here
            self._unreadable(exc)

    def _unreadable(self, exc: Exception) -> None:
        # The worker may wait for an answer to what it sent: it is of no further use. Its
        # end must still reach the pool (on_exit), or the pool stays short of a worker.
        log.error("module %s: worker %d sent what the service cannot read; killing it",
                  self.name, self.proc.pid, exc_info=exc)  # fmt: skip
        if self.current is not None and not self.current[1].done():
            self.current[1].set_exception(HandlerError(
                f"Module {self.name} sent the service an unreadable message: "
                f"{msg.describe(exc)}"
            ))  # fmt: skip
        self.kill()

    def _handle(self, message: msg.FromWorker) -> None:
        if isinstance(message, msg.Log):
            logging.getLogger(message.logger).log(message.level, "%s", message.text)
            return
        if self.current is None or message.cid != self.current[0]:
            return  # a late message of a call that already timed out
        _, future, request = self.current
        if isinstance(message, msg.Imported):
            if self.importing is not None and not self.importing.done():
                self.importing.set_result(None)
        elif isinstance(message, msg.Chunk):
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
        """A module in this worker adds a job: the queue is here, the answer goes back.
        The worker waits for it whatever happens: nothing may escape this task."""
        answer = msg.JobAdded(0, 503, "add_job: the job was not added")  # (cancelled)
        try:
            jid = await request.add_job_async(message.module, message.data, **message.options)
            answer = msg.JobAdded(jid, 0, "")
        except ServiceError as exc:
            answer = msg.JobAdded(0, exc.code, exc.message)
        except (TypeError, ValueError, RuntimeError) as exc:  # bad options from the module
            answer = msg.JobAdded(0, 400, f"add_job: {exc}")
        except Exception as exc:  # e.g. an argument nothing checked: the handler raises it
            log.exception("module %s: add_job failed in the service", self.name)
            answer = msg.JobAdded(0, 500, f"add_job: {msg.describe(exc)}")
        finally:
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

    async def call(
        self, version: ModuleVersion, request: Request, left: float, timeout: float,
        import_timeout: float = 30.0,
    ) -> Any:  # fmt: skip
        """Run one call of ``version`` in this process: its outcome, or CallTimeout after
        ``left`` seconds (the process is killed: a thread cannot be stopped, a process can).
        A worker that lacks the version imports it first, under ``import_timeout``
        instead: ``left`` counts from when it is ready (a module whose import takes longer
        than its TIMEOUT served no call)."""
        cid = next(_ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[msg.Ending] = loop.create_future()
        self.current = (cid, future, request)
        self.calls += 1
        name = version.name
        source = None if self.loaded.get(name) is version else version.source
        self.importing = None if source is None else loop.create_future()
        job = None
        if request.job is not None:
            j = request.job
            job = (j.id, j.attempt, j.checkpoint, j.source)
        self.send(
            msg.Call(cid, name, str(version.path), version.digest, source, request.module,
                     request.data, request.transport, request.peer, job)
        )  # fmt: skip
        self.loaded[name] = version
        try:
            if self.importing is not None:
                await self._imported(name, self.importing, future, import_timeout)
            reply = await asyncio.wait_for(future, max(left, 0.001))
        except TimeoutError:
            log.warning("module %s: call timed out; killing worker %d", name, self.proc.pid)
            self.kill()
            raise CallTimeout(f"Module {name} timed out after {timeout:g} s") from None
        except WorkerDied:
            raise
        except BaseException:  # cut (a stop past its grace): the worker still runs the call
            self.kill()
            raise
        finally:
            self.importing = None
        if isinstance(reply, msg.LoadFailed):
            self.loaded.pop(name, None)
        elif isinstance(reply, msg.Raised):
            log.error("module %s raised in worker %d:\n%s", name, self.proc.pid, reply.trace)
        return msg.outcome(name, reply)

    async def _imported(
        self, name: str, imported: asyncio.Future[None], ending: asyncio.Future[msg.Ending],
        limit: float,
    ) -> None:  # fmt: skip
        """Wait until the worker has imported the call's version (or the call ended: the
        import failed, the worker died)."""
        either: set[asyncio.Future[Any]] = {imported, ending}
        done, _ = await asyncio.wait(either, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        if done:
            return
        ending.cancel()  # (nothing awaits it now: its late end is dropped)
        log.warning("module %s: import in worker %d still running after %g s ([reload] "
                    "import_timeout); killing it", name, self.proc.pid, limit)  # fmt: skip
        self.kill()
        raise ModuleLoadFailed(
            f"Module {name} failed to load in a worker: the import did not finish within "
            f"{limit:g} s ([reload] import_timeout)"
        )

    def kill(self) -> None:
        """Kill the worker and every process its calls started (``subprocess.run("convert
        ...")`` left running would go on burning a core, uncounted). While the worker is
        not reaped its pid cannot be reused, so the group is still its own."""
        self.killed = True
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE / 2**20
        except (OSError, IndexError, ValueError):
            return 0.0
