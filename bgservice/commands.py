"""The built-in commands, served in front of the modules: ``helo``, ``hello``,
``service:ping|modules|stats`` and ``queue:...`` (docs/protocol.md lists them).

Stream listeners hand every request here; a name that is not a command goes on to its
module through the dispatcher. Both go through the dispatcher's one error boundary, and
are counted under their own name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from bgservice.dispatch import Dispatcher
from bgservice.errors import BadRequest
from bgservice.execution import Execution, describe_execution
from bgservice.protocol import Reply
from bgservice.registry import Registry
from bgservice.request import Request
from bgservice.stats import Stats


class QueueCommand(Protocol):
    """What the ``queue:`` command needs of the job queue (bgservice.queue.engine)."""

    async def command(self, request: Request) -> bytes: ...


class Commands:
    NAMES = frozenset(("helo", "hello", "service", "queue"))  # answered by the service

    def __init__(
        self,
        dispatcher: Dispatcher,
        queue: QueueCommand,
        registry: Registry,
        execution: Execution,
        stats: Stats,
        extra_stats: Mapping[str, Callable[[], Any]],
    ) -> None:
        self.dispatcher = dispatcher
        self.queue = queue
        self.registry = registry
        self.execution = execution
        self.stats = stats
        self.extra_stats = extra_stats  # more sections of service:stats, by name
        self._commands = {
            "helo": self._helo,
            "hello": self._hello,
            "service": self._service,
            "queue": queue.command,
        }
        assert self._commands.keys() == self.NAMES

    def begin(self, request: Request) -> Reply | Coroutine[Any, Any, Reply]:
        """A request that wants a reply, as far as it goes without waiting (where a first
        step runs, bgservice.eager): a built-in command's coroutine, or its module's
        reply or the coroutine that finishes it (Dispatcher.begin)."""
        command = self._commands.get(request.module)
        if command is not None:
            return self.dispatcher.serve(request, command)
        return self.dispatcher.begin(request)

    # --- the commands -------------------------------------------------------------------

    async def _helo(self, request: Request) -> bytes:
        return b"oleh"

    async def _hello(self, request: Request) -> bytes:
        return b"olleh"

    async def _service(self, request: Request) -> bytes:
        command = request.text.strip()
        if command == "ping":
            return b"pong"
        if command == "modules":
            return json.dumps(self.modules()).encode()
        if command == "stats":
            return json.dumps(self.service_stats()).encode()
        raise BadRequest("Unknown service request (ping, modules, stats)")

    # --- what they report (the HTTP API reports the same) -------------------------------

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
                    value = entry.version.stats()
                    json.dumps(value)  # a set, an object: it failed every module's stats
                # (sys.exit() in it too: the module's error, not the service's end)
                except BaseException as exc:
                    value = {"error": f"{type(exc).__name__}: {exc}"}
                out[entry.name] = value
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
                    "call_from": rule(v.call_from) if v else None,
                    "queue_from": rule(v.queue_from) if v else None,
                    "execution": describe_execution(v) if v else None,
                    "timeout": self.execution.timeout_of(v) if v else None,
                    "loaded_at": v.loaded_at if v else None,
                    "reloads": entry.reloads,
                    "error": entry.error,
                }
            )
        return rows


def rule(sources: frozenset[str] | None) -> list[str] | None:
    """A CALL_FROM / QUEUE_FROM rule as listed: its sources, or None (anyone)."""
    return None if sources is None else sorted(sources)
