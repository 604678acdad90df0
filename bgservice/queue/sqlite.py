"""The embedded job store: SQLite (standard library) in WAL mode.

Writes go through one writer thread with group commit (sqlite_writer.py): a caller's
future resolves only once its transaction is on disk. Ids are handed out here, on the
loop, from blocks of ``ID_BLOCK``; every commit that adds jobs records in the ``meta``
table the end of the block they fall in, so an id is never used twice (not after a crash,
not after the newest job was deleted) at the cost of one small write per commit, not one
per id; a database made by an earlier version (``AUTOINCREMENT``) goes on from its
highest id.

The database belongs to one service: ``DB.lock`` is locked (flock) while the store is
open (sqlite_schema.py). Until it is open, what asks it gets 503 ``Job store
unavailable`` (the listeners open first, so calls are served while a queue loads), and
so does what a failing commit fails (``Job store unavailable: database is locked``:
sqlite_failures.py). Read-only connections never make the file (``mode=ro``): one that
was deleted while the service runs is said once, by the expiry sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from bgservice.errors import Busy
from bgservice.queue.commands import NO_FILTER, JobFilter
from bgservice.queue.history import summarise_sql
from bgservice.queue.job import COLUMNS, Job, stored_after, stored_tags
from bgservice.queue.schedules import Schedule
from bgservice.queue.sqlite_failures import damaged
from bgservice.queue.sqlite_lists import FINISHED, matching
from bgservice.queue.sqlite_schema import BUSY_TIMEOUT_MS, UnusableDatabase, connect, lock, no_space
from bgservice.queue.sqlite_writer import Call, Insert, Writer
from bgservice.queue.store import Run, Writes

log = logging.getLogger(__name__)
T = TypeVar("T")
ID_BLOCK = 1000
_SELECT = f"SELECT {', '.join(COLUMNS)}, progress, interruptions FROM jobs"  # read by _job
_RUN_FIELDS = ("job", "module", "attempt", "started", "finished", "outcome")
# Rows deleted by one expiry operation: each takes the writer ~8 ms (measured, small jobs).
EXPIRE_JOBS, EXPIRE_RUNS = 3000, 8000
GET_MANY = 2000  # jobs read by one operation of get_many: ~10 ms of the writer
_EXPIRE_JOBS = ("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs"
                " WHERE expires IS NOT NULL AND expires < ?{} LIMIT ?)")  # fmt: skip
_BUT = " AND id NOT IN (SELECT value FROM json_each(?))"  # a JSON list, rarely any (Dependencies)
_EXPIRE_RUNS = "DELETE FROM runs WHERE rowid IN (SELECT rowid FROM runs WHERE finished < ? LIMIT ?)"


READS = 3  # reads of queue:stats' counts at most, while retries come in (counts)
# s a stop waits for the writer: a commit under way may wait out the busy timeout, and the
# stop's own last one too (a database locked by another process).
CLOSE_WAIT = 3 * BUSY_TIMEOUT_MS / 1000


def _count(
    writer: Writer, retrying: Callable[[], dict[int, str | None]] | None, c: sqlite3.Connection
) -> tuple[int, dict[str, int], dict[int, str]]:
    """The jobs by state, and the rows' states of the jobs being retried at this moment
    (asked here, in the writer's thread: a retry whose save is in this commit has been
    written by now, as writes go before reads), in one commit: its number."""
    counts = dict(c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    ids = sorted(retrying()) if retrying is not None else []
    rows: dict[int, str] = {}
    for at in range(0, len(ids), 500):  # variables: 999 at most before 3.32
        chunk = ids[at : at + 500]
        marks = ", ".join("?" * len(chunk))
        rows.update(c.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk))
    return writer.commits, counts, rows


class SqliteStore:
    def __init__(self, path: Path, commit_window: float = 0.0) -> None:
        self.path = path
        self.commit_window = commit_window
        self._writer: Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self._reserved = 0  # ids below it are reserved on disk
        self._locks: list[int] = []  # DB.lock's and the file's descriptors while open
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._moved = False  # the file deleted or replaced since: said
        # A second connection for long reads (the run history), in the loop's executor:
        # WAL lets it read while the writer commits, so they wait for neither.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    def _opened(self) -> tuple[asyncio.AbstractEventLoop, Writer]:
        """The loop and the writer; before ``open``, 503 (it was a 500 "AssertionError"
        for a read, a /metrics scrape or a dashboard's poll during a start)."""
        if self._loop is None or self._writer is None:
            raise Busy("Job store unavailable")
        return self._loop, self._writer

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop, writer = self._opened()
        future: asyncio.Future[T] = loop.create_future()
        writer.put(Call(fn, future))
        return future

    # --- Store ------------------------------------------------------------------------

    async def open(self) -> list[Job]:
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._locks = lock(self.path)
            conn, self._next_id, self._reserved = await self._loop.run_in_executor(
                None, connect, self.path
            )
        except BaseException as exc:
            self._unlock()
            if (full := no_space(self.path, exc)) is not None:  # (not "disk I/O error")
                raise full from None
            if advice := damaged(exc, self.path, starting=True):  # (as a commit says it)
                raise UnusableDatabase(f"{exc}{advice}") from None
            raise
        stat = os.stat(self.path)
        self._file = (stat.st_dev, stat.st_ino)
        self._writer = Writer(conn, self._loop, self.commit_window, COLUMNS, self.path)
        unfinished = f"{_SELECT} WHERE state IN ('waiting', 'running') ORDER BY id"
        return await self._submit(lambda c: [_job(r) for r in c.execute(unfinished)])

    def insert(self, job: Job, mark: tuple[str, float] | None = None) -> asyncio.Future[int]:
        loop, writer = self._opened()
        job.id = self._next_id
        self._next_id += 1
        if job.id >= self._reserved:
            self._reserved = job.id + ID_BLOCK
        future: asyncio.Future[int] = loop.create_future()
        # Every commit with new jobs writes the reservation they fall in: one small write
        # per commit, and a commit that failed cannot leave ids in use that no row reserves.
        # ``mark``: (schedule, slot) the job is the run of, recorded in the same commit.
        writer.put(Insert(job.row(), self._reserved, future, mark))
        return future

    def save(
        self, job: Job, run: Run | None = None, *, fields: tuple[str, ...] | None = None
    ) -> asyncio.Future[None]:
        assert self._writer is not None, "store not open"
        columns = _ALL if fields is None else fields
        values = {c: getattr(job, c) for c in columns}
        for column in _CONVERTED.intersection(columns):
            values[column] = _stored(column, values[column])
        record = None if run is None else tuple(getattr(run, f) for f in _RUN_FIELDS)
        return self._writer.save(job.id, values, record).future

    async def delete(self, job_id: int) -> None:
        await self._submit(lambda c: c.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def get(self, job_id: int) -> Job | None:
        def fetch(c: sqlite3.Connection) -> Job | None:
            row = c.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self._submit(fetch)

    async def get_many(self, ids: Sequence[int]) -> list[Job]:
        """The stored jobs of ``ids`` (those there are), ``GET_MANY`` ids an operation."""

        def fetch(part: Sequence[int]) -> Callable[[sqlite3.Connection], list[Job]]:
            def read(c: sqlite3.Connection) -> list[Job]:
                rows: list[tuple[Any, ...]] = []
                for at in range(0, len(part), 500):  # variables: 999 at most before 3.32
                    chunk = part[at : at + 500]
                    marks = ", ".join("?" * len(chunk))
                    rows += c.execute(f"{_SELECT} WHERE id IN ({marks})", chunk).fetchall()
                return [_job(row) for row in rows]

            return read

        found: list[Job] = []
        for at in range(0, len(ids), GET_MANY):
            found += await self._submit(fetch(ids[at : at + GET_MANY]))
        return found

    async def failed_with(self, errors: Sequence[str], after: int, most: int) -> list[Job]:
        # jobs_failed_by, each error's ids in order from ``after``, merged by a sort that
        # keeps ``most`` (no more read: a parent's 90,000 read in 181 pages took 33 ms).
        # The errors as one JSON list: a variable each went past SQLite's 999 before 3.32.
        sql = (f"{_SELECT} WHERE status = 424 AND error IN (SELECT value FROM json_each(?))"
               " AND id > ? ORDER BY id LIMIT ?")  # fmt: skip
        args = (json.dumps(list(errors)), after, most)
        return await self._submit(lambda c: [_job(r) for r in c.execute(sql, args)])

    async def list_jobs(
        self, state: str, limit: int, offset: int, where: JobFilter = NO_FILTER
    ) -> list[Job]:
        if where:  # a bounded chunk per operation (sqlite_lists.py), then the page's rows
            ids = await matching(self._submit, state, limit, offset, where)
            found = {j.id: j for j in await self.get_many(ids) if j.state == state}
            return [found[jid] for jid in ids if jid in found]  # (gone or retried meanwhile)
        return await self._submit(
            lambda c: [
                _job(r)
                for r in c.execute(
                    f"{_SELECT} WHERE state = ? AND state IN {FINISHED}"
                    " ORDER BY finished DESC, id DESC LIMIT ? OFFSET ?",
                    (state, limit, offset),
                )
            ]
        )

    async def counts(self, writes: Writes | None = None) -> dict[str, int]:
        _, writer = self._opened()
        for attempt in range(1, READS + 1):
            retrying = writes.retrying if writes is not None else None
            commit, counts, rows = await self._submit(partial(_count, writer, retrying))
            if writes is None:
                return counts
            # Answered in the order they commit: when no later commit was answered before
            # this one, a save still pending is in a later commit, not in these counts: an
            # end to add; a retry whose row still has the job as it was (read with the
            # counts, or, retried since, as it was then). Else read again (rare, and
            # READS times at most).
            if attempt == READS or writer.answered == commit:
                for state, n in writes.unwritten_ends().items():
                    counts[state] = counts.get(state, 0) + n
                for jid, was in writes.retrying().items():
                    row = rows[jid] if jid in rows else was
                    if row is not None and counts.get(row):
                        counts[row] -= 1
                break
        return counts

    @property
    def failing(self) -> str | None:
        """Why the last commit failed, while commits fail (None: they succeed)."""
        return None if self._writer is None else self._writer.failing.cause

    async def run_history(self, now: float, window: float) -> dict[str, Any]:
        loop, _ = self._opened()
        try:
            return await loop.run_in_executor(None, self._read, now, window)
        except sqlite3.Error as exc:  # e.g. the file deleted: "unable to open database file"
            raise Busy(f"Job store unavailable: {exc}") from None

    def _read(self, now: float, window: float) -> dict[str, Any]:
        with self._reader_lock:
            if self._reader is None:  # read-only: a file deleted meanwhile is not made anew
                self._reader = sqlite3.connect(  # (empty, the next start's, ids reused)
                    f"{self.path.absolute().as_uri()}?mode=ro",
                    uri=True, isolation_level=None, check_same_thread=False,
                )  # fmt: skip
                self._reader.execute("PRAGMA query_only=ON")
                self._reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            return summarise_sql(self._reader, now, window)

    def _close_reader(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def expire(self, now: float, history_before: float, keep: Sequence[int] = ()) -> int:
        """Chunk by chunk, each a writer operation of its own (~10 ms), so writes queued
        meanwhile commit between them: one DELETE of a million jobs held them for 3.5 s."""
        self._check_file()
        sql, args = _EXPIRE_JOBS.format(_BUT if keep else ""), (now, json.dumps(list(keep)))
        gone = await self._delete_chunks(sql, args if keep else args[:1], EXPIRE_JOBS)
        await self._delete_chunks(_EXPIRE_RUNS, (history_before,), EXPIRE_RUNS)
        return gone

    def _check_file(self) -> None:
        """Whether the path still names the file the writer has open (a stat, at each
        expiry sweep): deleted or replaced, said once."""
        try:
            stat = os.stat(self.path)
            moved = (stat.st_dev, stat.st_ino) != self._file
        except FileNotFoundError:
            moved = True
        except OSError:  # (its folder unreadable: nothing to tell)
            return
        if moved and not self._moved:
            self._moved = True
            log.error("the job store's file %s was deleted or replaced while running: jobs are "
                      "kept in the open file until the stop, and lost with it then (the next "
                      "start makes a new, empty database, or opens the file now there): see "
                      "docs/deploy.md, Backups", self.path)  # fmt: skip

    async def _delete_chunks(self, sql: str, args: tuple[Any, ...], limit: int) -> int:
        """``sql``, a DELETE of at most ``limit`` rows, until it deletes fewer: rows gone."""
        total = 0
        while True:
            gone = await self._submit(lambda c: c.execute(sql, (*args, limit)).rowcount)
            total += gone
            if gone < limit:
                return total

    # --- schedules (bgservice.queue.scheduler) -------------------------------------------

    async def load_schedules(self) -> dict[str, tuple[Schedule, float]]:
        rows = await self._submit(
            lambda c: c.execute("SELECT name, definition, last_slot FROM schedules").fetchall()
        )
        return {name: (Schedule.from_stored(text), last) for name, text, last in rows}

    async def put_schedule(self, schedule: Schedule, last: float, reset: bool = False) -> None:
        update = "definition = excluded.definition"
        if reset:
            update += ", last_slot = excluded.last_slot"
        await self._submit(
            lambda c: c.execute(
                "INSERT INTO schedules (name, definition, last_slot) VALUES (?, ?, ?)"
                f" ON CONFLICT (name) DO UPDATE SET {update}",
                (schedule.name, schedule.stored(), last),
            )
        )

    async def remove_schedule(self, name: str) -> bool:
        gone = await self._submit(
            lambda c: c.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount
        )
        return bool(gone)

    async def close(self) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        loop = asyncio.get_running_loop()
        ended = False
        try:
            await loop.run_in_executor(None, self._close_reader)
            ended = await loop.run_in_executor(None, writer.stop, CLOSE_WAIT)
        finally:
            if ended:  # (else its connection is open still: the locks go with the process)
                self._unlock()

    def _unlock(self) -> None:
        for fd in self._locks:  # DB.lock stays: removing it would race a next start
            os.close(fd)
        self._locks = []


_ALL = (*COLUMNS[1:], "progress", "interruptions")  # what a save of the whole job writes
_CONVERTED = frozenset(("after", "tags", "state", "progress"))  # the columns _stored changes


def _stored(column: str, value: Any) -> Any:
    if column == "after":
        return stored_after(value)
    if column == "tags":
        return stored_tags(value)
    if column == "progress":  # JSON: its message may be any text a handler reported
        return None if value is None else json.dumps(value)
    return str(value) if column == "state" else value


def _job(row: tuple[Any, ...]) -> Job:
    """A job from a ``_SELECT`` row: its ``COLUMNS``, then its progress and interruptions."""
    job = Job.from_row(row[:-2])
    job.interruptions = row[-1]
    if row[-2]:
        done, total, message = json.loads(row[-2])
        job.progress = (done, total, message)
    return job
