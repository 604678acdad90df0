"""The embedded store at scale: a mass expiry does not hold queue writes for seconds, and
jobs waiting on a finished one do not read it from the store one by one at start-up."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bgservice.config import QueueSettings
from bgservice.events import Events
from bgservice.queue import sqlite as sqlite_store
from bgservice.queue.dependencies import Dependencies
from bgservice.queue.finished import FinishedJobs
from bgservice.queue.job import COLUMNS, Job, JobState
from bgservice.queue.local import LocalQueue
from bgservice.queue.sqlite import SqliteStore
from bgservice.queue.sqlite_schema import SCHEMA
from bgservice.stats import Stats
from tests.conftest import wait_until

INSERT = f"INSERT INTO jobs ({', '.join(COLUMNS)}, progress) VALUES ({', '.join('?' * 25)})"


def _row(jid: int, state: str, now: float, *, after: str | None = None,
         expires: float | None = None, data: bytes = b"x") -> tuple:  # fmt: skip
    """A stored job, as ``COLUMNS`` and progress have it: done ones ran 10 s ago."""
    ran = now - 10 if state == "done" else None
    result = data if ran else None
    return (jid, "echo", data, state, 0, now - 20, now - 20, ran, ran, 1 if ran else 0, 0, 1.0,
            None, None, after, 200 if ran else None, result, None, 0, expires, None, None, None,
            None, None)  # fmt: skip


@pytest.mark.timeout(300)  # 13 s alone; past the default 60 s on a CI machine under load
def test_a_mass_expiry_leaves_room_for_adds(make_service, tmp_path):
    """300,000 finished jobs expire together: they are deleted a few thousand at a time,
    each chunk committed on its own, so adds commit between chunks. One DELETE of them all
    held every write behind it (an add waited 1.6 s here, 3.5 s with 1,000,000; timings
    in docs/benchmarks.md): no add was answered while the expiry was under way."""
    now, jobs = time.time(), 300_000
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.executemany(INSERT, (_row(i, "done", now, expires=now - 5, data=b"x" * 300)
                                  for i in range(1, jobs + 1)))  # fmt: skip
    svc = make_service("[queue]\nkeep_results = 2\n")  # a sweep every 0.5 s
    expired = f"job queue: {jobs} finished jobs expired"
    # After each add is answered, how many expired jobs are left (read on a connection of
    # the test's own: WAL shows it what is committed). Strictly between none and all: the
    # add committed while the expiry was under way, which one DELETE makes impossible.
    left: list[int] = []
    deadline = time.monotonic() + 240
    with sqlite3.connect(tmp_path / "jobs.db") as reader:
        while expired not in svc.log() and time.monotonic() < deadline:
            assert svc.call(b"queue:add?wait=1:echo:z") == b"z"
            query = "SELECT COUNT(*) FROM jobs WHERE expires < ?"  # the jobs_expires index
            left.append(reader.execute(query, (now - 1,)).fetchone()[0])
            time.sleep(0.002)
    assert expired in svc.log()  # once, the whole count
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE id <= ?", (jobs,)).fetchone() == (0,)
    midway = [n for n in left if 0 < n < jobs]
    assert len(midway) >= 3, f"expired jobs left after each add: {left}"


def recovered_queue(path: Path) -> LocalQueue:
    """The embedded engine on the store at ``path``, in the test's process, with no worker:
    what ``start`` recovers stays waiting (no job runs, so no runner is needed)."""
    runner: Any = None
    return LocalQueue(QueueSettings(workers=0), {}, SqliteStore(path), runner, Stats(), Events())


def counting_reads(store: SqliteStore) -> list[int]:
    """Wrap ``store.get`` and ``store.get_many``: the list grows by the number of ids each
    call asks for (its length: the store round trips)."""
    calls: list[int] = []
    real_get, real_get_many = store.get, store.get_many

    async def get(jid: int) -> Job | None:
        calls.append(1)
        return await real_get(jid)

    async def get_many(ids: Sequence[int]) -> list[Job]:
        calls.append(len(ids))
        return await real_get_many(ids)

    store.get, store.get_many = get, get_many  # type: ignore[method-assign]
    return calls


async def test_many_jobs_waiting_on_finished_ones_start_at_once(make_service, tmp_path):
    """50,000 waiting jobs, each after= one of 5 done jobs: at start-up each done job is
    read from the store once, not once per job waiting on it. Read per job, that was one
    writer round trip each, one after the other (ready in 3.3 s, 0.8 s now; timings in
    docs/benchmarks.md): the store's reads are counted. Then the service runs them all."""
    now, deps, waiting = time.time(), 5, 50_000
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.executemany(INSERT, (_row(i, "done", now, expires=now + 3600)
                                  for i in range(1, deps + 1)))  # fmt: skip
        conn.executemany(INSERT, (_row(deps + i, "waiting", now, after=str(1 + i % deps))
                                  for i in range(1, waiting + 1)))  # fmt: skip
    queue = recovered_queue(tmp_path / "jobs.db")
    reads = counting_reads(queue.store)  # type: ignore[arg-type]
    await queue.start()
    try:
        last = await queue.status(deps + waiting)
        assert (last["state"], last["position"]) == ("waiting", waiting - 1)  # in line
    finally:
        await queue.stop(0)
    assert len(reads) <= deps and sum(reads) <= deps, f"ids per store read: {reads[:20]}"

    svc = make_service("[queue]\nworkers = 4\n")

    def done() -> int:
        return json.loads(svc.call(b"queue:stats"))["counts"]["done"]

    await asyncio.to_thread(wait_until, lambda: done() == deps + waiting, 120, 0.5)


async def test_dependencies_of_recovered_jobs_are_read_in_one_go(tmp_path):
    """``Dependencies.recovering``: every dependency read by ``get_many`` (chunks of
    ``GET_MANY``), the jobs' lookups then answered without a store read each; a job
    cancelled meanwhile is not handed out."""
    now, count = time.time(), sqlite_store.GET_MANY + 10
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.executemany(INSERT, [_row(i, "done", now, expires=now + 60) for i in range(1, count)]
                         + [_row(count, "failed", now, expires=now + 60),
                            _row(count + 1, "done", now, expires=now - 1)])  # fmt: skip
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    live: dict[int, Job] = {}
    finished = FinishedJobs(None, store)  # type: ignore[arg-type]  # (settings: expiry only)
    deps = Dependencies(live, finished)  # type: ignore[arg-type]  # (a dict: LiveJobs' operations)
    recovered = [Job(id=10_000 + i, module="echo", data=b"", state=JobState.WAITING,
                     priority=0, run_at=now, created=now, after=(i, count + 5))
                 for i in range(1, count + 2)]  # fmt: skip
    live.update((job.id, job) for job in recovered)
    reads = 0
    real_get = store.get

    async def get(jid: int) -> Job | None:
        nonlocal reads
        reads += 1
        return await real_get(jid)

    store.get = get  # type: ignore[method-assign]
    outcomes = {}
    async for job in deps.recovering(recovered):
        outcomes[job.after[0]] = await deps.wait_on(job)
        if job.id == 10_001:
            del live[10_002]  # as a cancel would
    assert reads == 0
    assert len(outcomes) == count
    assert outcomes[count] == f"Dependency: job {count} failed"
    assert outcomes[1] is None and outcomes[count + 1] is None  # expired: it was done
    assert (await finished.lookup(count + 1), await finished.lookup(count + 5)) == (None, None)
    await store.close()
