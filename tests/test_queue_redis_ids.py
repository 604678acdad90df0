"""Redis losing the queue's data while instances run (a restart without persistence, a
FLUSHALL, a failover to a replica without it): its id counter starts at 1 again. Ids go
on past every id an instance has handed out or seen (bgservice/queue/redis_outage.py,
Ids), so a client still holding ``id:N`` from before never follows or collects another
job under it, and the loss is said once in the log.

Real service processes and a redis-server of each test's own, talked to over sockets.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import (
    GATE,
    RedisServer,
    ServiceProcess,
    redis_command,
    redis_config,
    wait_until,
    write_module,
)

LOST = "has lost the queue's data"
Start = Callable[..., ServiceProcess]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start an instance in a folder of its own on ``url``, prefix ``ids``. A lease of 300 s
    by default: the counter's regular check (every lease / 3) comes after the test's end,
    so what a test sees is what an add, a claim or a reconnection did."""
    started: list[ServiceProcess] = []

    def make(
        name: str, url: str, queue: str = "workers = 1", lease: float = 300.0
    ) -> ServiceProcess:
        backend = redis_config(url, "ids", lease)
        svc = ServiceProcess(tmp_path / name, f"[queue]\n{queue}\n", backend_config=backend)
        started.append(svc)
        return svc.start()

    yield make
    for svc in started:
        svc.stop()


def add(svc: ServiceProcess, command: bytes) -> int:
    reply = svc.call(command)
    assert reply.startswith(b"id:"), reply
    return int(reply[3:])


def run_three(svc: ServiceProcess, adder: ServiceProcess | None = None) -> list[int]:
    """Three jobs added (through ``adder``, else ``svc``) and run to their end: ids 1-3."""
    held = [add(adder or svc, b"queue:add:echo:old %d" % n) for n in range(3)]
    for n, jid in enumerate(held):
        assert svc.call(b"queue:get:id:%d" % jid) == b"old %d" % n
    assert held == [1, 2, 3]
    return held


def counter(server: RedisServer) -> bytes:
    return redis_command(server.url, "GET", "ids:id")


def test_an_add_after_a_flushall_takes_no_id_a_client_may_still_hold(start, own_redis):
    svc = start("a", own_redis.url)
    held = run_three(svc)
    assert redis_command(own_redis.url, "FLUSHALL") == b"+OK\r\n"
    # Was id:1 again: a client holding id:1 from before got the new job's result.
    new = add(svc, b"queue:add:echo:new")
    assert new == 4
    assert svc.call(b"queue:get:id:4") == b"new"
    for jid in held:  # their jobs are gone: said as such, not another job's result
        assert svc.call(b"queue:get:id:%d" % jid).startswith(b"404: Job %d not found" % jid)
    assert [add(svc, b"queue:add:echo:more") for _ in range(3)] == [5, 6, 7]
    svc.wait_for_log(LOST)
    assert "its id counter was 0, below the ids up to 3" in svc.log(), svc.log()
    assert "ids go on from 4" in svc.log(), svc.log()
    assert svc.log().count(LOST) == 1, svc.log()  # once, not at every add


def test_the_ids_an_instance_claimed_count_too(start, own_redis):
    adder = start("adder", own_redis.url, "workers = 0")
    runner = start("runner", own_redis.url)
    run_three(runner, adder)  # added by one instance, claimed and run by the other
    assert redis_command(own_redis.url, "FLUSHALL") == b"+OK\r\n"
    # The runner added none of them, and knows them from its claims: past them, not id:1.
    assert add(runner, b"queue:add:echo:new") == 4
    runner.wait_for_log(LOST)
    # The counter is past the adder's mark too: its next add neither repeats nor warns.
    assert add(adder, b"queue:add:echo:next") == 5
    assert adder.call(b"queue:get:id:5") == b"next"
    assert LOST not in adder.log(), adder.log()


def test_a_redis_restarted_without_its_data_is_found_at_the_reconnection(start, own_redis):
    svc = start("a", own_redis.url)
    run_three(svc)
    own_redis.stop()
    for item in own_redis.folder.iterdir():  # its append-only file: it starts empty
        if item.name != "redis.log":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    own_redis.start()
    # Said, and the counter moved, before any add: the connection made again checks it.
    svc.wait_for_log(LOST)
    assert "its id counter was 0, below the ids up to 3" in svc.log(), svc.log()
    assert counter(own_redis) == b"$1\r\n3\r\n"
    wait_until(lambda: svc.call(b"queue:add:echo:new") == b"id:4")
    assert svc.call(b"queue:get:id:4") == b"new"
    assert svc.log().count(LOST) == 1, svc.log()


def test_a_flushall_is_said_without_waiting_for_an_add(start, own_redis):
    # A FLUSHALL leaves the connections open: the counter's regular check (lease / 3,
    # 0.5 s here) finds it, for an instance that adds nothing (a worker) too.
    svc = start("a", own_redis.url, lease=1.5)
    run_three(svc)
    assert redis_command(own_redis.url, "FLUSHALL") == b"+OK\r\n"
    svc.wait_for_log(LOST)
    assert counter(own_redis) == b"$1\r\n3\r\n"
    assert add(svc, b"queue:add:echo:new") == 4
    assert svc.log().count(LOST) == 1, svc.log()


def test_a_get_waiting_when_the_data_goes_is_answered(start, own_redis, tmp_path):
    # A FLUSHALL sends no "done" and keeps the subscription: a queue:get waiting on a job
    # then waited until its client gave up. Found with the loss, it is answered 404.
    svc = start("a", own_redis.url, lease=1.5)
    write_module(svc.modules, "gate", GATE)
    wait_until(lambda: b'"gate"' in svc.call(b"service:modules"))
    jid = add(svc, b"queue:add:gate:" + bytes(tmp_path / "never"))
    wait_until(lambda: b'"running"' in svc.call(b"queue:status:id:%d" % jid))
    # The FLUSHALL must come after the get's first look at the job (a FLUSHALL before it:
    # a 404 at once, the waiting untested), which only Redis sees: its HMGET of the job's
    # result fields, waited for on a MONITOR (no fixed sleep: a loaded machine outlasts it).
    first_look = b'"HMGET" "ids:job:%d" "state" "status" "result" "expires"' % jid
    with (
        socket.create_connection(("127.0.0.1", own_redis.port), timeout=30) as monitor,
        ThreadPoolExecutor(1) as pool,
    ):
        monitor.sendall(b"MONITOR\r\n")
        seen = b""
        while not seen.startswith(b"+OK\r\n"):
            seen += monitor.recv(65536) or pytest.fail(f"MONITOR refused: {seen!r}")
        waiting = pool.submit(svc.call, b"queue:get:id:%d" % jid, timeout=20)
        while first_look not in seen:  # (a socket timeout, 30 s: no first look at all)
            seen += monitor.recv(65536) or pytest.fail("MONITOR closed")
        assert not waiting.done(), waiting.result()  # it saw the job running: it waits
        assert redis_command(own_redis.url, "FLUSHALL") == b"+OK\r\n"
        assert waiting.result(timeout=30).startswith(b"404: Job %d not found" % jid)
    svc.wait_for_log(LOST)
    # Its running attempt learns it at the next renewal, in words that fit (no other
    # attempt took it over: there is none).
    svc.wait_for_log(f"job {jid}: lease lost (taken over by another attempt, or Redis lost the")
