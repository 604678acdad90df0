"""Following the queue's channel (bgservice.queue.redis_channel) against a real
redis-server of the test's own: messages as they come, a frozen Redis found by the ping,
and a subscription that cannot be made is a Redis error (which the engine retries), not
an escaped timeout that would end its listener."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bgservice.queue.redis_channel import Subscription
from tests.conftest import ServiceProcess, redis_command, redis_config, wait_until


@pytest.fixture
def server(own_redis):
    return own_redis


def test_messages_in_order_then_a_frozen_redis_is_lost_by_the_ping(server):
    async def scenario() -> tuple[list[bytes], str]:
        client = aioredis.from_url(server.url)
        heard: list[bytes] = []
        channel = await Subscription.open(client, "c", 1.0, heard.append)
        try:
            for word in ("wake", "done:1", "done:2"):
                redis_command(server.url, "PUBLISH", "c", word)
            while len(heard) < 3:
                await asyncio.sleep(0.01)
            assert redis_command(server.url, "CLIENT", "PAUSE", "4000", "ALL") == b"+OK\r\n"
            with pytest.raises(RedisError) as lost:
                await asyncio.wait_for(channel.until_lost(), 3.5)  # quiet 1 s, ping, 1 s
            return heard, str(lost.value)
        finally:
            channel.close()
            await client.aclose()

    heard, why = asyncio.run(scenario())
    assert heard == [b"wake", b"done:1", b"done:2"]
    assert "no answer to a ping" in why


def test_a_subscription_redis_does_not_confirm_is_a_redis_error(server):
    async def scenario() -> None:
        client = aioredis.from_url(server.url)
        try:
            with pytest.raises(RedisError):
                await Subscription.open(client, "c", 1.0, lambda data: None)
        finally:
            await client.aclose()

    assert redis_command(server.url, "CLIENT", "PAUSE", "3000", "ALL") == b"+OK\r\n"
    asyncio.run(scenario())


def test_a_subscription_cancelled_while_it_connects_is_cancelled(server):
    # Through a client with a socket timeout (the engine's), redis-py wrote the new
    # connection's first commands through asyncio.wait_for, which on Python 3.11 loses a
    # cancellation that comes as the write ends: about a third were lost here, and the
    # engine's listener, cancelled by a stop, went on following its channel for ever.
    async def scenario() -> tuple[int, int]:
        client = aioredis.from_url(server.url, socket_timeout=5.0)
        lost = cancelled = 0
        try:
            for attempt in range(600):
                task = asyncio.create_task(Subscription.open(client, "c", 5.0, lambda _: None))
                for _ in range(attempt % 12):  # cancelled at each point of the opening
                    await asyncio.sleep(0)
                if task.done():
                    task.result().close()
                    continue
                task.cancel()
                try:
                    (await task).close()
                    lost += 1
                except asyncio.CancelledError:
                    cancelled += 1
        finally:
            await client.aclose()
        return lost, cancelled

    lost, cancelled = asyncio.run(scenario())
    assert cancelled > 100 and lost == 0, (lost, cancelled)


# --- defects found by a review of several instances on one Redis (2026-12-07) ----------


def test_an_outage_is_one_warning_its_failed_commands_counted_and_its_end_said(tmp_path, own_redis):
    # Redis down 10 s under ~10 queue requests a second logged 103 "queue command failed"
    # warnings (one a request), "jobs waiting on ended ones not ended yet" at each backoff
    # step (no job used after=), "Redis connection lost (Redis connection lost (closed))",
    # and no line at all when Redis answered again. Now: one WARNING, the failures
    # counted, and a line when it is back saying for how long and how many failed.
    server = own_redis
    # (A lease of 30 s: no renewal is under way as Redis stops, to be cut by its stop.)
    config = redis_config(server.url, "outage", lease=30)
    svc = ServiceProcess(tmp_path, "", backend_config=config)
    try:
        svc.start()
        reply = svc.call(b"queue:add:echo:x")
        check = b"queue:check:id:%s" % reply[3:]
        assert svc.call(check) in (b"1", b"2")
        subscribers = ("PUBSUB", "NUMSUB", "outage:events")
        wait_until(lambda: redis_command(server.url, *subscribers).endswith(b":1\r\n"))
        start = len(svc.log())
        server.stop()
        # The channel finds it first (its connection closed, none made again): said once.
        wait_until(lambda: "WARNING" in svc.log()[start:])
        replies: list[bytes] = []

        def checked() -> bytes:
            replies.append(svc.call(check))
            return replies[-1]

        until = time.monotonic() + 4
        while time.monotonic() < until:  # (the outage itself, with its traffic)
            assert checked() == b"503: Queue unavailable: Redis does not answer"
            time.sleep(0.1)
        server.start()
        wait_until(lambda: checked() == b"2")  # (503 until the reconnection: counted too)
        failed = sum(reply.startswith(b"503:") for reply in replies)
        lines = svc.log()[start:].splitlines()
        warnings = [line for line in lines if "WARNING" in line or "ERROR" in line]
        assert len(warnings) == 1 and "does not answer (" in warnings[0], warnings[:8]
        assert "Connection refused" in warnings[0], warnings  # (its reason, said once)
        svc.wait_for_log("Redis reachable again after")
        lines = svc.log()[start:].splitlines()
        back = [line for line in lines if "Redis reachable again after" in line]
        assert len(back) == 1 and "INFO" in back[0], back
        assert f"({failed} queue commands failed meanwhile)" in back[0], (failed, back)
    finally:
        svc.stop()
