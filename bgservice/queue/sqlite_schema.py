"""The embedded store's database file: its tables, opening it (a database made by an
earlier version gets the columns added since; one made by a later version, which this
one would misread, is refused: ``PRAGMA user_version``), and ``DB.lock``, which makes it
one service's: a second service started with the same ``db`` is refused (sharing it,
each would take the other's running jobs for ones a crash interrupted and run them
again), also under another name (a symbolic or hard link). A start that fails for want
of space on the file's device says so (``no_space``), not SQLite's "disk I/O error"."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
from pathlib import Path

from bgservice.queue.sqlite_failures import primary_code

log = logging.getLogger(__name__)

# The schema's version, in the file's header (PRAGMA user_version), written when the file is
# made or brought up to this schema. Raise it with a change an older version would misread
# (a new meaning of a column's values; new columns it ignores are fine): it refuses it.
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000  # how long a commit waits for another process's write lock
# A new database's mode, and DB.lock's: jobs carry e-mails and tokens, so the owner only
# (SQLite gives the -wal and -shm the file's mode). A file there keeps its own (0640 for a
# group an operator chose).
FILE_MODE = 0o600
# Bytes the -wal is cut back to once a checkpoint has copied it all: else it keeps the size
# a burst gave it until the stop (SQLite's default: no limit).
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# Bytes free on the file's device below which a start's "disk I/O error" is taken for want
# of space (SQLite says so when it cannot size its 32 KiB -shm there).
ROOM = 1024 * 1024

# Columns of jobs newer than its first schema, and their types: added to an older database.
ADDED_COLUMNS = {c: "TEXT" for c in ("name", "tags", "checkpoint", "source", "progress")}
ADDED_COLUMNS["interruptions"] = "INTEGER NOT NULL DEFAULT 0"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
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
    after TEXT,  -- ids, "1,2,3"; databases made before hold one INTEGER (read_after)
    status INTEGER,
    result BLOB,
    error TEXT,
    cancel_requested INTEGER NOT NULL,
    expires REAL,
    name TEXT,
    tags TEXT,  -- "a,b"
    checkpoint TEXT,
    source TEXT,
    interruptions INTEGER NOT NULL DEFAULT 0,  -- runs a crash cut ([queue] max_interruptions)
    progress TEXT  -- the last report, JSON [done, total, message]; written as the job ends
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
-- Finished jobs by state, newest finished first (queue:list); adds and starts, of jobs not
-- finished, do not write to it. list_jobs repeats its WHERE, so SQLite can use it.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (state, finished)
    WHERE state IN ('done', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires) WHERE expires IS NOT NULL;
-- The jobs a dependency's end failed (424), by the error that names it: how a retry with
-- dependents=1 finds them (bgservice.queue.retries); no write but such a job's touches it.
CREATE INDEX IF NOT EXISTS jobs_failed_by ON jobs (error) WHERE status = 424;
CREATE TABLE IF NOT EXISTS runs (
    job INTEGER NOT NULL,
    module TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Recurring jobs (bgservice.queue.scheduler): the definition as JSON, and the last slot
-- fired, written in the transaction that adds the slot's job.
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    last_slot REAL NOT NULL
);
"""


class DatabaseInUse(RuntimeError):
    pass


class UnusableDatabase(RuntimeError):
    """A database this service must not run on (newer than it, or not writable)."""


def lock_path(path: Path) -> Path:
    """DB.lock, beside the database's file: the file itself, not a symbolic link to it
    (every name of it locks the same lock; SQLite puts its -wal and -shm there too)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def lock(path: Path) -> list[int]:
    """Lock ``DB.lock`` and the database file itself (made empty if missing: SQLite takes
    an empty file for a new database) for this process; their descriptors, to close once
    SQLite's connections are closed (closing any descriptor of the database file drops
    the POSIX locks SQLite holds on it: so the file is locked with flock, which SQLite
    does not use, and never with fcntl). The file's lock refuses a second service on a
    hard link to it, whose DB.lock is another file."""
    first = _lock(lock_path(path), path)
    held = [] if first is None else [first]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError:  # (SQLite says why when it opens it)
        return held
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        for each in (fd, *held):
            os.close(each)
        raise DatabaseInUse(
            f"{path} is in use by another bgservice, under another name (a hard link to"
            " the same file): give each service its own database"
        ) from None
    except OSError:  # a file system without locks: DB.lock's warning said it
        os.close(fd)
        return held
    return [*held, fd]


def _lock(at: Path, path: Path) -> int | None:
    """Lock the file ``at`` (DB.lock), writing our pid in it (for the message of a
    service refused); None where the file system has no locks."""
    fd = os.open(at, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise DatabaseInUse(
            f"{path} is in use by another bgservice (pid {holder}): give each service its"
            ' own db = "...", or share one queue between services with backend = "redis"'
        ) from None
    except OSError as exc:  # a file system without locks: go on, as before
        log.warning("cannot lock %s (%s): start one service per database", path, exc)
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except OSError:  # (a full disk: no_space says it)
        os.close(fd)
        raise
    return fd


def connect(path: Path) -> tuple[sqlite3.Connection, int, int]:
    """Open (creating if needed); the next id and the end of the block already reserved."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        return _prepare(conn, path)
    except BaseException:
        conn.close()
        raise


def _prepare(conn: sqlite3.Connection, path: Path) -> tuple[sqlite3.Connection, int, int]:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UnusableDatabase(
            f"{path} was written by a newer bgservice (schema version {version}; this one"
            f" knows up to {SCHEMA_VERSION}, and would misread it): run that version, or"
            " restore a backup this version wrote (docs/deploy.md)"
        )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _has_json(conn)
    _writable(conn, path, version)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")  # (this connection's)
    conn.executescript(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    for column, kind in ADDED_COLUMNS.items():  # a database made by an earlier version
        if column not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    if version < SCHEMA_VERSION:  # made, or brought up to this schema
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    reserved = conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
    highest = conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0] or 0
    sequence = 0
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        sequence = row[0] if row else 0
    next_id = max(reserved[0] if reserved else 1, highest + 1, sequence + 1)
    return conn, next_id, next_id  # ids from next_id on are not reserved yet


def _has_json(conn: sqlite3.Connection) -> None:
    """The queue's statements read lists of ids with json_each (a list of any length in
    one variable: SQLite took at most 999 before 3.32). JSON1 is built in from SQLite 3.38
    and enabled by the major distributions before it; without it, say so at the start,
    not at the first cascade."""
    try:
        conn.execute("SELECT value FROM json_each('[1]')").fetchone()
    except sqlite3.DatabaseError as exc:
        raise UnusableDatabase(
            f"this Python's SQLite ({sqlite3.sqlite_version}) has no JSON functions ({exc}),"
            " which the job queue needs: they are built in from SQLite 3.38; use a Python"
            " built with an SQLite that has them (docs/deploy.md)"
        ) from None


def _writable(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """A write that changes nothing, at once: SQLite opens a file it may not write (or
    whose folder it may not make its -wal in) read-only without a word, and every add
    would then be refused with the service up and "ready"."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:  # (its commits will wait,
            log.warning("%s is locked by another process (%s)", path, exc)  # and say it)
            return
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_READONLY:
            raise
        raise UnusableDatabase(
            f"{path} cannot be written ({exc}): the service's user must be able to write"
            " the file and its folder (SQLite makes its -wal and -shm files there)"
        ) from None


def free_bytes(path: Path) -> int | None:
    """Bytes free to the service where SQLite writes the database's files (its -wal and
    -shm: beside the file a symbolic link points to); None if that cannot be read."""
    try:
        stat = os.statvfs(Path(os.path.realpath(path)).parent)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def no_space(path: Path, exc: BaseException) -> UnusableDatabase | None:
    """What the start's failure ``exc`` is when the device holding ``path`` is full: SQLite
    says "database or disk is full" or, for its -shm, "disk I/O error" (taken for it with
    less than ``ROOM`` free); DB.lock's write "No space left on device". Else None."""
    code = primary_code(exc)
    sure = code == sqlite3.SQLITE_FULL or getattr(exc, "errno", None) == errno.ENOSPC
    if not sure and code != sqlite3.SQLITE_IOERR:
        return None
    free = free_bytes(path)
    if not sure and (free is None or free >= ROOM):
        return None
    figure = "" if free is None else f"{free} bytes free; "
    return UnusableDatabase(
        f"no space left on the device holding {path} ({figure}{exc}): free some space"
        " there, or give db a path on another file system"
    )
