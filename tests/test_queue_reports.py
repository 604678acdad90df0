"""What ``queue:list`` shows, in which order, on both engines: waiting jobs in the order
they will run (due ones by priority and age, then delayed ones by due time, then on the
embedded engine the ones waiting for another job), finished ones newest finished first,
with the progress their handler last reported."""

from __future__ import annotations

import json
import time

from tests.conftest import wait_until, write_module

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import add, both_engines, status  # noqa: F401

REPORTER = """
def handle_tcp(request):
    request.job.progress(3, 7, "step " + request.text)
    if request.text == "fail":
        raise RuntimeError("failed on purpose")
    return "reported"
"""


def _listed(svc, query: bytes) -> list[dict]:
    (jobs,) = json.loads(svc.call(b"queue:list?" + query)).values()
    return list(jobs)


def test_delayed_jobs_are_listed_by_due_time_not_by_priority(service):
    # Listed by priority before due time, the job due last (ordB, priority 5) came first.
    a = add(service, b"queue:add?delay=10&priority=0&name=ordA:echo:a")
    b = add(service, b"queue:add?delay=50&priority=5&name=ordB:echo:b")
    c = add(service, b"queue:add?delay=30&priority=-5&name=ordC:echo:c")
    listed = _listed(service, b"state=waiting")
    assert [(j["id"], j["name"]) for j in listed] == [(a, "ordA"), (c, "ordC"), (b, "ordB")]
    assert [j["position"] for j in listed] == [None, None, None]


def test_waiting_jobs_are_listed_and_paged_in_the_order_they_will_run(
    make_service, queue_backend
):
    svc = make_service("[queue]\nworkers = 1\n")
    busy = add(svc, b"queue:add:sleep:20000")
    wait_until(lambda: status(svc, busy)["state"] == "running")
    # Waiting on the running job: first by priority, though it runs after all the others.
    blocked = add(svc, b"queue:add?after=%d&priority=100:echo:blocked" % busy)
    late = add(svc, b"queue:add?delay=40&priority=9:echo:late")
    plain = [add(svc, b"queue:add:echo:%d" % n) for n in range(3)]
    soon = add(svc, b"queue:add?delay=20&priority=-9:echo:soon")
    urgent = add(svc, b"queue:add?priority=5:echo:urgent")
    due = [urgent, *plain]
    # Redis keeps a job waiting for another in no line until that one ends: not listed.
    expected = [*due, soon, late] + ([blocked] if queue_backend == "sqlite" else [])
    listed = _listed(svc, b"state=waiting")
    assert [j["id"] for j in listed] == expected
    positions = {j["id"]: j["position"] for j in listed}
    assert [positions[jid] for jid in expected] == [0, 1, 2, 3] + [None] * (len(expected) - 4)
    pages = [_listed(svc, b"state=waiting&limit=2&offset=%d" % o) for o in range(0, 8, 2)]
    assert [(j["id"], j["position"]) for page in pages for j in page] == [
        (j["id"], j["position"]) for j in listed
    ]


def test_finished_jobs_are_listed_newest_finished_first(make_service):
    svc = make_service()
    slow = add(svc, b"queue:add:sleep:300")
    fast = add(svc, b"queue:add:echo:fastdone")
    assert svc.call(b"queue:get:id:%d" % slow) == b"slept 300"
    listed = _listed(svc, b"state=done&limit=2")
    assert [j["id"] for j in listed] == [slow, fast]
    assert listed[0]["finished"] >= listed[1]["finished"]
    assert [j["id"] for j in _listed(svc, b"state=done&limit=1&offset=1")] == [fast]
    # Cancelled ones too: the one added first, cancelled last, comes first.
    first = add(svc, b"queue:add?delay=60:echo:first")
    second = add(svc, b"queue:add?delay=60:echo:second")
    for jid in (second, first):
        assert svc.call(b"queue:cancel:id:%d" % jid) == b"cancelled"
        time.sleep(0.01)
    assert [j["id"] for j in _listed(svc, b"state=cancelled")] == [first, second]


def test_a_finished_jobs_progress_is_listed_and_kept_over_a_restart(
    make_service, modules_dir, tmp_path, queue_backend
):
    # The embedded store had no progress column: lists read from disk showed null, and
    # so did queue:status once the job left memory (a restart).
    write_module(modules_dir, "reporter", REPORTER)
    svc = make_service("[queue]\nretries = 0\n[http]\nenabled = true\nport = 0\n")
    done = add(svc, b"queue:add:reporter:ok")
    failed = add(svc, b"queue:add:reporter:fail")
    for jid in (done, failed):
        svc.call(b"queue:get:id:%d" % jid)
    reported = {"done": 3, "total": 7, "message": "step ok"}
    assert status(svc, done)["progress"] == reported
    assert _listed(svc, b"state=done")[0]["progress"] == reported
    assert _listed(svc, b"state=failed")[0]["progress"]["message"] == "step fail"
    _, page, _ = svc.http("GET", "/api/v1/jobs?state=done")
    assert page["jobs"]["done"][0]["progress"] == reported
    assert svc.stop() == 0
    restarted = make_service(root=tmp_path)
    assert status(restarted, done)["progress"] == reported
    assert status(restarted, failed)["progress"]["message"] == "step fail"
    assert _listed(restarted, b"state=done")[0]["progress"] == reported


def test_a_delayed_job_come_due_is_listed_where_it_will_run(make_service):
    # Redis listed a delayed job that had come due with the delayed ones (no position)
    # until a claim moved it to the ready line, where its lower id put it first: the
    # listing and queue:status said the other job would run next, and it ran second.
    svc = make_service("[queue]\nworkers = 1\n")
    busy = add(svc, b"queue:add:sleep:20000")
    wait_until(lambda: status(svc, busy)["state"] == "running")
    came_due = add(svc, b"queue:add?delay=0.3:echo:came-due")
    ready = add(svc, b"queue:add:echo:ready")
    run_at = status(svc, came_due)["run_at"]
    wait_until(lambda: time.time() > run_at + 0.05)
    listed = _listed(svc, b"state=waiting")
    assert [(j["id"], j["position"]) for j in listed] == [(came_due, 0), (ready, 1)]
    assert [status(svc, jid)["position"] for jid in (came_due, ready)] == [0, 1]
