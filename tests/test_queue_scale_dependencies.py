"""Many jobs waiting on one (after=) on the embedded engine: when it ends, they are
placed, or failed, a few hundred per turn of the loop, so calls meanwhile are answered."""

from __future__ import annotations

import json
import sqlite3
import time

from bgservice.queue.sqlite import SCHEMA
from tests.conftest import Framed, wait_until
from tests.queue_helpers import status
from tests.test_queue_scale_store import INSERT, _row


def test_100000_jobs_freed_by_one_are_placed_while_calls_are_answered(make_service, tmp_path):
    """100,000 waiting jobs after= one that ends done: they are placed 500 per turn of the
    loop, so a call sent meanwhile sees the dependency done and the last of them not yet
    in line (placed in one step, they held the loop 0.3 s and no call saw that)."""
    now, waiting = time.time(), 100_000
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        busy = list(_row(1, "waiting", now))
        busy[1], busy[2], busy[4] = "sleep", b"1000", 10  # module, data, priority: first
        conn.execute(INSERT, busy)
        conn.execute(INSERT, _row(2, "waiting", now))  # behind the sleeper: it waits
        conn.executemany(INSERT, (_row(i, "waiting", now, after="2")
                                  for i in range(3, waiting + 3)))  # fmt: skip
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 1000000\n")
    last = waiting + 2
    watch = Framed(svc.tcp, timeout=30)
    seen: list[tuple[str, str, int | None]] = []
    deadline = time.monotonic() + 60
    while (not seen or seen[-1][1:] == ("waiting", None)) and time.monotonic() < deadline:
        watch.send(b"queue:status:id:2", b"queue:status:id:%d" % last)
        dependency, dependent = (json.loads(watch.recv()[1]) for _ in range(2))
        seen.append((dependency["state"], dependent["state"], dependent.get("position")))
        time.sleep(0.002)
    watch.close()
    # Until job 2 ends, the last waits on it (no position); then, once placed, it is in
    # line (or run already).
    assert seen[0] == ("waiting", "waiting", None), seen[0]
    assert seen[-1][0] == "done" and seen[-1][1:] != ("waiting", None), seen[-1]
    assert seen.count(("done", "waiting", None)) >= 3, sorted(set(seen))
    assert svc.call(b"queue:get:id:%d" % last, timeout=60) == b"x"
    wait_until(lambda: status(svc, 3)["state"] == "done", timeout=30)
