"""The Redis engine's commands sent together (bgservice.queue.redis_batch), against a real
service and a real redis-server: each caller gets its own reply out of a shared pipeline,
and scripts Redis no longer has are loaded again without losing or repeating a command."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

from bgservice.client import AsyncClient
from bgservice.queue.redis_batch import Batcher
from tests.conftest import ServiceProcess, redis_command, redis_config
from tests.queue_helpers import add


@pytest.fixture
def service(tmp_path, redis_url):
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    config = redis_config(redis_url, prefix)
    svc = ServiceProcess(tmp_path, "[queue]\nworkers = 4\n", backend_config=config).start()
    yield svc
    svc.stop()


def test_concurrent_commands_each_get_their_own_reply(service):
    svc = service
    host, port = svc.tcp

    async def burst() -> tuple[list[int], list[bytes], list[bytes]]:
        async with AsyncClient(f"{host}:{port}") as bg:
            # Adds, gets and checks in flight together on one connection: many of them
            # share a turn of the service's loop, and so a pipeline to Redis.
            ids = await asyncio.gather(*(bg.add("echo", f"job {i}") for i in range(300)))
            results = await asyncio.gather(*(bg.get(j) for j in ids))
            checks = await asyncio.gather(*(bg.call("queue", f"check:id:{j}") for j in ids))
            return ids, results, checks

    ids, results, checks = asyncio.run(burst())
    assert len(set(ids)) == 300
    assert results == [f"job {i}".encode() for i in range(300)]
    assert checks == [b"2"] * 300
    missing = svc.call(b"queue:get:id:999999999")
    assert missing.startswith(b"404:")  # an error reply out of a batch: its caller's alone


def test_scripts_flushed_from_redis_are_loaded_again(service, redis_url):
    svc = service
    first = add(svc, b"queue:add:echo:before")
    assert svc.call(b"queue:get:id:%d" % first) == b"before"
    assert redis_command(redis_url, "SCRIPT", "FLUSH") == b"+OK\r\n"
    # The next commands find their scripts gone (NOSCRIPT): loaded again, sent again, once.
    second = add(svc, b"queue:add:echo:after")
    assert second == first + 1  # the add ran once: no id was taken twice
    assert svc.call(b"queue:get:id:%d" % second) == b"after"
    assert svc.call(b"queue:list:done").count(b'"id"') >= 2


def test_a_command_redis_cannot_take_fails_its_caller_alone(redis_url):
    # The Batcher on its own against the real redis-server: a bad argument raises at the
    # call; the commands queued with it in the same turn are answered, each its own.
    async def turn() -> list[object]:
        client = aioredis.from_url(redis_url)
        batch = Batcher(client, {}, timeout=5)
        key = f"batch-{uuid.uuid4().hex[:8]}"
        try:
            first = batch.execute("SET", key, "1")
            with pytest.raises(TypeError):
                batch.execute("SET", key, None)
            second = batch.execute("INCR", key)
            wrong = batch.execute("HGETALL", key)  # a string, not a hash: its error only
            third = batch.execute("GET", key)
            done = await asyncio.gather(first, second, wrong, third, return_exceptions=True)
            await batch.close()
            return done
        finally:
            await client.aclose()

    ok, incremented, wrong, value = asyncio.run(turn())
    assert ok == b"OK" and incremented == 2 and value == b"2"
    assert "WRONGTYPE" in str(wrong)


def test_a_silent_or_lost_connection_fails_what_is_owed_then_reconnects(own_redis):
    # The pipelines share one connection read as replies arrive: a Redis that answers
    # nothing for the timeout fails the commands it owes (not a hang), one that drops the
    # connection fails them at once; either way the next command opens a new connection.
    server = own_redis

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        client = aioredis.from_url(server.url)
        batch = Batcher(client, {}, timeout=1.0)
        seen: list[object] = [await batch.execute("SET", "k", "1")]
        assert redis_command(server.url, "CLIENT", "PAUSE", "2500", "ALL") == b"+OK\r\n"
        started = loop.time()
        seen += await asyncio.gather(batch.execute("INCR", "k"), return_exceptions=True)
        seen.append(loop.time() - started)
        await asyncio.sleep(2)  # the pause ends
        seen.append(await batch.execute("INCR", "k"))
        blocked = batch.execute("BLPOP", "nothing", "30")  # owed until the kill
        await asyncio.sleep(0.2)
        kill = ("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert (await loop.run_in_executor(None, redis_command, server.url, *kill))[:1] == b":"
        seen += await asyncio.gather(blocked, return_exceptions=True)
        seen.append(await batch.execute("GET", "k"))
        await batch.close()
        await client.aclose()
        return seen

    ok, silent, waited, after_pause, lost, value = asyncio.run(scenario())
    assert ok == b"OK"
    assert isinstance(silent, RedisTimeout) and waited >= 0.9  # not before the timeout
    assert after_pause in (2, 3)  # the INCR sent into the pause may have run when it ended
    assert isinstance(lost, RedisConnectionError)  # at the kill, not a timeout
    assert value == str(after_pause).encode()


# --- defects found by a review of several instances on one Redis (2026-12-07) ----------


def _timed(svc: ServiceProcess, payload: bytes) -> tuple[float, bytes]:
    """How long ``payload`` waited for its reply (10 s at most: far past any bound here),
    and the reply."""
    started = time.monotonic()
    try:
        reply = svc.call(payload, timeout=10)
    except OSError as exc:
        reply = repr(exc).encode()
    return time.monotonic() - started, reply


def _wave(svc: ServiceProcess, payload: bytes, clients: int = 8) -> list[tuple[float, bytes]]:
    """``clients`` one-shot clients, each sending ``payload`` 0.3 s after the one before:
    how long each waited for its reply, and the reply."""
    replies: list[tuple[float, bytes]] = []
    threads = [threading.Thread(target=lambda: replies.append(_timed(svc, payload)))
               for _ in range(clients)]  # fmt: skip
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # (the clients' pace, as web requests come)
    for thread in threads:
        thread.join()
    return replies


UNAVAILABLE = b"503: Queue unavailable: Redis does not answer"


def test_a_frozen_redis_answers_each_command_503_within_the_bound_and_then_at_once(
    tmp_path, own_redis
):
    # Redis stopped (SIGSTOP) without closing a connection: each batch of commands made a
    # connection attempt of its own, one after another, each bounded by the 5 s timeout:
    # the Nth client waited about N x 5 s (measured: 7.6 s ... 40.5 s; one client in
    # sequence 5, 15, 15, 15 s). Each command is answered within the 5 s from its send
    # now; and once Redis is found away, at once, until a reconnection succeeds.
    server = own_redis
    svc = ServiceProcess(tmp_path, "", backend_config=redis_config(server.url, "frozen"))
    try:
        svc.start()
        jid = add(svc, b"queue:add:echo:x")
        assert svc.call(b"queue:get:id:%d" % jid) == b"x"
        check = b"queue:check:id:%d" % jid
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            into = _wave(svc, check)  # into the freeze: found 5 s after the first was sent
            assert [reply for _, reply in into] == [UNAVAILABLE] * len(into), into
            # The bound is the 5 s command timeout from each one's send (plus a busy
            # machine's slack); the old code's waits grew with each client, to 40 s.
            assert max(waited for waited, _ in into) < 7.5, into
            # Once found away: at once (the old code: 5 to 15 s each, a pooled command
            # such as queue:stats 15 s: three tries of 5 s).
            found = _wave(svc, check)
            found += [_timed(svc, payload) for payload in (check, check, b"queue:stats",
                      b"queue:list?state=done", b"queue:status:id:%d" % jid)]  # fmt: skip
            assert [reply for _, reply in found] == [UNAVAILABLE] * len(found), found
            assert max(waited for waited, _ in found) < 2.0, found
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        svc.wait_for_log("Redis reachable again after", timeout=15)
        assert svc.call(check) == b"2"
        again = add(svc, b"queue:add:echo:thawed")
        assert svc.call(b"queue:get:id:%d" % again) == b"thawed"
    finally:
        svc.stop()


def test_the_command_timeout_is_the_configured_one(tmp_path, own_redis):
    # The timeout was max(connect_timeout, 5) s, with no setting below 5 s: a site whose
    # pages would rather fall back sooner than wait 5 s for a frozen Redis had no say.
    config = redis_config(own_redis.url, "quick") + "command_timeout = 1.5\n"
    svc = ServiceProcess(tmp_path, "", backend_config=config)
    try:
        svc.start()
        jid = add(svc, b"queue:add:echo:x")
        assert svc.call(b"queue:get:id:%d" % jid) == b"x"
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            assert svc.call(b"queue:check:id:%d" % jid, timeout=10) == UNAVAILABLE
            svc.wait_for_log("does not answer (no reply from Redis in 1.5 s)")
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    finally:
        svc.stop()
