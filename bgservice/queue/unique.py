"""The embedded engine's unique keys (``queue:add?unique=KEY``): which waiting or running
job holds each key, and the adds of a key still being stored, whose id another add of the
same key waits for (it must not make a second job)."""

from __future__ import annotations

import asyncio

from bgservice.errors import ServiceError


class UniqueKeys:
    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._storing: dict[str, asyncio.Future[int]] = {}

    async def existing(self, key: str) -> int | None:
        """The job holding ``key`` (once it is stored, if its add is being stored); None
        when no job holds it."""
        if key in self._held:
            return self._held[key]
        if key in self._storing:
            return await asyncio.shield(self._storing[key])
        return None

    def holder(self, key: str) -> int | None:
        return self._held.get(key)

    def hold(self, key: str | None, jid: int) -> None:
        if key:
            self._held[key] = jid

    def release(self, key: str | None, jid: int) -> None:
        """``jid`` no longer waits or runs: its key is free (unless another job took it)."""
        if key and self._held.get(key) == jid:
            del self._held[key]

    def storing(self, key: str | None) -> None:
        """The add of a job with ``key`` is being stored: other adds of it wait for its id."""
        if key:
            self._storing[key] = asyncio.get_running_loop().create_future()

    def stored(self, key: str | None, outcome: int | ServiceError) -> None:
        """The add of ``key`` ended: the new job's id (which now holds the key), or the
        error the adds that waited for it raise too."""
        if not key:
            return
        pending = self._storing.pop(key)
        if isinstance(outcome, int):
            self.hold(key, outcome)
            pending.set_result(outcome)
        else:
            pending.set_exception(outcome)
            pending.exception()  # retrieved: the waiters re-raise it themselves
