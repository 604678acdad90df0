"""Reading what the Redis engine's scripts return: a job's hash as a ``Job``."""

from __future__ import annotations

import json
from typing import Any

from bgservice.queue.job import COLUMNS, Job, JobState, read_after

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
