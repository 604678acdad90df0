"""A job as the Redis engine keeps it: the fields of its ``P:job:ID`` hash, both ways."""

from __future__ import annotations

import json
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
_INTS = {"priority", "attempts", "max_retries", "status"}


def job_from_hash(jid: int, fields: dict[bytes, bytes]) -> Job:
    """A job read back from its ``P:job:ID`` hash (as CLAIM and the listings return it)."""
    values: dict[str, Any] = {}
    for key in COLUMNS[1:]:
        raw = fields.get(key.encode())
        if raw is None:
            continue
        if key in ("data", "result"):
            values[key] = raw
        elif key in _FLOATS:
            values[key] = float(raw)
        elif key in _INTS:
            values[key] = int(raw)
        elif key == "after":
            values[key] = read_after(raw)
        elif key == "tags":
            values[key] = read_tags(raw)
        elif key == "cancel_requested":
            values[key] = raw == b"1"
        else:
            values[key] = raw.decode()
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
    fields: dict[str, Any] = {
        "module": job.module,
        "data": job.data,
        "state": str(job.state),
        "priority": job.priority,
        "run_at": repr(job.run_at),
        "created": repr(job.created),
        "attempts": job.attempts,
        "max_retries": job.max_retries,
        "backoff": repr(job.backoff),
        "cancel_requested": int(job.cancel_requested),
    }
    if job.timeout is not None:
        fields["timeout"] = repr(job.timeout)
    if job.unique_key:
        fields["unique_key"] = job.unique_key
    if job.after:
        fields["after"] = stored_after(job.after)
    if job.name:
        fields["name"] = job.name
    if job.source:
        fields["source"] = job.source
    if job.tags:
        fields["tags"] = stored_tags(job.tags)
    return [v for pair in fields.items() for v in pair]
