"""The embedded engine's pump (bgservice/queue/pump.py) and waiting line (schedule.py):
which ready jobs start now, with module limits, and the order queue:list shows them in;
on the embedded engine only."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from bgservice.client import Client
from tests.conftest import GATE as HELD
from tests.conftest import wait_until, write_module
from tests.queue_helpers import add, status


@pytest.mark.timeout(120)  # the old code took minutes: fail, do not hang the run
def test_thousands_of_jobs_held_by_their_module_limit_do_not_slow_the_others(make_service):
    # The embedded engine only: on Redis a claim looks at the best 100 ready jobs
    # (docs/queue.md, "Several instances").
    # Each pump took every held job out of line and put it back: adds and starts of other
    # modules slowed with the held ones' number (quadratic; 8,000 took a minute to add).
    svc = make_service("[queue]\nmodule_limits = { sleep = 1 }\n")
    conn = svc.framed()
    try:
        for _ in range(20):  # 10,000 adds, 500 to a write
            conn.send(*[b"queue:add:sleep:60000"] * 500)
            assert all(conn.recv()[0] == 200 for _ in range(500))
        conn.send(*[b"queue:add:echo:%d" % n for n in range(200)])
        jids = [int(conn.recv()[1][3:]) for _ in range(200)]
        conn.send(*[b"queue:get:id:%d" % jid for jid in jids])
        assert [conn.recv() for _ in jids] == [(200, b"%d" % n) for n in range(200)]
    finally:
        conn.close()
    assert json.loads(svc.call(b"queue:stats"))["counts"]["running"] == 1


RECORD = """
from pathlib import Path

def handle_tcp(request):
    with open(Path(__file__).with_name("order.log"), "a") as f:
        f.write(request.text + "\\n")
    return request.text
"""


def test_waiting_jobs_are_listed_in_the_order_they_run(make_service, modules_dir, tmp_path):
    # A delayed job that has come due runs by its id among the others; the list sorted
    # by due time put a later-added job first.
    write_module(modules_dir, "record", RECORD)
    write_module(modules_dir, "held", HELD)
    svc = make_service("[queue]\nworkers = 1\n")
    go = tmp_path / "go"
    # The one worker held until the list is read (a fixed sleep: a loaded machine's slow
    # calls could outlast it, and the first job ran before the list was read).
    busy = add(svc, b"queue:add:held:%s" % bytes(go))
    wait_until(lambda: status(svc, busy)["state"] == "running")
    first = add(svc, b"queue:add?delay=0.3:record:first")
    second = add(svc, b"queue:add:record:second")
    time.sleep(0.5)  # both are due now
    listed = [job["id"] for job in json.loads(svc.call(b"queue:list:waiting"))["waiting"]]
    assert listed == [first, second]
    go.touch()
    assert svc.call(b"queue:get:id:%d" % second) == b"second"
    assert (modules_dir / "order.log").read_text().split() == ["first", "second"]


GATE = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    for _ in range(6000):  # 60 s at most: a test that failed must not hang
        if Path(__file__).with_name("gate.open").exists():
            return "open"
        await asyncio.sleep(0.01)
    return "never opened"
"""


def _gated_service(make_service, modules_dir):
    """A service with 4 workers and the gate module (open once ``gate.open`` exists)."""
    write_module(modules_dir, "gate", GATE)
    return make_service("[queue]\nworkers = 4\n")


def _hold_the_workers(bg: Client) -> None:
    """Four gate jobs, running: every worker is held until the gate opens."""
    gates = bg.add_many([("gate", b"")] * 4)
    wait_until(lambda: {bg.status(j)["state"] for j in gates} == {"running"})


def test_a_backlog_of_jobs_that_finish_at_once_does_not_keep_the_loop(make_service, modules_dir):
    # A job whose handler replies without waiting frees its worker at once, so the pump
    # took every ready job in one turn of the loop: 20,000 such jobs coming due together
    # left every other client unanswered for 0.55 s (100,000: 3.7 s; timings in
    # docs/benchmarks.md). Here 30,000 wait for the workers, held by gate jobs; once the
    # gate opens, calls sent meanwhile see the backlog under way: the first of it done, the
    # last still waiting (never, when it ran in one turn: no call is read in between).
    svc = _gated_service(make_service, modules_dir)
    jobs = 30_000
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        _hold_the_workers(bg)
        first, *_, last = bg.add_many([("test", b"x")] * jobs)
    watch = svc.framed()
    (modules_dir / "gate.open").touch()
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while (not seen or seen[-1][1] != "done") and time.monotonic() < deadline:
        watch.send(b"queue:status:id:%d" % first, b"queue:status:id:%d" % last)
        seen.append(tuple(json.loads(watch.recv()[1])["state"] for _ in range(2)))
        time.sleep(0.002)
    watch.close()
    assert seen[-1] == ("done", "done") and seen.count(("done", "waiting")) >= 3, seen
    wait_until(lambda: json.loads(svc.call(b"queue:stats"))["counts"]["done"] == jobs + 4, 30)


def test_jobs_wait_to_start_while_the_store_is_behind(make_service, modules_dir, tmp_path):
    # Each job started is two saves (its start, its end) waiting in memory until the store
    # commits them; when the store fell behind, the pump went on starting jobs, and the
    # saves piled up (100,000 jobs freed at once: 14,666 in flight, and every full
    # collection of the garbage collector walked them). Here the store is held still (the
    # test holds SQLite's write lock, for less than the service's busy timeout of 5 s)
    # while 3,000 jobs that finish at once come free: the pump starts about 1,000 (2,000
    # saves in flight, local.BEHIND), then waits; once the lock goes, all of them run.
    # (Statuses of jobs waiting or just finished are read from memory, not the store.)
    svc = _gated_service(make_service, modules_dir)
    jobs = 3000
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        _hold_the_workers(bg)
        ids = bg.add_many([("echo", b"x")] * jobs)
        first, later = ids[0], ids[2000]  # (2,000 saves: about 1,000 jobs)
        lock = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the write lock: the service's commits wait
        try:
            (modules_dir / "gate.open").touch()
            seen: list[tuple[str, str]] = []
            for _ in range(60):  # 1.2 s: the old code ran all 3,000 in well under that
                seen.append((bg.status(first)["state"], bg.status(later)["state"]))
                time.sleep(0.02)
        finally:
            lock.rollback()
            lock.close()
        assert ("done", "waiting") in seen, seen  # the gates opened and jobs started ...
        assert all(state == "waiting" for _, state in seen), seen  # ... then they waited
        assert bg.get(ids[-1]) == b"x"
    wait_until(lambda: json.loads(svc.call(b"queue:stats"))["counts"]["done"] == jobs + 4, 30)
