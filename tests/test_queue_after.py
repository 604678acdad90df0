"""Several dependencies (issue 19, item 3), on both engines: ``after=1,2,3`` runs a job once
all three are done and fails it with 424 as soon as one fails or is cancelled; any option
given twice is a 400 naming it, over the socket and over HTTP."""

from __future__ import annotations

import sqlite3
import time

import pytest

from bgservice.client import Client
from bgservice.queue.sqlite_schema import SCHEMA
from tests.conftest import GATE, Framed, wait_until, write_module

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import add, both_engines, status  # noqa: F401
from tests.test_queue_scale_store import INSERT, _row

API = "/api/v1"
HTTP = "[http]\nenabled = true\nport = 0\n"


def test_fan_in_over_three_dependencies(service):
    a, b, c = (add(service, b"queue:add:sleep:%d" % ms) for ms in (200, 500, 900))
    fan_in = add(service, b"queue:add?after=%d,%d,%d:echo:all done" % (a, b, c))
    assert status(service, fan_in)["after"] == [a, b, c]
    wait_until(lambda: status(service, b)["state"] == "done")
    assert status(service, fan_in)["state"] == "waiting"  # c still runs
    assert status(service, fan_in)["position"] is None
    assert service.call(b"queue:get:id:%d" % fan_in) == b"all done"
    assert status(service, fan_in)["started"] >= status(service, c)["finished"]


def test_one_failed_or_cancelled_dependency_fails_the_job_at_once(service):
    long = add(service, b"queue:add:sleep:3000")
    failing = add(service, b"queue:add?delay=0.3:sleep:not a number")  # fails when it runs
    dependent = add(service, b"queue:add?after=%d,%d:echo:x" % (long, failing))
    reply = service.call(b"queue:get:id:%d" % dependent)
    assert reply == b"424: Dependency: job %d failed" % failing
    assert status(service, long)["state"] == "running"  # as soon as one failed
    held = add(service, b"queue:add?delay=60:echo:later")
    second = add(service, b"queue:add?after=%d,%d:echo:y" % (long, held))
    assert service.call(b"queue:cancel:id:%d" % held) == b"cancelled"
    reply = service.call(b"queue:get:id:%d" % second)
    assert reply == b"424: Dependency: job %d cancelled" % held
    # Its other dependency finishing later changes nothing; a retried job runs alone.
    assert service.call(b"queue:retry:id:%d" % second) == b"id:%d" % second
    assert service.call(b"queue:get:id:%d" % second) == b"y"
    assert service.call(b"queue:get:id:%d" % long) == b"slept 3000"
    assert status(service, second)["state"] == "done"


def test_add_refuses_a_failed_or_unknown_dependency_among_several(service):
    ok = add(service, b"queue:add:echo:fine")
    assert service.call(b"queue:get:id:%d" % ok) == b"fine"
    bad = add(service, b"queue:add:sleep:nope")
    service.call(b"queue:get:id:%d" % bad)
    assert service.call(b"queue:add?after=%d,%d:echo:x" % (ok, bad)) == b"424: Job %d failed" % bad
    reply = service.call(b"queue:add?after=%d,987654:echo:x" % ok)
    assert reply == b"404: Job 987654 not found (unknown or expired)"
    assert add(service, b"queue:add?after=%d,%d:echo:z" % (ok, ok))  # done ones: runs now
    assert service.call(b"queue:add?after=1,,2:echo:x").startswith(b"400: option after")


def test_add_refuses_a_dependency_whose_cancel_was_acknowledged(
    make_service, modules_dir, tmp_path
):
    # Found by a review of the job features: after= a "cancelling" job (running, its
    # cancel acknowledged: it ends cancelled) was taken, and failed with 424 once the
    # handler ended, where the jobs already waiting on it failed at the cancel.
    write_module(modules_dir, "gate", GATE)
    svc = make_service()
    gate = tmp_path / "open"
    running = add(svc, b"queue:add:gate:" + str(gate).encode())
    wait_until(lambda: status(svc, running)["state"] == "running")
    assert svc.call(b"queue:cancel:id:%d" % running) == b"cancelling"
    reply = svc.call(b"queue:add?after=%d:echo:x" % running)
    assert reply == b"424: Job %d cancelled" % running
    gate.touch()
    assert svc.call(b"queue:get:id:%d" % running) == b"410: Job %d cancelled" % running


@pytest.mark.parametrize(
    "command, option",
    [
        (b"queue:add?after=1&after=2:echo:x", b"after"),
        (b"queue:add?priority=1&priority=1:echo:x", b"priority"),
        (b"queue:add?unique=a&delay=1&unique=b:echo:x", b"unique"),
        (b"queue:list?limit=5&limit=6", b"limit"),
    ],
)
def test_an_option_given_twice_is_refused_naming_it(service, command, option):
    assert service.call(command) == b"400: option %s: given more than once" % option


def test_http_takes_a_list_and_refuses_a_field_given_twice(make_service):
    svc = make_service(HTTP)
    first = add(svc, b"queue:add:sleep:300")
    second = add(svc, b"queue:add:echo:2")
    code, body, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "data": "x",
                                                    "after": [first, second]})  # fmt: skip
    assert code == 201, body
    assert body["after"] == [first, second]
    assert svc.call(b"queue:get:id:%d" % body["id"]) == b"x"
    code, body, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "after": first})
    assert (code, body["after"]) == (201, [first])
    raw = b'{"module": "echo", "after": 1, "after": 2}'
    code, body, _ = svc.http("POST", f"{API}/jobs", raw)
    assert code == 400 and "field after: given more than once" in body["error"]["message"]
    code, body, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "after": []})
    assert code == 400 and "field after" in body["error"]["message"]
    code, body, _ = svc.http("GET", f"{API}/queue/stats?window=60&window=120")
    assert code == 400 and "given more than once" in body["error"]["message"]


def test_rows_written_before_several_ids_read_back():
    from bgservice.queue.job import Job, read_after

    assert read_after(None) == () and read_after(7) == (7,) and read_after("3,4") == (3, 4)
    assert read_after(b"5") == (5,)
    row = (1, "echo", b"", "waiting", 0, 1.0, 1.0, None, None, 0, 0, 1.0, None, None, 9,
           None, None, None, 0, None, None, None, None, None)  # fmt: skip
    assert Job.from_row(row).after == (9,)
    assert Job.from_row(row).row()[14] == "9"


SLOW_FAILURE = """
import asyncio
from bgservice import ReplyError

async def handle_tcp(request):
    await asyncio.sleep(1.0)
    raise ReplyError(500, "boom")
"""


@pytest.mark.parametrize("queue_backend", ["sqlite"])  # (Redis: one script ends them)
def test_a_dependency_failing_during_the_stop_fails_its_dependents_before_it(
    make_service, tmp_path
):
    """A job fails within the stop's grace: the jobs after= it fail before the service is
    gone, not at the next start, which would judge them by the dependency as it is then
    (here its result expired while the service was down: taken as done, the dependent
    ran; found in review, 2026-12-05)."""
    svc = make_service("[queue]\nworkers = 1\nkeep_results = 3\n", start=False)
    write_module(svc.modules, "boom", SLOW_FAILURE)
    svc.start()
    first = add(svc, b"queue:add:boom:x")
    after = add(svc, b"queue:add?after=%d:echo:ran" % first)
    wait_until(lambda: status(svc, first)["state"] == "running")
    assert svc.stop() == 0  # the failure comes 1 s into the 5 s grace
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        stored = dict(conn.execute("SELECT id, state FROM jobs"))
    assert stored == {first: "failed", after: "failed"}
    time.sleep(3.5)  # past keep_results: both records expire while it is down
    svc.start()
    wait_until(lambda: b'"waiting"' not in svc.call(b"queue:status:id:%d" % after))
    assert svc.call(b"queue:status:id:%d" % after).startswith(b"404")  # expired, never run


def test_a_job_after_two_that_fail_names_the_first_to_fail(make_service):
    """C after=A,B; A, which 1,000 other jobs wait on, is cancelled, then B (only C waits
    on it), in one write: C fails naming A. (On Redis A's jobs were left to later scripts
    while B's cancel failed C at once, naming B.)"""
    svc = make_service("[queue]\nworkers = 1\n")
    busy = add(svc, b"queue:add?priority=10:sleep:60000")
    wait_until(lambda: status(svc, busy)["state"] == "running", timeout=30)
    a, b = add(svc, b"queue:add:echo:a"), add(svc, b"queue:add:echo:b")
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=60) as bg:
        bg.add_many([("echo", b"x", {"after": a})] * 1000)
    c = add(svc, b"queue:add?after=%d,%d:echo:c" % (a, b))
    conn = Framed(svc.tcp, timeout=30)
    conn.send(b"queue:cancel:id:%d" % a, b"queue:cancel:id:%d" % b)
    assert [conn.recv() for _ in range(2)] == [(200, b"cancelled")] * 2
    conn.close()
    wait_until(lambda: status(svc, c)["state"] == "failed", timeout=30)
    assert status(svc, c)["error"] == f"Dependency: job {a} cancelled"


def test_the_jobs_a_dependency_frees_start_in_the_order_they_came(make_service, tmp_path):
    """20,000 jobs after= one, one worker: once it is done, they start in the order they
    were added, as jobs of one priority do (on Redis they were freed 500 at a time, each
    500 picked at random: the first added started 17th)."""
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 100000\n", start=False)
    write_module(svc.modules, "gate", GATE)
    svc.start()
    gate = tmp_path / "open"
    dependency = add(svc, b"queue:add:gate:" + str(gate).encode())
    wait_until(lambda: status(svc, dependency)["state"] == "running", timeout=30)
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=120) as bg:
        ids = bg.add_many([("echo", b"x", {"after": dependency})] * 20_000)
    gate.touch()
    assert svc.call(b"queue:get:id:%d" % ids[-1], timeout=120) == b"x"
    started = sorted((status(svc, jid)["started"], jid) for jid in ids[:300])
    assert [jid for _, jid in started] == ids[:300]


@pytest.mark.parametrize("queue_backend", ["sqlite"])  # (Redis: its work list resumes)
def test_jobs_a_crash_left_waiting_on_a_failed_dependency_fail_though_it_expired(
    make_service, tmp_path
):
    """What a crash in the middle of a cascade leaves, found by the next start after
    keep_results: job 1 failed (its record expired, not swept: no sweep runs while the
    service is down) and jobs 2 to 4 still waiting on it. They fail with it; the expired
    record was taken as done, and they ran (found in review, 2026-12-05)."""
    now = time.time()
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.executescript(SCHEMA)
        conn.execute(INSERT, _row(1, "failed", now, expires=now - 5))
        conn.executemany(INSERT, [_row(jid, "waiting", now, after="1") for jid in (2, 3, 4)])
    svc = make_service()
    for jid in (2, 3, 4):
        wait_until(lambda jid=jid: status(svc, jid)["state"] != "waiting")
        assert status(svc, jid)["state"] == "failed", status(svc, jid)
        assert status(svc, jid)["error"] == "Dependency: job 1 failed"
    assert svc.call(b"queue:status:id:1").startswith(b"404")  # expired, all the same


@pytest.mark.parametrize("queue_backend", ["sqlite"])  # (Redis: its work list holds the state)
def test_no_sweep_deletes_a_failed_dependency_while_its_cascade_goes_on(make_service, tmp_path):
    """Job 1 fails with 150,000 jobs waiting on it: they fail 500 a turn, over a second or
    more, while the sweep (keep_results 0.5 s) comes round. Had the sweep deleted job 1's
    record in the middle, a kill then left the rest waiting on a dependency that is gone,
    which the next start takes for done: they ran (found in review, 2026-12-05). The record
    now stays until its cascade has ended; a kill at any point leaves nothing to run."""
    now, many = time.time(), 150_000
    db = tmp_path / "jobs.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        failing = list(_row(1, "waiting", now))
        failing[1:3] = ["sleep", b"not a number"]  # fails as soon as it runs
        conn.execute(INSERT, failing)
        conn.executemany(INSERT, (_row(jid, "waiting", now, after="1") for jid in
                                  range(2, many + 2)))  # fmt: skip
    svc = make_service("[queue]\nkeep_results = 0.5\n")

    def swept_or_settled() -> bool:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            (dependency,), (waiting,) = conn.execute(
                "SELECT count(*) FROM jobs WHERE id = 1 UNION ALL"
                " SELECT count(*) FROM jobs WHERE state = 'waiting'"
            ).fetchall()
        return not dependency or not waiting

    wait_until(swept_or_settled, timeout=50, interval=0.01)
    assert svc.proc is not None
    svc.proc.kill()
    svc.proc.wait()
    svc = make_service()  # keep_results as by default: what ran would show
    wait_until(lambda: _states(db).get("waiting", 0) == 0 or _states(db).get("done"), timeout=50)
    assert _states(db).get("done", 0) == 0, _states(db)


def _states(db) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
