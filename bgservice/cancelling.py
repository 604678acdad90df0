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
import logging
from collections.abc import Iterable
from typing import Any

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
