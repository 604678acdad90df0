"""bgservice.client against a real service: Client (blocking) and AsyncClient."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bgservice.client import (
    AsyncClient,
    Client,
    ClientTimeout,
    ReplyError,
    ServiceDown,
    add_request,
    parse_address,
)
from tests.conftest import wait_until, write_module


def address(svc) -> str:
    host, port = svc.tcp
    return f"{host}:{port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_pure_helpers():
    assert parse_address("127.0.0.1:12341") == (socket.AF_INET, ("127.0.0.1", 12341))
    assert parse_address("[::1]:5") == (socket.AF_INET6, ("::1", 5))
    assert parse_address("/run/bg.sock") == (socket.AF_UNIX, "/run/bg.sock")
    with pytest.raises(ValueError):
        parse_address("nohostport")
    assert add_request("m", b"d") == b"queue:add:m:d"
    assert add_request("m", "x:y", priority=5, unique="a:b", after=None) == (
        b"queue:add?priority=5&unique=a%3Ab:m:x:y"
    )


def test_calls_errors_and_one_kept_connection(service):
    with Client(address(service)) as bg:
        assert bg.call("test", "x") == b"Test"
        assert bg.call("echo", bytes(range(256))) == bytes(range(256))
        assert bg.ping()
        with pytest.raises(ReplyError) as err:
            bg.call("nosuch")
        assert (err.value.code, err.value.message) == (400, "Unknown request")
        assert bg.call("test") == b"Test"
        assert {m["name"] for m in bg.modules()} >= {"test", "echo"}
        assert bg.stats()["connections"]["total"] == 1


def test_a_connection_closed_by_the_service_is_reopened(make_service):
    svc = make_service("[limits]\nidle_timeout = 0.2\n")
    with Client(address(svc)) as bg:
        assert bg.call("test") == b"Test"
        wait_until(lambda: svc.stats()["connections"]["open"] == 1)  # ours closed, this one
        assert bg.call("test") == b"Test"


def test_timeout_and_service_down(service):
    with Client(address(service), timeout=0.3) as bg:
        with pytest.raises(ClientTimeout):
            bg.call("sleep", "3000")
        assert bg.call("test") == b"Test"  # a fresh connection after the timeout
    with pytest.raises(ServiceDown):
        Client(f"127.0.0.1:{free_port()}").call("test")
    Client(f"127.0.0.1:{free_port()}").send("test", "never raises")


def test_send_over_udp(modules_dir, make_service):
    write_module(
        modules_dir,
        "note",
        "from pathlib import Path\n\ndef handle_udp(request):\n"
        "    Path(__file__).with_name('note.txt').write_text(request.text)\n",
    )
    svc = make_service()
    Client(address(svc)).send("note", "hello over udp")
    note = modules_dir / "note.txt"
    wait_until(lambda: note.exists() and note.read_text() == "hello over udp")


def test_queue_methods(service):
    with Client(address(service)) as bg:
        jid = bg.add("sleep", "200", priority=3, retries=1, unique="k")
        assert bg.add("sleep", "200", unique="k") == jid
        assert bg.check(jid) in (0, 1)
        assert bg.status(jid)["priority"] == 3
        assert bg.get(jid) == b"slept 200"
        assert bg.check(jid) == 2
        later = bg.add("echo", "x", delay=30)
        assert bg.list("waiting")["waiting"][0]["id"] == later
        assert bg.cancel(later) == "cancelled"
        with pytest.raises(ReplyError) as err:
            bg.get(later)
        assert err.value.code == 410
        assert bg.retry(later) == later
        assert bg.get(later) == b"x"
        assert bg.queue_stats(600)["counts"]["done"] >= 2


def test_async_client_pipelines_on_one_connection(service):
    async def main() -> tuple[list[bytes], int]:
        async with AsyncClient(address(service)) as bg:
            replies = await asyncio.gather(
                bg.call("sleep", "300"), *[bg.call("echo", str(i)) for i in range(50)]
            )
            jid = await bg.add("echo", "queued")
            assert await bg.get(jid) == b"queued"
            with pytest.raises(ReplyError):
                await bg.call("nosuch")
            return list(replies), (await bg.stats())["connections"]["total"]

    replies, connections = asyncio.run(main())
    assert replies == [b"slept 300", *[str(i).encode() for i in range(50)]]
    assert connections == 1


def test_async_client_down_and_timeout(service):
    async def main() -> None:
        with pytest.raises(ServiceDown):
            await AsyncClient(f"127.0.0.1:{free_port()}").call("test")
        bg = AsyncClient(address(service), timeout=0.3)
        with pytest.raises(ClientTimeout):
            await bg.call("sleep", "3000")
        assert await bg.call("test") == b"Test"
        await bg.close()

    asyncio.run(main())
