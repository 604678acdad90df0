"""The SQLite store's writer thread: one connection, group commit, writes in bulk.

Every operation is queued to one thread that owns the connection. The thread takes all
operations waiting at that moment (with a commit window, also what arrives within it) and
commits them in one transaction, so a burst of concurrent ``queue:add`` costs one fsync,
not one per job, and a caller's future resolves only after its transaction is on disk
(``synchronous=FULL``).

Inside a transaction the writes go first and in bulk: the new jobs, the saves grouped by
the columns they change and the run records, each in statements of many rows (``INSERT
... VALUES (...), (...)``, ``UPDATE ... FROM (VALUES ...)``), not ``executemany``'s step
per row: every SQLite step releases the GIL and takes it back from the loop thread,
which holds it most of the time (the bench's batch row: 95 -> 84 us of service CPU per
job). Then reads and deletes, in the order they came. A save for a job whose
previous save is still queued joins it (the newer values win, run records add up), so a
short job's "running" and "done" cost one UPDATE of the columns they changed. A bulk
statement that fails is rolled back to a savepoint and its rows tried one by one, so a bad
row fails alone; nothing escapes the thread, which must outlive any one operation. A
commit that fails as a whole (a full disk, the database locked) keeps its saves to try
them again (sqlite_failures.py); what the stop leaves unwritten is named in the log.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bgservice.errors import Busy
from bgservice.queue.sqlite_failures import Failing, Kept, spans
from bgservice.queue.sqlite_schema import BUSY_TIMEOUT_MS, SCHEMA_VERSION

log = logging.getLogger(__name__)

_BATCH = 2000  # operations in one transaction at most
_SIZES = (256, 64, 16, 4, 1)  # rows in one statement: a few shapes, each prepared once
_Done = tuple[asyncio.Future[Any], Any, BaseException | None]
_RUNS = ("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", "INSERT INTO runs VALUES {rows}")
# A write that changes nothing (the version the file has), for the tries made while commits
# fail with nothing to write: one that succeeds says the store writes again.
_PROBE = f"PRAGMA user_version = {SCHEMA_VERSION}"


class Insert:
    """A new job's row (its id first), the end of the block of ids it falls in, and the
    schedule slot it is the run of, if any (name, slot)."""

    __slots__ = ("future", "mark", "reserve", "row")

    def __init__(
        self,
        row: tuple[Any, ...],
        reserve: int,
        future: asyncio.Future[Any],
        mark: tuple[str, float] | None = None,
    ):
        self.row = row
        self.reserve = reserve
        self.future = future
        self.mark = mark


class Save:
    """A job's queued save: column -> value, and run records, until the writer takes it."""

    __slots__ = ("future", "jid", "runs", "values")

    def __init__(self, jid: int, future: asyncio.Future[None]) -> None:
        self.jid = jid
        self.values: dict[str, Any] = {}
        self.runs: list[tuple[Any, ...]] = []
        self.future = future


class Call:
    """Anything else: a function of the connection (reads, deletes)."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


Op = Insert | Save | Call


class Writer:
    """The thread, its queue and the saves it has not taken yet."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        commit_window: float,
        columns: Sequence[str],
        path: Path,  # the database's: the log names it
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.commit_window = commit_window
        # Commits numbered: the one running (the writer's thread reads it) and the last
        # answered on the loop, whose futures are all done (SqliteStore.counts).
        self.commits = self.answered = 0
        marks = ", ".join("?" * len(columns))
        self._insert = (f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({marks})",
                        f"INSERT INTO jobs ({', '.join(columns)}) VALUES {{rows}}")  # fmt: skip
        self._variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._statements: dict[tuple[str, int], str] = {}  # (form, rows) -> its text
        self._at = 0  # the first row of the statement _many runs now
        self._ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._saves: dict[int, Save] = {}  # by job id; the lock hands each one over
        self._saves_lock = threading.Lock()
        self._update_sql: dict[tuple[str, ...], tuple[str, str | None]] = {}
        self.failing = Failing(path)  # commits failing as a whole: said, tried again
        self._kept: dict[int, Kept] = {}  # saves a failed commit did not write, by job
        self._thread = threading.Thread(target=self._run, name="bgservice-store", daemon=True)
        self._thread.start()

    # --- the loop's side ------------------------------------------------------------------

    def put(self, op: Op) -> None:
        # Queued at once (not when a coroutine first runs), so writes apply in call order.
        self._ops.put(op)

    def save(self, jid: int, values: dict[str, Any], run: tuple[Any, ...] | None) -> Save:
        with self._saves_lock:
            pending = self._saves.get(jid)
            if pending is None:
                pending = self._saves[jid] = Save(jid, self.loop.create_future())
                self._ops.put(pending)
            pending.values.update(values)  # not taken yet: the newer values are written
            if run is not None:
                pending.runs.append(run)
        return pending

    def _answer(self, commit: int, results: list[_Done]) -> None:
        """A commit's outcome, on the loop: its futures, in the order of the commits."""
        self.answered = commit
        _resolve(results)

    def stop(self, timeout: float) -> bool:
        """Commit what is queued, then end the thread (blocking: run it off the loop);
        whether it ended (and closed the connection)."""
        self._ops.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._take(self.failing.wait(bool(self._kept)))
            # (while commits fail, a try is owed even with no new operation: the kept
            # saves', or one to find out that it writes again; at the stop, one more)
            if batch or self._kept or self.failing.cause is not None:
                with self._saves_lock:  # from here on, later saves are queued afresh
                    for op in batch:
                        if type(op) is Save:
                            del self._saves[op.jid]
                self.commits += 1
                results = self._apply(batch, stop)
                self.loop.call_soon_threadsafe(self._answer, self.commits, results)
        if self._kept:
            log.error("job store: stopped with the state changes of %d jobs not stored (%s): "
                      "the next start finds them as last stored (one that ended may run "
                      "again): jobs %s", len(self._kept), self.failing.cause,
                      spans(list(self._kept)))  # fmt: skip
        self.conn.close()

    def _take(self, wait: float | None = None) -> tuple[list[Op], bool]:
        try:  # (``wait``: until the next try of what failed; None: no try owed)
            first = self._ops.get(timeout=wait)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        # Everything queued meanwhile joins this commit; with a commit window, also what
        # arrives within it (fewer fsyncs under light concurrent load).
        until = time.monotonic() + self.commit_window
        while len(batch) < _BATCH:
            try:
                wait = until - time.monotonic()
                item = self._ops.get(timeout=wait) if wait > 0 else self._ops.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _apply(self, batch: list[Op], last: bool) -> list[_Done]:
        """``batch`` in one transaction, with the kept saves of its jobs (all of them when
        their try is due, and in the ``last`` commit, the stop's)."""
        results: list[_Done] = []
        inserts = [op for op in batch if type(op) is Insert]
        saves = [op for op in batch if type(op) is Save]
        writes: Sequence[Save | Kept] = saves
        if self._kept:  # (commits failed: their kept saves go with these)
            writes = [*saves, *self._with_kept(saves, last or self.failing.due())]
        # While commits fail, a try with nothing to write writes the probe (one that only
        # reads says nothing of writes: reads may succeed meanwhile, on a full disk).
        probe = self.failing.cause is not None and not batch and not writes
        try:
            self._begin(waits=bool(batch) or last, probe=probe)
            results += self._inserts(inserts)
            failed = self._saves_of(writes)
            results += [(op.future, None, failed.get(i)) for i, op in enumerate(saves)]
            results += self._calls(batch)
            self.conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            for kept in writes:  # (their futures fail now: the callers answer at once)
                self._kept[kept.jid] = Kept(kept.jid, kept.values, kept.runs)
            busy = self.failing.commit_failed(exc, len(batch))
            return [(op.future, None, Busy(busy)) for op in batch]
        if self.failing.cause is not None and (probe or inserts or writes):  # it wrote
            self.failing.committed()
        for i in range(len(saves), len(writes) if failed else 0):  # kept ones that failed
            if (error := failed.get(i)) is not None:  # alone (a row SQLite refuses): lost
                log.error("job store write failed: job %d: %s", writes[i].jid, error)
        return results

    def _calls(self, batch: list[Op]) -> list[_Done]:
        """The batch's reads and deletes, in the order they came, after its writes."""
        results: list[_Done] = []
        for op in batch:
            if type(op) is Call:
                try:
                    results.append((op.future, op.fn(self.conn), None))
                except Exception as exc:  # e.g. sqlite3.Error: this op only
                    if not self.conn.in_transaction:  # (SQLite ended it: a full disk)
                        raise
                    results.append((op.future, None, exc))
        return results

    def _begin(self, waits: bool, probe: bool) -> None:
        """BEGIN IMMEDIATE, and the ``probe``'s write. A try of the kept saves alone does
        not wait out the busy timeout (not ``waits``): a database held locked would hold
        the new operations queued behind it (they wait it out)."""
        if waits:
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.conn.execute("PRAGMA busy_timeout=0")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            finally:
                self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if probe:
            self.conn.execute(_PROBE)

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error as again:
            log.error("job store rollback failed: %s", again)

    def _with_kept(self, saves: list[Save], due: bool) -> list[Kept]:
        """The kept saves of the jobs ``saves`` write go under theirs (older values first,
        newer win, runs in order); when ``due``, the rest with them (returned)."""
        kept = self._kept
        for op in saves:
            if (older := kept.pop(op.jid, None)) is not None:
                op.values = {**older.values, **op.values}
                op.runs = older.runs + op.runs
        if not due:
            return []
        rest = list(kept.values())
        kept.clear()
        return rest

    def _inserts(self, ops: list[Insert]) -> list[_Done]:
        if not ops:
            return []
        failed = self._bulk(*self._insert, [op.row for op in ops])
        # The ids handed out are never handed out again, even after a crash.
        reserved = max(op.reserve for op in ops)
        self.conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_id', ?)", (reserved,)
        )
        # A schedule's run and the record that its slot fired: one commit, never one alone.
        marks = [
            (op.mark[1], op.mark[0])
            for i, op in enumerate(ops)
            if op.mark is not None and i not in failed
        ]
        if marks:
            self.conn.executemany("UPDATE schedules SET last_slot = ? WHERE name = ?", marks)
        return [(op.future, op.row[0], failed.get(i)) for i, op in enumerate(ops)]

    def _saves_of(self, ops: Sequence[Save | Kept]) -> dict[int, BaseException]:
        """The saves ``ops`` written: those that failed (by their index in ``ops``)."""
        shapes: dict[tuple[str, ...], list[int]] = {}
        for i, op in enumerate(ops):
            shapes.setdefault(tuple(op.values), []).append(i)
        failed: dict[int, BaseException] = {}
        for columns, members in shapes.items():
            forms = self._update_sql.get(columns)
            if forms is None:
                one = ", ".join(f"{c} = ?" for c in columns)
                many = ", ".join(f"{c} = v.column{k}" for k, c in enumerate(columns, 1))
                forms = self._update_sql[columns] = (
                    f"UPDATE jobs SET {one} WHERE id = ?",
                    f"UPDATE jobs SET {many} FROM (VALUES {{rows}}) AS v"
                    f" WHERE jobs.id = v.column{len(columns) + 1}"
                    if sqlite3.sqlite_version_info >= (3, 33) else None,  # UPDATE FROM
                )  # fmt: skip
            rows = [(*ops[i].values.values(), ops[i].jid) for i in members]
            for j, exc in self._bulk(*forms, rows).items():
                failed[members[j]] = exc
        runs = [run for op in ops for run in op.runs]
        try:
            self._many(_RUNS[1], runs)
        except Exception as exc:  # a bad record fails its save (reported) alone: else, kept,
            failed.update(self._runs_one_by_one(ops, runs, exc))  # it would fail every commit
        return failed

    def _runs_one_by_one(
        self, ops: Sequence[Save | Kept], runs: list[tuple[Any, ...]], exc: Exception
    ) -> dict[int, BaseException]:
        """After a statement of run records failed with ``exc`` (writing none of its rows:
        the rows before it are in), its rows and the rest one by one: the saves whose
        failed."""
        if not self.conn.in_transaction:  # SQLite ended it (a full disk): the commit fails
            raise exc
        owners = [i for i, op in enumerate(ops) for _ in op.runs]
        failed: dict[int, BaseException] = {}
        for k in range(self._at, len(runs)):
            try:
                self.conn.execute(_RUNS[0], runs[k])
            except Exception as refused:
                if not self.conn.in_transaction:
                    raise
                failed.setdefault(owners[k], refused)
        return failed

    def _bulk(
        self, one: str, many: str | None, rows: Sequence[tuple[Any, ...]]
    ) -> dict[int, BaseException]:
        """``rows`` in statements of many rows (``many``; None: ``executemany`` of
        ``one``); if that fails, undo it and run them one by one (``one``): which failed."""
        conn = self.conn
        conn.execute("SAVEPOINT bulk")
        try:
            if many is None:
                conn.executemany(one, rows)
            else:
                self._many(many, rows)
            conn.execute("RELEASE bulk")
            return {}
        except Exception:  # e.g. sqlite3.Error, OverflowError: find the rows at fault
            conn.execute("ROLLBACK TO bulk")
            conn.execute("RELEASE bulk")
        failed: dict[int, BaseException] = {}
        for i, row in enumerate(rows):
            try:
                conn.execute(one, row)
            except Exception as exc:
                if not conn.in_transaction:  # SQLite ended it (a full disk): all fail
                    raise
                failed[i] = exc
        return failed

    def _many(self, form: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """``form`` (its ``{rows}`` where the rows' ``(?, ...)`` go) run over ``rows``,
        in chunks of the _SIZES that SQLite's limit on variables allows."""
        at = 0
        while at < len(rows):
            width = len(rows[at])
            left = min(len(rows) - at, max(1, self._variables // width))
            size = next(n for n in _SIZES if n <= left)
            sql = self._statements.get((form, size))
            if sql is None:
                marks = "(" + ", ".join("?" * width) + ")"
                sql = self._statements[form, size] = form.format(rows=", ".join([marks] * size))
            chunk = rows[at : at + size]
            self._at = at  # (where a failure began: the statements before it wrote theirs)
            self.conn.execute(sql, [value for row in chunk for value in row])
            at += size


def _resolve(results: list[_Done]) -> None:
    for future, value, error in results:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
