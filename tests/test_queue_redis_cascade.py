"""On Redis, the jobs after= one that ends are failed or placed a bounded number per script
(redis_lua.py's cascade): 100,000 of them hold up no other client of that Redis."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import uuid

import pytest
import redis

from bgservice.client import Client
from tests.conftest import (
    GATE,
    Framed,
    ServiceProcess,
    redis_command,
    redis_config,
    wait_until,
    write_module,
)
from tests.queue_helpers import add, status


@pytest.fixture
def queue_backend() -> str:
    return "redis"


def counts(svc) -> dict[str, int]:
    return json.loads(svc.call(b"queue:stats"))["counts"]


def add_after(svc, dependency: int, jobs: int) -> list[int]:
    """``jobs`` echo jobs after= ``dependency``, pipelined on one connection."""
    with Client(f"{svc.tcp[0]}:{svc.tcp[1]}", timeout=120) as bg:
        return bg.add_many([("echo", b"x", {"after": dependency})] * jobs)


def test_a_cascade_of_100000_dependents_leaves_redis_to_others(make_service, redis_url):
    """100,000 waiting jobs after= one, which is cancelled: every one of them fails with it,
    500 per script, so Redis answers its other clients meanwhile (ended in the cancel's own
    script, Redis answered nobody for 2.0 s, and no call saw the cascade under way); one
    cancelled and retried before the cascade came to it is left waiting; a waiter on one
    of them hears its end."""
    svc = make_service("[queue]\nworkers = 1\nmax_waiting = 1000000\n")
    busy = add(svc, b"queue:add?priority=10:sleep:60000")
    wait_until(lambda: status(svc, busy)["state"] == "running", timeout=30)
    dependency = add(svc, b"queue:add:echo:x")  # behind the sleeper: it waits
    waiting = 100_000
    ids = add_after(svc, dependency, waiting)
    assert len(ids) == waiting and counts(svc)["waiting"] == waiting + 1
    first, last = ids[0], ids[-1]
    heard: list[bytes] = []
    waiter = threading.Thread(target=lambda: heard.append(svc.call(b"queue:get:id:%d" % first)))
    waiter.start()
    seen: list[int] = []  # the failed jobs as calls answered meanwhile counted them
    stop = threading.Event()

    def watch() -> None:
        conn = Framed(svc.tcp, timeout=30)
        try:
            while not stop.is_set():
                seen.append(json.loads(conn.call(b"queue:stats")[1])["counts"].get("failed", 0))
                time.sleep(0.002)
        finally:
            conn.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        time.sleep(0.2)
        # In one write, sent to Redis in one pipeline: the last in the cascade is cancelled
        # and retried before the cascade comes to it; it must be left waiting.
        conn = Framed(svc.tcp, timeout=30)
        conn.send(b"queue:cancel:id:%d" % dependency, b"queue:cancel:id:%d" % last,
                  b"queue:retry:id:%d" % last)  # fmt: skip
        replies = [conn.recv() for _ in range(3)]
        conn.close()
        wait_until(lambda: counts(svc).get("failed", 0) >= waiting - 1, timeout=60)
    finally:
        stop.set()
        watcher.join()
        waiter.join(30)
    # Redis answered while the cascade went on: calls saw it under way (in one script,
    # none could). How long Redis's other clients wait is measured in docs/benchmarks.md.
    halfway = sorted({n for n in seen if 0 < n < waiting - 1})
    assert len(halfway) >= 3, f"no call saw the cascade under way: {sorted(set(seen))}"
    assert replies == [(200, b"cancelled"), (200, b"cancelled"), (200, b"id:%d" % last)]
    failed = b"424: Dependency: job %d cancelled" % dependency
    assert heard == [failed]
    for jid in (first, ids[waiting // 2], last - 1):
        assert status(svc, jid)["error"] == failed[5:].decode()
    assert status(svc, last)["state"] == "waiting"
    now = counts(svc)
    assert (now["waiting"], now["cancelled"], now["failed"]) == (1, 1, waiting - 1)


def test_a_done_dependency_places_its_many_dependents(make_service, tmp_path):
    """5,000 jobs after= one that ends done: placed 500 per script, every one of them runs."""
    svc = make_service("[queue]\nworkers = 4\n", start=False)
    write_module(svc.modules, "gate", GATE)
    svc.start()
    gate = tmp_path / "open"
    dependency = add(svc, b"queue:add:gate:" + str(gate).encode())
    wait_until(lambda: status(svc, dependency)["state"] == "running", timeout=30)
    jobs = 5_000
    ids = add_after(svc, dependency, jobs)
    assert counts(svc)["waiting"] == jobs
    gate.touch()
    assert svc.call(b"queue:get:id:%d" % ids[-1], timeout=60) == b"x"
    wait_until(lambda: counts(svc).get("done", 0) == jobs + 1, timeout=60, interval=0.2)
    assert counts(svc).get("waiting", 0) == 0


def test_a_cascade_left_by_an_instance_that_died_is_ended_by_the_next(tmp_path, redis_url):
    """An instance killed while it works through a cascade leaves the rest in Redis: the
    next instance to start (or any other running) ends them all."""
    prefix = f"cascade-{uuid.uuid4().hex[:8]}"
    started: list[ServiceProcess] = []

    def start(name: str) -> ServiceProcess:
        root = tmp_path / name
        root.mkdir()
        queue = "[queue]\nworkers = 1\nmax_waiting = 1000000\n"
        started.append(ServiceProcess(root, queue, backend_config=redis_config(redis_url, prefix)))
        return started[-1].start()

    failed_key = f"{prefix}:state:failed"
    try:
        first = start("a")
        busy = add(first, b"queue:add?priority=10:sleep:60000")
        wait_until(lambda: status(first, busy)["state"] == "running", timeout=30)
        dependency = add(first, b"queue:add:echo:x")
        waiting = 50_000
        ids = add_after(first, dependency, waiting)
        assert first.call(b"queue:cancel:id:%d" % dependency) == b"cancelled"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        with redis.Redis.from_url(redis_url) as db:
            left = waiting - db.zcard(failed_key)
        assert left > 0, "the cascade ended before the kill: nothing was left to the next"
        second = start("b")
        wait_until(lambda: counts(second).get("failed", 0) == waiting, timeout=60)
        for jid in (ids[0], ids[-1]):
            assert status(second, jid)["error"] == f"Dependency: job {dependency} cancelled"
    finally:
        for svc in started:
            if svc.proc is not None and svc.proc.poll() is None:
                svc.proc.kill()
                svc.proc.wait()


def test_a_cascade_cut_by_a_redis_pause_goes_on_when_redis_answers(tmp_path, own_redis):
    """Redis stops answering (CLIENT PAUSE) in the middle of a cascade: the script that
    times out is tried again after a backoff, not at the next lease round (lease = 600 s
    here: 200 s away; it was the only trigger left, and the next round after an outage
    comes a lease and a third later)."""
    server = own_redis
    root = tmp_path / "svc"
    root.mkdir()
    prefix = f"pause-{uuid.uuid4().hex[:8]}"
    svc = ServiceProcess(root, "[queue]\nworkers = 1\nmax_waiting = 1000000\n",
                         backend_config=redis_config(server.url, prefix, lease=600))  # fmt: skip
    try:
        svc.start()
        busy = add(svc, b"queue:add?priority=10:sleep:60000")
        wait_until(lambda: status(svc, busy)["state"] == "running", timeout=30)
        dependency = add(svc, b"queue:add:echo:x")
        waiting = 50_000
        ids = add_after(svc, dependency, waiting)
        assert svc.call(b"queue:cancel:id:%d" % dependency) == b"cancelled"
        redis_command(server.url, "CLIENT", "PAUSE", "7000", "ALL")
        wait_until(lambda: "jobs waiting on ended ones not ended yet" in svc.log(), timeout=30)
        # (queue:stats replies 503 at once until the pause ends and Redis is found back)
        svc.wait_for_log("Redis reachable again after", timeout=30)
        wait_until(lambda: counts(svc).get("failed", 0) == waiting, timeout=60, interval=0.5)
        assert status(svc, ids[-1])["error"] == f"Dependency: job {dependency} cancelled"
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()


def test_jobs_waiting_on_one_as_an_earlier_version_stored_them_are_freed(
    make_service, redis_url, tmp_path
):
    """P:blocked:ID was a plain set before it became a sorted set: one an earlier version
    left in Redis is converted when next used, and its jobs run."""
    svc = make_service("[queue]\nworkers = 2\n", start=False)
    write_module(svc.modules, "gate", GATE)
    svc.start()
    gate = tmp_path / "open"
    dependency = add(svc, b"queue:add:gate:" + str(gate).encode())
    wait_until(lambda: status(svc, dependency)["state"] == "running", timeout=30)
    ids = add_after(svc, dependency, 700)
    prefix = re.search(r'prefix = "([^"]+)"', svc.config.read_text()).group(1)  # type: ignore[union-attr]
    key = f"{prefix}:blocked:{dependency}"
    with redis.Redis.from_url(redis_url) as db:
        members = db.zrange(key, 0, -1)
        assert len(members) == 700
        db.delete(key)
        db.sadd(key, *members)  # as an earlier version wrote it
    late = add(svc, b"queue:add?after=%d:echo:late" % dependency)  # added to the old set
    gate.touch()
    assert svc.call(b"queue:get:id:%d" % late, timeout=60) == b"late"
    assert svc.call(b"queue:get:id:%d" % ids[-1], timeout=60) == b"x"
    wait_until(lambda: counts(svc).get("done", 0) == 702, timeout=60)
