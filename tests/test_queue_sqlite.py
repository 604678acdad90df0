"""The SQLite store on its own: group commit, ids, expiry, history, its files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

from bgservice.errors import Busy
from bgservice.queue.job import Job, JobState
from bgservice.queue.sqlite import SqliteStore
from bgservice.queue.sqlite_schema import SCHEMA, DatabaseInUse
from bgservice.queue.store import Run
from tests.conftest import Framed
from tests.queue_helpers import add


def _job(**kw) -> Job:
    now = time.time()
    values = dict(id=0, module="echo", data=b"x", state=JobState.WAITING, priority=0,
                  run_at=now, created=now)  # fmt: skip
    values.update(kw)
    return Job(**values)


def _runs(folder) -> list[tuple[int, int, str]]:
    with sqlite3.connect(folder / "jobs.db") as conn:
        return conn.execute("SELECT job, attempt, outcome FROM runs ORDER BY finished").fetchall()


async def test_concurrent_inserts_share_commits_and_ids_are_unique(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    ids = await asyncio.gather(*(store.insert(_job(data=b"%d" % i)) for i in range(500)))
    assert sorted(ids) == list(range(1, 501))
    await store.close()
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 500


async def test_a_store_asked_before_it_is_open_answers_503(tmp_path):
    # The listeners open before the queue: a read, a queue:stats or a /metrics scrape in
    # that window was a 500 "AssertionError: store not open", logged with a traceback
    # (and an alert); an add there was a 503 already.
    store = SqliteStore(tmp_path / "jobs.db")
    for ask in (lambda: store.get(1), lambda: store.counts(), lambda: store.run_history(0, 60),
                lambda: store.list_jobs("waiting", 10, 0), lambda: store.insert(_job())):
        with pytest.raises(Busy, match="Job store unavailable"):
            await ask()
    await store.open()
    assert await store.get(1) is None
    await store.close()


async def test_a_database_open_in_one_store_is_refused_to_another(tmp_path):
    first = SqliteStore(tmp_path / "jobs.db")
    await first.open()
    with pytest.raises(DatabaseInUse, match=f"in use by another bgservice \\(pid {os.getpid()}\\)"):
        await SqliteStore(tmp_path / "jobs.db").open()
    await first.close()
    second = SqliteStore(tmp_path / "jobs.db")  # closed: free again
    assert await second.open() == []
    await second.close()


async def test_ids_are_never_reused_after_deleting_the_newest(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    job = _job()
    job.id = await store.insert(job)
    job.state, job.expires = JobState.DONE, time.time() - 1
    await store.save(job)
    assert await store.expire(time.time(), 0) == 1
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db")
    assert await store.open() == []
    later = await store.insert(_job())
    assert later > job.id
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db")  # a restart inside a block of ids
    await store.open()
    assert await store.insert(_job()) > later
    await store.close()


async def test_a_database_of_the_first_release_goes_on_from_its_highest_id(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:  # AUTOINCREMENT, as the first release made it
        first = SCHEMA.replace("id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY AUTOINCREMENT,")
        conn.executescript(first)
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', 41)")
    store = SqliteStore(path)
    await store.open()
    assert await store.insert(_job()) == 42
    await store.close()


async def test_a_database_from_before_interruptions_gets_their_column(tmp_path):
    path = tmp_path / "jobs.db"
    line = "    interruptions INTEGER NOT NULL DEFAULT 0,  -- runs a crash cut"
    older = "\n".join(x for x in SCHEMA.splitlines() if not x.startswith(line))
    assert "interruptions" not in older
    with sqlite3.connect(path) as conn:
        conn.executescript(older)
    store = SqliteStore(path)
    await store.open()
    job = _job(state=JobState.RUNNING)
    job.id = await store.insert(job)
    await store.close()
    store = SqliteStore(path)
    [recovered] = await store.open()
    assert recovered.interruptions == 0
    recovered.interruptions = 2
    await store.save(recovered, fields=("interruptions",))
    await store.close()
    store = SqliteStore(path)
    [again] = await store.open()
    assert again.interruptions == 2
    await store.close()


async def test_unfinished_jobs_come_back_and_history_is_kept(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db", commit_window=0.002)
    await store.open()
    waiting = _job(data=b"\x00\xff")
    waiting.id = await store.insert(waiting)
    done = _job()
    done.id = await store.insert(done)
    done.state, done.result, done.status = JobState.DONE, b"ok", 200
    now = time.time()
    await store.save(done, Run(done.id, "echo", 1, now - 2, now, "done"))
    await store.close()
    store = SqliteStore(tmp_path / "jobs.db")
    recovered = await store.open()
    assert [(j.id, j.data) for j in recovered] == [(waiting.id, b"\x00\xff")]
    assert (await store.get(done.id)).result == b"ok"
    assert await store.counts() == {"waiting": 1, "done": 1}
    assert _runs(tmp_path) == [(done.id, 1, "done")]
    assert [j.id for j in await store.list_jobs("done", 10, 0)] == [done.id]
    await store.close()


async def test_a_save_still_queued_takes_the_newer_row_and_keeps_every_run(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    job = _job()
    job.id = await store.insert(job)
    writer_free = threading.Event()
    # Hold the writer so the saves below are still queued when the next one comes.
    held = store._submit(lambda c: writer_free.wait(10))
    now = time.time()
    job.state, job.attempts = JobState.RUNNING, 1
    first = store.save(job)
    job.state = JobState.WAITING
    second = store.save(job, Run(job.id, "echo", 1, now - 1, now, "retry"))
    job.state, job.attempts, job.result = JobState.DONE, 2, b"ok"
    third = store.save(job, Run(job.id, "echo", 2, now, now + 1, "done"))
    assert first is second is third  # one UPDATE for the three
    other = _job()
    other.id = 99
    assert store.save(other) is not first  # another job's save is its own
    writer_free.set()
    await asyncio.gather(held, first)
    stored = await store.get(job.id)
    assert (stored.state, stored.attempts, stored.result) == (JobState.DONE, 2, b"ok")
    assert _runs(tmp_path) == [(job.id, 1, "retry"), (job.id, 2, "done")]
    # Once written, a new save is queued afresh.
    job.result = b"again"
    fourth = store.save(job)
    assert fourth is not first
    await fourth
    assert (await store.get(job.id)).result == b"again"
    await store.close()


async def test_an_operation_that_raises_fails_alone_and_the_writer_lives_on(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    bad = store.get(10**30)  # too large for SQLite: OverflowError, not sqlite3.Error
    good = store.insert(_job())
    with pytest.raises(OverflowError):
        await bad
    assert await good == 1
    assert await store.insert(_job()) == 2
    await store.close()


@pytest.mark.parametrize("sqlite_version", [sqlite3.sqlite_version_info, (3, 31, 1)])
async def test_one_commits_many_rows_land_each_in_its_place_and_a_bad_one_fails_alone(
    tmp_path, monkeypatch, sqlite_version
):
    """The writer puts a commit's new jobs, saves and runs into statements of many rows
    (chunks of 256, 64, 16, 4, 1; saves with executemany before SQLite 3.33, which lacks
    UPDATE FROM): 300 of each in one commit must each reach its own row, and a row
    SQLite refuses (an integer past 64 bits) must fail alone."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", sqlite_version)
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    free = threading.Event()
    held = store._submit(lambda c: free.wait(10))  # so all below share one commit
    jobs = [_job(data=b"job %d" % i, priority=2**70 if i == 270 else i) for i in range(300)]
    added = [store.insert(job) for job in jobs]
    free.set()
    await held
    outcomes = await asyncio.gather(*added, return_exceptions=True)
    assert isinstance(outcomes[270], OverflowError)  # in the second statement
    assert [o for i, o in enumerate(outcomes) if i != 270] == [*range(1, 271), *range(272, 301)]
    for job, jid in zip(jobs, outcomes, strict=True):
        job.id = jid
    stored = [job for job in jobs if job.priority != 2**70]
    free.clear()
    held = store._submit(lambda c: free.wait(10))
    now = time.time()
    saved = []
    for n, job in enumerate(stored):
        job.state, job.result, job.finished = JobState.DONE, b"result of %d" % job.id, now + n
        job.status = 2**70 if n == 285 else 200
        run = Run(job.id, "echo", 1, now, now + n, "done")
        saved.append(store.save(job, run, fields=("state", "result", "status", "finished")))
    free.set()
    await held
    outcomes = await asyncio.gather(*saved, return_exceptions=True)
    assert isinstance(outcomes[285], OverflowError)
    assert [o for i, o in enumerate(outcomes) if i != 285] == [None] * 298
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        described = "data || ' ' || priority || ' ' || state || ' ' || COALESCE(result, '-')"
        rows = dict(conn.execute(f"SELECT id, {described} FROM jobs").fetchall())
    assert len(rows) == 299
    for n, job in enumerate(stored):
        i = jobs.index(job)
        done = "waiting -" if n == 285 else f"done result of {job.id}"
        assert rows[job.id] == f"job {i} {i} {done}"
    assert [(j, a) for j, a, _ in _runs(tmp_path)] == [(job.id, 1) for job in stored]
    await store.close()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI not installed")
def test_a_services_database_is_wal(service, tmp_path):
    """Here, not in test_queue.py: that file runs on both engines, and Redis has no WAL."""
    out = subprocess.run(
        ["sqlite3", str(tmp_path / "jobs.db"), "PRAGMA journal_mode"], capture_output=True
    )
    assert out.stdout.strip() == b"wal"


# The jobs table before progress was stored (and interruptions, which came later).
_NEWER = ("    progress ", "    interruptions ")
OLD_SCHEMA = "\n".join(
    x for x in SCHEMA.split("CREATE INDEX")[0].splitlines() if not x.startswith(_NEWER)
).replace("source TEXT,\n)", "source TEXT\n)")


async def test_a_database_without_the_progress_column_opens_and_keeps_progress(tmp_path):
    # A database made before progress was stored: the column is added at open, its jobs
    # read back with no progress, and a job finishing from now on keeps its last report.
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        assert "progress" not in {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        conn.execute(
            "INSERT INTO jobs (id, module, data, state, priority, run_at, created, finished,"
            " attempts, max_retries, backoff, cancel_requested)"
            " VALUES (7, 'echo', x'', 'done', 0, 1, 1, 2, 1, 0, 1.0, 0)"
        )
    store = SqliteStore(path)
    assert await store.open() == []
    assert (await store.get(7)).progress is None
    job = _job()
    job.id = await store.insert(job)
    job.state, job.finished = JobState.FAILED, time.time()
    job.progress = (3.0, 7.0, "step \ud800 and \u00e9")  # any text a handler reported
    await store.save(job, fields=("state", "finished", "progress"))
    await store.close()
    store = SqliteStore(path)
    await store.open()
    assert (await store.get(job.id)).progress == (3.0, 7.0, "step \ud800 and \u00e9")
    assert [j.progress for j in await store.list_jobs("failed", 10, 0)] == [job.progress]
    assert [(j.id, j.progress) for j in await store.list_jobs("done", 10, 0)] == [(7, None)]
    await store.close()


async def test_finished_jobs_are_listed_by_finish_time_then_id(tmp_path):
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    now = time.time()
    jobs = [_job() for _ in range(4)]
    for job, finished in zip(jobs, (now + 2, now + 5, now + 2, now + 1), strict=True):
        job.id = await store.insert(job)
        job.state, job.finished = JobState.DONE, finished
        await store.save(job)
    newest = [jobs[1].id, jobs[2].id, jobs[0].id, jobs[3].id]
    assert [j.id for j in await store.list_jobs("done", 10, 0)] == newest
    assert [j.id for j in await store.list_jobs("done", 2, 1)] == newest[1:3]
    await store.close()


def test_a_long_run_history_is_summed_off_the_loop(make_service, tmp_path):
    """queue:stats over a busy hour (400,000 attempts: the dashboard asks for a week) is
    summed by SQLite in a thread: calls go on being answered meanwhile. It was a Python
    object per attempt on the loop, which answered no one until it was done (0.6 s then;
    timings in docs/benchmarks.md): calls sent meanwhile were all answered after it."""
    now = time.time()
    runs = [(i, "echo", 1, now - 1800 + i * 0.004, now - 1800 + i * 0.004 + 0.002, "done")
            for i in range(400_000)]  # fmt: skip
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", runs)
    svc = make_service()
    asking, pinging = Framed(svc.tcp, timeout=60), Framed(svc.tcp, timeout=60)

    def stats_pending() -> bool:
        return not asking.ready and not select.select([asking.sock], [], [], 0)[0]

    answered = []  # per queue:stats: the calls answered while its reply had not come
    for _ in range(3):
        asking.send(b"queue:stats?window=86400")
        count = 0
        while stats_pending():
            assert pinging.call(b"test:x") == (200, b"Test")
            count += stats_pending()  # answered, and the reply to queue:stats still not in
            time.sleep(0.002)
        code, body = asking.recv()
        assert code == 200, body
        answered.append(count)
    asking.close()
    pinging.close()
    window = json.loads(body)["window"]
    assert (window["runs"], window["outcomes"]) == (400_000, {"done": 400_000})
    assert window["busy_seconds"] == pytest.approx(800.0, rel=1e-3)
    assert sum(h["runs"] for h in window["by_hour"]) == 400_000
    # Each time, calls were answered while it was summed (about 190 here; on the loop, at
    # most the one answered before the sum began, every time: the rest waited for it).
    assert min(answered) >= 10, f"calls answered while queue:stats was summed: {answered}"


async def test_expiry_keeps_the_jobs_it_is_told_to(tmp_path):
    """The failed jobs whose dependents still wait (Dependencies.failing) stay stored,
    expired or not: a restart judges those dependents by them."""
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open()
    ids = []
    for _ in range(4):
        job = _job()
        job.id = await store.insert(job)
        job.state, job.expires = JobState.FAILED, time.time() - 1
        await store.save(job)
        ids.append(job.id)
    assert await store.expire(time.time(), 0, keep=[ids[1], ids[3]]) == 2
    assert [job.id for job in await store.get_many(ids)] == [ids[1], ids[3]]
    assert await store.expire(time.time(), 0) == 2
    await store.close()


@contextlib.contextmanager
def _umask(mask: int):
    """The test process's umask, which the services it starts inherit."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(folder, names: tuple[str, ...]) -> dict[str, int]:
    return {name: (folder / name).stat().st_mode & 0o777 for name in names}


def test_a_new_database_is_the_services_users_alone_and_an_existing_one_keeps_its_mode(
    make_service, tmp_path
):
    # Found by review: the database (and DB.lock) was made 0644 under the usual umask, so
    # outside systemd every local user could read every job's data and result (e-mails,
    # tokens). SQLite makes the -wal and -shm with the file's mode.
    files = ("jobs.db", "jobs.db-wal", "jobs.db-shm", "jobs.db.lock")
    with _umask(0o022):
        svc = make_service()
        assert add(svc, b"queue:add?delay=3600:echo:a@example.com") == 1
        assert _modes(tmp_path, files) == dict.fromkeys(files, 0o600)
        assert svc.stop() == 0
        (tmp_path / "jobs.db").chmod(0o640)  # an operator's choice (a group): kept
        svc.start()
    assert _modes(tmp_path, files) == {**dict.fromkeys(files[:3], 0o640), files[3]: 0o600}


WAL_LIMIT = 64 * 1024 * 1024  # docs/queue.md: the -wal is cut back to 64 MiB


def test_a_wal_grown_by_a_burst_is_cut_back_to_its_limit_once_checkpointed(make_service, tmp_path):
    # Found by review: no journal_size_limit: a -wal a burst grew (here past a long read,
    # which holds the checkpoint back, as a backup does) kept its size until the stop.
    svc = make_service()
    wal = tmp_path / "jobs.db-wal"
    reader = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchall()  # its snapshot: held
        for _ in range(18):
            add(svc, b"queue:add?delay=3600:echo:" + b"x" * (4 << 20))
        assert wal.stat().st_size > WAL_LIMIT
    finally:
        reader.close()
    # The next commit's checkpoint copies the whole -wal into the file (nothing holds it
    # back now); the commit after it writes the -wal from its start again, and cuts it.
    add(svc, b"queue:add:echo:checkpointed")
    add(svc, b"queue:add:echo:starts the wal over")
    assert wal.stat().st_size <= WAL_LIMIT


def test_an_sqlite_without_json_functions_is_refused_when_the_store_opens(tmp_path):
    # The queue's statements read lists of ids with json_each: without JSON1 (an SQLite
    # older than 3.38 built without it) the first cascade or retry failed, mid-service.
    # Such an SQLite is stood in for by an authorizer that denies json_each.
    from bgservice.queue import sqlite_schema

    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.set_authorizer(lambda action, table, *_: sqlite3.SQLITE_DENY
                        if table == "json_each" else sqlite3.SQLITE_OK)  # fmt: skip
    try:
        with pytest.raises(sqlite_schema.UnusableDatabase, match="has no JSON functions"):
            sqlite_schema._prepare(conn, path)
    finally:
        conn.close()
    conn, next_id, _ = sqlite_schema.connect(path)  # an SQLite that has them: opened
    conn.close()
    assert next_id == 1
