"""The embedded engine's unique keys (``queue:add?unique=KEY``): which waiting or running
job holds each key, and the adds of a key still being stored, whose id another add of the
same key waits for (it must not make a second job). A running job whose cancel was
acknowledged ("cancelling") holds its key no longer: its work is given up, though its
handler may still run, so the next add of the key makes a job."""

from __future__ import annotations

import asyncio

from bgservice.errors import Conflict, ServiceError
from bgservice.queue.job import Job


class UniqueKeys:
    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._storing: dict[str, asyncio.Future[int | None]] = {}

    async def claim(self, key: str) -> int | None:
        """The job holding ``key`` (once it is stored, if its add is being stored), or
        None: the key is then the caller's, who must end with ``stored``. Taken with no
        wait in between, so two adds of one key never both get None."""
        while True:
            if key in self._held:
                return self._held[key]
            pending = self._storing.get(key)
            if pending is None:
                self._storing[key] = asyncio.get_running_loop().create_future()
                return None
            jid = await asyncio.shield(pending)
            if jid is not None:
                return jid  # else that add made no job (e.g. a bad after=): look again

    def holder(self, key: str) -> int | None:
        return self._held.get(key)

    def adding(self, key: str) -> bool:
        """An add of a job with ``key`` is being stored."""
        return key in self._storing

    def hold(self, key: str | None, jid: int) -> None:
        if key:
            self._held[key] = jid

    def recovered(self, job: Job) -> None:
        """``job``, unfinished, was read back at start: it holds its key again, unless its
        cancel was acknowledged (it ends cancelled now; a job added since may hold it)."""
        if not job.cancel_requested:
            self.hold(job.unique_key, job.id)

    def retaking(self, key: str | None, jid: int) -> None:
        """Raise the 409 for a retry of ``jid`` whose key another job holds, or an add of
        it is taking: two jobs of one key would break what ``unique=`` promises."""
        if key and (holder := self.holder(key)) is not None:
            raise Conflict(f"Job {jid}'s unique key is held by job {holder}")
        if key and self.adding(key):
            raise Conflict(f"Job {jid}'s unique key is being taken by a job being added")

    def release(self, key: str | None, jid: int) -> None:
        """``jid`` no longer waits or runs: its key is free (unless another job took it)."""
        if key and self._held.get(key) == jid:
            del self._held[key]

    def stored(self, key: str | None, outcome: int | ServiceError | None) -> None:
        """The add that claimed ``key`` ended: the new job's id (which now holds the key),
        None if it made no job, or the store's error, which the adds that waited raise."""
        if not key:
            return
        pending = self._storing.pop(key)
        if isinstance(outcome, ServiceError):
            pending.set_exception(outcome)
            pending.exception()  # retrieved: the waiters re-raise it themselves
            return
        if outcome is not None:
            self.hold(key, outcome)
        pending.set_result(outcome)
