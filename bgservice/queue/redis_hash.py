"""A job as the Redis engine keeps it: the fields of its ``P:job:ID`` hash, both ways."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bgservice.queue.job import (
    COLUMNS,
    Job,
    JobState,
    read_after,
    read_tags,
    stored_after,
    stored_tags,
)

_FLOATS = {"run_at", "created", "started", "finished", "backoff", "timeout", "expires"}
_INTS = {"priority", "attempts", "max_retries", "status", "interruptions"}


def _reader(key: str) -> Callable[[bytes], Any]:
    if key in ("data", "result"):
        return bytes
    if key in _FLOATS:
        return float
    if key in _INTS:
        return int
    special: dict[str, Callable[[bytes], Any]] = {
        "after": read_after,
        "tags": read_tags,
        "cancel_requested": b"1".__eq__,
    }
    return special.get(key, bytes.decode)


# Each field of the hash that is a Job column: its name and how it reads back. Looked up
# per field present (a job's hash holds about half the columns), not per column.
_FIELDS = {key.encode(): (key, _reader(key)) for key in (*COLUMNS[1:], "interruptions")}


def job_from_hash(jid: int, fields: dict[bytes, bytes]) -> Job:
    """A job read back from its ``P:job:ID`` hash (as CLAIM and the listings return it)."""
    values: dict[str, Any] = {}
    for field, raw in fields.items():
        column = _FIELDS.get(field)
        if column is not None:
            values[column[0]] = column[1](raw)
    values["state"] = JobState(values.get("state", "waiting"))
    job = Job(id=jid, **values)
    progress = fields.get(b"progress")
    if progress:
        done, total, message = json.loads(progress)
        job.progress = (done, total, message)
    return job


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A hash as Redis replies it (a flat list of keys and values) as a dict."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def hash_of(job: Job) -> list[Any]:
    """A new job's hash fields, flat (name, value, ...), as the ADD script stores them."""
    fields: list[Any] = [
        "module", job.module,
        "data", job.data,
        "state", str(job.state),
        "priority", job.priority,
        "run_at", repr(job.run_at),
        "created", repr(job.created),
        "attempts", job.attempts,
        "max_retries", job.max_retries,
        "backoff", repr(job.backoff),
        "cancel_requested", int(job.cancel_requested),
    ]  # fmt: skip
    if job.timeout is not None:
        fields += ("timeout", repr(job.timeout))
    if job.unique_key:
        fields += ("unique_key", job.unique_key)
    if job.after:
        fields += ("after", stored_after(job.after))
    if job.name:
        fields += ("name", job.name)
    if job.source:
        fields += ("source", job.source)
    if job.tags:
        fields += ("tags", stored_tags(job.tags))
    return fields
