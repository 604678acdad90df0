"""Process-mode modules across reloads: helper changes, deletion, leaving process mode."""

from __future__ import annotations

import asyncio
import threading
import time

from bgservice.config import WorkerSettings
from bgservice.origin import Origin
from bgservice.processes import ProcessPools
from bgservice.registry import import_module_file
from bgservice.request import Request
from tests.conftest import wait_until, write_module
from tests.test_processes import _alive

USES = """
import os
from . import _common
{execution}
PROCESSES = 1
def handle_tcp(request):
    return _common.VALUE + "{mark}"
"""

# Sleeps for the request's seconds; each unload() (service or worker) logs its pid.
SLOW = """
import os, time
from pathlib import Path
{execution}
PROCESSES = 2
TIMEOUT = 30
def handle_tcp(request):
    if request.text != "pid":
        time.sleep(float(request.text))
    return f"done:{{os.getpid()}}"
def unload():
    with open(Path(__file__).with_name("unloads.log"), "a") as f:
        f.write(f"{{os.getpid()}}\\n")
"""
PROCESS = 'EXECUTION = "process"'


def _workers(svc, name: str) -> dict:
    return svc.stats()["workers"].get(name, {})


def _unloaded_in(modules_dir) -> set[int]:
    path = modules_dir / "unloads.log"
    return {int(line) for line in path.read_text().split()} if path.exists() else set()


def test_a_helper_change_reaches_process_workers(modules_dir, make_service):
    helper = write_module(modules_dir, "_common", 'VALUE = "helper v1"\n')
    usesp = write_module(modules_dir, "usesp", USES.format(execution=PROCESS, mark=""))
    write_module(modules_dir, "usest", USES.format(execution="", mark=""))
    svc = make_service()
    assert svc.call(b"usesp:x") == b"helper v1"
    assert svc.call(b"usest:x") == b"helper v1"
    helper.write_text('VALUE = "helper v2"\n')
    wait_until(lambda: svc.call(b"usest:x") == b"helper v2")
    wait_until(lambda: svc.call(b"usesp:x") == b"helper v2", timeout=5)
    # The module and a helper saved together: the module's new digest must not hide
    # that its helper changed too.
    usesp.write_text(USES.format(execution=PROCESS, mark="!"))
    helper.write_text('VALUE = "helper v3"\n')
    wait_until(lambda: svc.call(b"usest:x") == b"helper v3")
    wait_until(lambda: svc.call(b"usesp:x") == b"helper v3!", timeout=5)


def _slow_call_and_job(svc) -> tuple[list[bytes], threading.Thread, int]:
    """A direct call and a queued job of ``pm``, both running 4 s in its two workers."""
    result: list[bytes] = []
    caller = threading.Thread(target=lambda: result.append(svc.call(b"pm:4", timeout=30)))
    caller.start()
    jid = int(svc.call(b"queue:add:pm:4")[3:])
    wait_until(lambda: _workers(svc, "pm").get("busy") == 2)
    return result, caller, jid


def test_deleting_a_process_module_lets_its_running_calls_finish(modules_dir, make_service):
    path = write_module(modules_dir, "pm", SLOW.format(execution=PROCESS))
    svc = make_service()
    result, caller, jid = _slow_call_and_job(svc)
    third: list[bytes] = []  # in line for a worker: it finishes on the old code too
    waiter = threading.Thread(target=lambda: third.append(svc.call(b"pm:0", timeout=30)))
    waiter.start()
    wait_until(lambda: _workers(svc, "pm").get("waiting") == 1)
    path.unlink()
    svc.wait_for_log("module pm removed")
    # (the busy workers alone were counted: "2 calls to finish first" with 3 to go)
    svc.wait_for_log("(its file was deleted; 3 calls to finish first: 2 running, 1 waiting "
                     "for a worker)")  # fmt: skip
    # The retiring pool's stats still show the call in line (they showed 0: only the
    # live pools' waiters were counted). Its two calls run 4 s: it is still in line.
    assert _workers(svc, "pm").get("waiting") == 1, _workers(svc, "pm")
    assert svc.call(b"pm:pid") == b"400: Unknown request"
    caller.join(30)
    waiter.join(30)
    assert third and third[0].startswith(b"done:"), third
    job_reply = svc.call(b"queue:get:id:%d" % jid, timeout=30)
    assert result and result[0].startswith(b"done:"), result
    assert job_reply.startswith(b"done:"), job_reply
    pids = {int(result[0][5:]), int(job_reply[5:])}
    assert len(pids) == 2 and svc.proc is not None and svc.proc.pid not in pids
    # Then the workers stop (running unload(), so not killed), and the pool is gone.
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    assert pids <= _unloaded_in(modules_dir)
    wait_until(lambda: "pm" not in svc.stats()["workers"])


def test_leaving_process_mode_retires_the_workers(modules_dir, make_service):
    path = write_module(modules_dir, "pm", SLOW.format(execution=PROCESS))
    svc = make_service()
    result, caller, jid = _slow_call_and_job(svc)
    path.write_text(SLOW.format(execution=""))
    svc.wait_for_log("module pm reloaded")
    assert svc.proc is not None
    assert svc.call(b"pm:pid") == b"done:%d" % svc.proc.pid  # now in the service
    caller.join(30)
    job_reply = svc.call(b"queue:get:id:%d" % jid, timeout=30)
    assert result and result[0].startswith(b"done:"), result
    assert job_reply.startswith(b"done:"), job_reply
    pids = {int(result[0][5:]), int(job_reply[5:])}
    assert len(pids) == 2 and svc.proc.pid not in pids  # finished in the old workers
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    assert pids <= _unloaded_in(modules_dir)
    wait_until(lambda: "pm" not in svc.stats()["workers"])


async def test_a_call_racing_its_modules_deletion_leaves_no_worker_behind(tmp_path):
    # The module's first call began (its version held) and the file was deleted before
    # the call reached the pools: it runs in a pool of its own, whose worker must stop
    # once the call is over, not idle until the service stops.
    (tmp_path / "pid.py").write_text(
        'import os\nEXECUTION = "process"\ndef handle_tcp(request):\n    return str(os.getpid())\n'
    )
    version = import_module_file("pid", tmp_path / "pid.py")
    version.retire(lambda _: None)
    pools = ProcessPools(tmp_path, WorkerSettings(processes=1), grace=5)
    try:
        pid = int(await pools(version, Request("pid", b"", Origin.TCP), 10))
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _alive(pid)
        assert not pools.retiring and not pools.pools
    finally:
        await pools.close()
