"""Where and how a module's handler runs: on the loop, in the thread pool or in a worker
process, under its timeout.

``async def`` handlers run on the event loop, their first step at once (most finish there
without waiting); ``def`` handlers run in the thread pool (``[limits] threads``), since a
handler that blocks must not stall every client; modules that declare
``EXECUTION = "process"`` run in worker processes (bgservice.processes), which a handler
holding the GIL cannot freeze and a timeout can kill.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from functools import partial
from typing import Any

from bgservice import eager
from bgservice.cancelling import GoneOn
from bgservice.config import Settings
from bgservice.eager import Rest
from bgservice.errors import (
    Busy,
    CallTimeout,
    HandlerError,
    ModuleLoadFailed,
    NoHandler,
    ServiceError,
    TransportNotAccepted,
    UnknownRequest,
    WorkerDied,
)
from bgservice.events import CALL_FAILED, THREAD_STUCK, Events
from bgservice.logs import Sparse
from bgservice.origin import Origin
from bgservice.process_messages import describe
from bgservice.registry import Handler, ModuleVersion, Registry
from bgservice.request import Request
from bgservice.stats import Stats
from bgservice.threads import CallThreads, Escaped, ThreadsExhausted

log = logging.getLogger(__name__)
Loop = asyncio.AbstractEventLoop

# Names that are never a module's: the built-in commands (bgservice.commands).
RESERVED = frozenset({"queue", "service", "helo", "hello"})
FAILURE_TRACES = 5.0  # s: a datagram handler's traceback, per module, at most this often

# Runs a call in a worker process: (version, request, timeout) -> the handler's result.
ProcessRunner = Callable[[ModuleVersion, Request, float], Awaitable[Any]]


class Execution:
    """Runs one handler of one module version, wherever the version says it runs."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        stats: Stats,
        threads: CallThreads,
        processes: ProcessRunner,
        events: Events,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = stats
        self.threads = threads
        self.processes = processes
        self.events = events
        self.gone_on = GoneOn()  # handlers that went on after their call's cancellation
        self._sparse_traces: dict[str, Sparse] = {}  # datagrams' tracebacks, by module

    def resolve(self, name: str, origin: Origin) -> tuple[ModuleVersion, Handler]:
        """The serving version of module ``name`` and its handler for ``origin``, or raise."""
        entry = self.registry.get(name)
        if entry is None or name in RESERVED:
            raise UnknownRequest()
        version = entry.version
        if version is None:
            raise ModuleLoadFailed(f"Module {name} failed to load: {entry.error}")
        handler = version.udp if origin.is_datagram else version.tcp
        if handler is None:
            raise NoHandler(f"Module {name} has no {origin.handler.upper()} handler")
        if origin.accepts not in version.accepts:
            raise TransportNotAccepted(f"Module {name} does not accept {origin.accepts} requests")
        return version, handler

    def timeout_of(self, version: ModuleVersion, fallback: float | None = None) -> float:
        """The module's own TIMEOUT, else ``fallback`` (a queued job's ``[queue]
        job_timeout``), else ``[limits] call_timeout``."""
        return version.timeout or fallback or self.settings.limits.call_timeout

    async def run(
        self,
        version: ModuleVersion,
        handler: Handler,
        request: Request,
        timeout: float | None = None,
        fallback: float | None = None,
    ) -> Any:
        """Run one handler: async on the loop, sync in the thread pool, or in a process.

        The version is held until the handler really ends (a timed-out thread keeps
        running), so its unload hook never runs under a call still using it.
        """
        timeout = timeout or self.timeout_of(version, fallback)
        name = version.name
        loop = request.loop or asyncio.get_running_loop()
        version.acquire()
        self.stats.in_flight[name] += 1
        self.stats.ran.add(name)

        def release() -> None:
            version.release()
            self.stats.in_flight[name] -= 1

        try:
            if handler.is_async and version.execution != "process":
                try:
                    return await self._on_loop(version, handler, request, timeout)
                finally:
                    version.release()
                    self.stats.in_flight[name] -= 1
            if version.execution == "process":
                try:
                    return await self._in_process(version, request, timeout)
                finally:
                    release()
            return await self._in_thread(version, handler, request, timeout, loop, release)
        except TimeoutError as exc:
            raise self._timed_out(name, request, timeout, exc) from None
        except ServiceError:
            raise
        except asyncio.CancelledError as exc:
            raise self._cancelled(name, request, exc) from exc
        except BaseException as exc:  # SystemExit too: the module's error, not the service's end
            raise self._raised(name, request, _handlers(exc)) from exc

    def start(
        self, version: ModuleVersion, handler: Handler, request: Request
    ) -> tuple[bool, Any]:
        """Run a call's first step now where its handler allows it (``async def`` on the
        loop): ``(True, result)`` when it finished there, else ``(False, rest)``, a
        coroutine to run *in a task* for the result. Raises the call's error.

        A call that finishes within its first step ran inside one step of the loop: no
        reload can have come between, so it needs no hold on its version.
        """
        if not handler.is_async or version.execution == "process":
            return False, self.run(version, handler, request)
        self.stats.ran.add(version.name)  # (for the lag warning: a step may block)
        coro = handler.fn(request)
        if not inspect.iscoroutine(coro):  # a wrapper taken for async that replied itself
            return True, coro
        eager.runs(coro, request.loop or asyncio.get_running_loop())
        try:
            first = coro.send(None)
        except StopIteration as done:
            return True, done.value
        except ServiceError:
            raise
        except BaseException as exc:  # (no cancellation is ours yet; SystemExit: see run)
            raise self._raised(version.name, request, exc) from exc
        return False, self._rest(version, request, coro, first)

    async def _rest(
        self, version: ModuleVersion, request: Request, coro: Any, first: Any
    ) -> Any:
        name, timeout = version.name, self.timeout_of(version)
        version.acquire()
        self.stats.in_flight[name] += 1
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await Rest(coro, first, partial(self._go_on, version, request, limit))
        except TimeoutError as exc:
            self._raise_if_own(limit, name, request, exc)
            raise self._timed_out(name, request, timeout) from None
        except ServiceError:
            raise
        except asyncio.CancelledError as exc:
            raise self._cancelled(name, request, exc) from exc
        except BaseException as exc:  # (as in run)
            raise self._raised(name, request, _handlers(exc)) from exc
        finally:
            version.release()
            self.stats.in_flight[name] -= 1

    def _raise_if_own(
        self, limit: asyncio.Timeout, name: str, request: Request, exc: TimeoutError
    ) -> None:
        """A TimeoutError ``limit`` (the call's timeout) did not cause is the handler's
        own error (its wait_for, a socket's timeout): raised as such, not as a 504."""
        if not limit.expired():
            raise self._raised(name, request, exc) from exc

    def _traces(self, name: str) -> Sparse:
        sparse = self._sparse_traces.get(name)
        if sparse is None:
            sparse = self._sparse_traces[name] = Sparse(FAILURE_TRACES)
        return sparse

    def _timed_out(
        self, name: str, request: Request, timeout: float, exc: TimeoutError | None = None
    ) -> CallTimeout:
        log.warning("module %s timed out after %.3g s", name, timeout)
        message = f"Module {name} timed out after {timeout:g} s"
        message += f" ({exc})" if exc is not None and exc.args else ""
        self._failed(request, message, f"{request.transport} from {request.peer}")
        return CallTimeout(message)

    def _cancelled(self, name: str, request: Request, exc: asyncio.CancelledError) -> HandlerError:
        """The handler's error, when the handler let out a CancelledError of its own (a
        task it awaited was cancelled) while nothing cancelled the call: uncaught, it
        ended the call's task as cancelled, which a one-shot client then waited on for
        ever (out of a datagram's first step it stopped the service). The call's own
        cancellation (the service stopping, a job cancelled) goes on."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise exc
        return self._raised(name, request, exc)

    def _raised(self, name: str, request: Request, exc: BaseException) -> HandlerError:
        # A flood of datagrams that raise: a traceback per module every few seconds (the
        # dispatcher's lines count the rest); a call's each, as its client saw it fail.
        if not request.origin.is_datagram or self._traces(name).tick(time.monotonic()):
            log.error("module %s raised", name, exc_info=exc)
        message = f"Module {name} raised {describe(exc)}"
        trace = "".join(traceback.format_exception(exc))
        self._failed(request, message, trace)
        if self.settings.verbose:
            message += "\n" + trace
        return HandlerError(message)

    async def _in_process(
        self, version: ModuleVersion, request: Request, timeout: float
    ) -> Any:
        try:
            return await self.processes(version, request, timeout)
        except (HandlerError, CallTimeout, WorkerDied) as exc:
            # Raised, timed out or died in its worker: alerted (and, with -v, its trace
            # sent) as a call in a thread is in _raised and _timed_out.
            trace = getattr(exc, "trace", "")
            self._failed(request, exc.message, trace or f"{request.transport} from {request.peer}")
            if trace and self.settings.verbose:
                raise type(exc)(f"{exc.message}\n{trace}") from None
            raise

    async def _on_loop(
        self, version: ModuleVersion, handler: Handler, request: Request, timeout: float
    ) -> Any:
        return await self._awaited(version, request, handler.fn(request), timeout)

    async def _awaited(
        self, version: ModuleVersion, request: Request, coro: Any, timeout: float
    ) -> Any:
        # The first step runs at once: a handler that finishes without waiting (most
        # replies) costs no timer. One that waits is resumed under its timeout
        # (asyncio.timeout, not wait_for: no second task per call).
        if not inspect.iscoroutine(coro):  # a wrapper taken for async that replied itself
            return coro
        try:
            first = coro.send(None)
        except StopIteration as done:
            return done.value
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await Rest(coro, first, partial(self._go_on, version, request, limit))
        except TimeoutError as exc:
            self._raise_if_own(limit, version.name, request, exc)
            raise

    def _go_on(
        self, version: ModuleVersion, request: Request, limit: asyncio.Timeout,
        coro: Coroutine[Any, Any, Any], on: Any,
    ) -> bool:  # fmt: skip
        """A handler caught a cancellation and waits on. Past its call's deadline (a
        clean-up, or a handler that will not end), it goes on apart (GoneOn), holding its
        version (and counted in flight), and a queued job's slot, until it ends, as a
        stuck thread does, and the call ends now. Before it, the cancellation was the
        handler's own (a timeout or TaskGroup of its own, which take it back): it goes on
        in the call."""
        if not limit.expired():
            return False
        name = version.name
        version.acquire()
        self.stats.in_flight[name] += 1
        gone: Future[None] = Future()

        def ended() -> None:
            version.release()
            self.stats.in_flight[name] -= 1
            gone.set_result(None)

        if request.job is not None:
            request.job.outlived(gone)
        self.gone_on.take(coro, on, name, ended)
        return True

    async def _in_thread(
        self,
        version: ModuleVersion,
        handler: Handler,
        request: Request,
        timeout: float,
        loop: Loop,
        release: Callable[[], None],
    ) -> Any:
        """A ``def`` handler, in the pool. One that outlives its timeout keeps its thread
        (Python cannot stop it): the pool counts it stuck and replaces it (threads.py); a
        queued job's worker and module slot stay taken until it returns (its ``outlived``)."""
        try:
            # In a copy of the call's context, as asyncio.to_thread runs a function: a
            # thread's own context would carry what one call set into the next.
            job = self.threads.submit(contextvars.copy_context().run, handler.fn, request)
        except ThreadsExhausted as exc:
            release()
            raise Busy(str(exc)) from None
        except RuntimeError:  # the pool is shut down: we are stopping
            release()
            raise Busy("Shutting down") from None
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(release))
        deadline = loop.time() + timeout
        version.acquire()  # the call's own hold: a coroutine it returns runs after the thread
        try:
            result = await self._joined(version, request, job, timeout)
            # A def wrapper over an async def the load could not see through: its coroutine
            # runs on the loop, in what is left of the timeout, as a worker process runs it
            # (it was a 500 "bad reply: ... not coroutine", never awaited).
            if inspect.iscoroutine(result):
                return await self._awaited(version, request, result, deadline - loop.time())
            return result
        finally:
            version.release()

    async def _joined(
        self, version: ModuleVersion, request: Request, job: Future[Any], timeout: float
    ) -> Any:
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await asyncio.wrap_future(job)
        except TimeoutError as exc:
            self._raise_if_own(limit, version.name, request, exc)
            if not self.threads.abandon(job):
                raise TimeoutError("no free thread") from None
            if request.job is not None:  # a queued job's slot: held until the thread returns
                request.job.outlived(job)
            self._stuck(version.name, timeout)
            raise

    def _stuck(self, name: str, timeout: float) -> None:
        stats = self.threads.stats()
        title = (
            f"handler thread stuck in module {name} after its {timeout:g} s timeout "
            f"({stats['stuck']} stuck, {stats['stuck_limit']} may be replaced)"
        )
        log.warning("%s", title)
        self.events.emit(THREAD_STUCK, title=title, module=name)

    def _failed(self, request: Request, message: str, detail: str) -> None:
        """A module failed a direct call (a queued job alerts once it has failed for good)."""
        if request.origin.alerted:
            self.events.emit(CALL_FAILED, title=message, detail=detail, module=request.module)


def _handlers(exc: BaseException) -> BaseException:
    """What a handler raised, for its ``500: Module M raised ...``: ``SystemExit``,
    ``KeyboardInterrupt`` and their kin too (let out of a call's task they stopped the
    service, and a queued job doing it stopped it again at every start), carried out of a
    thread as ``Escaped``. Not ``GeneratorExit``: the call's coroutine being closed."""
    if isinstance(exc, GeneratorExit):
        raise exc
    return exc.error if isinstance(exc, Escaped) else exc


def describe_execution(version: ModuleVersion) -> str:
    """Where the module's calls run: ``loop``, ``thread`` or ``process``."""
    if version.execution != "default":
        return version.execution
    handlers = [h for h in (version.tcp, version.udp) if h is not None]
    if handlers and all(h.is_async for h in handlers):
        return "loop"
    return "thread" if handlers else "-"
