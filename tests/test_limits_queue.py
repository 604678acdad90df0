"""The queue's bounds that were hard-coded, now [queue] and [http] keys, and the number
of schedules, once unbounded: one pipelined connection stored 1,189 of them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, wait_until

BOTH = pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
HTTP = "[http]\nenabled = true\nport = 0\n"
API = "/api/v1"
ONE = '[[schedule]]\nname = "from-config"\nmodule = "echo"\nevery = 3600\n'


def add_schedule(name: str, every: int = 3600) -> bytes:
    return f"queue:schedule?name={name}&every={every}:echo:x".encode()


def names(svc) -> set[str]:
    return {s["name"] for s in json.loads(svc.call(b"queue:schedules"))}


def loaded(svc) -> None:
    """Once the schedules are loaded (a 503 for a moment after the start)."""
    from tests.conftest import wait_until

    wait_until(lambda: not svc.call(b"queue:schedules").startswith(b"503"))


# --- max_schedules ----------------------------------------------------------------------


@BOTH
def test_pipelined_adds_stop_at_max_schedules_the_configs_counted(make_service):
    svc = make_service("[queue]\nmax_schedules = 3\n" + ONE)
    loaded(svc)
    conn = svc.framed()
    try:
        conn.send(*(add_schedule(f"s{i}") for i in range(20)))  # all at once, pipelined
        replies = [conn.recv() for _ in range(20)]
    finally:
        conn.close()
    added = [status for status, _ in replies if status == 200]
    refused = [body for status, body in replies if status == 503]
    assert (len(added), len(refused)) == (2, 18), replies  # 3, the config's one included
    assert refused[0] == b"Too many schedules (3, [queue] max_schedules)"
    assert len(names(svc)) == 3 and "from-config" in names(svc)
    # Replacing one is no add; removing one makes room.
    kept = sorted(names(svc) - {"from-config"})
    assert svc.call(add_schedule(kept[0], every=60)).startswith(b"{")
    assert svc.call(add_schedule("late")).startswith(b"503: Too many schedules (3")
    assert svc.call(f"queue:unschedule:{kept[0]}".encode()) == b"removed"
    assert svc.call(add_schedule("late")).startswith(b"{")


def test_max_schedules_refuses_an_http_add_too(make_service):
    svc = make_service(HTTP + "[queue]\nmax_schedules = 1\n")
    loaded(svc)
    body = {"name": "one", "module": "echo", "every": 60}
    assert svc.http("POST", f"{API}/schedules", body)[0] == 201
    status, reply, _ = svc.http("POST", f"{API}/schedules", {**body, "name": "two"})
    assert (status, reply["error"]["message"]) == (
        503,
        "Too many schedules (1, [queue] max_schedules)",
    )
    assert svc.http("POST", f"{API}/schedules", {**body, "every": 120})[0] == 201  # replaced


def test_more_schedules_in_the_config_than_max_schedules_stop_the_start(tmp_path):
    config = tmp_path / "service.config"
    two = ONE + ONE.replace("from-config", "second")
    config.write_text(f'modules = "{REPO / "modules"}"\n[queue]\nmax_schedules = 1\n' + two)
    done = subprocess.run(
        [sys.executable, str(REPO / "service.py"), "-c", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "[queue] max_schedules (line 3): service.config has 2 [[schedule]]" in done.stderr


# --- max_dependencies, max_tag_chars, max_page, max_wait ---------------------------------------


def test_max_dependencies_bounds_after_over_http(make_service):
    svc = make_service(HTTP + "[queue]\nmax_dependencies = 2\n")
    status, reply, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "after": [1, 2, 3]})
    assert status == 400
    assert reply["error"]["message"] == (
        "option after: at most 2 job ids ([queue] max_dependencies)"
    )
    first = svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 60})[1]["id"]
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "after": [first, first]})
    assert (status, job["after"]) == (201, [first])


def test_max_dependencies_can_be_raised(make_service):
    svc = make_service(HTTP + "[queue]\nmax_dependencies = 150\n")
    first = svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 60})[1]["id"]
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "after": [first] * 120})
    assert status == 201, job


def test_max_tag_chars_bounds_a_tag_over_http(make_service):
    svc = make_service(HTTP + "[queue]\nmax_tag_chars = 8\n")
    status, reply, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": ["x" * 9]})
    assert status == 400
    assert "each tag is 1-8 of" in reply["error"]["message"]
    assert "[queue] max_tag_chars" in reply["error"]["message"]
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": ["x" * 8]})
    assert (status, job["tags"]) == (201, ["x" * 8])


def test_max_tag_chars_can_be_raised(make_service):
    svc = make_service(HTTP + "[queue]\nmax_tag_chars = 100\n")
    status, job, _ = svc.http("POST", f"{API}/jobs", {"module": "echo", "tags": ["t" * 80]})
    assert (status, job["tags"]) == (201, ["t" * 80])


def test_max_page_bounds_an_http_page(make_service):
    svc = make_service(HTTP + "[queue]\nmax_page = 3\n")
    for _ in range(5):
        svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 60})
    _, page, _ = svc.http("GET", f"{API}/jobs?state=waiting&page_size=50")
    assert (page["limit"], len(page["jobs"]["waiting"])) == (3, 3)
    assert page["next_page_token"]
    _, default, _ = svc.http("GET", f"{API}/jobs?state=waiting")  # the default 100, bounded
    assert default["limit"] == 3


def test_max_wait_bounds_an_http_wait(make_service):
    svc = make_service(HTTP + "max_wait = 1.5\n")
    job = svc.http("POST", f"{API}/jobs", {"module": "echo", "delay": 60})[1]["id"]
    status, reply, _ = svc.http("GET", f"{API}/jobs/{job}?wait=2")
    assert status == 400
    assert reply["error"]["message"] == "wait: must be 0-1.5 seconds ([http] max_wait)"
    status, reply, _ = svc.http("GET", f"{API}/jobs/{job}?wait=nan")
    assert (status, reply["error"]["message"]) == (
        400,
        "wait: must be 0-1.5 seconds ([http] max_wait)",
    )
    status, reply, _ = svc.http("GET", f"{API}/jobs/{job}?wait=1.5")
    assert (status, reply["state"]) == (200, "waiting")


def test_max_wait_can_be_raised(make_service):
    svc = make_service(HTTP + "max_wait = 900\n")
    job = svc.http("POST", f"{API}/jobs", {"module": "echo"})[1]["id"]
    status, reply, _ = svc.http("GET", f"{API}/jobs/{job}?wait=600")  # done long before
    assert (status, reply["state"]) == (200, "done")


# --- the same over a socket: the engine's part -------------------------------------------------


def test_max_dependencies_and_max_tag_chars_bound_a_tcp_add(make_service):
    svc = make_service("[queue]\nmax_dependencies = 2\nmax_tag_chars = 8\n")
    reply = svc.call(b"queue:add?after=1,2,3:echo:x")
    assert reply == b"400: option after: at most 2 job ids ([queue] max_dependencies)"
    assert b"each tag is 1-8 of" in svc.call(b"queue:add?tags=xxxxxxxxx:echo:x")


def test_max_page_bounds_a_tcp_list(make_service):
    svc = make_service("[queue]\nmax_page = 3\n")
    for _ in range(5):
        svc.call(b"queue:add?delay=60:echo:x")
    assert len(json.loads(svc.call(b"queue:list?state=waiting&limit=50"))["waiting"]) == 3


def test_max_waiting_bytes_bounds_the_data_of_waiting_jobs_in_memory(make_service):
    # The embedded engine keeps each waiting job's data in memory until it ends: 2,000
    # adds of 1 MiB behind a busy worker took the service from 35 MB to 2 GB (a scale
    # review), within max_waiting's 100,000 jobs and nothing else to stop them.
    svc = make_service("[queue]\nworkers = 1\nmax_waiting_bytes = 2500000\n")
    blocker = svc.call(b"queue:add:sleep:1500")
    assert blocker.startswith(b"id:")
    mib = b"x" * (1 << 20)
    first, second = (svc.call(b"queue:add:echo:" + mib) for _ in range(2))
    assert first.startswith(b"id:") and second.startswith(b"id:")
    refused = svc.call(b"queue:add:echo:" + mib)
    assert refused.startswith(b"503: Queue full (") and b"[queue] max_waiting_bytes)" in refused
    assert svc.call(b"queue:add:echo:small").startswith(b"id:")  # small data still fits
    assert svc.call(b"queue:get:" + second[3:]) == mib  # once they ran, their bytes are free
    assert svc.call(b"queue:add:echo:" + mib).startswith(b"id:")


def pipelined(svc, payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """Every request written at once on one framed connection: adds that share a commit."""
    conn = svc.framed()
    try:
        conn.send(*payloads)
        return [conn.recv() for _ in payloads]
    finally:
        conn.close()


@BOTH
def test_max_waiting_holds_for_adds_that_arrive_together(make_service):
    # The embedded engine counted the jobs stored, not the adds on their way to the store:
    # all the adds of one commit passed (64 pipelined adds past a max_waiting of 5). The
    # Redis engine counted waiting jobs only, not running ones (2 workers: 2 more).
    svc = make_service("[queue]\nworkers = 2\nmax_waiting = 3\n")
    replies = pipelined(svc, [b"queue:add:sleep:20000"] * 20)
    added = [body for status, body in replies if status == 200]
    refused = {body for status, body in replies if status != 200}
    assert len(added) == 3 and all(body.startswith(b"id:") for body in added), replies
    assert refused == {b"Queue full (3 jobs)"}, replies
    assert svc.call(b"queue:add:sleep:1") == b"503: Queue full (3 jobs)"  # running count
    for body in added:
        assert svc.call(b"queue:cancel:" + body) in (b"cancelled", b"cancelling")
    wait_until(lambda: svc.call(b"queue:add:echo:x").startswith(b"id:"))  # room again


def test_max_waiting_bytes_holds_for_adds_that_arrive_together(make_service):
    svc = make_service("[queue]\nworkers = 1\nmax_waiting_bytes = 100000\n")
    assert svc.call(b"queue:add:sleep:20000").startswith(b"id:")  # holds the worker
    replies = pipelined(svc, [b"queue:add:echo:" + b"x" * 30000] * 10)
    assert [status for status, _ in replies].count(200) == 3, replies
    assert all(body.startswith(b"Queue full (") for status, body in replies if status != 200)


def test_a_job_larger_than_max_waiting_bytes_is_refused_413_not_told_to_retry(make_service):
    # A job whose data alone passes max_waiting_bytes could never be queued, yet got
    # "503 Queue full (0 bytes, ...)" on an empty queue: a client told to try again later
    # (a Retry-After over HTTP) tried for ever.
    svc = make_service("[queue]\nmax_waiting_bytes = 1000\n")
    refused = svc.call(b"queue:add:echo:" + b"x" * 1001)
    assert refused == b"413: Job too large (1001 bytes, [queue] max_waiting_bytes 1000)"
    assert svc.call(b"queue:add?wait=1:echo:" + b"y" * 1000) == b"y" * 1000  # (fits: runs)


@BOTH
def test_an_add_of_a_held_unique_key_gets_its_job_from_a_full_queue(make_service):
    # The embedded engine counted the room before it looked at the key: an add that adds
    # nothing got 503 Queue full (Redis replied the holder's id). Adds of one key that
    # arrive together wait for the first's id, holding no room, so the others still fit.
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 2\n")
    replies = pipelined(svc, [b"queue:add?unique=u&delay=600:echo:x"] * 5
                        + [b"queue:add?delay=600:echo:%d" % n for n in range(3)])  # fmt: skip
    held = replies[0][1]
    assert held.startswith(b"id:") and replies[:5] == [(200, held)] * 5, replies
    assert replies[5][0] == 200 and replies[5][1] != held, replies
    assert replies[6:] == [(503, b"Queue full (2 jobs)")] * 2, replies
    assert svc.call(b"queue:add?unique=u:echo:y") == held  # full now: still its id
    assert svc.call(b"queue:add?unique=v:echo:z") == b"503: Queue full (2 jobs)"  # a new job
