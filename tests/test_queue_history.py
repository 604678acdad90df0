"""Run history for every attempt (issue 19, item 8), on both engines: an attempt cut by a
crash is recorded as ``interrupted`` (SQLite: found running at the next start; Redis:
when another instance takes its lease over), so ``queue:stats`` counts it."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest

from bgservice.queue.history import summarise, summarise_sql
from bgservice.queue.sqlite_schema import SCHEMA
from bgservice.queue.store import Run
from tests.conftest import wait_until

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import both_engines, status  # noqa: F401


def _window(svc) -> dict:
    return json.loads(svc.call(b"queue:stats"))["window"]


def test_an_attempt_cut_by_kill_9_is_in_the_run_history(make_service):
    svc = make_service()
    jid = int(svc.call(b"queue:add:sleep:5000")[3:])
    wait_until(lambda: status(svc, jid)["state"] == "running")
    # Store writes apply in order: once a later add is acknowledged, "running" is durable
    # (without it, a kill before that write's commit left a job that had never started:
    # one attempt, not two, on a slow machine).
    svc.call(b"queue:add?delay=600:echo:later")
    assert svc.proc is not None
    svc.proc.kill()
    svc.proc.wait()
    svc.start()
    # It runs again, its first attempt recorded (and given back: attempt 1 again).
    wait_until(lambda: (s := status(svc, jid))["state"] == "running" and s["interruptions"],
               timeout=15)  # fmt: skip
    assert status(svc, jid)["attempts"] == 1
    window = _window(svc)
    assert window["outcomes"] == {"interrupted": 1}
    assert window["runs"] == 1
    assert json.loads(svc.call(b"queue:stats"))["finished_per_minute"] == 0
    assert svc.call(b"queue:cancel:id:%d" % jid) == b"cancelling"
    assert svc.call(b"queue:get:id:%d" % jid).startswith(b"410:")
    wait_until(lambda: _window(svc)["outcomes"] == {"interrupted": 1, "cancelled": 1})


def test_the_sql_summary_is_the_python_one():
    """The embedded store sums the history in SQLite, the Redis engine in Python: the same
    answers for attempts inside one hour, across hour boundaries, begun before the window,
    of no length, and ended "before" they began (a clock stepped back)."""
    rng = random.Random(17)
    now = 1_800_000_000.0 + rng.random() * 3600
    runs = []
    for i in range(3000):
        finished = now - rng.random() * 3 * 3600
        length = rng.choice([0.0, rng.random(), rng.random() * 60, rng.random() * 9000, -1.5])
        outcome = rng.choice(["done", "done", "failed", "retry", "interrupted", "cancelled"])
        runs.append(Run(i, "echo", 1, finished - length, finished, outcome))
    runs.append(Run(9999, "echo", 1, now - 30, now + 5, "done"))  # ends after now
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
        [(r.job, r.module, r.attempt, r.started, r.finished, r.outcome) for r in runs],
    )
    for window in (1.0, 59.5, 3600.0, 2 * 3600 + 17.25, 86400.0):
        since = [r for r in runs if r.finished >= now - max(window, 60)]
        expected = summarise(since, now, window)
        got = summarise_sql(conn, now, window)
        assert got["finished_per_minute"] == expected["finished_per_minute"] > 0
        assert got["window"]["outcomes"] == expected["window"]["outcomes"]
        assert got["window"]["runs"] == expected["window"]["runs"] > 0
        assert got["window"]["busy_seconds"] == pytest.approx(expected["window"]["busy_seconds"])
        assert [(h["hour"], h["runs"]) for h in got["window"]["by_hour"]] == [
            (h["hour"], h["runs"]) for h in expected["window"]["by_hour"]
        ]
        assert [h["busy_seconds"] for h in got["window"]["by_hour"]] == pytest.approx(
            [h["busy_seconds"] for h in expected["window"]["by_hour"]]
        )
