"""``queue:stats``' counts while jobs change state (embedded engine): every job is
counted once, in one state, also while the change is still being written to the store.

Waiting and running jobs are counted in memory, finished ones in the store, whose writer
thread commits after the fact: a job whose row and memory disagree for a moment must not
fall between the two (an end not yet written) nor be counted by both (a retry not yet
written)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from bgservice.queue.job import Job, JobState
from bgservice.queue.sqlite import SqliteStore
from bgservice.queue.store import Writes
from tests.conftest import wait_until, write_module
from tests.test_queue_sqlite import _job

FAILS = """
async def handle_tcp(request):
    raise RuntimeError("fails every time")
"""


def _total(reply: bytes) -> tuple[int, dict[str, int]]:
    counts = json.loads(reply)["counts"]
    return sum(counts.values()), counts


def test_stats_right_after_an_add_and_wait_count_the_job(make_service):
    # The job has ended (its result replied) and left memory; its end may still be on its
    # way to the store: counted nowhere, the total was one short (every round on the code
    # before the store's count added the ends not written yet).
    svc = make_service()
    conn = svc.framed()
    wrong = []
    for added in range(1, 1001):
        conn.send(b"queue:add?wait=1:echo:x", b"queue:stats")
        assert conn.recv() == (200, b"x")
        total, counts = _total(conn.recv()[1])
        if total != added:
            wrong.append((added, counts))
    conn.close()
    assert not wrong, (len(wrong), wrong[:3])


def test_stats_while_failed_jobs_are_retried_count_each_once(make_service, modules_dir):
    # A retried job is waiting in memory at once, while its row says failed until the
    # retry's save commits: counted by both, the total was that many too high (most calls
    # made while retries went on, on the code before).
    write_module(modules_dir, "fails", FAILS)
    svc = make_service()
    conn = svc.framed()
    jobs = 200
    conn.send(*[b"queue:add?retries=0:fails:x"] * jobs)
    ids = [int(conn.recv()[1][3:]) for _ in range(jobs)]
    wait_until(lambda: _total(svc.call(b"queue:stats"))[1]["failed"] == jobs)
    retried = threading.Event()

    def retry_all(rounds: int) -> None:
        other = svc.framed()
        try:
            for _ in range(rounds):  # each retry fails again at once: failed, retried...
                other.send(*[b"queue:retry:id:%d" % jid for jid in ids])
                assert {other.recv()[0] for _ in ids} <= {200, 409}
        finally:
            other.close()
            retried.set()

    thread = threading.Thread(target=retry_all, args=(10,))
    thread.start()
    wrong, calls = [], 0
    while not retried.is_set():
        conn.send(*[b"queue:stats"] * 10)
        for _ in range(10):
            total, counts = _total(conn.recv()[1])
            calls += 1
            if total != jobs:
                wrong.append(counts)
    thread.join()
    conn.close()
    assert calls >= 10
    assert not wrong, (len(wrong), calls, wrong[:3])


async def test_a_retry_the_store_refuses_is_counted_once_until_memory_lets_it_go(tmp_path):
    # LocalQueue.retry's steps, against the real store: the retried job is waiting in
    # memory, its save fails (a value no row can hold), and memory lets it go. A count
    # answered in between saw it in memory and, no longer "retrying", also in its row
    # (failed): two jobs of one, every time (found in review).
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    writes = Writes(store)
    job = _job(state=JobState.FAILED, finished=time.time())
    await store.insert(job)
    memory: dict[int, Job] = {}  # LocalQueue.jobs

    async def retry() -> None:
        job.move(JobState.WAITING)
        job.priority = 2**70  # no SQLite integer: this save alone fails
        memory[job.id] = job
        try:
            await writes.retry(job)
        except Exception:
            memory.pop(job.id, None)
            writes.refused(job.id)

    task = asyncio.ensure_future(retry())
    await asyncio.sleep(0)  # the retry's save is queued; the count's read after it
    counts = await store.counts(writes)
    seen = dict(counts, waiting=len(memory))  # as reports.stats puts them together
    await task
    await store.close()
    assert sum(seen.values()) == 1, seen
    assert not memory and not writes.retrying()
