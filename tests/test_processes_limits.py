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
from bgservice.errors import ModuleLoadFailed
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
    stats = {"processes": 1, "busy": 0, "started": 1, "stopping": 0, "waiting": 0}
    assert svc.stats()["workers"]["quick"] == stats


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


def _dies_with_a_killed_service(svc: Any, request: bytes, pid_file: Path) -> None:
    """Kill the service (SIGKILL) while ``request`` runs; the process whose pid the call
    wrote to ``pid_file`` must end too."""
    with socket.create_connection(svc.tcp, timeout=30) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
        assert _alive(pid)
        svc.signal(signal.SIGKILL)
        svc.wait()
        wait_until(lambda: not _alive(pid))


def test_a_busy_worker_dies_with_a_killed_service(modules_dir, make_service):
    write_module(modules_dir, "busy", BUSY)
    _dies_with_a_killed_service(make_service(), b"busy:x", modules_dir / "busy.pid")


def test_programs_a_call_started_die_with_a_killed_service(modules_dir, make_service):
    # The kernel killed the worker (PR_SET_PDEATHSIG), but a program its call started ran
    # on (documented as a limit outside systemd, until the worker's group had a guard).
    write_module(modules_dir, "spawns", """
        import subprocess, time
        from pathlib import Path
        EXECUTION = "process"
        TIMEOUT = 300
        def handle_tcp(request):
            child = subprocess.Popen(["sleep", "300"])
            Path(__file__).with_name("child.pid").write_text(str(child.pid))
            time.sleep(120)
    """)  # fmt: skip
    _dies_with_a_killed_service(make_service(), b"spawns:x", modules_dir / "child.pid")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_recycled_worker_takes_its_guard_along(modules_dir, make_service):
    # The guard (a shell waiting for the service's end) is in the worker's group: a
    # worker that ends (here recycled after one call) leaves no guard behind.
    write_module(modules_dir, "ppid", """
        import os
        EXECUTION = "process"
        def handle_tcp(request):
            return str(os.getpid())
    """)  # fmt: skip
    svc = make_service("[workers]\nmax_calls = 1\n")
    worker = int(svc.call(b"ppid:x"))
    guards = wait_until(lambda: [
        pid for pid in _children(worker)
        if b"kill -KILL 0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ])  # fmt: skip
    wait_until(lambda: not _alive(worker))
    wait_until(lambda: not any(_alive(pid) for pid in guards))
    assert int(svc.call(b"ppid:x")) != worker  # (and the next worker serves)


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


# In a worker (not in the service, which imports the file too), the import waits for the
# test's "go" file, or the unload() hook does: as long as the test wants, no longer.
WAITS_FOR_GO = """
import os, sys, time
from pathlib import Path
EXECUTION = "process"
PROCESSES = {processes}
TIMEOUT = 1
IN_A_WORKER = Path(sys.argv[0]).name == "process_main.py"
HERE = Path(__file__).parent

def wait_for_go():
    (HERE / f"waiting.{{os.getpid()}}").touch()
    deadline = time.monotonic() + 60
    while not (HERE / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)

if IN_A_WORKER and {in_import}:
    wait_for_go()

def handle_tcp(request):
    return str(os.getpid())

def unload():
    if IN_A_WORKER and not {in_import}:
        wait_for_go()
"""


def _waiting(modules_dir: Path) -> list[int]:
    return [int(p.suffix[1:]) for p in modules_dir.glob("waiting.*")]


def test_a_module_whose_import_outlasts_its_timeout_serves(modules_dir, make_service):
    # The worker imported the module inside the call, under the call's 1 s: every call
    # 504, each worker killed mid-import, none ever served. The import is bounded by
    # [reload] import_timeout instead, and a call's timeout counts once it is done.
    write_module(modules_dir, "slowimp", WAITS_FOR_GO.format(processes=1, in_import=True))
    svc = make_service()
    result: list[bytes] = []
    first = threading.Thread(target=lambda: result.append(svc.call(b"slowimp:x", timeout=30)))
    first.start()
    wait_until(lambda: _waiting(modules_dir))
    # A call waiting for the one worker hears why it waits.
    waited = b"504: Module slowimp timed out after 1 s (no free worker: 1 importing the module)"
    assert svc.call(b"slowimp:x") == waited
    (modules_dir / "go").touch()
    first.join(30)
    assert result and result[0].isdigit(), result
    assert svc.call(b"slowimp:x") == result[0]  # the same worker, not killed
    assert "killing worker" not in svc.log()


async def test_a_workers_import_is_bounded_by_import_timeout(tmp_path):
    (tmp_path / "go").unlink(missing_ok=True)
    (tmp_path / "hang.py").write_text(WAITS_FOR_GO.format(processes=1, in_import=True))
    version = import_module_file("hang", tmp_path / "hang.py")
    pools = ProcessPools(tmp_path, WorkerSettings(processes=1), grace=5, import_timeout=0.5)
    try:
        with pytest.raises(ModuleLoadFailed) as failed:
            await pools(version, Request("hang", b"", Origin.TCP), 60)
        assert failed.value.message == (
            "Module hang failed to load in a worker: the import did not finish within "
            "0.5 s ([reload] import_timeout)"
        )
        [pid] = _waiting(tmp_path)
        await _when(lambda: not _alive(pid))  # killed
    finally:
        await pools.close()


def test_stopping_workers_count_against_the_pool(modules_dir, make_service):
    # Recycled after each call, with an unload() hook that takes its time: each call
    # left a worker stopping and started another (40 calls, 40 processes), and stats
    # showed none of them. A stopping worker holds its place until it has exited.
    write_module(modules_dir, "pu", WAITS_FOR_GO.format(processes=2, in_import=False))
    svc = make_service("[workers]\nmax_calls = 1\n[limits]\nshutdown_grace = 60\n")
    pids = {svc.call(b"pu:x") for _ in range(2)}
    assert len(pids) == 2 and all(pid.isdigit() for pid in pids), pids
    wait_until(lambda: len(_waiting(modules_dir)) == 2)
    assert svc.call(b"pu:x") == b"504: Module pu timed out after 1 s (no free worker: 2 stopping)"
    workers = svc.stats()["workers"]["pu"]
    assert workers["stopping"] == 2 and workers["processes"] == 0, workers
    (modules_dir / "go").touch()
    assert svc.call(b"pu:x").isdigit()


UNLOADS_SLOWLY = """
import os, sys, time
from pathlib import Path
EXECUTION = "process"
def handle_tcp(request):
    return str(os.getpid())
def unload():
    if Path(sys.argv[0]).name == "process_main.py":
        time.sleep({seconds})
        Path(__file__).with_name("unloaded").touch()
"""


def test_worker_unload_hooks_get_the_shutdown_grace(modules_dir, make_service):
    # They got a fixed 3 s at shutdown, whatever [limits] shutdown_grace said.
    write_module(modules_dir, "pu", UNLOADS_SLOWLY.format(seconds=4))
    svc = make_service("[limits]\nshutdown_grace = 30\n")
    assert svc.call(b"pu:x").isdigit()
    assert svc.stop(timeout=60) == 0
    assert (modules_dir / "unloaded").exists()
    assert "unload() hooks" not in svc.log()


def test_a_worker_unload_hook_cut_at_shutdown_is_logged(modules_dir, make_service):
    write_module(modules_dir, "pu", UNLOADS_SLOWLY.format(seconds=60))
    svc = make_service("[limits]\nshutdown_grace = 0.5\n")
    pid = svc.call(b"pu:x")
    assert pid.isdigit()
    assert svc.stop() == 0
    line = f"module pu: worker {pid.decode()} still running its unload() hooks after 0.5 s"
    assert line in svc.log()
    assert not (modules_dir / "unloaded").exists()
