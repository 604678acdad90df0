"""One round trip per job, and many jobs per write: ``queue:add?wait=1`` and the clients'
``run``, ``add_many`` and ``get_many`` (blocking and asyncio), on both engines."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bgservice.client import AsyncClient, BatchError, Client, ReplyError
from bgservice.protocol import PREFACE, ReplyDecoder, framed_request
from tests.queue_helpers import both_engines, status  # noqa: F401 (a fixture)


def address(svc) -> str:
    host, port = svc.tcp
    return f"{host}:{port}"


def test_add_and_wait_replies_with_the_result_of_a_stored_job(service):
    assert service.call(b"queue:add?wait=1:echo:hello") == b"hello"
    # The job was stored and ran as any other: it is in the list, done, with its result.
    done = service.call(b"queue:list?state=done")
    assert b'"module":"echo","state":"done"' in done
    with Client(address(service)) as bg:
        listed = bg.list("done")["done"]
        assert bg.get(listed[0]["id"]) == b"hello"
        assert bg.run("sleep", "50", priority=2) == b"slept 50"
        with pytest.raises(ReplyError) as err:
            bg.run("fail", "x")  # the job's error reply is the reply
        assert err.value.code >= 400
        assert bg.request(b"queue:add?wait=0:echo:x")[1].startswith(b"id:")  # wait=0: an id
        code, body = bg.request(b"queue:add?wait=maybe:echo:x")
        assert (code, body) == (400, b"option wait: expected 1 or 0, got 'maybe'")


def test_add_and_wait_keeps_the_unique_key(service):
    with Client(address(service)) as bg:
        jid = bg.add("sleep", "300", unique="nightly")
        # The same unique key: the running job's result, not a second job.
        assert bg.run("sleep", "999", unique="nightly") == b"slept 300"
        assert bg.status(jid)["state"] == "done"
        assert len(bg.list("done")["done"]) == 1


def test_add_many_pipelines_and_keeps_the_order(service):
    jobs = [("echo", f"job {i}") for i in range(200)] + [("sleep", "10", {"priority": 4})]
    with Client(address(service)) as bg:
        ids = bg.add_many(jobs)
        assert len(ids) == len(set(ids)) == 201
        assert ids == sorted(ids)
        results = bg.get_many([f"id:{jid}" for jid in ids])
        assert results == [f"job {i}".encode() for i in range(200)] + [b"slept 10"]
        assert bg.status(ids[-1])["priority"] == 4
        assert bg.stats()["connections"]["total"] == 1  # all of it on one connection


def test_a_refused_job_in_a_batch_leaves_the_others_queued(service):
    with Client(address(service)) as bg:
        with pytest.raises(BatchError) as err:
            bg.add_many([("echo", "a"), ("echo", "b", {"priority": "high"}), ("echo", "c")])
        first, refused, third = err.value.results
        assert err.value.code == 400 and isinstance(refused, ReplyError)
        assert "1 of 3 failed" in str(err.value) and "priority" in str(err.value)
        assert bg.get_many([first, third]) == [b"a", b"c"]
        with pytest.raises(BatchError) as err:
            bg.get_many([first, 999_999])
        assert err.value.results[0] == b"a" and err.value.results[1].code == 404
        assert bg.call("test") == b"Test"  # the connection is still in step


def test_async_client_run_and_batches(service):
    async def main() -> None:
        async with AsyncClient(address(service)) as bg:
            assert await bg.run("echo", "one trip") == b"one trip"
            ids = await bg.add_many([("echo", str(i)) for i in range(100)])
            assert await bg.get_many(ids) == [str(i).encode() for i in range(100)]
            assert await bg.add_many([]) == []
            with pytest.raises(BatchError):
                await bg.add_many([("echo", "ok"), ("", "no module")])
            assert (await bg.stats())["connections"]["total"] == 1

    asyncio.run(main())


def test_wait_on_both_engines(make_service):
    svc = make_service()
    jid = int(svc.call(b"queue:add?delay=0.2:echo:later")[3:])
    assert svc.call(b"queue:add?wait=1&after=%d:echo:then" % jid) == b"then"
    assert status(svc, jid)["state"] == "done"


def test_a_pipelined_burst_from_a_raw_socket(service):
    """What any language can do without a client library: many framed adds in one write,
    the ids back in order, then the results."""
    host, port = service.tcp
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            PREFACE + b"".join(framed_request(b"queue:add:echo:%d" % i) for i in range(50))
        )
        decoder, replies = ReplyDecoder(), []
        assert sock.recv(len(PREFACE)) == PREFACE
        while len(replies) < 50:
            replies += decoder.feed(sock.recv(65536))
    ids = [int(body[3:]) for code, body in replies if code == 200]
    assert len(ids) == 50 and ids == sorted(ids)
    with Client(address(service)) as bg:
        assert bg.get_many(ids) == [b"%d" % i for i in range(50)]
