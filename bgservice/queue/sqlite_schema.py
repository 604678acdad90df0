"""The embedded store's database file: its tables, opening it (a database made by an
earlier version gets the columns added since), and ``DB.lock``, which makes it one
service's: a second service started with the same ``db`` is refused (sharing it, each
would take the other's running jobs for ones a crash interrupted and run them again)."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

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


def lock_path(path: Path) -> Path:  # DB.lock, beside the database
    return path.with_name(path.name + ".lock")


def lock(path: Path) -> int | None:
    """Lock ``DB.lock`` for this process (released when it closes, or the process ends)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
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
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def connect(path: Path) -> tuple[sqlite3.Connection, int, int]:
    """Open (creating if needed); the next id and the end of the block already reserved."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    for column, kind in ADDED_COLUMNS.items():  # a database made by an earlier version
        if column not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    reserved = conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
    highest = conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0] or 0
    sequence = 0
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        sequence = row[0] if row else 0
    next_id = max(reserved[0] if reserved else 1, highest + 1, sequence + 1)
    return conn, next_id, next_id  # ids from next_id on are not reserved yet
