"""A queued job's time limit (issue 19, item 7), on both engines: its own ``timeout=``,
else its module's TIMEOUT, else ``[queue] job_timeout``, else none; never the
``[limits] call_timeout`` meant for a caller waiting on a socket."""

from __future__ import annotations

from tests.conftest import write_module

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import both_engines  # noqa: F401


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
        "import asyncio\nTIMEOUT = 3.0\n"
        "async def handle_tcp(r):\n    await asyncio.sleep(float(r.text))\n    return 'ok'\n",
    )
    svc = make_service("[queue]\njob_timeout = 0.5\n")
    assert _get(svc, b"queue:add:sleep:1500").startswith(b"504: Module sleep timed out after 0.5")
    assert _get(svc, b"queue:add:slow:1.2") == b"ok"  # the module's TIMEOUT wins
    assert _get(svc, b"queue:add?timeout=0.3:slow:1.2").startswith(b"504:")  # the job's wins
    assert _get(svc, b"queue:add?timeout=2:sleep:1000") == b"slept 1000"


def test_job_timeout_accepts_none_and_refuses_nonsense(make_service):
    assert _get(make_service('[queue]\njob_timeout = "none"\n'), b"queue:add:sleep:10")
    svc = make_service('[queue]\njob_timeout = "soon"\n', start=False)
    svc.start(wait=False)
    assert svc.wait() == 2
    assert "job_timeout" in svc.log()
