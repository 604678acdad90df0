"""Request -> module handler, under a timeout; errors -> replies; every request counted.

This is the one execution boundary: expected failures are caught by name and become their
reply codes, anything else is logged once with its traceback and becomes a 500. Nothing a
module does can raise past ``begin``, ``call``, ``serve`` or ``notify``. The built-in commands
(bgservice.commands) are served through the same boundary.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from time import monotonic, perf_counter
from typing import Any

from bgservice.config import Settings
from bgservice.declarations import admit
from bgservice.errors import Busy, ServiceError, UnknownRequest
from bgservice.events import INTERNAL_ERROR, Events
from bgservice.execution import RESERVED, Execution
from bgservice.logs import Sparse
from bgservice.origin import Origin
from bgservice.protocol import OK, Reply
from bgservice.registry import Handler, ModuleVersion, Registry
from bgservice.request import Request, reply_bytes
from bgservice.stats import Stats
from bgservice.unknown_names import UnknownNames

log = logging.getLogger(__name__)

Serve = Callable[[Request], Awaitable[bytes]]

UNKNOWN_MODULE = "(unknown)"  # the stats entry of requests for no module
FAILURE_LINES = 5.0  # s: failed datagrams, a log line per module and status at most this often


def shown(name: str) -> str:
    """A module name for a log line: quoted, and cut short (a datagram may be 64 KB)."""
    return repr(name) if len(name) <= 60 else f"{name[:60]!r}... ({len(name)} chars)"


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        stats: Stats,
        execution: Execution,
        events: Events,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = stats
        self.execution = execution
        self.events = events
        self.unknown = UnknownNames(events)  # repeated unknown names -> an event
        self.closing = False
        self._failures: dict[tuple[str, int], Sparse] = {}  # by (module, status)

    def close(self) -> None:
        """Shutting down: every request from now on is answered ``503``."""
        self.closing = True

    def check(self, module: str, source: str | None = None) -> None:
        """Raise the error a queued job for ``module`` would get, now (``queue:add``), and
        403 when the module's ``QUEUE_FROM`` does not admit ``source``."""
        try:
            version, _ = self.execution.resolve(module, Origin.QUEUE)
        except UnknownRequest:  # a mistyped job name: counted as a mistyped call is
            self.unknown.seen(module, Origin.QUEUE)
            raise
        if version.queue_from is not None:
            admit(version.queue_from, source or "", f"module {module}: queue")

    def runnable(self) -> list[str]:
        """The modules a queued job can run on now: those ``check`` admits from some source
        (the Redis engine claims jobs of these only, the others wait for another instance)."""
        names = []
        for entry in self.registry:
            try:
                self.execution.resolve(entry.name, Origin.QUEUE)
            except ServiceError:  # unknown, failed to load, no TCP handler, refusing jobs
                continue
            names.append(entry.name)
        return names

    # --- entry points ------------------------------------------------------------------

    def begin(self, request: Request) -> Reply | Coroutine[Any, Any, Reply]:
        """Serve a request that wants a reply (TCP, Unix stream) as far as it goes without
        waiting: its reply, or the coroutine that finishes it, to run in a task. Called
        where a first step runs (bgservice.eager): the handler's first step runs here
        (Execution.start), and most finish there, with no coroutine of the call path at
        all (profiled: each level cost about a microsecond per request)."""
        start = perf_counter()
        try:
            version, handler = self._admit(request)
            done, value = self.execution.start(version, handler, request)
            if not done:
                return self._finish(request, start, value)
            reply: Reply = (OK, reply_bytes(request.module, value))
        except Exception as exc:  # the boundary: a bug must cost one reply, not the service
            reply = self._failed(request, exc)
        self._count(request, reply[0], start, len(reply[1]))
        return reply

    async def call(
        self, request: Request, timeout: float | None = None, fallback: float | None = None
    ) -> Reply:
        """Serve a request that wants a reply (TCP, Unix stream, queued job, alert).
        ``timeout`` overrides the module's TIMEOUT; ``fallback`` is used when it has none."""
        if timeout is None and fallback is None:
            first = self.begin(request)
            return first if isinstance(first, tuple) else await first
        return await self._finish(request, perf_counter(), self._run(request, timeout, fallback))

    def _admit(self, request: Request) -> tuple[ModuleVersion, Handler]:
        if self.closing and request.origin is not Origin.ALERT:  # (alerts: flushed)
            raise Busy("Shutting down")
        version, handler = self.execution.resolve(request.module, request.origin)
        if version.call_from is not None and request.origin.direct:
            admit(version.call_from, request.source, f"module {request.module}: call")
        return version, handler

    async def _run(self, request: Request, timeout: float | None, fallback: float | None) -> Any:
        version, handler = self._admit(request)
        return await self.execution.run(version, handler, request, timeout, fallback)

    async def _finish(self, request: Request, start: float, rest: Awaitable[Any]) -> Reply:
        """What is left of a call once its handler waited: its reply, counted."""
        try:
            reply: Reply = (OK, reply_bytes(request.module, await rest))
        except Exception as exc:  # the boundary
            reply = self._failed(request, exc)
        self._count(request, reply[0], start, len(reply[1]))
        return reply

    def _failed(self, request: Request, exc: Exception) -> Reply:
        if isinstance(exc, ServiceError):
            return (exc.code, exc.message.encode())
        return self._internal(request, exc)

    async def serve(self, request: Request, serve: Serve) -> Reply:
        """Run ``serve(request)`` inside the boundary: its reply, or the error's."""
        start = perf_counter()
        try:
            if self.closing:
                raise Busy("Shutting down")
            reply: Reply = (OK, await serve(request))
        except ServiceError as exc:
            reply = (exc.code, exc.message.encode())
        except Exception as exc:  # the boundary: a bug must cost one reply, not the service
            reply = self._internal(request, exc)
        self._count(request, reply[0], start, len(reply[1]))
        return reply

    def _internal(self, request: Request, exc: Exception) -> Reply:
        """A bug of ours (or an error nobody named) while serving: logged, alerted, 500."""
        log.error(
            "internal error serving %s from %s", shown(request.module), request.peer, exc_info=exc
        )
        self.events.emit(
            INTERNAL_ERROR,
            title=f"internal error serving {request.module}: {type(exc).__name__}: {exc}",
            detail="".join(traceback.format_exception(exc)),
        )
        return (500, f"Internal error: {type(exc).__name__}".encode())

    def notify(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Serve a fire-and-forget request (UDP, Unix datagram): nothing is sent back.

        Its handler's first step runs now (Execution.start); a handler that finished there
        is done (None), else the coroutine that finishes it is returned, for the caller to
        run in a task (its timeout needs one).
        """
        start = perf_counter()
        try:
            version, handler = self.execution.resolve(request.module, request.origin)
            if version.call_from is not None and request.origin.direct:
                admit(version.call_from, request.source, f"module {request.module}: call")
            done, rest = self.execution.start(version, handler, request)
        except Exception as exc:
            self._notified(request, start, exc)
            return None
        if done:
            self._count(request, OK, start, 0)
            return None
        return self._notify_rest(request, rest, start)

    async def _notify_rest(self, request: Request, rest: Awaitable[Any], start: float) -> None:
        try:
            await rest
        except Exception as exc:  # the boundary: _notified sorts it out
            self._notified(request, start, exc)
        else:
            self._count(request, OK, start, 0)

    def _notified(self, request: Request, start: float, exc: Exception) -> None:
        """A fire-and-forget request failed: a log line (there is no one to reply to)."""
        if isinstance(exc, ServiceError):
            status = exc.code
            self._tell_failure(request, exc)
        else:
            status = 500
            log.error(
                "internal error serving %s from %s",
                shown(request.module),
                request.peer,
                exc_info=exc,
            )
        self._count(request, status, start, 0)

    def _tell_failure(self, request: Request, exc: ServiceError) -> None:
        """A line for a failed datagram; of a flood (20,000 for a mistyped module, 20,000
        lines), one per module and status every FAILURE_LINES s, saying how many more."""
        module = request.module
        key = (module if self.registry.get(module) is not None else UNKNOWN_MODULE, exc.code)
        sparse = self._failures.get(key)
        if sparse is None:
            sparse = self._failures[key] = Sparse(FAILURE_LINES, partial(self._more_failed, key))
        if count := sparse.tick(monotonic()):
            log.warning(
                "%s request from %s for module %s failed: %d %s%s",
                request.transport,
                request.peer or "local",
                shown(module),
                exc.code,
                exc.message.partition("\n")[0],  # (-v's traceback: logged where it was raised)
                f" ({count - 1} more like it since the last line)" if count > 1 else "",
            )

    def _more_failed(self, key: tuple[str, int], count: int) -> None:
        module, code = key
        named = "unknown modules" if module == UNKNOWN_MODULE else f"module {shown(module)}"
        log.warning("%d more datagrams for %s failed with %d since the last line",
                    count, named, code)  # fmt: skip

    def _count(self, request: Request, status: int, start: float, out: int) -> None:
        key = (request.module, request.origin.transport)
        stats = self.stats
        if status != OK:
            module = request.module
            if module not in RESERVED and self.registry.get(module) is None:
                # Names of no module share one entry: garbage requests must not grow the
                # stats (and /metrics' label sets) without bound. (A reply of 200 came
                # from a module or a command: no need to look.)
                key = (UNKNOWN_MODULE, key[1])
                self.unknown.seen(module, request.origin)
            stats.errors[key] += 1
        stats.requests[key] += 1
        elapsed = perf_counter() - start
        stats.latency.observe(key, elapsed)
        if self.settings.verbose:
            log.debug(
                "%s %s %s in=%dB out=%dB %.2fms status=%d",
                request.transport,
                request.peer or "local",
                shown(request.module) if request.module else "-",
                len(request.data),
                out,
                elapsed * 1000,
                status,
            )
