"""The threads ``def`` handlers run in (bgservice/threads.py): a handler stuck past its
timeout costs one thread, which is replaced up to ``[limits] stuck_threads``; beyond
that, ``def`` calls are refused with a 503 naming the cause (issue 18, item 2)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import CancelledError

import pytest

from bgservice.threads import CallThreads, ThreadsExhausted
from tests.conftest import wait_until, write_module

# Blocks until the file named in the request exists: a handler stuck past its timeout.
STUCK = """
import time
from pathlib import Path

TIMEOUT = 0.5

def handle_tcp(request):
    gate = Path(request.text)
    while not gate.exists():
        time.sleep(0.02)
    return "freed"
"""

QUICK = """
def handle_tcp(request):
    return "quick"
"""


def test_stuck_threads_are_replaced_up_to_a_bound_then_refused(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "stuck", STUCK)
    write_module(modules_dir, "quick", QUICK)
    svc = make_service("[limits]\nthreads = 2\nstuck_threads = 2\n")
    gate = tmp_path / "gate"
    for _ in range(2):  # every thread of the pool stuck ...
        assert svc.call(b"stuck:%s" % bytes(gate)) == b"504: Module stuck timed out after 0.5 s"
    assert svc.call(b"quick") == b"quick"  # ... and def calls still served, at once
    assert svc.stats()["threads"] == {"size": 2, "busy": 2, "stuck": 2, "stuck_limit": 2}
    assert "handler thread stuck in module stuck" in svc.log()
    for _ in range(2):  # the replacements stuck too: the bound is reached
        assert svc.call(b"stuck:%s" % bytes(gate)).startswith(b"504: ")
    started = time.monotonic()
    reply = svc.call(b"quick")
    assert reply == b"503: No free thread: 4 handler threads are stuck past their timeout"
    # Refused at once, not at its timeout: waiting for a thread would take quick's
    # call_timeout (30 s) and end in a 504; the bound is wide of that, not of "at once".
    assert time.monotonic() - started < 10
    assert svc.call(b"echo:async handlers run on the loop") == b"async handlers run on the loop"
    gate.touch()  # the stuck handlers end: their threads serve again, the extras go
    wait_until(lambda: svc.stats()["threads"]["stuck"] == 0)
    assert svc.call(b"quick") == b"quick"
    assert svc.stop() == 0


UNLOADS = """
from pathlib import Path

async def handle_tcp(request):  # on the loop: served while every thread is stuck
    return "v1"

def unload():
    Path(__file__).with_name("unloaded.txt").write_text("done")
"""


def test_an_unload_hook_runs_while_every_call_thread_is_stuck(
    modules_dir, make_service, tmp_path
):
    # Sync unload hooks ran on the call threads: with those all stuck the hook was
    # skipped, and the log said it "raised".
    write_module(modules_dir, "stuck", STUCK)
    write_module(modules_dir, "unloads", UNLOADS)
    svc = make_service("[limits]\nthreads = 1\nstuck_threads = 0\n")
    gate = tmp_path / "gate"
    assert svc.call(b"stuck:%s" % bytes(gate)).startswith(b"504: ")
    write_module(modules_dir, "unloads", UNLOADS.replace('"v1"', '"v2"'))
    wait_until(lambda: svc.call(b"unloads:x") == b"v2")
    wait_until((modules_dir / "unloaded.txt").exists)
    assert "unload hook of module unloads raised" not in svc.log()
    gate.touch()


def test_a_call_that_waited_for_a_thread_says_so(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "stuck", STUCK)
    write_module(modules_dir, "held", STUCK.replace("TIMEOUT = 0.5", "TIMEOUT = 10"))
    svc = make_service("[limits]\nthreads = 1\nstuck_threads = 1\n")
    gate = tmp_path / "gate"
    got: list[bytes] = []
    first = threading.Thread(target=lambda: got.append(svc.call(b"held:%s" % bytes(gate))))
    first.start()
    wait_until(lambda: svc.stats()["threads"]["busy"] == 1)
    # Queued behind the running call, it never gets a thread before its timeout.
    assert svc.call(b"stuck:%s" % bytes(gate)) == (
        b"504: Module stuck timed out after 0.5 s (no free thread)"
    )
    gate.touch()
    first.join(10)
    assert got == [b"freed"]


RECORDER = """
from pathlib import Path

async def handle_tcp(request):
    with open(Path(__file__).with_name("alerts.jsonl"), "a") as f:
        f.write(request.text + "\\n")
"""


def test_a_stuck_thread_raises_an_error_alert(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "stuck", STUCK)
    write_module(modules_dir, "recorder", RECORDER)
    svc = make_service('[alerts]\nmodule = "recorder"\n')
    gate = tmp_path / "gate"
    assert svc.call(b"stuck:%s" % bytes(gate)).startswith(b"504: ")
    alerts = modules_dir / "alerts.jsonl"
    wait_until(lambda: alerts.exists() and "handler thread stuck" in alerts.read_text())
    alert = json.loads(alerts.read_text().splitlines()[0])
    assert alert["event"] == "error" and alert["module"] == "stuck"
    assert alert["title"].startswith("handler thread stuck in module stuck after its 0.5 s")
    gate.touch()


# --- the pool on its own ----------------------------------------------------------------


def test_the_pool_runs_calls_and_reports_errors():
    pool = CallThreads(2, 1)
    assert pool.submit(lambda a, b: a + b, 1, 2).result(5) == 3
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_abandoned_calls_get_replacements_then_exhaust_the_pool():
    pool = CallThreads(1, 1)
    release = threading.Event()
    first = pool.submit(release.wait)
    wait_until(first.running)
    assert pool.abandon(first) is True
    second = pool.submit(release.wait)
    wait_until(second.running)  # ran on the replacement
    assert pool.abandon(second) is True
    with pytest.raises(ThreadsExhausted):
        pool.submit(print)
    release.set()
    wait_until(lambda: pool.stats()["stuck"] == 0)
    assert pool.submit(lambda: "again").result(5) == "again"
    wait_until(lambda: len(pool.threads()) == 1)  # the spare went away
    pool.shutdown()


def test_never_more_threads_than_size_and_spare():
    # With threads stuck and their spares started, a submit still started a thread of
    # its own whenever fewer than `size` were not stuck: 7 threads for 4 + 2.
    pool = CallThreads(2, 1)
    release = threading.Event()
    stuck = [pool.submit(release.wait) for _ in range(2)]
    wait_until(lambda: all(f.running() for f in stuck))
    assert all(pool.abandon(f) for f in stuck)  # one spare started
    more = [pool.submit(release.wait) for _ in range(3)]
    wait_until(lambda: sum(f.running() for f in more) >= 1)
    assert len(pool.threads()) == 3  # was 4
    release.set()
    for f in more:
        f.result(5)
    pool.shutdown()


def test_a_queued_call_given_up_on_never_runs():
    pool = CallThreads(1, 1)
    release = threading.Event()
    pool.submit(release.wait)
    queued = pool.submit(lambda: "ran")
    assert pool.abandon(queued) is False  # it was waiting: cancelled, no thread stuck
    release.set()
    with pytest.raises(CancelledError):
        queued.result(5)
    assert pool.stats()["stuck"] == 0
    pool.shutdown(cancel_futures=True)


def test_threads_are_daemons():
    pool = CallThreads(1, 1)
    pool.submit(time.sleep, 0).result(5)
    assert all(t.daemon for t in pool.threads())
    pool.shutdown()
