"""Jobs and the service's stops: a job whose runs end with the service (``[queue]
max_interruptions``, engine.interrupted) runs again a bounded number of times, then
fails; a graceful stop (JobQueue.close, then stop) starts no job, hands back the ones it
cut (engine.handed_back, not an interruption) and tells whoever waits which job waits.
Real services, killed or stopped for real; both engines."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import GATE, wait_until, write_module

# both_engines is the queue_backend fixture: every test here runs on both engines.
from tests.queue_helpers import add, both_engines, status  # noqa: F401

# Counts its runs in the file its data names; then waits for FILE.go and, unless FILE.ok
# exists by then, kills the service it runs in (SIGKILL: no clean stop, as a crash).
CRASH_MODULE = """
import os
import signal
import time
from pathlib import Path

def handle_tcp(request):
    runs = Path(request.text)
    with runs.open("a") as f:
        f.write("x")
    go, ok = runs.with_suffix(".go"), runs.with_suffix(".ok")
    while not go.exists():
        time.sleep(0.01)
    go.unlink()
    if ok.exists():
        return "survived"
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _runs(path: Path) -> int:
    return len(path.read_text()) if path.exists() else 0


def _crash_run(svc, runs: Path, n: int) -> None:
    """Wait for the job's ``n``th run, make sure its start is stored, let it kill ``svc``."""
    wait_until(lambda: _runs(runs) == n, timeout=30)
    # Store writes apply in order: once a later add is acknowledged, "running" is durable.
    add(svc, b"queue:add?delay=600:echo:x")
    runs.with_suffix(".go").touch()
    assert svc.proc.wait(timeout=30) == -9


def _crash_job(modules_dir, make_service, tmp_path, limit: int, options: bytes = b""):
    """A service of ``max_interruptions = limit`` with a crash job: (service, job id, its
    runs file, the config for the next starts)."""
    write_module(modules_dir, "crash", CRASH_MODULE)
    config = f"[queue]\nmax_interruptions = {limit}\n"
    svc = make_service(config)
    runs = tmp_path / "runs"
    jid = add(svc, b"queue:add%s:crash:%s" % (options, str(runs).encode()))
    return svc, jid, runs, config


def test_a_job_that_crashes_the_service_fails_past_max_interruptions(
    modules_dir, make_service, tmp_path
):
    svc, jid, runs, config = _crash_job(modules_dir, make_service, tmp_path, 1)
    _crash_run(svc, runs, 1)
    svc = make_service(config, root=tmp_path)  # interrupted once: it runs again
    _crash_run(svc, runs, 2)
    svc = make_service(config, root=tmp_path)  # twice: more than 1, it fails
    wait_until(lambda: status(svc, jid)["state"] == "failed", timeout=30)
    failed = status(svc, jid)
    assert failed["status"] == 500
    assert failed["interruptions"] == 2
    assert f"Job {jid} interrupted 2 times, more than [queue] max_interruptions (1)" in (
        failed["error"]
    )
    assert svc.call(b"queue:get:id:%d" % jid).startswith(b"500:")
    assert _runs(runs) == 2  # not run a third time
    assert svc.proc.poll() is None
    # An operator who fixed the cause retries it: a fresh count, and it runs.
    (runs.with_suffix(".ok")).touch()
    assert svc.call(b"queue:retry:id:%d" % jid) == b"id:%d" % jid
    assert status(svc, jid)["interruptions"] == 0
    wait_until(lambda: _runs(runs) == 3, timeout=30)
    runs.with_suffix(".go").touch()
    assert svc.call(b"queue:get:id:%d" % jid) == b"survived"


def test_max_interruptions_0_runs_a_job_a_crash_cut_at_most_once(
    modules_dir, make_service, tmp_path
):
    svc, jid, runs, config = _crash_job(modules_dir, make_service, tmp_path, 0, b"?retries=5")
    _crash_run(svc, runs, 1)
    svc = make_service(config, root=tmp_path)
    wait_until(lambda: status(svc, jid)["state"] == "failed", timeout=30)
    assert status(svc, jid)["interruptions"] == 1  # failed for good: retries= is for errors
    assert _runs(runs) == 1


def test_a_graceful_stop_cutting_a_job_is_not_an_interruption(
    modules_dir, make_service, tmp_path
):
    write_module(modules_dir, "crash", CRASH_MODULE)
    config = "[limits]\nshutdown_grace = 0.2\n[queue]\nmax_interruptions = 0\n"
    runs = tmp_path / "runs"
    (runs.with_suffix(".ok")).touch()  # it ends well once let go
    svc = make_service(config)
    jid = add(svc, b"queue:add:crash:" + str(runs).encode())
    for n in (1, 2):
        wait_until(lambda n=n: _runs(runs) == n, timeout=30)
        assert svc.stop() == 0  # SIGTERM: the job outlives the grace, and is handed back
        svc = make_service(config, root=tmp_path)
    wait_until(lambda: _runs(runs) == 3, timeout=30)
    running = status(svc, jid)
    # (the two attempts the stops cut were given back: the third run is attempt 1 again)
    assert (running["state"], running["interruptions"], running["attempts"]) == ("running", 0, 1)
    runs.with_suffix(".go").touch()
    assert svc.call(b"queue:get:id:%d" % jid) == b"survived"


# Counts its runs in the file its data names: the first waits (for a stop or a kill to
# cut it), the second fails, the third says what it saw.
FAILS_ONCE_AFTER_A_CUT = """
import time
from pathlib import Path

def handle_tcp(request):
    runs = Path(request.text)
    with runs.open("a") as f:
        f.write("x")
    ran = len(runs.read_text())
    if ran == 1:
        while True:
            time.sleep(0.05)
    if ran == 2:
        raise RuntimeError("fails once")
    return f"ran {ran} times, attempt {request.job.attempt}"
"""


@pytest.mark.parametrize("cut", ["stop", "kill"])
def test_an_attempt_the_service_cut_takes_none_of_the_jobs_retries(
    modules_dir, make_service, tmp_path, cut
):
    # Found by a review of the job features: a deploy (or a crash) in the middle of a job
    # took one of its retries=, so the handler's one failure after it was final (500).
    write_module(modules_dir, "once", FAILS_ONCE_AFTER_A_CUT)
    config = "[limits]\nshutdown_grace = 0.2\n"
    svc = make_service(config)
    runs = tmp_path / "runs"
    jid = add(svc, b"queue:add?retries=1&backoff=0:once:" + str(runs).encode())
    wait_until(lambda: _runs(runs) == 1, timeout=30)
    if cut == "stop":
        assert svc.stop() == 0
    else:
        add(svc, b"queue:add?delay=600:echo:x")  # (writes apply in order: "running" stored)
        svc.proc.kill()
        assert svc.proc.wait(timeout=30) == -9
    svc = make_service(config, root=tmp_path)
    assert svc.call(b"queue:get:id:%d" % jid, timeout=30) == b"ran 3 times, attempt 2"
    info = status(svc, jid)
    assert (info["attempts"], info["interruptions"]) == (2, int(cut == "kill")), info


@pytest.mark.parametrize("value", ["-1", "1.5", '"3"'])
def test_max_interruptions_must_be_a_whole_number_from_0(make_service, value):
    svc = make_service(f"[queue]\nmax_interruptions = {value}\n", start=False)
    svc.start(wait=False)
    assert svc.proc.wait(timeout=20) == 2
    assert "max_interruptions" in svc.log()


def test_a_job_due_while_the_service_stops_waits_for_the_next_start(
    modules_dir, make_service, tmp_path
):
    # A datagram's handler still running keeps the stop going past the moment a delayed
    # job comes due: the job waits for the next start, not started and refused by the
    # closed dispatcher (failed for good, "503: Shutting down").
    write_module(modules_dir, "gate", GATE.replace("def handle_tcp", "def handle_udp"))
    svc = make_service("[limits]\nshutdown_grace = 20\n")
    gate = tmp_path / "gate.open"
    svc.send_udp(b"gate:" + str(gate).encode())
    wait_until(lambda: svc.stats()["in_flight"].get("gate", 0) == 1)
    jid = add(svc, b"queue:add?delay=1:echo:due")
    svc.signal(signal.SIGTERM)
    svc.wait_for_log("shutting down")
    time.sleep(2)  # the job is due now, the stop still waits for the datagram
    gate.touch()
    assert svc.wait() == 0
    restarted = make_service(root=tmp_path)
    assert restarted.call(b"queue:get:id:%d" % jid) == b"due"
    assert status(restarted, jid)["attempts"] == 1


def test_an_add_and_wait_cut_by_a_stop_names_its_job(modules_dir, make_service, tmp_path):
    write_module(modules_dir, "gate", GATE)
    config = "[limits]\nshutdown_grace = 0.5\n[queue]\nworkers = 1\n"
    svc = make_service(config)
    gate = tmp_path / "gate.open"
    framed = svc.framed()
    # One runs (cut by the stop: handed back), one waits behind it (never started).
    framed.send(b"queue:add?wait=1:gate:" + str(gate).encode(), b"queue:add?wait=1:echo:later")
    wait_until(lambda: json.loads(svc.call(b"queue:stats"))["counts"].get("waiting") == 1)
    svc.signal(signal.SIGTERM)
    replies = [framed.recv(), framed.recv()]
    assert [code for code, _ in replies] == [503, 503]
    assert all(body.endswith(b" is still queued") for _, body in replies), replies
    cut, behind = (int(body.split()[3]) for _, body in replies)
    assert svc.wait() == 0
    gate.touch()
    restarted = make_service(root=tmp_path)
    assert restarted.call(b"queue:get:id:%d" % cut) == b"open"
    assert restarted.call(b"queue:get:id:%d" % behind) == b"later"


SWALLOWS = """
import asyncio

async def handle_tcp(request):
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:  # (a handler that saves what it has, and returns)
        return "saved at the stop"
"""


def test_a_job_that_ends_on_its_own_when_the_stop_cuts_it_is_not_handed_back(
    modules_dir, make_service, tmp_path, queue_backend
):
    # Its task, cancelled, returned: the job was done, and handing it back (done ->
    # waiting) raised in the middle of the stop.
    write_module(modules_dir, "swallows", SWALLOWS)
    config = "[limits]\nshutdown_grace = 0.3\n"
    svc = make_service(config)
    jid = add(svc, b"queue:add:swallows:x")
    wait_until(lambda: status(svc, jid)["state"] == "running")
    assert svc.stop() == 0
    assert "Traceback" not in svc.log()
    restarted = make_service(config, root=tmp_path)
    assert restarted.call(b"queue:get:id:%d" % jid) == b"saved at the stop"
    assert status(restarted, jid)["attempts"] == 1
