"""``queue:stats``' run history: how many attempts ended in the last minute, and over the
window asked, their outcomes and the busy seconds per hour.

Two ways to the same figures: ``summarise`` from ``Run`` records (the Redis engine, which
reads its records from Redis), ``summarise_sql`` inside SQLite (the embedded store, off
the loop), so that a week's history of a busy queue (millions of attempts, which the
dashboard's chart asks for) is never turned into a Python object per attempt on the loop.
tests/test_queue_history.py holds the two to the same answers.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable
from typing import Any

from bgservice.queue.store import Run

HOUR = 3600
ENDED = ("retry", "interrupted")  # attempts that did not finish their job


def summarise(runs: list[Run], now: float, window: float) -> dict[str, Any]:
    """``runs``: at least those that ended since ``now - max(window, 60)``."""
    last_minute = sum(1 for r in runs if r.finished >= now - 60 and r.outcome not in ENDED)
    start = now - window
    hours = _Hours()
    outcomes: Counter[str] = Counter()
    busy = 0.0
    for run in runs:
        if run.finished < start:
            continue
        outcomes[run.outcome] += 1
        begin, end = max(run.started, start), min(run.finished, now)
        busy += max(0.0, end - begin)
        hours.attempt(begin, end)
    return _summary(last_minute, window, outcomes, busy, hours)


def summarise_sql(conn: sqlite3.Connection, now: float, window: float) -> dict[str, Any]:
    """The same from the ``runs`` table, aggregated by SQLite: one row per outcome and
    per hour; only attempts that cross an hour boundary come to Python, to be split."""
    start = now - window
    # begin, end and the hour begin falls in, as summarise has them (times are positive,
    # so CAST truncates as // floors).
    clipped = (
        "SELECT MAX(started, :start) AS b, MIN(finished, :now) AS e,"
        " CAST(MAX(started, :start) / 3600 AS INTEGER) * 3600 AS h"
        " FROM runs WHERE finished >= :start"
    )
    at = {"start": start, "now": now}
    last_minute = conn.execute(
        "SELECT COUNT(*) FROM runs WHERE finished >= ? AND outcome NOT IN (?, ?)",
        (now - 60, *ENDED),
    ).fetchone()[0]
    outcomes: Counter[str] = Counter()
    busy = 0.0
    for outcome, runs, seconds in conn.execute(
        "SELECT outcome, COUNT(*), TOTAL(MAX(0.0, MIN(finished, :now) - MAX(started, :start)))"
        " FROM runs WHERE finished >= :start GROUP BY outcome",
        at,
    ):
        outcomes[outcome] = runs
        busy += seconds
    hours = _Hours()
    for hour, runs, seconds in conn.execute(
        f"SELECT h, COUNT(*), TOTAL(MAX(0.0, e - b)) FROM ({clipped}) WHERE e <= h + 3600"
        " GROUP BY h",
        at,
    ):
        hours.add(hour, seconds, runs)
    for begin, end in conn.execute(f"SELECT b, e FROM ({clipped}) WHERE e > h + 3600", at):
        hours.attempt(begin, end)
    return _summary(last_minute, window, outcomes, busy, hours)


class _Hours:
    """Busy seconds and attempts (counted in the hour they began) per hour."""

    def __init__(self) -> None:
        self.rows: dict[int, list[float]] = {}

    def add(self, hour: int, busy: float, runs: int) -> None:
        row = self.rows.setdefault(int(hour), [0.0, 0])
        row[0] += busy
        row[1] += runs

    def attempt(self, begin: float, end: float) -> None:
        """One attempt: counted in the hour it began, its busy time split by hour."""
        self.add(int(begin // HOUR * HOUR), 0.0, 1)
        while begin < end:
            hour = int(begin // HOUR * HOUR)
            part = min(end, hour + HOUR) - begin
            self.add(hour, part, 0)
            begin += part

    def listed(self) -> Iterable[dict[str, Any]]:
        for hour, (busy, runs) in sorted(self.rows.items()):
            yield {"hour": hour, "busy_seconds": round(busy, 3), "runs": int(runs)}


def _summary(
    last_minute: int, window: float, outcomes: Counter[str], busy: float, hours: _Hours
) -> dict[str, Any]:
    return {
        "finished_per_minute": last_minute,
        "window": {
            "seconds": window,
            "runs": sum(outcomes.values()),
            "outcomes": dict(outcomes),
            "busy_seconds": round(busy, 3),
            "by_hour": list(hours.listed()),
        },
    }
