"""Running a coroutine's first step at once, and a task only for what is left.

Most requests finish without waiting (a cached reply, a short ``async def`` handler, a
built-in command): for them a task, and the loop iteration it waits for, is pure cost.
``start`` runs the first step in the caller; a coroutine that waits goes on in a task
that takes over exactly where it stopped (``Resume``; ``Rest`` for a coroutine that
awaits the rest of another itself). Python 3.12's eager task factory does the same for
every task; this does it only where it is known to pay, and on 3.11.

For the whole coroutine ``asyncio.current_task()`` is a ``FirstStep``: what a timeout or
a task group asks of its task (``cancel``, ``cancelling``, ``uncancel``) it answers for
the task that carries on (and its name, loop and coroutine, for loggers and anyio's
``get_current_task``), so a handler may use ``asyncio.timeout`` and ``wait_for`` at
once (even one due as it begins: its cancellation reaches the coroutine where it waits),
and it stays the current task in the rest, so a library that checks it is the same
object (anyio's cancel scopes) finds it is. Without it there was no current task in the
first step (or another's), and both raised "Timeout should be used inside a task": a 500
for every handler that began with one (on Python 3.12 ``wait_for`` too, so the shipped
compilers failed every compile).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import itertools
from asyncio.tasks import _enter_task, _leave_task, current_task  # (the eager task factory's)
from collections.abc import Callable, Coroutine, Generator
from types import CoroutineType, FunctionType
from typing import Any

if type(current_task) is FunctionType:  # Python 3.11's, a Python function around this dict
    current_task = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]

Spawn = Callable[..., Any]  # (coroutine, context=...) -> a task: loop.create_task's form
# (coroutine, what it waits on) -> whether it goes on elsewhere, its await ended
Detach = Callable[[Coroutine[Any, Any, Any], Any], bool]


class FirstStep:
    """The current task of a coroutine run by ``start``: its cancellations are kept and
    handed to the task made for the rest (``task``), and then forwarded to it."""

    # Defaults on the class, no __init__: one is made for every first step, and most
    # are never asked anything.
    task: asyncio.Task[Any] | None = None
    coro: Any = None  # the coroutine whose first step this is (a handler's: runs)
    _cancels = 0
    _message: Any = None
    _name: str | None = None

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

    def cancelled(self) -> bool:
        return self.task is not None and self.task.cancelled()

    # What loggers and anyio's get_current_task() read (its TaskInfo: name and coroutine).
    # A name asked for or set before the task is made is given to it (carry_on): the
    # same from the first line to the last.
    def get_name(self) -> str:
        if self.task is not None:
            return self.task.get_name()
        if self._name is None:
            self._name = f"bgservice-call-{next(_names)}"
        return self._name

    def set_name(self, value: object) -> None:
        if self.task is not None:
            self.task.set_name(value)
        else:
            self._name = str(value)

    def get_coro(self) -> Any:
        return self.task.get_coro() if self.task is not None else self.coro

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.task.get_loop() if self.task is not None else asyncio.get_running_loop()

    # What anyio's cancel scopes read of a task before they cancel it: before the task is
    # made, "not cancelled yet" and "waiting on nothing" (it then cancels it, next turn).
    @property
    def _must_cancel(self) -> bool:
        return self.task._must_cancel if self.task is not None else self._cancels > 0  # type: ignore[attr-defined]

    @property
    def _fut_waiter(self) -> Any:
        return self.task._fut_waiter if self.task is not None else None  # type: ignore[attr-defined]

    def carry_on(self, task: asyncio.Task[Any]) -> None:
        """``task`` runs the rest: it gets what was asked of this step meanwhile."""
        self.task = task
        self.coro = None
        if self._name is not None:
            task.set_name(self._name)
        if self._cancels:
            task.cancel(self._message)

    def __getattr__(self, name: str) -> Any:
        if self.task is not None:
            return getattr(self.task, name)
        raise RuntimeError(
            f"asyncio.current_task().{name} is not available before the call first awaits:"
            " its first step runs at once, outside a task (docs/modules.md)"
        )


def start(
    coro: Coroutine[Any, Any, Any], spawn: Spawn, loop: asyncio.AbstractEventLoop,
    base: contextvars.Context | None = None,
) -> tuple[bool, Any]:  # fmt: skip
    """Run ``coro`` up to its first wait: ``(True, result)`` when it finished there,
    else ``(False, task)``: the rest handed to ``spawn``, which makes it a task.

    In a context of its own, as a task's would be: run in the caller's, a handler setting
    a context variable set it for every later request of the listener. The task made for
    the rest runs in the same context, not a copy: a variable's token from the first step
    resets it in the rest (a copy refused it: "created in a different Context"). ``loop``
    is the running loop (looked up, it costs a system call a request on Python 3.11).
    ``base``: a context to copy instead of the caller's."""
    context = contextvars.copy_context() if base is None else base.copy()
    return context.run(_start, None, coro, spawn, loop, context)


def start_call(
    begin: Callable[[Any], Any], arg: Any, spawn: Spawn, loop: asyncio.AbstractEventLoop
) -> tuple[bool, Any]:
    """``begin(arg)`` now, as ``start`` runs a first step: ``(True, what it returned)``,
    unless that is a coroutine (the rest of what it began: a handler that waits), which
    goes on as in ``start``, under the same current task. No coroutine of its own for
    what ends in ``begin``."""
    context = contextvars.copy_context()
    return context.run(_start, begin, arg, spawn, loop, context)


def _start(
    begin: Callable[[Any], Any] | None, arg: Any, spawn: Spawn,
    loop: asyncio.AbstractEventLoop, context: contextvars.Context,
) -> tuple[bool, Any]:  # fmt: skip
    step, outer = FirstStep(), current_task(loop)
    if outer is not None:  # a task's step started this one: it is not that task's
        _leave_task(loop, outer)
    _enter_task(loop, step)  # type: ignore[arg-type]  # (the C version takes any object)
    try:
        if begin is None:  # (start: the coroutine itself)
            coro = step.coro = arg
        else:
            coro = begin(arg)
            if type(coro) is not CoroutineType:  # (by exact type: every call asks)
                return True, coro
            if step.coro is None:  # (no handler's coroutine named by begin: see runs)
                step.coro = coro
        yielded = coro.send(None)
    except StopIteration as done:
        return True, done.value
    finally:
        _leave_task(loop, step)  # type: ignore[arg-type]
        if outer is not None:
            _enter_task(loop, outer)
    task = spawn(Resume(coro, yielded, step, loop), context=context)
    step.carry_on(task)
    return False, task


def runs(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
    """The first step running now (``start_call``'s ``begin``) is ``coro``'s, a handler's:
    what its ``get_coro()`` answers (anyio's ``get_current_task``), as a task's would."""
    step = current_task(loop)
    if type(step) is FirstStep:
        step.coro = coro


class Rest:
    """What is left of a coroutine whose first step ran outside: awaiting it hands what it
    yielded to the task, and what the task sends or throws (a result, a cancellation)
    back to it. An awaitable, not a generator-based coroutine: from Python 3.12 on,
    ``create_task`` refuses those (every call that waited was a 500 there, and the
    service stopped). With ``detach``, a coroutine that catches a cancellation thrown in
    and waits on is offered to ``detach`` (with what it waits on); taken, it goes on
    elsewhere and the cancellation goes on out (Execution._go_on)."""

    __slots__ = ("_coro", "_detach", "_yielded")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], yielded: Any, detach: Detach | None = None
    ) -> None:
        self._coro, self._yielded, self._detach = coro, yielded, detach

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
                if (
                    self._detach is not None
                    and isinstance(exc, asyncio.CancelledError)
                    and self._detach(coro, yielded)
                ):  # it caught its cancellation and waits on: it goes on elsewhere
                    raise exc
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as done:
                    return done.value


class Resume(collections.abc.Coroutine[Any, Any, Any]):
    """``Rest`` as a coroutine of its own, for a task to run.

    The task's first ``send`` gets what the first step yielded; whatever the task throws,
    from the very first, goes into the coroutine where it waits. (An ``async def``
    awaiting ``Rest`` lost a throw that came before the task first ran: thrown into a
    coroutine not started yet, it ends it there. A timeout due as it begins does that,
    ``asyncio.timeout(0)``, which redis-py's connection pool enters on every command: the
    call's task ended cancelled, and its client waited for ever.)

    While the coroutine runs, ``asyncio.current_task()`` is still its first step's
    ``FirstStep``, which forwards to the task: the same object from the first line to the
    last, as a library may check (anyio's cancel scopes, so httpx: "Attempted to exit
    cancel scope in a different task than it was entered in", a 500 for every call).

    An object of ``collections.abc.Coroutine``: what ``create_task`` takes on every
    Python, as it takes a native coroutine."""

    __slots__ = ("_coro", "_loop", "_step", "_yielded")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], yielded: Any, step: FirstStep,
        loop: asyncio.AbstractEventLoop,
    ) -> None:  # fmt: skip
        self._coro, self._yielded, self._step, self._loop = coro, yielded, step, loop

    def send(self, value: Any) -> Any:
        if self._yielded is not _GONE:  # the task's first step
            yielded, self._yielded = self._yielded, _GONE
            return yielded
        loop, step = self._loop, self._step  # (_as_step, inlined: every step of every call)
        task: Any = current_task(loop)
        _leave_task(loop, task)
        _enter_task(loop, step)  # type: ignore[arg-type]
        try:
            return self._coro.send(value)
        except BaseException:  # (StopIteration too) it has ended: no cycle left behind
            self._step = None  # type: ignore[assignment]  # (task -> Resume -> step -> task)
            raise
        finally:
            _leave_task(loop, step)  # type: ignore[arg-type]
            _enter_task(loop, task)
            task = step = None  # type: ignore[assignment]  # a traceback keeps this frame

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        try:
            if self._yielded is not _GONE:  # before the task's first step
                waited, self._yielded = self._yielded, _GONE
                if asyncio.isfuture(waited) and isinstance(typ, asyncio.CancelledError):
                    waited.cancel()  # as a task that waited on it would (Task.cancel)
            if val is None and tb is None:
                return self._as_step(self._coro.throw, typ)
            return self._as_step(self._coro.throw, typ, val, tb)  # (the old form, deprecated)
        finally:
            # What was thrown, its traceback holding this frame: a cycle through it would
            # hold the task, and its reply, until a full collection (3.12+: a review).
            typ = val = tb = waited = None

    def _as_step(self, method: Callable[..., Any], *args: Any) -> Any:
        loop, step = self._loop, self._step
        task: Any = current_task(loop)  # the task running this one
        _leave_task(loop, task)
        _enter_task(loop, step)  # type: ignore[arg-type]
        try:
            return method(*args)
        except BaseException:  # (as in send)
            self._step = None  # type: ignore[assignment]
            raise
        finally:
            _leave_task(loop, step)  # type: ignore[arg-type]
            _enter_task(loop, task)
            args = task = step = None  # type: ignore[assignment]  # (as in throw)

    def close(self) -> None:
        self._coro.close()

    def __getattr__(self, name: str) -> Any:
        # __qualname__, cr_frame, cr_await...: the coroutine's, for the task's repr and stack
        if name in Resume.__slots__:  # (not set yet)
            raise AttributeError(name)
        return getattr(self._coro, name)

    def __await__(self) -> Generator[Any, Any, Any]:
        yielded, self._yielded = self._yielded, _GONE
        return Rest(self._coro, yielded).__await__()


_names = itertools.count(1)  # FirstStep's names, as asyncio numbers its tasks'
_GONE = object()  # Resume: the first step's yield was handed to the task
