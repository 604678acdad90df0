"""Running a coroutine's first step at once, and a task only for what is left.

Most requests finish without waiting (a cached reply, a short ``async def`` handler, a
built-in command): for them a task, and the loop iteration it waits for, is pure cost.
``start`` runs the first step in the caller; a coroutine that waits goes on in a task
that takes over exactly where it stopped (``resume``). Python 3.12's eager task factory
does the same for every task; this does it only where it is known to pay, and on 3.11.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

Spawn = Callable[[Coroutine[Any, Any, Any]], object]

# First steps running now, nested (a request started eagerly may start a job eagerly):
# while one runs, the task current_task() names is not the coroutine's own, whatever it is.
_depth = 0


def start(coro: Coroutine[Any, Any, Any], spawn: Spawn) -> tuple[bool, Any]:
    """Run ``coro`` up to its first wait: ``(True, result)`` when it finished there,
    else ``(False, task)``: the rest handed to ``spawn``, which makes it a task.

    In a context of its own, as a task's would be: run in the caller's, a handler setting
    a context variable set it for every later request of the listener (the task made
    for the rest copies this context, so it sees what the first step set)."""
    return contextvars.copy_context().run(_start, coro, spawn)


def _start(coro: Coroutine[Any, Any, Any], spawn: Spawn) -> tuple[bool, Any]:
    global _depth
    _depth += 1
    try:
        yielded = coro.send(None)
    except StopIteration as done:
        return True, done.value
    finally:
        _depth -= 1
    return False, spawn(resume(coro, yielded))


@types.coroutine
def hop() -> Generator[None, None, None]:
    """Give the loop one turn. Run inside ``start``'s first step, it ends that step: what
    follows runs in the task ``start`` made (``asyncio.timeout`` needs a task)."""
    yield


def in_task(loop: asyncio.AbstractEventLoop) -> bool:
    """True when the running coroutine is its task's own, not a first step run by ``start``
    (inside which a timeout would bind to the wrong task, or to none)."""
    return _depth == 0 and asyncio.current_task(loop) is not None


class Rest:
    """What is left of a coroutine whose first step ran outside: awaiting it hands what it
    yielded to the task, and what the task sends or throws (a result, a cancellation)
    back to it. An awaitable, not a generator-based coroutine: from Python 3.12 on,
    ``create_task`` refuses those (every call that waited was a 500 there, and the
    service stopped)."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro, self._yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._yielded
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


async def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """``Rest`` as a coroutine, for a task to run (a caller that awaits the rest itself
    awaits ``Rest``: one frame less)."""
    return await Rest(coro, yielded)
