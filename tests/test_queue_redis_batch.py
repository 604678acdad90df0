"""The Redis engine's commands sent together (bgservice.queue.redis_batch), against a real
service and a real redis-server: each caller gets its own reply out of a shared pipeline,
and scripts Redis no longer has are loaded again without losing or repeating a command."""

from __future__ import annotations

import asyncio
import uuid

from bgservice.client import AsyncClient
from tests.conftest import ServiceProcess, redis_command, redis_config
from tests.queue_helpers import add


def start(tmp_path, redis_url) -> ServiceProcess:
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    config = redis_config(redis_url, prefix)
    return ServiceProcess(tmp_path, "[queue]\nworkers = 4\n", backend_config=config).start()


def test_concurrent_commands_each_get_their_own_reply(tmp_path, redis_url):
    svc = start(tmp_path, redis_url)
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


def test_scripts_flushed_from_redis_are_loaded_again(tmp_path, redis_url):
    svc = start(tmp_path, redis_url)
    first = add(svc, b"queue:add:echo:before")
    assert svc.call(b"queue:get:id:%d" % first) == b"before"
    assert redis_command(redis_url, "SCRIPT", "FLUSH") == b"+OK\r\n"
    # The next commands find their scripts gone (NOSCRIPT): loaded again, sent again, once.
    second = add(svc, b"queue:add:echo:after")
    assert second == first + 1  # the add ran once: no id was taken twice
    assert svc.call(b"queue:get:id:%d" % second) == b"after"
    assert svc.call(b"queue:list:done").count(b'"id"') >= 2
