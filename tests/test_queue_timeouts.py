"""A queued job's time limit (issue 19, item 7), on both engines: its own ``timeout=``,
else its module's TIMEOUT, else ``[queue] job_timeout``, else none; never the
``[limits] call_timeout`` meant for a caller waiting on a socket."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_until, write_module

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import add, both_engines, status  # noqa: F401


def _get(svc, command: bytes) -> bytes:
    reply = svc.call(command)
    assert reply.startswith(b"id:"), reply
    return svc.call(b"queue:get:" + reply)


def test_a_job_without_timeout_is_not_cut_by_the_call_timeout(make_service):
    svc = make_service("[limits]\nshutdown_grace = 5.0\ncall_timeout = 0.5\n")
    assert svc.call(b"sleep:1500").startswith(b"504:")  # a direct call: call_timeout
    assert _get(svc, b"queue:add:sleep:1500") == b"slept 1500"  # a job: no limit


def test_job_timeout_limits_jobs_and_module_timeout_and_job_option_win(make_service, modules_dir):
    write_module(
        modules_dir,
        "slow",
        "import asyncio\nTIMEOUT = 30.0\n"
        "async def handle_tcp(r):\n    await asyncio.sleep(float(r.text))\n    return 'ok'\n",
    )
    svc = make_service("[queue]\njob_timeout = 0.5\n")
    # The limits that must not cut a job are far past its sleep (a loaded machine stretches
    # it); those that must, far below it.
    assert _get(svc, b"queue:add:sleep:1500").startswith(b"504: Module sleep timed out after 0.5")
    assert _get(svc, b"queue:add:slow:1.2") == b"ok"  # the module's TIMEOUT wins
    assert _get(svc, b"queue:add?timeout=0.3:slow:1.2").startswith(b"504:")  # the job's wins
    assert _get(svc, b"queue:add?timeout=30:sleep:1000") == b"slept 1000"


def test_job_timeout_accepts_none_and_refuses_nonsense(make_service):
    assert _get(make_service('[queue]\njob_timeout = "none"\n'), b"queue:add:sleep:10")
    svc = make_service('[queue]\njob_timeout = "soon"\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    assert "job_timeout" in svc.log()


# A module whose handler notes when another of its jobs runs beside it ("overlapped"), then
# waits until the file its data names exists (60 s at most): past its job's timeout, as
# Python cannot stop a thread. HELD_ASYNC: the same, an async def that catches every
# cancellation (its timeout's, and GoneOn's again each second) and waits on.
HELD = """
import asyncio, time
from pathlib import Path

{kind} handle_tcp(request):
    here = Path(__file__).parent
    if (here / "running").exists():
        (here / "overlapped").touch()
    (here / "running").touch()
    try:
        for _ in range(6000):
            if Path(request.text).exists():
                return "open"
            {wait}
        return "never opened"
    finally:
        (here / "running").unlink(missing_ok=True)
"""
HELD_DEF = HELD.format(kind="def", wait="time.sleep(0.01)")
HELD_ASYNC = HELD.format(kind="async def", wait="""try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass""")


# On both engines: the Redis engine holds the worker on its instance, and the module's slot
# in Redis (P:held; test_queue_redis.py: across instances, and when the instance dies).
@pytest.mark.parametrize("source", [HELD_DEF, HELD_ASYNC], ids=["def", "async"])
@pytest.mark.parametrize(
    "limits", ["workers = 1", "workers = 4\nmodule_limits = { held = 1 }"], ids=["workers", "limit"]
)
@pytest.mark.parametrize("retries", [0, 1])
def test_a_handler_past_its_jobs_timeout_keeps_its_worker_and_module_slot(
    make_service, modules_dir, tmp_path, limits, source, retries
):
    write_module(modules_dir, "held", source)
    svc = make_service(f"[queue]\n{limits}\n")
    go, already = tmp_path / "go", tmp_path / "already"
    already.touch()
    first = add(svc, b"queue:add?timeout=0.3&retries=%d&backoff=0:held:%s" % (retries, bytes(go)))
    second = add(svc, b"queue:add:held:%s" % bytes(already))
    # Its attempt ends at the timeout (504; or a retry, due at once) while its handler
    # goes on: neither the next job nor the retry starts beside it (freed at the timeout,
    # the slot let them start at once).
    error = wait_until(lambda: status(svc, first)["error"])
    assert error == "Module held timed out after 0.3 s"
    states = [status(svc, j)["state"] for j in (first, second)]
    assert states == ["waiting" if retries else "failed", "waiting"]
    go.touch()  # the handler returns: its slot frees, and the jobs run, one at a time
    ended = b"open" if retries else b"504: " + error.encode()
    assert svc.call(b"queue:get:id:%d" % first) == ended
    assert svc.call(b"queue:get:id:%d" % second) == b"open"
    assert not (modules_dir / "overlapped").exists()


def _stats(svc) -> dict:
    return dict(json.loads(svc.call(b"queue:stats")))


def test_queue_stats_counts_the_workers_held_by_handlers_past_their_jobs_timeout(
    make_service, modules_dir, tmp_path
):
    # The held worker was invisible: "running": 0 on one worker, a job waiting, nothing
    # starting, and nothing in queue:stats to say why.
    write_module(modules_dir, "held", HELD_DEF)
    svc = make_service("[queue]\nworkers = 1\n")
    go = tmp_path / "go"
    assert _stats(svc)["workers_held"] == 0
    first = add(svc, b"queue:add?timeout=0.5&retries=0:held:%s" % bytes(go))
    second = add(svc, b"queue:add:held:%s" % bytes(go))
    wait_until(lambda: status(svc, first)["state"] == "failed")
    # (Redis: the worker is held once the instance has recorded the job's end.)
    wait_until(lambda: _stats(svc)["workers_held"] == 1)
    stats = _stats(svc)  # the handler waits for go: still held
    assert (stats["workers"], stats["workers_held"]) == (1, 1)
    assert (stats["counts"]["running"], stats["counts"]["waiting"]) == (0, 1)
    go.touch()  # the handler returns: its worker frees, and the second job runs
    assert svc.call(b"queue:get:id:%d" % second) == b"open"
    assert _stats(svc)["workers_held"] == 0  # (freed before the second job could start)
