"""The Redis engine's claim: it takes the best job it may, however many jobs it may not
take are ahead of it (a module at its limit or over its rate, or one no live instance
runs). Real service processes and a real redis-server, over real sockets.

Before, a claim looked at the best 100 ready jobs only: past 100 jobs it could not take,
it gave up, and the whole queue (that priority and below) waited at the pace of the
limited module, or for ever behind a module whose instances were down, without a word.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import (
    GATE,
    ServiceProcess,
    redis_command,
    redis_config,
    wait_until,
    write_module,
)
from tests.queue_helpers import add, status

AHEAD = 150  # jobs the claim cannot take, ahead of the one it can (the old bound: 100)

ONLY0 = "def handle_tcp(request):\n    return 'only0 ran'\n"


def instance(tmp_path: Path, name: str, url: str, prefix: str, queue: str) -> ServiceProcess:
    """A service of its own folder and modules (the shipped ones) on the queue ``prefix``."""
    root = tmp_path / name
    root.mkdir()
    return ServiceProcess(root, f"[queue]\n{queue}\n", backend_config=redis_config(url, prefix))


def add_many(svc: ServiceProcess, command: bytes, count: int) -> list[int]:
    """``count`` adds pipelined on one framed connection: their ids."""
    conn = svc.framed()
    try:
        conn.send(*[command] * count)
        replies = [conn.recv()[1] for _ in range(count)]
    finally:
        conn.close()
    assert all(r.startswith(b"id:") for r in replies), replies[:3]
    return [int(r[3:]) for r in replies]


def counts(svc: ServiceProcess) -> dict[str, int]:
    return dict(json.loads(svc.call(b"queue:stats"))["counts"])


@pytest.mark.parametrize(
    "cap", ["module_limits = { slow = 1 }", 'module_rates = { slow = "1/hour" }']
)
def test_a_job_passes_a_long_line_of_a_capped_modules_jobs(tmp_path, redis_url, cap):
    # 150 slow jobs, one of them running (and held there): the rest wait for the slot
    # (or the rate's window). An echo job added behind them ran only once fewer than 100
    # were ahead: the queue went at the slow module's pace.
    prefix = f"capped-{uuid.uuid4().hex[:8]}"
    svc = instance(tmp_path, "a", redis_url, prefix, f"workers = 2\n{cap}")
    write_module(svc.modules, "slow", GATE)
    svc.start()
    try:
        slow = add_many(svc, b"queue:add:slow:" + bytes(tmp_path / "never"), AHEAD)
        wait_until(lambda: status(svc, slow[0])["state"] == "running")
        jid = add(svc, b"queue:add:echo:passed")
        assert svc.call(b"queue:get:id:%d" % jid, timeout=10) == b"passed"
        assert [status(svc, j)["state"] for j in slow[1:]] == ["waiting"] * (AHEAD - 1)
        assert counts(svc)["waiting"] == AHEAD - 1
    finally:
        svc.stop()


# Writes its data to order.txt beside it: the order jobs ran in, across modules.
ORDER = """
from pathlib import Path

def handle_tcp(request):
    with open(Path(__file__).with_name("order.txt"), "a") as f:
        f.write(request.text + "\\n")
    return request.text
"""


def test_past_jobs_it_cannot_take_a_claim_takes_the_best_by_priority_then_age(tmp_path, redis_url):
    # Behind 150 slow jobs (priority 10, limited to one at a time), jobs of two other
    # modules run by priority, then in order of arrival, whatever their module: the best
    # of the heads of their modules' lines.
    prefix = f"order-{uuid.uuid4().hex[:8]}"
    svc = instance(tmp_path, "a", redis_url, prefix, "workers = 2\nmodule_limits = { slow = 1 }")
    for name, source in (("slow", GATE), ("hold", GATE), ("first", ORDER), ("second", ORDER)):
        write_module(svc.modules, name, source)
    svc.start()
    try:
        slow = add_many(svc, b"queue:add?priority=10:slow:" + bytes(tmp_path / "never"), AHEAD)
        hold = add(svc, b"queue:add:hold:" + bytes(tmp_path / "open"))  # the other worker
        wait_until(lambda: status(svc, hold)["state"] == "running")
        ids = [
            add(svc, b"queue:add?priority=%d:%s:%s" % (priority, module, module + b"%d" % priority))
            for module, priority in ((b"first", 0), (b"second", 5), (b"first", 5), (b"second", 0))
        ]
        (tmp_path / "open").touch()
        for jid in ids:
            assert svc.call(b"queue:get:id:%d" % jid, timeout=10).startswith((b"first", b"second"))
        ran = (svc.modules / "order.txt").read_text().split()
        assert ran == ["second5", "first5", "first0", "second0"]
        assert counts(svc)["waiting"] == len(slow) - 1
    finally:
        svc.stop()


def test_jobs_of_a_module_no_live_instance_runs_do_not_stop_the_queue(tmp_path, redis_url):
    # Only the adder (workers = 0) has module only0; the worker has not. 150 only0 jobs
    # ahead: the worker's claim gave up after 100 of them and the echo job never ran.
    prefix = f"stranded-{uuid.uuid4().hex[:8]}"
    adder = instance(tmp_path, "adder", redis_url, prefix, "workers = 0")
    worker = instance(tmp_path, "worker", redis_url, prefix, "workers = 1")
    write_module(adder.modules, "only0", ONLY0)
    try:
        adder.start()
        worker.start()
        stranded = add_many(adder, b"queue:add:only0:x", AHEAD)
        jid = add(adder, b"queue:add:echo:ran")
        assert adder.call(b"queue:get:id:%d" % jid, timeout=10) == b"ran"
        assert {status(worker, j)["state"] for j in stranded} == {"waiting"}
    finally:
        adder.stop()
        worker.stop()


def test_a_queue_an_earlier_version_wrote_is_split_and_claimed(tmp_path, redis_url):
    # An earlier version kept one ready line (P:ready), no line per module: the first
    # instance to start splits it (in batches of 1000: 1,150 jobs take two), and jobs of
    # modules it runs are taken past the others'.
    prefix = f"earlier-{uuid.uuid4().hex[:8]}"
    adder = instance(tmp_path, "adder", redis_url, prefix, "workers = 0")
    write_module(adder.modules, "only0", ONLY0)
    adder.start()
    stranded = add_many(adder, b"queue:add:only0:x", 1000 + AHEAD)
    jid = add(adder, b"queue:add:echo:ran")
    assert adder.stop() == 0
    # What an earlier version left in Redis: the same jobs, P:ready, and nothing else.
    for key in ("ready:only0", "ready:echo", "ready_modules", "ready_split"):
        redis_command(redis_url, "DEL", f"{prefix}:{key}")
    assert redis_command(redis_url, "ZCARD", f"{prefix}:ready") == b":%d\r\n" % (len(stranded) + 1)
    worker = instance(tmp_path, "worker", redis_url, prefix, "workers = 1")
    try:
        worker.start()
        assert worker.call(b"queue:get:id:%d" % jid, timeout=10) == b"ran"
        zcard = redis_command(redis_url, "ZCARD", f"{prefix}:ready:only0")
        assert zcard == b":%d\r\n" % len(stranded)
        assert redis_command(redis_url, "GET", f"{prefix}:ready_split") == b"$4\r\ndone\r\n"
        assert f"job queue: {len(stranded) + 1} ready jobs put in their modules'" in worker.log()
    finally:
        worker.stop()


def test_ready_jobs_no_live_instance_runs_are_said_in_the_log(tmp_path, redis_url):
    # Jobs of a module no live instance runs waited, ready, and nothing said so. Said
    # once they have waited so for a lease (an instance that runs the module may be
    # starting), then at most once a minute, by whichever instance finds them.
    prefix = f"said-{uuid.uuid4().hex[:8]}"
    adder = instance(tmp_path, "adder", redis_url, prefix, "workers = 0")
    worker = instance(tmp_path, "worker", redis_url, prefix, "workers = 1")
    write_module(adder.modules, "only0", ONLY0)
    line = "job queue: 3 ready jobs of module only0 wait, and no live instance runs it"

    def logs() -> str:
        return adder.log() + worker.log()

    try:
        adder.start()
        worker.start()
        ids = [add(adder, b"queue:add:only0:x") for _ in range(3)]
        assert adder.call(b"queue:get:id:%d" % add(adder, b"queue:add:echo:x")) == b"x"
        wait_until(lambda: line in logs())
        write_module(worker.modules, "only0", ONLY0)  # the worker runs it within a second
        for jid in ids:
            assert worker.call(b"queue:get:id:%d" % jid, timeout=10) == b"only0 ran"
        assert logs().count("no live instance runs it") == 1, logs()
    finally:
        adder.stop()
        worker.stop()
