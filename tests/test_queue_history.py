"""Run history for every attempt (issue 19, item 8), on both engines: an attempt cut by a
crash is recorded as ``interrupted`` (SQLite: found running at the next start; Redis:
when another instance takes its lease over), so ``queue:stats`` counts it."""

from __future__ import annotations

import json

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
    # It runs again, its first attempt counted and recorded.
    wait_until(lambda: status(svc, jid)["attempts"] == 2, timeout=15)
    window = _window(svc)
    assert window["outcomes"] == {"interrupted": 1}
    assert window["runs"] == 1
    assert json.loads(svc.call(b"queue:stats"))["finished_per_minute"] == 0
    assert svc.call(b"queue:cancel:id:%d" % jid) == b"cancelling"
    assert svc.call(b"queue:get:id:%d" % jid).startswith(b"410:")
    wait_until(lambda: _window(svc)["outcomes"] == {"interrupted": 1, "cancelled": 1})
