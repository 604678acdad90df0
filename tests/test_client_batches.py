"""One round trip per job, and many jobs per write: ``queue:add?wait=1`` and the clients'
``run``, ``add_many`` and ``get_many`` (blocking and asyncio), on both engines; and what
a batch cut short by a lost connection or a timeout still says (``results``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

import pytest

from bgservice import client, client_async, client_requests
from bgservice.client import (
    AsyncClient,
    BatchError,
    Client,
    ClientTimeout,
    ReplyError,
    ServiceDown,
)
from bgservice.client_requests import JobSpec
from bgservice.protocol import PREFACE, FrameDecoder, ReplyDecoder, framed_reply, framed_request
from tests.conftest import wait_until, write_module
from tests.queue_helpers import both_engines, status  # noqa: F401 (a fixture)
from tests.test_client_failures import FakeService


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


# Found by review: IndexError, KeyError 0, "echo" read as module "e" data "c" (a 400
# for the batch), and a 4-tuple queued with its options dropped. Each is a ValueError
# naming the job now, raised before any of the batch is sent (as PHP's addMany).
MALFORMED = [
    ([("echo",)], r"job 0 must be \(module, data\) or \(module, data, options\), not \('echo',\)"),
    ([{"module": "echo"}], r"job 0 must be .*, not \{'module': 'echo'\}"),
    (["echo"], r"job 0 must be .*, not 'echo'"),
    ([("echo", "ok"), ("echo", "x", {"priority": 5}, 1)], r"job 1 must be .*, not \('echo'"),
    ([("echo", "ok"), ("echo", "x", "priority=5")], r"job 1: options must be a dict"),
    ([("echo", "ok"), (b"echo", "x")], r"job 1: module must be str, not bytes"),
    ([("echo", "ok"), ("echo", 5)], r"job 1: data must be str or bytes, not int"),
    ([("echo", "ok"), ("echo", "x", {"after": "id:"})], r"job 1: job id must be N or 'id:N'"),
]


def test_a_malformed_job_of_add_many_is_named_before_any_is_sent(service):
    with Client(address(service)) as bg:
        for jobs, error in MALFORMED:
            with pytest.raises(ValueError, match=r"add_many\(\): " + error):
                bg.add_many(jobs)
        assert bg.add_many([["echo", "a list"], ("echo", "x", {"priority": 5})]) == [1, 2]

    async def main() -> None:
        async with AsyncClient(address(service)) as abg:
            for jobs, error in MALFORMED:
                with pytest.raises(ValueError, match=r"add_many\(\): " + error):
                    await abg.add_many(jobs)

    asyncio.run(main())
    with Client(address(service)) as bg:  # none of the malformed batches sent a job
        assert sum(bg.queue_stats()["counts"].values()) == 2
        assert bg.status(2)["priority"] == 5


def test_async_client_run_and_batches(service):
    async def main() -> None:
        async with AsyncClient(address(service)) as bg:
            assert await bg.run("echo", "one trip") == b"one trip"
            ids = await bg.add_many([("echo", str(i)) for i in range(100)])
            assert await bg.get_many(ids) == [str(i).encode() for i in range(100)]
            assert await bg.add_many([]) == []
            with pytest.raises(BatchError):
                await bg.add_many([("echo", "ok"), ("echo", "x", {"priority": "high"})])
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


# --- a batch cut short ----------------------------------------------------------------

# A job that never ends: queued with wait=1, its reply never comes, nor do those of the
# requests after it (replies come in request order). add_many refuses wait= (its replies
# are ids): the holding fixture puts that request among the batch's by hand.
HANG = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    Path(__file__).with_name("hang.started").touch()
    await asyncio.sleep(3600)
"""


HOLD: JobSpec = ("hang", "", {"wait": True})


@pytest.fixture
def holding(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_many, in both clients, sends ``HOLD`` among its jobs as queue:add?wait=1."""
    made = client_requests.add_requests

    def add_requests(jobs: list[JobSpec]) -> list[bytes]:
        return [b"queue:add?wait=1:hang:" if job == HOLD else made([job])[0] for job in jobs]

    for module in (client, client_async):
        monkeypatch.setattr(module, "add_requests", add_requests)


def _jobs(before: int, total: int) -> list[JobSpec]:
    """``total`` echo jobs ("job N"), but the one at ``before`` a job that never ends."""
    jobs: list[JobSpec] = [("echo", f"job {i}") for i in range(total)]
    jobs[before] = HOLD
    return jobs


def _sent_without_reply(results: list[object], error: BaseException) -> bool:
    return bool(results) and all(r is error for r in results)


def test_a_batch_cut_by_a_timeout_keeps_the_ids_of_the_jobs_it_queued(
    modules_dir, make_service, holding
):
    # add_many raised ClientTimeout and nothing else: which of the jobs were queued was
    # lost, and a retry queued them twice.
    write_module(modules_dir, "hang", HANG)
    svc = make_service()
    jobs = _jobs(40, 100)
    jobs[1] = ("echo", "refused", {"priority": "high"})
    with Client(address(svc), timeout=2) as bg, pytest.raises(ClientTimeout) as cut:
        bg.add_many(jobs)  # written 64 at a time: the second 36 never
    results, error = cut.value.results, cut.value
    assert isinstance(results[1], ReplyError) and results[1].code == 400
    queued = [results[0], *results[2:40]]
    assert all(isinstance(jid, int) for jid in queued), results[:40]
    assert _sent_without_reply(results[40:64], error) and results[64:] == [None] * 36
    assert "40 answered, 24 sent without a reply (they may have run), 36 not sent" in str(error)

    async def in_one_write() -> ClientTimeout:
        async with AsyncClient(address(svc), timeout=2) as abg:
            with pytest.raises(ClientTimeout) as cut:
                await abg.add_many(_jobs(30, 50))
            return cut.value

    error = asyncio.run(in_one_write())
    assert all(isinstance(jid, int) for jid in error.results[:30]), error.results[:30]
    assert _sent_without_reply(error.results[30:], error)
    assert "30 answered, 20 sent without a reply (they may have run)" in str(error)
    with Client(address(svc)) as bg:  # the ids are the jobs queued, and each is there
        assert all(bg.status(jid)["module"] == "echo" for jid in queued)
        assert bg.get_many(queued) == [f"job {i}".encode() for i in range(40) if i != 1]
        assert bg.get_many(error.results[:30]) == [f"job {i}".encode() for i in range(30)]
        # The jobs sent were queued, the refused one and those never sent were not:
        # 63 of the first batch (the first 64 less the refused), all 50 of the second.
        wait_until(lambda: sum(bg.queue_stats()["counts"].values()) == 63 + 50)


def test_get_many_cut_by_a_timeout_keeps_the_results_that_came(modules_dir, make_service):
    write_module(modules_dir, "hang", HANG)
    svc = make_service()
    with Client(address(svc), timeout=2) as bg:
        done = bg.add_many([("echo", "a"), ("echo", "b"), ("echo", "c")])
        assert bg.get_many(done) == [b"a", b"b", b"c"]
        wanted = [done[0], done[1], bg.add("hang"), done[2]]
        with pytest.raises(ClientTimeout) as cut:
            bg.get_many(wanted)
        assert cut.value.results[:2] == [b"a", b"b"]
        assert _sent_without_reply(cut.value.results[2:], cut.value)

    async def in_one_write() -> ClientTimeout:
        async with AsyncClient(address(svc), timeout=2) as abg:
            with pytest.raises(ClientTimeout) as cut:
                await abg.get_many(wanted)
            return cut.value

    error = asyncio.run(in_one_write())
    assert error.results[:2] == [b"a", b"b"] and _sent_without_reply(error.results[2:], error)


def test_add_many_cut_by_a_killed_service_names_the_jobs_it_queued(
    modules_dir, make_service, holding
):
    write_module(modules_dir, "hang", HANG)
    svc = make_service()

    def kill_once_started() -> None:
        # The second 64 are in: the first 64 ids were read before they were written.
        wait_until((modules_dir / "hang.started").exists)
        svc.proc.kill()

    with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(address(svc)) as bg:
        killed = pool.submit(kill_once_started)
        with pytest.raises(ServiceDown, match="may have run") as cut:
            bg.add_many(_jobs(64, 200))
        killed.result()
        results = cut.value.results
        assert all(isinstance(jid, int) for jid in results[:64]), results[:64]
        assert _sent_without_reply(results[64:128], cut.value) and results[128:] == [None] * 72
        assert "64 answered, 64 sent without a reply" in str(cut.value)
        assert "72 not sent" in str(cut.value)
        with pytest.raises(ServiceDown) as down:
            bg.call("test")
        assert down.value.results is None  # a single call: no batch to tell about
        with pytest.raises(ServiceDown) as down:
            bg.add_many([("echo", "x")] * 3)
        assert down.value.results == [None] * 3  # none sent: safe to send again
    svc.wait()
    again = make_service()  # the same folder and database
    with Client(address(again)) as bg:
        assert all(bg.status(jid)["module"] == "echo" for jid in results[:64])
        assert bg.get_many(results[:64]) == [f"job {i}".encode() for i in range(64)]


class AnswersThenCloses(FakeService):
    """A framed server that answers a connection's first ``answers`` requests (``id:1``,
    ``id:2``, ...) and then closes its side: a service that stopped part way."""

    def __init__(self, answers: int) -> None:
        self.answers = answers
        super().__init__()

    def serve(self, peer: socket.socket) -> None:
        peer.recv(len(PREFACE))
        peer.sendall(PREFACE)
        decoder, served = FrameDecoder(1 << 20), 0
        while served < self.answers and (data := peer.recv(65536)):
            frames = decoder.feed(data)[: self.answers - served]
            ids = range(served + 1, served + len(frames) + 1)
            peer.sendall(b"".join(framed_reply(200, b"id:%d" % n) for n in ids))
            served += len(frames)
        peer.shutdown(socket.SHUT_WR)
        while peer.recv(65536):  # read until the client closes: no reset
            pass


def test_a_batch_cut_midway_by_a_lost_connection_keeps_each_reply_read():
    # Within one write of 64 (Client) or the one write of all (AsyncClient): the replies
    # read before the connection was lost were dropped with the rest.
    server = AnswersThenCloses(100)
    jobs: list[JobSpec] = [("echo", str(i)) for i in range(150)]
    with Client(server.address) as bg, pytest.raises(ServiceDown) as cut:
        bg.add_many(jobs)
    results = cut.value.results
    assert results[:100] == list(range(1, 101))
    assert _sent_without_reply(results[100:128], cut.value) and results[128:] == [None] * 22

    async def in_one_write() -> ServiceDown:
        async with AsyncClient(server.address) as abg:
            with pytest.raises(ServiceDown) as cut:
                await abg.add_many(jobs)
            return cut.value

    error = asyncio.run(in_one_write())
    assert error.results[:100] == list(range(1, 101))
    assert _sent_without_reply(error.results[100:], error)
    assert "100 answered, 50 sent without a reply (they may have run)" in str(error)
    server.listener.close()
