"""A queued job's record: what is stored, and how it reads in ``queue:status``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from bgservice.config import QueueSettings
from bgservice.errors import BadRequest
from bgservice.queue.commands import AddSpec


class JobState(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def check_code(self) -> str:
        """The original's ``queue:check`` answer: 0 waiting, 1 running, 2 finished."""
        if self is JobState.WAITING:
            return "0"
        return "1" if self is JobState.RUNNING else "2"

    @property
    def finished(self) -> bool:
        return self not in (JobState.WAITING, JobState.RUNNING)


# A job's life, once for both engines (docs/queue.md draws it): (from, to) -> why.
# The local engine moves jobs only through ``Job.move``, which checks this table; the Redis
# engine's Lua scripts make the same moves, and tests/test_queue.py checks what both do.
TRANSITIONS: dict[tuple[JobState, JobState], str] = {
    (JobState.WAITING, JobState.RUNNING): "a worker is free and it is due (priority, then age)",
    (JobState.WAITING, JobState.CANCELLED): "queue:cancel",
    (JobState.WAITING, JobState.FAILED): "a dependency failed or was cancelled (424)",
    (JobState.RUNNING, JobState.DONE): "its module replied 200",
    (JobState.RUNNING, JobState.FAILED): "an error reply, and no retry left (or a 4xx)",
    (JobState.RUNNING, JobState.CANCELLED): "queue:cancel asked, and the attempt ended",
    (JobState.RUNNING, JobState.WAITING): "a 5xx with retries left (after a backoff); or its "
    "attempt was cut (a crash, a lost lease, a shutdown) and it runs again",
    (JobState.FAILED, JobState.WAITING): "queue:retry",
    (JobState.CANCELLED, JobState.WAITING): "queue:retry",
}


def stored_after(after: tuple[int, ...]) -> str | None:
    """The ids a job runs after as stored (SQLite column, Redis field): ``"1,2,3"``."""
    return ",".join(map(str, after)) if after else None


def read_after(raw: int | str | bytes | None) -> tuple[int, ...]:
    """Back from storage; rows written before several ids were allowed hold one int."""
    if raw is None or raw == "" or raw == b"":
        return ()
    if isinstance(raw, int):
        return (raw,)
    text = raw.decode() if isinstance(raw, bytes) else raw
    return tuple(int(part) for part in text.split(","))


def stored_tags(tags: tuple[str, ...]) -> str | None:
    return ",".join(tags) or None


def read_tags(raw: str | bytes | None) -> tuple[str, ...]:
    if not raw:
        return ()
    return tuple((raw.decode() if isinstance(raw, bytes) else raw).split(","))


def checked_name(name: str | None, settings: QueueSettings) -> str | None:
    if name is not None and len(name) > settings.max_name_chars:
        raise BadRequest(f"option name: at most {settings.max_name_chars} characters")
    return name


def checked_unique(key: str | None, settings: QueueSettings) -> str | None:
    if key is not None and len(key) > settings.max_name_chars:  # it is stored twice
        raise BadRequest(f"option unique: at most {settings.max_name_chars} characters")
    return key


def checked_tags(tags: tuple[str, ...], settings: QueueSettings) -> tuple[str, ...]:
    if len(tags) > settings.max_tags:
        raise BadRequest(f"option tags: at most {settings.max_tags} tags")
    return tags


class BadTransition(RuntimeError):
    """A move the job state table does not allow: a bug of the engine, not of the user."""


# Columns in storage order; ``Job`` has a field of the same name for each.
COLUMNS = (
    "id",
    "module",
    "data",
    "state",
    "priority",
    "run_at",
    "created",
    "started",
    "finished",
    "attempts",
    "max_retries",
    "backoff",
    "timeout",
    "unique_key",
    "after",
    "status",
    "result",
    "error",
    "cancel_requested",
    "expires",
    "name",
    "tags",
    "checkpoint",
    "source",
)


@dataclass(eq=False)
class Job:
    id: int
    module: str
    data: bytes
    state: JobState
    priority: int
    run_at: float
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    max_retries: int = 0
    backoff: float = 1.0
    timeout: float | None = None
    unique_key: str | None = None
    after: tuple[int, ...] = ()  # runs when all of these are done
    status: int | None = None
    result: bytes | None = None
    error: str | None = None
    cancel_requested: bool = False
    expires: float | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()
    checkpoint: str | None = None  # saved by a run (request.job.save_checkpoint), for the next
    source: str | None = None  # where it was added from (AddSpec.source)
    # Runs a crash cut ([queue] max_interruptions). Stored apart from COLUMNS, as progress.
    interruptions: int = 0
    # In memory only:
    progress: tuple[float, float, str | None] | None = field(default=None, repr=False)

    @classmethod
    def new(cls, spec: AddSpec, settings: QueueSettings, now: float) -> Job:
        """A waiting job as ``queue:add`` describes it, the queue's defaults filled in
        (its id is the engine's to give)."""
        return cls(
            id=0,
            module=spec.module,
            data=spec.data,
            state=JobState.WAITING,
            priority=spec.priority,
            run_at=spec.run_at or now,
            created=now,
            max_retries=settings.retries if spec.retries is None else spec.retries,
            backoff=settings.backoff if spec.backoff is None else spec.backoff,
            timeout=spec.timeout,
            # A schedule's run (mark) carries the service's own key, schedule:NAME@SLOT (at
            # most 88 characters): max_name_chars bounds what clients send.
            unique_key=spec.unique if spec.mark else checked_unique(spec.unique, settings),
            after=spec.after,
            name=checked_name(spec.name, settings),
            tags=checked_tags(spec.tags, settings),
            source=spec.source,
        )

    def move(self, state: JobState) -> None:
        """Go to ``state``, as ``TRANSITIONS`` allows."""
        if (self.state, state) not in TRANSITIONS:
            raise BadTransition(f"job {self.id}: {self.state} -> {state} is not a job's move")
        self.state = state

    def row(self) -> tuple[Any, ...]:
        """The stored row, in ``COLUMNS`` order (spelt out: it is built for every job)."""
        return (
            self.id, self.module, self.data, str(self.state), self.priority, self.run_at,
            self.created, self.started, self.finished, self.attempts, self.max_retries,
            self.backoff, self.timeout, self.unique_key, stored_after(self.after), self.status,
            self.result,
            self.error, self.cancel_requested, self.expires, self.name, stored_tags(self.tags),
            self.checkpoint, self.source,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Job:
        values = dict(zip(COLUMNS, row, strict=True))
        values["state"] = JobState(values["state"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["data"] = bytes(values["data"])
        values["after"] = read_after(values["after"])
        values["tags"] = read_tags(values["tags"])
        if values["result"] is not None:
            values["result"] = bytes(values["result"])
        return cls(**values)

    def describe(
        self, now: float, position: int | None = None, throttled: float | None = None
    ) -> dict[str, Any]:
        """The ``queue:status`` JSON."""
        duration = None  # (waiting, for a retry too: the last start is no run's)
        if self.started is not None and self.state is not JobState.WAITING:
            duration = round((self.finished or now) - self.started, 6)
        progress = None
        if self.progress is not None:
            done, total, message = self.progress
            progress = {"done": done, "total": total, "message": message}
        return {
            "id": self.id,
            "module": self.module,
            "state": str(self.state),
            "priority": self.priority,
            "position": position,
            "progress": progress,
            "attempts": self.attempts,
            "max_retries": self.max_retries,
            "interruptions": self.interruptions,
            "created": self.created,
            "run_at": self.run_at,
            "started": self.started,
            "finished": self.finished,
            "duration": duration,
            "timeout": self.timeout,
            "unique": self.unique_key,
            "after": list(self.after) or None,
            "status": self.status,
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "name": self.name,
            "tags": list(self.tags),
            "checkpoint": self.checkpoint,
            "source": self.source,
            # Waiting for its module's rate window ([queue] module_rates): until then.
            "throttled_until": throttled,
        }
