"""The job queue's one interface, and what both of its engines share.

``JobQueue`` is what the rest of the service sees: ``queue:`` commands, and the methods
the HTTP API and ``request.add_job`` call. Two engines implement it:

- ``LocalQueue`` (local.py): scheduling in memory, every change written through the
  embedded SQLite store (sqlite.py); one host, no other server (the default);
- ``RedisQueue`` (redis.py): scheduling in Redis with atomic scripts (redis_scripts.py),
  so several service instances share one queue.

A job's states and the moves between them are one table, ``TRANSITIONS`` in job.py.

Both run a job the same way (``run_job``) and decide its outcome the same way
(``decide``): done, retried after a backoff, failed or cancelled.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import json
import logging
import random
import time
from collections.abc import Container, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from bgservice.config import NO_TIMEOUT, QueueSettings
from bgservice.errors import BadRequest, Busy, Cancelled, Forbidden, NotFound, ReplyError
from bgservice.events import JOB_FAILED, Events
from bgservice.origin import Origin
from bgservice.protocol import OK, Reply, whole
from bgservice.queue.commands import (
    AddSpec,
    Command,
    ListSpec,
    job_id,
    parse,
    parse_add,
    parse_list,
    parse_retry,
    parse_window,
)
from bgservice.queue.job import Job, JobState
from bgservice.queue.rates import Windows
from bgservice.queue.scheduler import SCHEDULE_COMMANDS, Scheduler
from bgservice.queue.schedules import Schedule
from bgservice.queue.store import Run
from bgservice.request import JobContext, Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)
Result = Reply
TITLE_ERROR = 100  # characters of a failed job's error its alert's title quotes


class JobRunner(Protocol):
    """How the queue runs a job: the dispatcher, through its error boundary."""

    async def call(
        self, request: Request, timeout: float | None = None, fallback: float | None = None
    ) -> Result: ...

    def check(self, module: str, source: str | None = None) -> None:
        """Raise the error a job for ``module`` would end with (unknown, refusing jobs, or
        not to be queued from ``source``: 403)."""

    def runnable(self) -> list[str]:
        """The modules whose jobs can run here now (``check`` admits them, from some
        source): an instance of a shared queue claims no job of another module."""


# Not frozen, though a value: made for every attempt, and a frozen dataclass's __init__ calls
# object.__setattr__ once per field (AddSpec: 2.3 us, 0.55 us unfrozen).
@dataclass
class Outcome:
    """What happens to a job after one run: its next state and, for a retry, when."""

    state: JobState
    status: int
    body: bytes
    run_at: float | None = None  # set for a retry


def decide(
    job: Job, status: int, body: bytes, now: float, backoff_max: float, jitter: float = 0.0
) -> Outcome:
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
        # Shortened by up to ``jitter`` of it, at random: jobs that failed together (their
        # database down) come back spread out, not all in the same instant; never longer
        # than the backoff a user reads in the docs, never past backoff_max.
        delay *= 1.0 - jitter * random.random()
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

    def __init__(
        self, settings: QueueSettings, runner: JobRunner, stats: Stats, events: Events
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.counters = stats  # the service's (its stats() method is the queue's own)
        self.events = events
        self.scheduler: Scheduler | None = None  # set once the schedules are loaded
        self._metric_names: set[str] = set()  # job names /metrics labels on their own
        self.rates = Windows({})  # [queue] module_rates (set by make_queue)
        # The running loop, kept by start(): on Python 3.11 each get_running_loop() is a
        # getpid() system call, and the job path asked several times per job.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Each job's attempt starts from a copy of this, not of whatever context started
        # it: the handler that added it, or the job whose end freed its worker.
        self.root = contextvars.copy_context()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the queue runs on (kept by start(); asked for before it)."""
        return self._loop or asyncio.get_running_loop()

    async def start_scheduler(self, configured: tuple[Schedule, ...]) -> None:
        """Load the schedules (service.config's replacing stored ones of the same name)
        and start firing them; the engine must have started."""
        scheduler = Scheduler(self, configured)
        await scheduler.start()
        self.scheduler = scheduler  # commands see it once it is loaded (503 till then)

    async def fire(self, schedule: Schedule, slot: float | None) -> int | None:
        """Add a schedule's run: of ``slot`` (recorded as fired with the job, atomically;
        None if it had been fired already), or one now (``slot`` None)."""
        return await self.add(schedule.spec(slot)) or None

    def check_schedule(self, schedule: Schedule, caller: str | None = None) -> None:
        """Raise the error its jobs would get now (queue:add's), and the one ``caller``'s
        own add would: a schedule does nothing its maker could not (QUEUE_FROM)."""
        for source in (schedule.source, caller) if caller is not None else (schedule.source,):
            self.runner.check(schedule.module, source)

    def schedules_changed(self) -> None:  # noqa: B027 (a hook; one instance: nobody to tell)
        """Schedules were changed here: tell the other instances, if any."""

    @abc.abstractmethod
    def close(self, grace: float = 0.0) -> None:
        """Stopping, first thing: start no job from now on (``stop`` follows once the
        listeners are closed); a job that comes due meanwhile waits for the next start,
        not for a dispatcher that refuses it (503: failed for good). Whoever waits for a
        job is told it is still queued (``refuse_waiters``) before the ``grace`` ends."""

    @abc.abstractmethod
    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]: ...

    @abc.abstractmethod
    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None: ...

    @abc.abstractmethod
    async def remove_schedule(self, name: str) -> bool: ...

    async def command(self, request: Request) -> bytes:
        """A ``queue:`` request -> reply body, or raise the error reply."""
        cmd = parse(request.data)
        if cmd.name == "add":
            return await self._add(cmd, request)
        if cmd.name == "get":
            return await self._result(job_id(cmd))
        if cmd.name == "check":
            return (await self.check(job_id(cmd))).encode()
        if cmd.name == "status":
            return _json(await self.status(job_id(cmd)))
        if cmd.name == "cancel":
            return (await self.cancel(job_id(cmd))).encode()
        if cmd.name == "retry":
            return b"id:%d" % await self.retry(job_id(cmd), parse_retry(cmd))
        if cmd.name == "list":
            return _json(await self.list_jobs(parse_list(cmd, self.settings)))
        if cmd.name in SCHEDULE_COMMANDS:
            if self.scheduler is None:
                raise Busy("Schedules not loaded yet")
            return await self.scheduler.command(cmd, request.source)
        return _json(await self.stats(parse_window(cmd)))

    async def _add(self, cmd: Command, request: Request) -> bytes:
        if "source" in cmd.options:
            raise Forbidden("option source: only an HTTP caller with the API token sets it")
        spec = parse_add(cmd, source=request.source, limits=self.settings)
        jid = await self.add(spec)
        # add-and-wait: one round trip for a caller that only wants the result (the job is
        # stored first, as for any add, so a caller gone meanwhile loses nothing); the
        # result is owed to it even if keep_results let it expire (0: as it finished)
        return await self._result(jid, owed=True) if spec.wait else b"id:%d" % jid

    async def _result(self, jid: int, owed: bool = False) -> bytes:
        """``queue:get``'s reply: the job's result once it finished, or its error reply."""
        status, body = await self.get(jid, owed)
        if status != OK:
            raise ReplyError(status, body.decode("utf-8", "replace"))
        return body

    async def run_job(self, job: Job) -> Result:
        """Run one attempt of ``job`` through its module's TCP handler, off the loop as a
        direct call would be. Its time limit: the job's ``timeout=``, else its module's
        TIMEOUT, else ``[queue] job_timeout``, else none (never ``call_timeout``: that is
        for a caller waiting on a socket). Streamed output is kept, so the result is what
        a direct call would have replied."""
        loop = self.loop
        chunks: list[bytes] = []
        context = JobContext(
            job, loop, self.progressed, self.save_checkpoint,
            self.settings.max_checkpoint_bytes, self.outlived,
        )  # fmt: skip
        request = Request(
            job.module, job.data, Origin.QUEUE, f"job:{job.id}",
            sink=chunks.append, loop=loop, jobs=self, job=context,
        )  # fmt: skip
        fallback = self.settings.job_timeout or NO_TIMEOUT
        try:
            return whole(await self.runner.call(request, job.timeout, fallback), chunks)
        finally:  # a def handler's thread may run on past its timeout: its writes stop
            context.ended = True

    def conclude(self, job: Job, status: int, body: bytes, now: float) -> Outcome:
        """``decide`` the attempt's outcome, and count it: its duration for ``/metrics``,
        an alert when the job ends ``failed``."""
        settings = self.settings
        outcome = decide(job, status, body, now, settings.backoff_max, settings.backoff_jitter)
        if job.started is not None:
            kind = "retry" if outcome.state is JobState.WAITING else str(outcome.state)
            key = (job.module, self.name_label(job.name), kind)
            self.counters.job_durations.observe(key, now - job.started)
        if outcome.state is JobState.FAILED:
            self.failed(job, status, body)
        return outcome

    def failed(self, job: Job, status: int, body: bytes) -> None:
        """A job ends ``failed``: a line in the log, and the alert."""
        detail = body.decode("utf-8", "replace")
        # The error's first line in the title too: it is a mail's subject, and the line
        # logged (a 4xx failure, retried never, had no other).
        first = detail.strip().partition("\n")[0]
        first = first if len(first) <= TITLE_ERROR else first[: TITLE_ERROR - 3] + "..."
        title = f"job {job.id} ({job.module}) failed after {job.attempts} attempt(s): {status}"
        title += f" {first}" if first else ""
        log.warning("%s", title)
        self.events.emit(JOB_FAILED, title=title, detail=detail, module=job.module, job=job.id)

    def name_label(self, name: str | None) -> str:
        """A job's name as a /metrics label: the first ``[queue] metrics_names`` distinct
        names as they are, later ones ``other`` (labels are series: keep them bounded);
        ``""`` for a job without a name."""
        if name is None:
            return ""
        if name in self._metric_names:
            return name
        if len(self._metric_names) < self.settings.metrics_names:
            self._metric_names.add(name)
            return name
        return "other"

    @abc.abstractmethod
    async def save_checkpoint(self, job: Job, value: str) -> None:
        """Store a running job's checkpoint durably (``request.job.save_checkpoint``)."""

    def progressed(self, job: Job) -> None:  # noqa: B027 (a hook; the default is enough)
        """A running job reported progress (already on ``job.progress``); the local queue
        reads it from there, a shared one copies it where other instances see it."""

    def outlived(self, job: Job, going_on: Future[Any]) -> None:  # noqa: B027 (as above)
        """``job``'s attempt ended at its timeout while its handler goes on until
        ``going_on`` is done: the engine keeps its worker and module slot taken."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, grace: float) -> None: ...

    @abc.abstractmethod
    async def add(self, spec: AddSpec) -> int:
        """Add a job; its id once it is stored (or the id of the job its unique key hits)."""

    @abc.abstractmethod
    async def get(self, jid: int, owed: bool = False) -> Result:
        """Wait for job ``jid`` to finish; its reply as a direct call would have given it.
        ``owed``: asked by its own add (``wait=1``), owed the result even once expired
        (the embedded engine reads it still; Redis kept it for the add: ADD's ``owed``)."""

    @abc.abstractmethod
    async def check(self, jid: int) -> str: ...

    @abc.abstractmethod
    async def status(self, jid: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def cancel(self, jid: int) -> str: ...

    @abc.abstractmethod
    async def retry(self, jid: int, dependents: bool = False) -> int:
        """Put failed or cancelled job ``jid`` back in line (its ``after=`` forgotten);
        ``dependents``: then the jobs that failed with 424 because it did, and because
        they did, too, each waiting on its ``after=`` jobs again (docs/queue.md, retry)."""

    @abc.abstractmethod
    async def delete(self, jid: int) -> None:
        """Forget a finished job and its result (its run records stay, for the history)."""

    @abc.abstractmethod
    async def list_jobs(self, spec: ListSpec) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def stats(self, window: float) -> dict[str, Any]: ...


def refuse_waiters(waiters: dict[int, asyncio.Future[Result]], running: Container[int]) -> None:
    """Stopping: whoever waits for a job not in ``running`` gets ``503: Shutting down:
    job N is still queued`` (an add?wait=1 learns its job's id: not to add it again)."""
    for jid, waiter in waiters.items():
        if jid not in running and not waiter.done():
            waiter.set_result((503, b"Shutting down: job %d is still queued" % jid))


def name_counts(pairs: Iterable[tuple[str | bytes | None, str]]) -> dict[str, dict[str, int]]:
    """``queue:stats``' ``names``: job name -> {"waiting": N, "running": M}, for the jobs
    (name, state) given; jobs without a name are left out."""
    out: dict[str, dict[str, int]] = {}
    for name, state in pairs:
        if name:
            text = name.decode() if isinstance(name, bytes) else name
            row = out.setdefault(text, {"waiting": 0, "running": 0})
            row[state] += 1
    return out


def finished_result(job: Job) -> Result:
    if job.state is JobState.WAITING or job.state is JobState.RUNNING:
        raise BadRequest("job not finished")
    return job.status or OK, job.result or b""


def queue_stats(
    counts: dict[str, int], oldest: float | None, history: dict[str, Any], workers: int,
    every: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``queue:stats``: counts per state, the oldest waiting job's age, and the run
    history's summary (history.py: the rate and busy hours); the ``workers`` of the
    instance asked and of ``every`` instance sharing the queue (one host: the same)."""
    return {
        "counts": counts,
        "oldest_waiting_age": round(time.time() - oldest, 3) if oldest else None,
        "finished_per_minute": history["finished_per_minute"],
        "workers": workers,
        "cluster_workers": workers if every is None else every,
        "window": history["window"],
    }


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
