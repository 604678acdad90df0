"""Reports on a long waiting line (embedded engine): ``queue:list``, ``queue:stats`` and
``queue:status`` read a page of the line, not every waiting job, so other clients are
answered meanwhile; and what they show is still the line's order, exactly.

Measured before (100,000 waiting, one worker busy): each list/stats/status held the loop
40-60 ms (list sorted every job whatever the page, stats counted them three times, a
position scanned every entry of the line); a `test:x` sent meanwhile waited as long. Then a
position checked each job ahead in Python: the last of 100,000 held the loop 49 ms. Those
timings live in docs/benchmarks.md; the test counts what made them, the Python calls each
report makes on the loop: one or more per waiting job, then; a page's worth now."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable
from types import FrameType
from typing import TypeVar

from bgservice.client import Client
from bgservice.queue.commands import JobFilter, ListSpec
from bgservice.queue.job import Job, JobState
from bgservice.queue.schedule import SLICE, WaitingLine
from bgservice.queue.sqlite_schema import SCHEMA
from tests.conftest import GATE, wait_until, write_module
from tests.queue_helpers import add, status
from tests.test_queue_pump import _gated_service, _hold_the_workers
from tests.test_queue_scale_store import INSERT, _row, recovered_queue

T = TypeVar("T")

WAITING = 100_000


def _seed(tmp_path, waiting: int) -> None:
    """A sleeping job to hold the one worker (first by priority), then ``waiting`` echo
    jobs, stored before the start: the service recovers them all waiting."""
    now = time.time()
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        busy = list(_row(1, "waiting", now))
        busy[1], busy[2], busy[4] = "sleep", b"60000", 10  # module, data, priority
        conn.execute(INSERT, busy)
        rows = (_row(i, "waiting", now) for i in range(2, waiting + 2))
        conn.executemany(INSERT, ((*r[:20], f"n{r[0] % 3}", *r[21:]) for r in rows))


async def _python_calls(report: Awaitable[T]) -> tuple[T, int]:
    """``report`` awaited, and how many Python functions were called (or generators
    resumed) on this thread meanwhile: the engine's work on the loop, machine-independent."""
    calls = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        result = await report
    finally:
        sys.setprofile(None)
    return result, calls


async def test_reports_on_100000_waiting_jobs_leave_the_loop_to_others(make_service, tmp_path):
    _seed(tmp_path, WAITING)
    # In the test's process first, no worker (all 100,001 wait): each report's Python calls
    # on the loop, fewer than one per 10 waiting jobs (a sort or a pass over every job, or
    # a Python check per job ahead: 100,000 and more; a page of 100 at offset 500, about
    # 4,500 calls, the rest a few hundred: the counts do not depend on the machine).
    queue = recovered_queue(tmp_path / "jobs.db")
    await queue.start()
    try:
        last = WAITING + 1  # the whole line ahead of it (the busy job first)
        spent = {}
        for name, report in [
            ("status of the last", lambda: queue.status(last)),
            ("list", lambda: queue.list_jobs(ListSpec(None, 100, 0))),
            ("list page", lambda: queue.list_jobs(ListSpec("waiting", 100, 500))),
            ("stats", lambda: queue.stats(3600)),
        ]:
            await report()  # (a first call may fill a cache)
            reply, spent[name] = await _python_calls(report())
        assert reply["counts"]["waiting"] == WAITING + 1
        assert max(spent.values()) < WAITING // 10, spent
    finally:
        await queue.stop(0)

    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 1000000\n")
    await asyncio.to_thread(wait_until, lambda: status(svc, 1)["state"] == "running", 30)
    stats = json.loads(svc.call(b"queue:stats"))
    assert stats["counts"]["waiting"] == WAITING and stats["counts"]["running"] == 1
    named = sum(1 for jid in range(2, WAITING + 2) if jid % 3 == 1)
    assert stats["names"]["n1"] == {"waiting": named, "running": 0}
    assert stats["oldest_waiting_age"] >= 10
    deep = 2 + WAITING // 2  # half the line ahead of it
    assert status(svc, deep)["position"] == WAITING // 2
    page = json.loads(svc.call(b"queue:list?state=waiting&limit=100&offset=5000"))["waiting"]
    assert [(j["id"], j["position"]) for j in page] == [(5002 + n, 5000 + n) for n in range(100)]
    assert status(svc, last)["position"] == WAITING - 1


def test_a_mixed_line_is_listed_and_positioned_exactly(make_service):
    svc = make_service("[queue]\nworkers = 1\n")
    busy = add(svc, b"queue:add:sleep:20000")
    wait_until(lambda: status(svc, busy)["state"] == "running")
    after = [add(svc, b"queue:add?after=%d&priority=%d:echo:b" % (busy, p)) for p in (0, 7)]
    delayed = [add(svc, b"queue:add?delay=%d&priority=%d:echo:d" % (d, p))
               for d, p in ((50, 9), (30, 0), (40, -3))]  # fmt: skip
    low = [add(svc, b"queue:add?priority=-2:echo:l%d" % n) for n in range(3)]
    plain = [add(svc, b"queue:add:echo:p%d" % n) for n in range(4)]
    high = [add(svc, b"queue:add?priority=3&name=hi:echo:h%d" % n) for n in range(2)]
    gone = plain[1]
    assert svc.call(b"queue:cancel:id:%d" % gone) == b"cancelled"
    plain.remove(gone)
    due = [*high, *plain, *low]
    expected = [*due, delayed[1], delayed[2], delayed[0], after[1], after[0]]
    listed = json.loads(svc.call(b"queue:list?state=waiting"))["waiting"]
    assert [j["id"] for j in listed] == expected
    assert [j["position"] for j in listed] == [*range(len(due)), *[None] * 5]
    for limit in (1, 2, 3, 4, 7):
        pages = [json.loads(svc.call(b"queue:list?state=waiting&limit=%d&offset=%d"
                                     % (limit, o)))["waiting"]
                 for o in range(0, len(expected) + limit, limit)]  # fmt: skip
        assert [(j["id"], j["position"]) for p in pages for j in p] == [
            (j["id"], j["position"]) for j in listed
        ]
    assert [status(svc, jid)["position"] for jid in expected] == [j["position"] for j in listed]
    running = json.loads(svc.call(b"queue:list:running"))["running"]
    assert [j["id"] for j in running] == [busy]
    stats = json.loads(svc.call(b"queue:stats"))
    assert stats["counts"]["waiting"] == len(expected) and stats["counts"]["running"] == 1
    assert stats["names"] == {"hi": {"waiting": 2, "running": 0}}
    assert stats["oldest_waiting_age"] is not None


def test_stats_count_every_job_while_jobs_end(make_service, modules_dir):
    # queue:stats counts waiting and running jobs in memory and finished ones in the store;
    # a job that ended while the count was read from the store, its end not yet written,
    # was counted nowhere (or, its end written along, twice): the totals of calls made
    # while 10,000 jobs ended fell short of the jobs there were.
    svc = _gated_service(make_service, modules_dir)
    jobs = 10_000
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        _hold_the_workers(bg)
        bg.add_many([("echo", b"x")] * jobs)
    conn = svc.framed()
    (modules_dir / "gate.open").touch()
    totals: list[int] = []
    done = 0
    while done != jobs + 4:
        conn.send(*[b"queue:stats"] * 20)
        for _ in range(20):
            counts = json.loads(conn.recv()[1])["counts"]
            totals.append(sum(counts.values()))
            done = counts["done"]
    conn.close()
    assert set(totals) == {jobs + 4}, sorted(set(totals))


async def _longest_hold(report: Awaitable[T]) -> tuple[T, int]:
    """``report`` awaited, and the most Python calls this thread made between two turns of
    the loop meanwhile (a callback that schedules itself again each turn marks them): how
    long the report held the loop from every other client, machine-independent."""
    loop, calls, marked, longest, done = asyncio.get_running_loop(), 0, 0, 0, False

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    def turn() -> None:
        nonlocal marked, longest
        longest, marked = max(longest, calls - marked), calls
        if not done:
            loop.call_soon(turn)

    loop.call_soon(turn)
    sys.setprofile(count)
    try:
        result = await report
    finally:
        sys.setprofile(None)
        done = True
    return result, max(longest, calls - marked)


async def test_a_deep_or_filtered_page_gives_the_loop_back_as_it_walks(make_service, tmp_path):
    # A page deep in a line of 100,000 (offset 99,950), or a filter whose one match is at
    # the line's end, walked the whole line in one turn of the loop (~0.4 s here), and a
    # filter's count of matches took another pass (~20 ms): every other client waited.
    # Now the walk and the count give the loop back every millisecond or so: the most
    # Python calls in one turn, counted, are a small share of the line.
    _seed(tmp_path, WAITING)
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        tail = list(_row(WAITING + 2, "waiting", time.time()))
        tail[1] = "tail"  # (its module: the line's last job)
        conn.execute(INSERT, tail)
    queue = recovered_queue(tmp_path / "jobs.db")
    await queue.start()
    try:
        pages = {
            "deep": ListSpec("waiting", 100, WAITING - 50),
            "filtered, last": ListSpec("waiting", 100, 0, JobFilter(module="tail")),
            "filtered, none": ListSpec("waiting", 100, 0, JobFilter(name="nobody")),
            "filtered, deep": ListSpec("waiting", 10, WAITING // 3 - 5, JobFilter(name="n1")),
        }
        held, got = {}, {}
        for name, spec in pages.items():
            reply, held[name] = await _longest_hold(queue.list_jobs(spec))
            got[name] = [(j["id"], j["position"]) for j in reply["waiting"]]
        assert max(held.values()) < WAITING // 5, held  # (the whole line: 100,000s)
    finally:
        await queue.stop(0)
    # The busy sleep job is first in line (priority 10), then the echo jobs by id, the tail.
    assert got["deep"] == [(WAITING - 49 + n, WAITING - 50 + n) for n in range(52)]
    assert got["filtered, last"] == [(WAITING + 2, WAITING + 1)]
    assert got["filtered, none"] == []
    n1 = [jid for jid in range(2, WAITING + 2) if jid % 3 == 1]  # named n1 (_seed)
    assert got["filtered, deep"] == [(jid, jid - 1) for jid in n1[WAITING // 3 - 5 :]]


def test_a_deep_page_reads_the_line_as_it_was_while_jobs_come(make_service, tmp_path):
    # The walk gives the loop back, so jobs are added while it reads the line: jobs of a
    # higher priority move entries about in the line's heap.
    # The page is read from the line as it was when the walk began: a run of the seeded
    # jobs in order, each once, with their positions (a walk of the heap itself, moved
    # under it, read entries twice, or passed them).
    _seed(tmp_path, WAITING)
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 1000000\n")
    wait_until(lambda: status(svc, 1)["state"] == "running", 30)
    address, added, stop = f"{svc.tcp[0]}:{svc.tcp[1]}", [], threading.Event()

    def adding() -> None:  # batches of 50, each ahead of every seeded job
        with Client(address, timeout=60) as bg:
            while not stop.is_set():
                added.extend(bg.add_many([("echo", b"hi", {"priority": 5})] * 50))

    adder = threading.Thread(target=adding)
    adder.start()
    positions = []  # the last seeded job's: (added before, jobs ahead but the seeded, after)
    try:
        wait_until(lambda: len(added) >= 100)
        before = len(added)
        with Client(address, timeout=60) as bg:
            page = bg.list("waiting", limit=1000, offset=WAITING - 2000)["waiting"]
            added_during = len(added) - before
            for _ in range(5):  # (the count gives the loop back too: jobs come meanwhile)
                low = len(added)
                position = bg.status(WAITING + 1)["position"]
                positions.append((low, position - (WAITING - 1), len(added) + 50))
    finally:
        stop.set()
        adder.join()
    ids = [j["id"] for j in page]
    first = ids[0]
    assert ids == list(range(first, first + 1000)), ids[:5]
    # The jobs of priority 5 added before the walk began are ahead of them: the positions
    # count those (and the busy job, running, is in no line); a batch in line as the walk
    # began may have its ids back after the page: the 50.
    ahead = WAITING - 2000 - (first - 2)
    assert before <= ahead <= before + added_during + 50, (before, ahead, added_during)
    assert [j["position"] for j in page] == [first - 2 + ahead + n for n in range(1000)]
    assert all(low <= ahead <= high for low, ahead, high in positions), positions


async def _turns(report: Awaitable[T]) -> tuple[T, int]:
    """``report`` awaited, and how many times it gave the loop back meanwhile (a callback
    that schedules itself again each turn counts them)."""
    loop, turns, done = asyncio.get_running_loop(), 0, False

    def turn() -> None:
        nonlocal turns
        turns += 1
        if not done:
            loop.call_soon(turn)

    loop.call_soon(turn)
    try:
        result = await report
    finally:
        done = True
    return result, turns


async def test_a_position_deep_in_line_gives_the_loop_back_as_it_counts(tmp_path):
    # The position of a job deep in a line of 100,000 compared every entry ahead at C
    # speed in one turn of the loop (9 ms here): every other client waited. Now the count
    # gives the loop back every SLICE entries (and once before, after the walk from the
    # top that finds few ahead); exact as before when nothing changes meanwhile.
    _seed(tmp_path, WAITING)
    queue = recovered_queue(tmp_path / "jobs.db")
    await queue.start()
    try:
        got = {}
        for jid in (WAITING + 1, 2 + WAITING // 2, 3):  # the last, the middle, the second
            reply, turns = await _turns(queue.status(jid))
            got[jid] = (reply["position"], turns)
    finally:
        await queue.stop(0)
    # No worker: the sleeping job (priority 10) waits first, then the echo jobs by id.
    positions = {jid: position for jid, (position, _) in got.items()}
    assert positions == {WAITING + 1: WAITING, 2 + WAITING // 2: WAITING // 2 + 1, 3: 2}, got
    assert min(turns for jid, (_, turns) in got.items() if jid != 3) >= WAITING // SLICE, got


async def test_a_page_past_the_line_into_100000_dependents_gives_the_loop_back(tmp_path):
    # 100,000 jobs waiting on job 2 (after=2), in no line: a page that goes past the line
    # lists them, ordered, after it. Each page read and ordered every one of them in one
    # turn of the loop (a first page too, though the line filled it); now a first page the
    # line fills reads none, and one past it gives the loop back as it reads them.
    now = time.time()
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.execute(INSERT, _row(1, "waiting", now))
        conn.execute(INSERT, _row(2, "waiting", now))
        conn.executemany(INSERT, (_row(i, "waiting", now, after="2")
                                  for i in range(3, WAITING + 3)))  # fmt: skip
    queue = recovered_queue(tmp_path / "jobs.db")
    await queue.start()
    try:
        held, got = {}, {}
        for name, spec in {
            "first": ListSpec("waiting", 1, 0),
            "past the line": ListSpec("waiting", 5, 0),
            "deep among them": ListSpec("waiting", 5, WAITING - 3),
            "filtered": ListSpec("waiting", 3, 1, JobFilter(name="nobody")),
        }.items():
            reply, held[name] = await _longest_hold(queue.list_jobs(spec))
            got[name] = [(j["id"], j["position"]) for j in reply["waiting"]]
        assert held["first"] < 1000, held  # (the line's one job: no dependent read)
        assert max(held.values()) < WAITING // 5, held
    finally:
        await queue.stop(0)
    assert got["first"] == [(1, 0)]
    assert got["past the line"] == [(1, 0), (2, 1), (3, None), (4, None), (5, None)]
    assert got["deep among them"] == [(WAITING - 2 + n, None) for n in range(5)]  # to the last
    assert got["filtered"] == []


async def test_jobs_that_come_due_during_a_count_are_counted_once() -> None:
    # The count gives the loop back, and the line's timer moves delayed jobs whose time
    # came into their module's heap meanwhile: counted as come due at the start, then met
    # again in a heap read live after the move, they were counted twice (1,000 over here).
    jobs: dict[int, Job] = {}
    line = WaitingLine(jobs.get, lambda: None)

    def placed(module: str, run_at: float) -> Job:
        jid = len(jobs) + 1
        job = jobs[jid] = Job(id=jid, module=module, data=b"", state=JobState.WAITING, priority=0,
                              run_at=run_at, created=run_at)  # fmt: skip
        line.place(job)
        return job

    now = time.time()
    soon = [placed("b", now + 0.05) for _ in range(1000)]
    for _ in range(20_000):
        placed("a", now - 1)
    line._ready = {"a": line._ready.pop("a"), "b": []}  # (b's heap read after a's)
    last = placed("a", now - 1)
    time.sleep(max(0.0, soon[-1].run_at - time.time()) + 0.01)  # due; the timer not run yet
    try:
        assert await line.position(last) == len(jobs) - 1
        assert line._ready["b"], "the timer moved none during the count: nothing tested"
    finally:
        line.close()


def test_a_job_that_ends_while_its_position_is_counted_has_none(make_service, modules_dir):
    # queue:status read the job's state after the count, which gives the loop back: a
    # cancel pipelined behind it, served meanwhile, made a reply "cancelled" with a
    # position and a finished time.
    write_module(modules_dir, "gate", GATE)
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 100000\n")
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        held = bg.add("gate", str(modules_dir / "never"))
        wait_until(lambda: bg.status(held)["state"] == "running")
        jobs = bg.add_many([("echo", b"x")] * 30_000)
        replies = []
        for jid in jobs[-10:]:
            status, cancelled = bg.requests([b"queue:status:id:%d" % jid,
                                             b"queue:cancel:id:%d" % jid])  # fmt: skip
            assert cancelled == (200, b"cancelled"), cancelled
            replies.append(json.loads(status[1]))
    for job in replies:  # waiting with its place, or cancelled without one
        shown = (job["state"], job["position"] is None, job["finished"] is None)
        assert shown in {("waiting", False, True), ("cancelled", True, False)}, job
