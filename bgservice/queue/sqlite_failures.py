"""The SQLite store's commits failing as a whole, and how it rides that out.

A commit fails as a whole when the disk is full, the database is locked by another
process (an operator's ``sqlite3`` session in a transaction) past the busy timeout, on an
I/O error or a corrupt page. The new jobs of such a commit are refused (their adds get
503: nothing was acknowledged, so they must not appear later), reads and deletes fail;
but the saves of jobs' state changes are what memory has already acted on (a result
delivered, a cancel applied): those are kept (``Kept``) and tried again with each next
commit of their job, and all of them at a backoff (0.1 s doubling to 5 s), so that disk
and memory agree again once the cause goes (a job whose end was not stored would run a
second time after a restart).

What the log says of it (``Failing``), as redis_outage.py says Redis away: one ERROR
when commits start failing, with the cause; then a line a minute at most, counting the
operations failed; one line when a commit succeeds again. The callers' own lines stay
quiet for these failures: they get ``Busy``, whose 503 says the cause (``Job store
unavailable: database or disk is full``). A damaged file ("database disk image is
malformed") is no passing cause: its lines also say what to do (``damaged``).
"""

from __future__ import annotations

import logging
import shlex
import sqlite3
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MOST = 0.1, 5.0  # s: the backoff of the tries of kept saves
STILL_EVERY = 60.0  # s: while commits keep failing, a line this often at most
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # (primary codes)


class Failing:
    """Whether the last commit failed and why; when to try again; the log's lines. Used in
    the writer's thread; ``cause`` is read on the loop too (a str, swapped whole)."""

    def __init__(self, path: Path) -> None:
        self.path = path  # the database's: a damaged one's lines name it
        self.cause: str | None = None  # set: the last commit failed, with this
        self.since = 0.0  # (monotonic) when commits began to fail
        self.failed = 0  # operations failed since the last line that counted them
        self._said = -STILL_EVERY  # when a line last said it
        self._quiet = False  # these failures began too soon after a line to say so
        self._delay = RETRY_FIRST
        self._retry_at = 0.0

    def commit_failed(self, exc: BaseException, operations: int) -> str:
        """A commit of ``operations`` failed with ``exc``: said, then counted; the 503's
        message its operations fail with (a ``Busy`` each: raised again and again, one
        instance would grow its traceback at each raise). Failures that come back within
        a minute of a line (a disk almost full: a small commit passes, the next fails) go
        on counting quietly, and their lines come a minute apart."""
        now = time.monotonic()
        cause = str(exc).partition("\n")[0] or type(exc).__name__
        advice = damaged(exc, self.path)
        self.failed += operations
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, RETRY_MOST)
        if self.cause is None:
            self.since, self._quiet = now, now - self._said < STILL_EVERY
            if not self._quiet:
                self._said = now
                log.error("job store: a commit failed (%s): new jobs are refused (503), the "
                          "state changes of jobs are kept in memory and written once it "
                          "commits again%s", cause, advice)  # fmt: skip
        elif now - self._said >= STILL_EVERY:
            self._said = now
            log.warning("job store still fails to commit after %.0f s (%s): %d operations "
                        "failed so far%s", now - self.since, cause, self.failed,
                        advice)  # fmt: skip
        self.cause = cause
        return f"Job store unavailable: {cause}"

    def committed(self) -> None:
        """A commit that wrote succeeded while commits failed: said (unless these failures
        went unsaid, and a line was said within the minute), and the kept saves left are
        tried at once."""
        now = time.monotonic()
        if not self._quiet or now - self._said >= STILL_EVERY:
            self._said = now
            log.info("job store writes again after %.1f s (%d operations failed meanwhile)",
                     now - self.since, self.failed)  # fmt: skip
            self.failed = 0
        self.cause = None
        self._delay, self._retry_at = RETRY_FIRST, 0.0

    def wait(self, owed: bool) -> float | None:
        """Seconds until the next try (the writer waits that long for operations at most);
        None when no try is owed: commits succeed and no save is ``owed``."""
        if self.cause is None and not owed:
            return None
        return max(0.0, self._retry_at - time.monotonic())

    def due(self) -> bool:
        return time.monotonic() >= self._retry_at


def primary_code(exc: BaseException) -> int:
    """SQLite's primary result code of ``exc`` (SQLITE_FULL, not its extended code, in the
    low byte); 0 for an error that is not SQLite's (an OSError)."""
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def damaged(exc: BaseException, path: Path, starting: bool = False) -> str:
    """What to do, when ``exc`` says the database file is damaged (SQLITE_CORRUPT,
    SQLITE_NOTADB: retrying mends nothing, and its commits fail wherever they touch the
    damaged pages); else "". Said with the cause, as the operator must act. At the start,
    the file may also be another one than the queue's (a wrong ``db`` path)."""
    if primary_code(exc) not in _DAMAGED:
        return ""
    where = shlex.quote(str(path))
    what = ("is damaged, or is not the queue's (is db the right path?): " if starting
            else "is damaged: stop the service, ")  # fmt: skip
    return (f"; the database file {path} {what}check it with sqlite3 {where} \"PRAGMA "
            "integrity_check\", and restore a backup (docs/deploy.md, Backups and the job "
            "store's failures)")  # fmt: skip


class Kept:
    """A save that a failed commit did not write, by job: its columns and run records, to
    go under (older values first, newer win; runs in order) the job's next save."""

    __slots__ = ("jid", "runs", "values")

    def __init__(self, jid: int, values: dict[str, Any], runs: list[tuple[Any, ...]]) -> None:
        self.jid = jid
        self.values = values
        self.runs = runs


def spans(ids: list[int]) -> str:
    """``1-3, 7``: every id named, runs of consecutive ones shortened."""
    parts: list[str] = []
    ids = sorted(ids)
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            first, last = ids[start], ids[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ", ".join(parts)
