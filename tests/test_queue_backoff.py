"""A retry's backoff (queue/engine.py's decide): each wait shortened at random by up to
``[queue] backoff_jitter`` of it, so jobs that failed together come back spread out; on
both engines."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_until, write_module
from tests.queue_helpers import add, both_engines, status  # noqa: F401

BROKEN = "def handle_tcp(request):\n    raise RuntimeError('database down')\n"
JOBS = 20


def failed_once(svc, jobs: list[int]) -> list[float]:
    """Each job's ``run_at`` once its first attempt failed and it waits out its backoff."""
    infos = [wait_until(lambda j=j: (s := status(svc, j))["state"] == "waiting"
                        and s["attempts"] == 1 and s) for j in jobs]  # fmt: skip
    return [info["run_at"] for info in infos]


@pytest.mark.parametrize("jitter", ["", "backoff_jitter = 0\n"])
def test_jobs_failing_together_come_back_spread_out(modules_dir, make_service, jitter):
    # Without jitter, jobs that failed in the same second (their database down) all came
    # back in the same second, as many retries as jobs at once, every doubling alike.
    write_module(modules_dir, "broken", BROKEN)
    svc = make_service(f"[queue]\nworkers = 4\n{jitter}")
    wait_until(lambda: svc.call(b"broken:x").startswith(b"500:"))
    before = time.time()
    jobs = [add(svc, b"queue:add?retries=1&backoff=60:broken:%d" % k) for k in range(JOBS)]
    run_at = failed_once(svc, jobs)
    after = time.time()
    if jitter:  # exactly the backoff after each failure
        assert all(before + 60 <= due <= after + 60 for due in run_at), run_at
        return
    # Between 75 % and 100 % of the backoff (the default, a quarter), and spread: that no
    # job of 20 came back 2 s early or more has a chance of (2/15)**20.
    assert all(before + 45 <= due <= after + 60 for due in run_at), run_at
    assert min(run_at) < before + 58, run_at
