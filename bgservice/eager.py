"""Running a coroutine's first step at once, and a task only for what is left.

Most requests finish without waiting (a cached reply, a short ``async def`` handler, a
built-in command): for them a task, and the loop iteration it waits for, is pure cost.
``start`` runs the first step in the caller; a coroutine that waits goes on in a task
that takes over exactly where it stopped (``Rest``). Python 3.12's eager task factory
does the same for every task; this does it only where it is known to pay, and on 3.11.

During the first step ``asyncio.current_task()`` is a ``FirstStep``: what a timeout or a
task group asks of its task (``cancel``, ``cancelling``, ``uncancel``) it answers for the
task that carries on, so a handler may use ``asyncio.timeout`` and ``wait_for`` at once.
Without it there was no current task there (or another's), and both raised "Timeout
should be used inside a task": a 500 for every handler that began with one (on Python
3.12 ``wait_for`` too, so the shipped compilers failed every compile).
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from asyncio.tasks import _enter_task, _leave_task  # what the eager task factory uses
from collections.abc import Callable, Coroutine, Generator
from typing import Any

Spawn = Callable[[Coroutine[Any, Any, Any]], Any]


class FirstStep:
    """The current task of a first step run by ``start``: its cancellations are kept and
    handed to the task made for the rest (``task``), and then forwarded to it."""

    # Defaults on the class, no __init__: one is made for every first step, and most
    # are never asked anything.
    task: asyncio.Task[Any] | None = None
    _cancels = 0
    _message: Any = None

    def cancel(self, msg: Any = None) -> bool:
        if self.task is not None:
            return self.task.cancel(msg)
        self._cancels += 1  # delivered to the task once there is one (carry_on)
        self._message = msg
        return True

    def cancelling(self) -> int:
        return self.task.cancelling() if self.task is not None else self._cancels

    def uncancel(self) -> int:
        if self.task is not None:
            return self.task.uncancel()
        self._cancels = max(0, self._cancels - 1)
        return self._cancels

    def done(self) -> bool:
        return self.task is not None and self.task.done()

    def carry_on(self, task: asyncio.Task[Any]) -> None:
        """``task`` runs the rest: it gets what was asked of this step meanwhile."""
        self.task = task
        if self._cancels:
            task.cancel(self._message)

    def __getattr__(self, name: str) -> Any:
        if self.task is not None:
            return getattr(self.task, name)
        raise RuntimeError(
            f"asyncio.current_task().{name} is not available before the call first awaits:"
            " its first step runs at once, outside a task (docs/modules.md)"
        )


# First steps running now, nested (a request started eagerly may start a job eagerly):
# while one runs, the task current_task() names is not the coroutine's own, whatever it is.
_depth = 0


def start(
    coro: Coroutine[Any, Any, Any], spawn: Spawn, loop: asyncio.AbstractEventLoop
) -> tuple[bool, Any]:
    """Run ``coro`` up to its first wait: ``(True, result)`` when it finished there,
    else ``(False, task)``: the rest handed to ``spawn``, which makes it a task.

    In a context of its own, as a task's would be: run in the caller's, a handler setting
    a context variable set it for every later request of the listener (the task made
    for the rest copies this context, so it sees what the first step set). ``loop`` is
    the running loop (looked up, it costs a system call a request on Python 3.11)."""
    return contextvars.copy_context().run(_start, coro, spawn, loop)


def _start(
    coro: Coroutine[Any, Any, Any], spawn: Spawn, loop: asyncio.AbstractEventLoop
) -> tuple[bool, Any]:
    global _depth
    step, outer = FirstStep(), asyncio.current_task(loop)
    if outer is not None:  # a task's step started this one: it is not that task's
        _leave_task(loop, outer)
    _enter_task(loop, step)  # type: ignore[arg-type]  # (the C version takes any object)
    _depth += 1
    try:
        yielded = coro.send(None)
    except StopIteration as done:
        return True, done.value
    finally:
        _depth -= 1
        _leave_task(loop, step)  # type: ignore[arg-type]
        if outer is not None:
            _enter_task(loop, outer)
    task = spawn(resume(coro, yielded))
    step.carry_on(task)
    return False, task


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
