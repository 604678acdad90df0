"""Ending tasks at shutdown: cancelled, and cancelled again while they go on.

A cancellation can be lost. On Python 3.11 ``asyncio.wait_for`` returns what it waited
for when that finished as the cancellation came, and the cancellation is gone (CPython
gh-86296, fixed in 3.12): redis-py sends every command of a client with a socket timeout
through it, so a task cancelled in the middle of one goes on as if nothing had happened
(found as a stop that never ended: the Redis engine's listener, cancelled while it
connected, went on to follow its channel for ever). Handler code can do the same, by
catching ``CancelledError``. So a task that has not ended a while after its
cancellation is cancelled again (anyio's cancel scopes do the same, for the same
reason), until it ends or the caller's patience runs out. The while is long enough for
any clean-up a cancellation starts (closing a connection, handing a job back) to finish
first: a cancellation lost makes a task go on for good, not for a moment.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from bgservice.eager import Rest

log = logging.getLogger(__name__)

AGAIN = 1.0  # seconds a cancelled task has to end before it is cancelled again
STOP_PATIENCE = 3.0  # seconds a stop waits for what it cancelled, cancelling it each second


async def cancel_all(
    tasks: Iterable[asyncio.Future[Any]], what: str, patience: float = STOP_PATIENCE,
    again: float = AGAIN,
) -> set[asyncio.Future[Any]]:  # fmt: skip
    """Cancel ``tasks`` and wait up to ``patience`` seconds for them to end, cancelling
    again every ``again`` seconds those still running; those still running then are
    logged (``what`` they are) and returned. What the others ended with is retrieved (a
    failure is theirs to report, not asyncio's "exception was never retrieved")."""
    tasks = set(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(again, left))
    for task in tasks - pending:
        if not task.cancelled():
            task.exception()
    if pending:
        log.warning("%d %s did not end when cancelled: left behind", len(pending), what)
    return pending


class GoneOn:
    """Handlers that caught their call's cancellation at its timeout and waited on (a
    clean-up, or a handler that will not end). Awaited in the call, one would hold its
    client past the deadline and, over UDP, a ``udp_workers`` slot for good (a few
    stopped every datagram). The call ends (``504`` at the deadline) and the coroutine
    goes on here, in a task of its own, cancelled again every ``AGAIN`` seconds until it
    ends (a clean-up gets that long; a cancellation lost by Python 3.11's ``wait_for`` is
    made good). The stop cancels what is still here with every other task.
    """

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def take(
        self, coro: Coroutine[Any, Any, Any], waits_on: Any, name: str,
        ended: Callable[[], None],
    ) -> None:  # fmt: skip
        """Go on with ``coro`` (module ``name``'s, waiting on ``waits_on``); ``ended()``
        when it ends, however it ends."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(_go_on(coro, waits_on), context=contextvars.copy_context())
        self.tasks.add(task)
        again = loop.call_later(AGAIN, _cancel_again, task, name)

        def done(task: asyncio.Task[Any]) -> None:
            self.tasks.discard(task)
            again.cancel()
            ended()
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.warning("module %s: a handler gone on after its cancellation raised %r",
                            name, exc)  # fmt: skip

        task.add_done_callback(done)


async def _go_on(coro: Coroutine[Any, Any, Any], waits_on: Any) -> Any:
    return await Rest(coro, waits_on)


def _cancel_again(task: asyncio.Task[Any], name: str = "") -> None:
    if not task.done():
        if name:  # (the first time: a clean-up has had its second)
            log.warning("module %s: a handler caught its cancellation and went on after its"
                        " call's timeout; cancelled again each %g s until it ends",
                        name, AGAIN)  # fmt: skip
        task.cancel()
        task.get_loop().call_later(AGAIN, _cancel_again, task)
