"""A module version's unload hook: run off the loader, given up after a timeout.

A sync hook runs on a thread of its own. On the loader's thread, a hook that blocked held
up every later import for good; on the calls' pool, stuck handlers could leave it no
thread. Python cannot stop a thread: a hook still running at the timeout is only given up
on (logged); it is a daemon thread, which neither a reload nor the service's exit waits
for. An async hook runs on the loop and is cancelled at the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from bgservice.declarations import makes_coroutine

log = logging.getLogger(__name__)


async def run_unload(name: str, hook: Callable[[], Any], timeout: float) -> None:
    """Run module ``name``'s unload hook; log what it raised, or that it did not end. One
    that makes a coroutine (``async def``, decorated too) runs on the loop, as handlers do."""
    on_loop = makes_coroutine(hook)
    if on_loop:
        running: asyncio.Future[Any] = asyncio.ensure_future(_on_loop(name, hook))
    else:
        running = asyncio.wrap_future(_in_own_thread(name, hook))
    # asyncio.wait, not wait_for: a TimeoutError the hook raises is its error, not ours.
    done, _ = await asyncio.wait({running}, timeout=timeout)
    if not done:
        if on_loop:
            running.cancel()
            fate = "cancelled"
        else:
            fate = "it goes on in a thread of its own"
        log.warning(
            "unload hook of module %s did not finish within %g s ([reload] import_timeout): %s",
            name, timeout, fate,
        )  # fmt: skip


async def _on_loop(name: str, hook: Callable[[], Any]) -> None:
    try:
        await hook()
    except asyncio.CancelledError:
        raise
    except BaseException:  # sys.exit() too: out of a task, SystemExit stops the service
        log.exception("unload hook of module %s raised", name)


def _in_own_thread(name: str, hook: Callable[[], Any]) -> Future[None]:
    """Start the hook in a daemon thread; the future ends when the hook does."""
    ended: Future[None] = Future()

    def run() -> None:
        # Logged here, the future only says "ended": what the hook raised may be what an
        # asyncio future refuses (StopIteration) or must not raise (sys.exit()'s SystemExit).
        try:
            hook()
        except BaseException:
            log.exception("unload hook of module %s raised", name)
        ended.set_result(None)

    threading.Thread(target=run, name=f"bgservice-unload-{name}", daemon=True).start()
    return ended
