"""Sleeps for ``data`` milliseconds (default 100, at most 60000) and replies ``slept N``.

A direct call is still cut at ``[limits] call_timeout`` (30 s by default: ``504``); a
queued job only where ``[queue] job_timeout`` (or its ``timeout=``) says so.

Useful to see timeouts, shutdown grace and the queue at work. It is ``async`` so a
thousand sleeping calls cost no threads.
"""

import asyncio

from bgservice import ReplyError

MAX_MS = 60_000


async def handle_tcp(request):
    text = request.text.strip() or "100"
    try:
        ms = int(text)
    except ValueError:
        raise ReplyError(400, f"sleep: expected milliseconds, got {text[:40]!r}") from None
    if not 0 <= ms <= MAX_MS:
        raise ReplyError(400, f"sleep: milliseconds must be 0-{MAX_MS}")
    await asyncio.sleep(ms / 1000)
    return f"slept {ms}"
