"""The embedded job store: SQLite (standard library) in WAL mode, one writer thread.

Every operation is queued to one thread that owns the connection. The thread takes all
operations waiting at that moment and commits them in one transaction (group commit), so
a burst of concurrent ``queue:add`` costs one fsync, not one per job, and a caller's
future resolves only after its transaction is on disk (``synchronous=FULL``).
A save for a job whose previous save is still queued joins that one (the newer row wins,
run records add up), so a short job's "running" and "done" rows cost one UPDATE, not two.
``AUTOINCREMENT`` keeps ids from ever being reused, even after the newest job is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bgservice.queue.job import COLUMNS, Job
from bgservice.queue.store import Run

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    module TEXT NOT NULL,
    data BLOB NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    run_at REAL NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    backoff REAL NOT NULL,
    timeout REAL,
    unique_key TEXT,
    after INTEGER,
    status INTEGER,
    result BLOB,
    error TEXT,
    cancel_requested INTEGER NOT NULL,
    expires REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS runs (
    job INTEGER NOT NULL,
    module TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished);
"""
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
_INSERT = (
    f"INSERT INTO jobs ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})"
)
_UPDATE = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE id = ?"
_BATCH = 2000
_RUN_FIELDS = ("job", "module", "attempt", "started", "finished", "outcome")
_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
_Done = tuple[asyncio.Future[Any], Any, BaseException | None]


class _Save:
    """A job's queued save: the row to write and its run records, until the writer takes it."""

    __slots__ = ("future", "jid", "row", "runs")

    def __init__(self, jid: int, row: tuple[Any, ...], future: asyncio.Future[None]) -> None:
        self.jid = jid
        self.row = row
        self.runs: list[tuple[Any, ...]] = []
        self.future = future

    def __call__(self, c: sqlite3.Connection) -> None:
        c.execute(_UPDATE, self.row)
        if self.runs:
            c.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", self.runs)


class SqliteStore:
    def __init__(self, path: Path, commit_window: float = 0.0) -> None:
        self.path = path
        self.commit_window = commit_window
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        # Saves not yet taken by the writer, by job id; the lock hands each one over.
        self._saves: dict[int, _Save] = {}
        self._saves_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the writer thread ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _run(self, conn: sqlite3.Connection) -> None:
        assert self._loop is not None
        while True:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            stop = False
            # Everything queued meanwhile joins this commit; with a commit window, also
            # what arrives within it (fewer fsyncs under light concurrent load).
            until = time.monotonic() + self.commit_window
            while len(batch) < _BATCH:
                try:
                    wait = until - time.monotonic()
                    item = self._ops.get(timeout=wait) if wait > 0 else self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            with self._saves_lock:  # from here on, later saves are queued afresh
                for fn, _ in batch:
                    if type(fn) is _Save:
                        del self._saves[fn.jid]
            self._loop.call_soon_threadsafe(_resolve, self._apply(conn, batch))
            if stop:
                break
        conn.close()

    @staticmethod
    def _apply(conn: sqlite3.Connection, batch: list[_Op]) -> list[_Done]:
        # Nothing may escape: the writer thread must outlive any one operation, or every
        # later queue call would wait forever.
        results: list[_Done] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in batch:
                try:
                    results.append((future, fn(conn), None))
                except Exception as exc:  # e.g. sqlite3.Error, OverflowError: this op only
                    results.append((future, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            log.error("job store commit failed: %s", exc)
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error as again:
                log.error("job store rollback failed: %s", again)
            return [(future, None, exc) for _, future in batch]
        return results

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        # Queued at once (not when a coroutine first runs), so writes apply in call order.
        assert self._loop is not None, "store not open"
        future: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((fn, future))
        return future

    # --- Store ------------------------------------------------------------------------

    async def open(self) -> list[Job]:
        self._loop = asyncio.get_running_loop()
        conn = await self._loop.run_in_executor(None, self._connect)
        self._thread = threading.Thread(
            target=self._run, args=(conn,), name="bgservice-store", daemon=True
        )
        self._thread.start()
        return await self._submit(
            lambda c: [
                Job.from_row(r)
                for r in c.execute(f"{_SELECT} WHERE state IN ('waiting', 'running') ORDER BY id")
            ]
        )

    def insert(self, job: Job) -> asyncio.Future[int]:
        row = job.row()[1:]
        return self._submit(lambda c: c.execute(_INSERT, row).lastrowid or 0)

    def save(self, job: Job, run: Run | None = None) -> asyncio.Future[None]:
        row = (*job.row()[1:], job.id)
        record = None if run is None else tuple(getattr(run, f) for f in _RUN_FIELDS)
        with self._saves_lock:
            pending = self._saves.get(job.id)
            if pending is None:
                assert self._loop is not None, "store not open"
                pending = self._saves[job.id] = _Save(job.id, row, self._loop.create_future())
                self._ops.put((pending, pending.future))
            else:  # not taken by the writer yet: it writes the newer row instead
                pending.row = row
            if record is not None:
                pending.runs.append(record)
        return pending.future

    async def get(self, job_id: int) -> Job | None:
        def fetch(c: sqlite3.Connection) -> Job | None:
            row = c.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return Job.from_row(row) if row else None

        return await self._submit(fetch)

    async def list_jobs(self, state: str, limit: int, offset: int) -> list[Job]:
        return await self._submit(
            lambda c: [
                Job.from_row(r)
                for r in c.execute(
                    f"{_SELECT} WHERE state = ? ORDER BY id DESC LIMIT ? OFFSET ?",
                    (state, limit, offset),
                )
            ]
        )

    async def counts(self) -> dict[str, int]:
        return await self._submit(
            lambda c: dict(c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        )

    async def runs_since(self, since: float) -> list[Run]:
        return await self._submit(
            lambda c: [
                Run(*r)
                for r in c.execute(
                    "SELECT job, module, attempt, started, finished, outcome FROM runs"
                    " WHERE finished >= ? ORDER BY finished",
                    (since,),
                )
            ]
        )

    async def expire(self, now: float, history_before: float) -> int:
        def delete(c: sqlite3.Connection) -> int:
            gone = c.execute("DELETE FROM jobs WHERE expires IS NOT NULL AND expires < ?", (now,))
            c.execute("DELETE FROM runs WHERE finished < ?", (history_before,))
            return gone.rowcount

        return await self._submit(delete)

    async def close(self) -> None:
        if self._thread is None:
            return
        self._ops.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._thread = None


def _resolve(results: list[_Done]) -> None:
    for future, value, error in results:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
