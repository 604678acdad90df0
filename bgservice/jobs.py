"""The job queue's one interface, and what both of its engines share.

``JobQueue`` is what the rest of the service sees: ``queue:`` commands, and the methods
the HTTP API and ``request.add_job`` call. Two engines implement it:

- ``LocalQueue`` (jobs_local.py): scheduling in memory, every change written through the
  embedded SQLite store; one host, no other server (the default);
- ``RedisQueue`` (jobs_redis.py): scheduling in Redis with atomic scripts, so several
  service instances share one queue.

Both run a job the same way (``run_job``) and decide its outcome the same way
(``decide``): done, retried after a backoff, failed or cancelled.
"""

from __future__ import annotations

import abc
import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bgservice.config import QueueSettings
from bgservice.dispatch import Dispatcher
from bgservice.errors import BadRequest, Cancelled, NotFound, ReplyError
from bgservice.job import Job, JobState
from bgservice.protocol import OK
from bgservice.queue_commands import (
    AddSpec,
    ListSpec,
    job_id,
    parse,
    parse_add,
    parse_list,
    parse_window,
)
from bgservice.request import Request
from bgservice.store import Run

Result = tuple[int, bytes]


class JobContext:
    """``request.job`` in a queued call: the job's id, progress reports, cancel requests."""

    def __init__(
        self,
        job: Job,
        loop: asyncio.AbstractEventLoop,
        on_progress: Callable[[Job], None] | None = None,
    ) -> None:
        self.id = job.id
        self.attempt = job.attempts
        self._job = job
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._on_progress = on_progress

    @property
    def cancelled(self) -> bool:
        """True once ``queue:cancel`` asked this running job to stop."""
        return self._job.cancel_requested

    def progress(self, done: float, total: float = 100, message: str | None = None) -> None:
        """Report progress; ``queue:status`` shows it at once. Safe from any thread."""
        value = (float(done), float(total), None if message is None else str(message)[:500])
        if threading.get_ident() == self._loop_thread:
            self._set(value)
        else:
            self._loop.call_soon_threadsafe(self._set, value)

    def _set(self, value: tuple[float, float, str | None]) -> None:
        self._job.progress = value
        if self._on_progress is not None:
            self._on_progress(self._job)


@dataclass(frozen=True)
class Outcome:
    """What happens to a job after one run: its next state and, for a retry, when."""

    state: JobState
    status: int
    body: bytes
    run_at: float | None = None  # set for a retry


def decide(job: Job, status: int, body: bytes, now: float, backoff_max: float) -> Outcome:
    """Cancel asked -> cancelled; OK -> done; 5xx with retries left -> retry after an
    exponential backoff; anything else (4xx: the request itself is wrong) -> failed."""
    if job.cancel_requested:
        return Outcome(JobState.CANCELLED, Cancelled.code, b"Job %d cancelled" % job.id)
    if status == OK:
        return Outcome(JobState.DONE, status, body)
    if status >= 500 and job.attempts <= job.max_retries:
        # The exponent is capped: 2**1100 does not fit a float, and past 2**60 every
        # backoff is at backoff_max anyway.
        delay = min(job.backoff * 2.0 ** min(job.attempts - 1, 60), backoff_max)
        return Outcome(JobState.WAITING, status, body, now + delay)
    return Outcome(JobState.FAILED, status, body)


def run_record(job: Job, outcome: Outcome, finished: float) -> Run:
    assert job.started is not None
    kind = "retry" if outcome.state is JobState.WAITING else str(outcome.state)
    return Run(job.id, job.module, job.attempts, job.started, finished, kind)


def not_found(jid: int) -> NotFound:
    return NotFound(f"Job {jid} not found (unknown or expired)")


class JobQueue(abc.ABC):
    """The queue as the service sees it; ``command`` serves every ``queue:`` request."""

    def __init__(self, settings: QueueSettings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher

    async def command(self, request: Request) -> bytes:
        """A ``queue:`` request -> reply body, or raise the error reply."""
        cmd = parse(request.data)
        if cmd.name == "add":
            return b"id:%d" % await self.add(parse_add(cmd))
        if cmd.name == "get":
            status, body = await self.get(job_id(cmd))
            if status != OK:
                raise ReplyError(status, body.decode("utf-8", "replace"))
            return body
        if cmd.name == "check":
            return (await self.check(job_id(cmd))).encode()
        if cmd.name == "status":
            return _json(await self.status(job_id(cmd)))
        if cmd.name == "cancel":
            return (await self.cancel(job_id(cmd))).encode()
        if cmd.name == "retry":
            return b"id:%d" % await self.retry(job_id(cmd))
        if cmd.name == "list":
            return _json(await self.list_jobs(parse_list(cmd)))
        return _json(await self.stats(parse_window(cmd)))

    async def run_job(self, job: Job) -> Result:
        """Run one attempt of ``job`` through its module's TCP handler, off the loop as a
        direct call would be, with the job's own timeout. Streamed output is kept, so the
        result is what a direct call would have replied."""
        request = Request(job.module, job.data, "queue", f"job:{job.id}")
        request.job = JobContext(job, self.dispatcher.running_loop, self.progressed)
        return await self.dispatcher.call_whole(request, timeout=job.timeout)

    def conclude(self, job: Job, status: int, body: bytes, now: float) -> Outcome:
        """``decide`` the attempt's outcome, and count it: its duration for ``/metrics``,
        an alert when the job ends ``failed``."""
        outcome = decide(job, status, body, now, self.settings.backoff_max)
        if job.started is not None:
            kind = "retry" if outcome.state is JobState.WAITING else str(outcome.state)
            self.dispatcher.stats.job_durations.observe((job.module, kind), now - job.started)
        if outcome.state is JobState.FAILED:
            self.dispatcher.alert(
                "job",
                f"job {job.id} ({job.module}) failed after {job.attempts} attempt(s): {status}",
                body.decode("utf-8", "replace"),
                module=job.module,
                job=job.id,
            )
        return outcome

    def progressed(self, job: Job) -> None:  # noqa: B027 (a hook; the default is enough)
        """A running job reported progress (already on ``job.progress``); the local queue
        reads it from there, a shared one copies it where other instances see it."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, grace: float) -> None: ...

    @abc.abstractmethod
    async def add(self, spec: AddSpec) -> int:
        """Add a job; its id once it is stored (or the id of the job its unique key hits)."""

    @abc.abstractmethod
    async def get(self, jid: int) -> Result:
        """Wait for job ``jid`` to finish; its reply as a direct call would have given it."""

    @abc.abstractmethod
    async def check(self, jid: int) -> str: ...

    @abc.abstractmethod
    async def status(self, jid: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def cancel(self, jid: int) -> str: ...

    @abc.abstractmethod
    async def retry(self, jid: int) -> int: ...

    @abc.abstractmethod
    async def list_jobs(self, spec: ListSpec) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def stats(self, window: float) -> dict[str, Any]: ...


def finished_result(job: Job) -> Result:
    if job.state is JobState.WAITING or job.state is JobState.RUNNING:
        raise BadRequest("job not finished")
    return job.status or OK, job.result or b""


def busy_by_hour(runs: list[Run], now: float, window: float) -> dict[str, Any]:
    """Busy seconds per hour over ``window``: when the service works and when it idles."""
    start = now - window
    hours: dict[int, dict[str, float]] = {}
    outcomes: Counter[str] = Counter()
    busy = 0.0
    for run in runs:
        outcomes[run.outcome] += 1
        begin, end = max(run.started, start), min(run.finished, now)
        busy += max(0.0, end - begin)
        while begin < end:
            hour = int(begin // 3600 * 3600)
            part = min(end, hour + 3600) - begin
            row = hours.setdefault(hour, {"busy_seconds": 0.0, "runs": 0})
            row["busy_seconds"] += part
            begin += part
        row = hours.setdefault(int(max(run.started, start) // 3600 * 3600), {
            "busy_seconds": 0.0, "runs": 0})  # fmt: skip
        row["runs"] += 1
    return {
        "seconds": window,
        "runs": len(runs),
        "outcomes": dict(outcomes),
        "busy_seconds": round(busy, 3),
        "by_hour": [
            {"hour": h, "busy_seconds": round(v["busy_seconds"], 3), "runs": int(v["runs"])}
            for h, v in sorted(hours.items())
        ],
    }


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
