"""Checkpoints against a real service: a job saves where it got to, and the next attempt
(after a killed worker process, a service killed with SIGKILL, a retry) resumes there,
in every execution mode and on both engines."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import wait_until, write_module
from tests.queue_helpers import add, status

LOOP = """
import asyncio

async def handle_tcp(request):
    job = request.job
    start = int(job.checkpoint or 0)
    for step in range(start, 12):
        await job.save_checkpoint(str(step + 1))
        await asyncio.sleep(0.15)
    return f"resumed at {start}"
"""

PROCESS = """
import os
import time
from pathlib import Path

EXECUTION = "process"

def handle_tcp(request):
    job = request.job
    start = int(job.checkpoint or 0)
    Path(request.text).write_text(str(os.getpid()))
    for step in range(start, 12):
        job.save_checkpoint(str(step + 1))
        time.sleep(0.15)
    return f"resumed at {start}"
"""

THREAD = """
def handle_tcp(request):
    job = request.job
    start = int(job.checkpoint or 0)
    if start == 0:
        job.save_checkpoint("7")
        raise RuntimeError("cut short after step 7")
    return f"resumed at {start}"
"""

BIG = """
async def handle_tcp(request):
    await request.job.save_checkpoint("x" * 11)
    return "saved"
"""


def checkpoint(svc, jid: int) -> int:
    return int(status(svc, jid)["checkpoint"] or 0)


def resumed_at(svc, jid: int) -> int:
    reply = svc.call(b"queue:get:id:%d" % jid, timeout=60)
    assert reply.startswith(b"resumed at "), reply
    return int(reply.split()[-1])


@pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
def test_a_job_resumes_from_its_checkpoint_after_the_service_is_killed(
    make_service, modules_dir
):
    write_module(modules_dir, "steps", LOOP)
    svc = make_service()
    jid = add(svc, b"queue:add:steps:")
    wait_until(lambda: checkpoint(svc, jid) >= 3, timeout=15)
    svc.signal(signal.SIGKILL)
    svc.wait()
    again = make_service()
    saved = checkpoint(again, jid)
    assert saved >= 3
    assert resumed_at(again, jid) >= saved - 1  # the new attempt began where the last one got
    resumed = status(again, jid)  # (the attempt the kill cut was given back)
    assert (resumed["attempts"], resumed["interruptions"]) == (1, 1)


@pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
def test_a_process_job_resumes_after_its_worker_is_killed(make_service, modules_dir, tmp_path):
    write_module(modules_dir, "crunch", PROCESS)
    svc = make_service()
    pid_file = tmp_path / "worker.pid"
    jid = add(svc, b"queue:add?retries=2&backoff=0.1:crunch:%s" % str(pid_file).encode())
    wait_until(lambda: pid_file.exists() and checkpoint(svc, jid) >= 3, timeout=20)
    first_worker = int(pid_file.read_text())
    at_kill = checkpoint(svc, jid)
    os.kill(first_worker, signal.SIGKILL)
    start = resumed_at(svc, jid)
    assert start >= at_kill  # not from 0: from what the killed attempt saved
    assert int(pid_file.read_text()) != first_worker  # a new worker ran it
    job = status(svc, jid)
    assert job["attempts"] == 2 and job["checkpoint"] == "12"


def test_a_thread_job_resumes_on_its_retry(make_service, modules_dir):
    write_module(modules_dir, "cut", THREAD)
    svc = make_service()
    jid = add(svc, b"queue:add?retries=1&backoff=0.1:cut:")
    assert resumed_at(svc, jid) == 7
    assert status(svc, jid)["attempts"] == 2


def test_a_checkpoint_over_the_limit_is_refused(make_service, modules_dir):
    write_module(modules_dir, "big", BIG)
    svc = make_service("[queue]\nmax_checkpoint_bytes = 10\n")
    jid = add(svc, b"queue:add:big:")
    reply = svc.call(b"queue:get:id:%d" % jid)
    assert reply.startswith(b"500: ") and b"checkpoint of 11 bytes" in reply, reply
    assert b"max_checkpoint_bytes is 10" in reply
    assert status(svc, jid)["checkpoint"] is None


CATCHING = """
def handle_tcp(request):
    caught = []
    for value in ("x" * 11, 5):  # over the limit, and not text
        try:
            request.job.save_checkpoint(value)
        except (TypeError, ValueError) as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
    return "; ".join(caught)
"""


@pytest.mark.parametrize("execution", ["thread", "process"])
def test_a_refused_checkpoint_raises_the_same_in_a_worker_process(
    make_service, modules_dir, execution
):
    # docs/modules.md: over the limit, ValueError. A process worker once raised ReplyError
    # (a module's `except ValueError` did not catch it).
    source = CATCHING if execution == "thread" else 'EXECUTION = "process"\n' + CATCHING
    write_module(modules_dir, "catching", source)
    svc = make_service("[queue]\nmax_checkpoint_bytes = 10\n")
    jid = add(svc, b"queue:add:catching:")
    assert svc.call(b"queue:get:id:%d" % jid) == (
        b"ValueError: checkpoint of 11 bytes: [queue] max_checkpoint_bytes is 10; "
        b"TypeError: a checkpoint is text (json.dumps a structure), not int"
    )


STALE = """
import time
from pathlib import Path

def wait_for(path):
    deadline = time.time() + 20
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)

def handle_tcp(request):
    job, folder = request.job, Path(request.text)
    if job.attempt == 1:
        wait_for(folder / "attempt2")  # timed out meanwhile: its thread goes on regardless
        job.progress(9, message="attempt 1 (timed out long ago)")
        try:
            job.save_checkpoint("written by attempt 1")
            saved = "stored"
        except RuntimeError as exc:
            saved = type(exc).__name__
        (folder / "attempt1").write_text(f"{saved} cancelled={job.cancelled}")
        return "attempt 1"
    job.save_checkpoint("written by attempt 2")
    job.progress(1, message="attempt 2")
    (folder / "attempt2").write_text("")
    wait_for(folder / "looked")  # the test has read the status
    return f"{job.checkpoint} cancelled={job.cancelled}"
"""


@pytest.mark.parametrize("queue_backend", ["sqlite", "redis"])
def test_a_timed_out_thread_writes_nothing_into_the_next_attempt(
    make_service, modules_dir, tmp_path
):
    # A def handler's thread runs on past its timeout. Its progress and checkpoint once
    # landed in the job's next attempt (the embedded engine keeps one Job for all of them):
    # queue:status showed them, the new attempt read them back, and the old thread saw the
    # new attempt's cancel flag.
    write_module(modules_dir, "stale", STALE)
    folder = tmp_path / "stale"
    folder.mkdir()
    svc = make_service()
    jid = add(svc, b"queue:add?timeout=2&retries=1&backoff=0.05:stale:%s" % bytes(folder))
    wait_until(lambda: (folder / "attempt1").exists(), timeout=20)
    time.sleep(0.3)  # a progress report would have been copied by now (Redis: 50 ms)
    job = status(svc, jid)
    (folder / "looked").write_text("")
    assert (job["state"], job["attempts"]) == ("running", 2)
    assert job["progress"]["message"] == "attempt 2"
    assert job["checkpoint"] == "written by attempt 2"
    assert (folder / "attempt1").read_text() == "AttemptOver cancelled=True"
    reply = svc.call(b"queue:get:id:%d" % jid, timeout=30)
    assert reply == b"written by attempt 2 cancelled=False"
    assert status(svc, jid)["checkpoint"] == "written by attempt 2"
