"""Request -> built-in command or module handler, under a timeout; errors -> replies.

This is the one execution boundary: expected failures are caught by name and become their
reply codes, anything else is logged once with its traceback and becomes a 500. Nothing a
module does can raise past ``call`` or ``notify``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import Executor
from typing import Any, Protocol

from bgservice.config import Settings
from bgservice.errors import (
    BadRequest,
    Busy,
    CallTimeout,
    HandlerError,
    ModuleLoadFailed,
    NoHandler,
    ServiceError,
    TransportNotAccepted,
    UnknownRequest,
)
from bgservice.protocol import OK
from bgservice.registry import Handler, ModuleVersion, Registry
from bgservice.request import JobAdder, Request, to_bytes
from bgservice.stats import Stats

log = logging.getLogger(__name__)

Reply = tuple[int, bytes]
RESERVED = frozenset({"queue", "service", "helo", "hello"})
_KIND = {
    "tcp": "tcp", "unix": "tcp", "udp": "udp", "unix_dgram": "udp", "queue": "queue",
    "alert": "tcp",
}  # fmt: skip
_NOT_ALERTED = frozenset({"queue", "alert"})  # a job's failure is alerted when it is final


def _no_alert(event: str, title: str, message: str = "", **where: Any) -> None:
    """The alert hook before bgservice.alerts is wired in (and in unit tests)."""


class QueueCommands(JobAdder, Protocol):
    """What dispatch needs of the job queue (bgservice.jobs)."""

    async def command(self, request: Request) -> bytes: ...


UNKNOWN_MODULE = "(unknown)"  # the stats entry of requests for no module


def _shown(name: str) -> str:
    """A module name for a log line: quoted, and cut short (a datagram may be 64 KB)."""
    return repr(name) if len(name) <= 60 else f"{name[:60]!r}... ({len(name)} chars)"


class Dispatcher:
    def __init__(
        self, settings: Settings, registry: Registry, stats: Stats, executor: Executor
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = stats
        self.executor = executor
        self.queue: QueueCommands | None = None
        # The serving loop, set by the server when it starts: looked up once, since on
        # Python 3.11 every get_running_loop() is a getpid system call.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutting_down = False
        self.process_runner: Callable[[ModuleVersion, Request, float], Awaitable[Any]] | None = None
        self.extra_stats: dict[str, Callable[[], Any]] = {}
        self.alert: Callable[..., None] = _no_alert  # (event, title, message, module=, job=)
        self._builtins: dict[str, Callable[[Request], Awaitable[bytes]]] = {
            "helo": self._helo,
            "hello": self._hello,
            "service": self._service,
            "queue": self._queue,
        }

    @property
    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The serving loop, without a get_running_loop() per call once the server set it."""
        return self.loop or asyncio.get_running_loop()

    # --- entry points ------------------------------------------------------------------

    async def call(self, request: Request, timeout: float | None = None) -> Reply:
        """Serve a request that wants a reply (TCP, Unix stream, queued job)."""
        start = time.perf_counter()
        try:
            if self.shutting_down:
                raise Busy("Shutting down")
            builtin = self._builtins.get(request.module)
            if builtin is not None:
                reply: Reply = (OK, await builtin(request))
            else:
                version, handler = self.resolve(request.module, _KIND[request.transport])
                reply = (
                    OK,
                    _reply_bytes(request, await self.run(version, handler, request, timeout)),
                )
        except ServiceError as exc:
            reply = (exc.code, exc.message.encode())
        except Exception as exc:  # the boundary: a bug must cost one reply, not the service
            log.exception("internal error serving %s from %s", _shown(request.module), request.peer)
            reply = (500, f"Internal error: {type(exc).__name__}".encode())
            self.alert(
                "error",
                f"internal error serving {request.module}: {type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
            )
        self._count(request, reply[0], start, len(reply[1]))
        return reply

    async def call_whole(self, request: Request, timeout: float | None = None) -> Reply:
        """``call``, with whatever the handler streamed through ``request.write()`` put in
        front of its return value: the whole reply, for replies sent in one piece (framed
        replies, queued jobs' results)."""
        chunks: list[bytes] = []
        request.bind(chunks.append, self.running_loop)
        status, body = await self.call(request, timeout)
        if chunks and status == OK:
            body = b"".join(chunks) + body
        return status, body

    async def notify(self, request: Request) -> None:
        """Serve a fire-and-forget request (UDP, Unix datagram): nothing is sent back."""
        start = time.perf_counter()
        status = OK
        try:
            version, handler = self.resolve(request.module, "udp")
            await self.run(version, handler, request)
        except ServiceError as exc:
            status = exc.code
            log.warning(
                "%s request from %s for module %s failed: %d %s",
                request.transport,
                request.peer or "local",
                _shown(request.module),
                exc.code,
                exc.message,
            )
        except Exception:
            status = 500
            log.exception("internal error serving %s from %s", _shown(request.module), request.peer)
        self._count(request, status, start, 0)

    # --- modules -----------------------------------------------------------------------

    def resolve(self, name: str, kind: str) -> tuple[ModuleVersion, Handler]:
        """The serving version of module ``name`` and its handler for ``kind``, or raise."""
        entry = self.registry.get(name)
        if entry is None or name in RESERVED:
            raise UnknownRequest()
        version = entry.version
        if version is None:
            raise ModuleLoadFailed(f"Module {name} failed to load: {entry.error}")
        handler = version.udp if kind == "udp" else version.tcp
        if handler is None:
            raise NoHandler(f"Module {name} has no {'UDP' if kind == 'udp' else 'TCP'} handler")
        if kind not in version.accepts:
            raise TransportNotAccepted(f"Module {name} does not accept {kind} requests")
        return version, handler

    def timeout_of(self, version: ModuleVersion) -> float:
        return version.timeout or self.settings.limits.call_timeout

    async def run(
        self,
        version: ModuleVersion,
        handler: Handler,
        request: Request,
        timeout: float | None = None,
    ) -> Any:
        """Run one handler: async on the loop, sync in the thread pool, or in a process.

        The version is held until the handler really ends (a timed-out thread keeps
        running), so its unload hook never runs under a call still using it.
        """
        timeout = timeout or self.timeout_of(version)
        name = version.name
        loop = self.running_loop
        request.attach(loop, self.queue)
        version.acquire()
        self.stats.in_flight[name] += 1

        def release() -> None:
            version.release()
            self.stats.in_flight[name] -= 1

        try:
            if version.execution == "process" and self.process_runner is not None:
                try:
                    return await self.process_runner(version, request, timeout)
                finally:
                    release()
            if handler.is_async:
                try:
                    # The first step runs at once: a handler that finishes without waiting
                    # (most replies) costs no timer. One that waits is resumed under its
                    # timeout (asyncio.timeout, not wait_for: no second task per call).
                    coro = handler.fn(request)
                    try:
                        first = coro.send(None)
                    except StopIteration as done:
                        return done.value
                    async with asyncio.timeout(timeout):
                        return await _resume(coro, first)
                finally:
                    release()
            try:
                job = self.executor.submit(handler.fn, request)
            except RuntimeError:  # the pool is shut down: we are stopping
                release()
                raise Busy("Shutting down") from None
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(release))
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(job)
        except TimeoutError:
            log.warning("module %s timed out after %.3g s", name, timeout)
            message = f"Module {name} timed out after {timeout:g} s"
            self._alert_call(request, message, f"{request.transport} from {request.peer}")
            raise CallTimeout(message) from None
        except ServiceError:
            raise
        except Exception as exc:
            log.error("module %s raised", name, exc_info=exc)
            message = f"Module {name} raised {type(exc).__name__}: {exc}"
            trace = "".join(traceback.format_exception(exc))
            self._alert_call(request, message, trace)
            if self.settings.verbose:
                message += "\n" + trace
            raise HandlerError(message) from exc

    def _alert_call(self, request: Request, message: str, detail: str) -> None:
        """A module failed a direct call (a queued job alerts once it has failed for good)."""
        if request.transport not in _NOT_ALERTED:
            self.alert("call", message, detail, module=request.module)

    def _count(self, request: Request, status: int, start: float, out: int) -> None:
        module = request.module
        if module not in self._builtins and self.registry.get(module) is None:
            # Names of no module share one entry: garbage requests must not grow the
            # stats (and /metrics' label sets) without bound.
            module = UNKNOWN_MODULE
        key = (module, request.transport)
        self.stats.requests[key] += 1
        if status != OK:
            self.stats.errors[key] += 1
        elapsed = time.perf_counter() - start
        self.stats.latency.observe(key, elapsed)
        if self.settings.verbose:
            log.debug(
                "%s %s %s in=%dB out=%dB %.2fms status=%d",
                request.transport,
                request.peer or "local",
                _shown(request.module) if request.module else "-",
                len(request.data),
                out,
                elapsed * 1000,
                status,
            )

    # --- built-in commands -------------------------------------------------------------

    async def _helo(self, request: Request) -> bytes:
        return b"oleh"

    async def _hello(self, request: Request) -> bytes:
        return b"olleh"

    async def _queue(self, request: Request) -> bytes:
        if self.queue is None:
            raise Busy("Queue not available")
        return await self.queue.command(request)

    async def _service(self, request: Request) -> bytes:
        command = request.text.strip()
        if command == "ping":
            return b"pong"
        if command == "modules":
            return json.dumps(self.modules()).encode()
        if command == "stats":
            return json.dumps(self.service_stats()).encode()
        raise BadRequest("Unknown service request (ping, modules, stats)")

    def service_stats(self) -> dict[str, Any]:
        """``service:stats``: the counters, what other parts add, modules' own stats."""
        extra = {name: fn() for name, fn in self.extra_stats.items()}
        return {**self.stats.snapshot(), **extra, "module_stats": self.module_stats()}

    def module_stats(self) -> dict[str, Any]:
        """What modules report of themselves through a ``stats()`` function (cheap, sync)."""
        out: dict[str, Any] = {}
        for entry in self.registry:
            if entry.version is not None and entry.version.stats is not None:
                try:
                    out[entry.name] = entry.version.stats()
                except Exception as exc:
                    out[entry.name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    def modules(self) -> list[dict[str, Any]]:
        rows = []
        for entry in self.registry:
            v = entry.version
            rows.append(
                {
                    "name": entry.name,
                    "state": entry.state,
                    "accepts": sorted(v.accepts) if v else [],
                    "execution": describe_execution(v) if v else None,
                    "timeout": self.timeout_of(v) if v else None,
                    "loaded_at": v.loaded_at if v else None,
                    "reloads": entry.reloads,
                    "error": entry.error,
                }
            )
        return rows


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting ``coro`` after its first step ran outside: hand what it yielded to
    the task, and what the task sends or throws (a result, a cancellation) back to it."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value


def describe_execution(version: ModuleVersion) -> str:
    """Where the module's calls run: ``loop``, ``thread`` or ``process``."""
    if version.execution != "default":
        return version.execution
    handlers = [h for h in (version.tcp, version.udp) if h is not None]
    if handlers and all(h.is_async for h in handlers):
        return "loop"
    return "thread" if handlers else "-"


def _reply_bytes(request: Request, value: Any) -> bytes:
    """A handler's return value as the reply; a wrong type is the module's error (500)."""
    try:
        return to_bytes(value)
    except TypeError as exc:
        raise HandlerError(f"Module {request.module} returned a bad reply: {exc}") from None
