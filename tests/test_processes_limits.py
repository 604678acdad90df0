"""Process-mode modules at their limits: overload, cut calls, a service that dies, module
errors that must not take a worker (or the service) down."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bgservice.config import WorkerSettings
from bgservice.origin import Origin
from bgservice.processes import ProcessPool, ProcessPools
from bgservice.registry import import_module_file
from bgservice.request import Request
from tests.conftest import wait_until, write_module
from tests.test_processes import _alive

# 20 ms a call, one worker: about 50 calls a second.
QUICK = """
import time
EXECUTION = "process"
PROCESSES = 1
TIMEOUT = 1
def handle_tcp(request):
    time.sleep(0.02)
    return "r"
"""


class _IdleWorker:
    """What ProcessPool.acquire and release look at in a worker, without a process."""

    alive = True
    calls = 0
    current = None


async def test_a_worker_handed_to_a_caller_that_gave_up_goes_back_to_the_pool(tmp_path):
    pool = ProcessPool("m", tmp_path, WorkerSettings(processes=1), grace=1)
    worker = _IdleWorker()
    pool.workers.add(worker)  # type: ignore[arg-type]
    waiting = asyncio.get_running_loop().create_task(pool.acquire())
    await asyncio.sleep(0)  # in line: the one worker is busy
    assert len(pool.waiters) == 1
    pool.release(worker)  # type: ignore[arg-type]  # handed to the caller in line...
    waiting.cancel()  # ...whose timeout fires before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.idle == [worker]
    assert await asyncio.wait_for(pool.acquire(), 1) is worker


def _hammer(svc, request: bytes, callers: int, seconds: float) -> list[bytes]:
    replies: list[bytes] = []
    end = time.monotonic() + seconds

    def load() -> None:
        while time.monotonic() < end:
            replies.append(svc.call(request, timeout=30))

    threads = [threading.Thread(target=load) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_an_overloaded_pool_serves_and_keeps_its_worker(modules_dir, make_service):
    write_module(modules_dir, "quick", QUICK)
    svc = make_service()
    assert svc.call(b"quick:x") == b"r"
    replies = _hammer(svc, b"quick:x", callers=60, seconds=4)
    waited_out = b"504: Module quick timed out after 1 s (no free worker)"
    assert set(replies) <= {b"r", waited_out}, set(replies)
    assert b"r" in replies and waited_out in replies  # it was overloaded
    # No call started with too little time left to finish: the worker was never killed,
    # and it still serves (none lost to a caller that gave up as it was handed over).
    assert "killing worker" not in svc.log()
    assert svc.call(b"quick:x") == b"r"
    assert svc.stats()["workers"]["quick"] == {"processes": 1, "busy": 0, "started": 1}


async def test_a_cut_call_kills_its_worker_instead_of_pooling_it(tmp_path):
    (tmp_path / "nap.py").write_text(
        'import time\nEXECUTION = "process"\ndef handle_tcp(request):\n    time.sleep(30)\n'
    )
    version = import_module_file("nap", tmp_path / "nap.py")
    pools = ProcessPools(tmp_path, WorkerSettings(processes=1), grace=5)
    try:
        call = asyncio.get_running_loop().create_task(
            pools(version, Request("nap", b"", Origin.TCP), 60)
        )
        pool = await _when(lambda: pools.pools.get("nap"))
        worker = await _when(lambda: next(iter(pool.workers), None))
        await _when(lambda: worker.current is not None)
        call.cancel()  # what a stop does to the calls still running after its grace
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not pool.idle and not worker.alive  # never handed to another call
        await _when(lambda: not _alive(worker.proc.pid))
    finally:
        await pools.close()


async def _when(condition: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, condition
        await asyncio.sleep(0.01)
    return value


BUSY = """
import os, time
from collections.abc import Callable
from pathlib import Path
from typing import Any
EXECUTION = "process"
TIMEOUT = 300
def handle_tcp(request):
    Path(__file__).with_name("busy.pid").write_text(str(os.getpid()))
    time.sleep(120)
"""


def test_a_busy_worker_dies_with_a_killed_service(modules_dir, make_service):
    write_module(modules_dir, "busy", BUSY)
    svc = make_service()
    with socket.create_connection(svc.tcp, timeout=30) as client:
        client.sendall(b"busy:x")
        client.shutdown(socket.SHUT_WR)
        pid_file = modules_dir / "busy.pid"
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
        assert _alive(pid)
        svc.signal(signal.SIGKILL)
        svc.wait()
        wait_until(lambda: not _alive(pid))


def test_add_job_failing_unexpectedly_is_the_handlers_error(modules_dir, make_service):
    write_module(
        modules_dir,
        "padd",
        """
        EXECUTION = "process"
        TIMEOUT = 10
        def handle_tcp(request):
            return "id %s" % request.add_job(123, "x")  # not a module name
        """,
    )
    svc = make_service()
    reply = svc.call(b"padd:x")
    assert reply.startswith(b"500: add_job: AttributeError: "), reply
    assert svc.call(b"test:x") == b"Test"  # the service runs on
    assert svc.proc is not None and svc.proc.poll() is None


def test_awaited_checkpoints_in_a_process_module(modules_dir, make_service):
    write_module(
        modules_dir,
        "pasync",
        """
        import asyncio, json
        EXECUTION = "process"
        async def handle_tcp(request):
            state = json.loads(request.job.checkpoint or '{"row": 0}')
            for row in range(state["row"], 3000, 1000):
                await asyncio.sleep(0.01)
                await request.job.save_checkpoint(json.dumps({"row": row + 1000}))
            return "imported"
        """,
    )
    svc = make_service()
    jid = int(svc.call(b"queue:add:pasync:")[3:])
    assert svc.call(b"queue:get:id:%d" % jid) == b"imported"
    status = json.loads(svc.call(b"queue:status:id:%d" % jid))
    assert status["checkpoint"] == '{"row": 3000}'


def test_an_exception_that_cannot_be_printed_is_a_500(modules_dir, make_service):
    write_module(
        modules_dir,
        "weird",
        """
        import os
        EXECUTION = "process"
        PROCESSES = 1
        class Weird(Exception):
            def __str__(self):
                raise RuntimeError("no text")
        def handle_tcp(request):
            if request.text == "raise":
                raise Weird()
            return str(os.getpid())
        """,
    )
    svc = make_service()
    pid = svc.call(b"weird:pid")
    assert svc.call(b"weird:raise") == b"500: Module weird raised Weird: <exception str() failed>"
    assert svc.call(b"weird:pid") == pid  # the same worker: it did not die
    # In a thread the same: the module's error, not an internal error of the service.
    source = (modules_dir / "weird.py").read_text().replace('EXECUTION = "process"', "")
    write_module(modules_dir, "weird_thread", source)
    wait_until(lambda: svc.call(b"weird_thread:pid") != b"400: Unknown request")
    reply = svc.call(b"weird_thread:raise")
    assert reply == b"500: Module weird_thread raised Weird: <exception str() failed>"


def test_a_worker_whose_service_is_gone_exits_at_once(tmp_path: Path):
    # The service died between starting the worker and the worker's first line: the
    # pid it was given is no longer its parent's. (2**22 + 1 is above every pid_max.)
    done = subprocess.run(
        [sys.executable, "-m", "bgservice.process_main", str(tmp_path), str(2**22 + 1)],
        stdin=subprocess.PIPE, capture_output=True, timeout=20,
    )  # fmt: skip
    assert done.returncode != 0


def test_a_message_the_service_cannot_read_costs_one_call(modules_dir, make_service):
    write_module(
        modules_dir,
        "punread",
        """
        EXECUTION = "process"
        PROCESSES = 1
        TIMEOUT = 10
        class Unreadable:  # pickled in the worker, fails as the service unpickles it
            def __reduce__(self):
                return (int, ("not a number",))
        def handle_tcp(request):
            if request.text == "bad":
                request.add_job("test", "x", name=Unreadable())
            return "fine"
        """,
    )
    svc = make_service()
    reply = svc.call(b"punread:bad")
    assert reply.startswith(b"500: Module punread sent the service an unreadable message"), reply
    assert svc.call(b"punread:x") == b"fine"  # a new worker: the pool is not short of one
    assert svc.stats()["workers"]["punread"]["processes"] == 1
