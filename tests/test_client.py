"""bgservice.client against a real service: Client (blocking) and AsyncClient."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
import uvloop

from bgservice.client import (
    AsyncClient,
    Client,
    ClientTimeout,
    ReplyError,
    ServiceDown,
    add_request,
    parse_address,
    parse_job_id,
    queue_request,
)
from bgservice.protocol import PREFACE
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


def test_a_tag_with_a_comma_in_a_list_is_refused_before_sending():
    # tags=["a,b"] went out as two tags, silently (the PHP client and the CLI refuse it).
    for bad in (["a,b"], ["ok", ""], ["ok", " "]):
        with pytest.raises(ValueError, match="each item of tags is one tag"):
            add_request("echo", b"x", tags=bad)
    assert add_request("echo", b"x", tags="a,b") == b"queue:add?tags=a%2Cb:echo:x"  # two


def test_host_and_port_as_the_php_client_takes_them():
    # Taken, then failed at the connect as "service down": an unbracketed IPv6 address
    # with a port (ambiguous), a blank, port 0, digits of another script, a host with a
    # space or a stray bracket. The PHP client refused them all when it was made.
    inet, inet6 = socket.AF_INET, socket.AF_INET6
    assert parse_address(":7") == (inet, ("127.0.0.1", 7))  # no host: loopback
    assert parse_address("my_host.example.com:65535") == (inet, ("my_host.example.com", 65535))
    assert parse_address("db.example.com.:5") == (inet, ("db.example.com.", 5))  # (DNS's FQDN)
    assert parse_address("[fe80::1%eth0]:9") == (inet6, ("fe80::1%eth0", 9))
    assert parse_address("tcp://[::1]:5") == (inet6, ("::1", 5))
    with pytest.raises(ValueError, match=r"an IPv6 address takes brackets, as in \[::1\]:12341"):
        parse_address("::1:12341")
    for bad in (" 127.0.0.1:5", "127.0.0.1:5 ", "127.0.0.1:0", "h:65536", "a b:5", "[::1]]:5",
                "127.0.0.1:\u0665", "127.0.0.1: 5", "-h:5", "h..:5", ".h:5"):  # fmt: skip
        with pytest.raises(ValueError, match="address must be host:port"):
            parse_address(bad)


def test_address_forms_of_the_php_client_and_no_other_scheme():
    # "udg:///run/bg.dgram" (the PHP client's form) was taken for a path starting "udg:",
    # and every send went nowhere, silently; so was "udp://host:port".
    unix = socket.AF_UNIX
    assert parse_address("udg:///run/bg.dgram", datagram=True) == (unix, "/run/bg.dgram")
    assert parse_address("unix:///run/bg.sock") == (unix, "/run/bg.sock")
    assert parse_address("unix:/run/bg.sock") == (unix, "/run/bg.sock")
    assert parse_address("/run/a://b") == (unix, "/run/a://b")  # a path, not a scheme
    for bad in ("udp://127.0.0.1:5", "http://127.0.0.1:5", "unix://", "unix:", "udg:///x"):
        with pytest.raises(ValueError):
            parse_address(bad)
    for bad in ("tcp://127.0.0.1:5", "http://127.0.0.1:5", "udg://", "ftp:///x"):
        with pytest.raises(ValueError):
            parse_address(bad, datagram=True)
    for bad in ("tcp://", "tcp://127.0.0.1", "tcp://host/x:5", "tcp:///run/bg.sock"):
        with pytest.raises(ValueError, match="address must be host:port"):
            parse_address(bad)
    # Refused when the client is made, not lost at each send.
    with pytest.raises(ValueError, match="tcp://"):
        Client("127.0.0.1:5", udp_address="tcp://127.0.0.1:5")
    with pytest.raises(ValueError, match="udp_address"):
        Client("udg:///run/bg.dgram")


@pytest.mark.parametrize("job", [7, "7", "id:7", " id:7\n", "id: 7", "007"])
def test_a_job_id_is_taken_as_n_or_as_the_originals_id_n(job):
    assert parse_job_id(job) == 7
    assert queue_request("get", job) == b"queue:get:id:7"
    assert add_request("m", after=job) == b"queue:add?after=7:m:"


ARABIC_SEVEN = "\u0667"  # str.isdigit() takes it; the service does not
BAD_IDS = [0, -1, True, 7.0, b"7", "", "id:", "x", "id:x", "7.0", "id:id:7", ARABIC_SEVEN]


@pytest.mark.parametrize("job", [*BAD_IDS, 2**63, "9" * 20, None])
def test_a_bad_job_id_is_a_value_error_not_job_0(job):
    with pytest.raises(ValueError, match="job id must be N or 'id:N'"):
        parse_job_id(job)
    if job is not None:  # None is queue_request's "no job" (queue:list, queue:stats)
        with pytest.raises(ValueError):
            queue_request("check", job)


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


def test_a_call_timeout_of_its_own_on_the_kept_connection(service):
    # The connection keeps the kernel's timeout (SO_RCVTIMEO); a call with a timeout of
    # its own changes it for that call, and the next call gets the client's back. (The
    # client's 1 s leaves a loaded machine's adds and reconnections room.)
    with Client(address(service), timeout=1) as bg:
        job = bg.add("sleep", "1500")
        assert bg.get(job, timeout=10) == b"slept 1500"  # longer than the client's: waits
        with pytest.raises(ClientTimeout):
            bg.call("sleep", "10000")  # the client's 1 s again
        job = bg.add("sleep", "10000")
        with pytest.raises(ClientTimeout):
            bg.get(job, timeout=0.2)  # shorter than the client's
        assert bg.call("test") == b"Test"


def test_a_timeout_waiting_for_a_job_names_the_job_and_the_timeout(service):
    # "no reply from 127.0.0.1:N in time", and nothing else: which job, and whose timeout
    # ran out, were left to guess (a job still running read as a service that hung).
    def check(error: ClientTimeout, job: int | None, said: str) -> None:
        assert error.job == job and said in str(error), (str(error), error.job)

    # Only the waits race the short timeouts: the jobs are added (and done ended) with a
    # normal timeout, and each wait goes on a connection opened (greeted) beforehand with
    # a normal timeout too (a timeout drops the connection), so a slow add, greeting or
    # reply to done on a loaded machine is not what times out. A batch's timeout is 1 s:
    # done's reply must come within it for slow to be the first without a reply.
    with Client(address(service)) as setup:
        slow, done = setup.add("sleep", "30000"), setup.add("echo", "done")
        assert setup.get(done) == b"done"
    with Client(address(service), timeout=0.3) as bg:
        assert bg.call("test", timeout=30) == b"Test"
        with pytest.raises(ClientTimeout) as own:
            bg.get(f"id:{slow}", timeout=0.2)
        said = f"get() gave up waiting for job {slow} after get()'s timeout of 0.2 s"
        check(own.value, slow, said)
        assert bg.call("test", timeout=30) == b"Test"
        with pytest.raises(ClientTimeout) as clients:
            bg.get(slow)
        check(clients.value, slow, f"job {slow} after the client's timeout of 0.3 s")
        assert bg.call("test", timeout=30) == b"Test"
        with pytest.raises(ClientTimeout) as many:
            bg.get_many([done, slow, done], timeout=1)
        first = f"job {slow} (the first without a reply) after get_many()'s timeout of 1 s"
        check(many.value, slow, first)
        assert many.value.results[0] == b"done"
        assert bg.call("test", timeout=30) == b"Test"
        with pytest.raises(ClientTimeout) as ran:  # no id until its result comes
            bg.run("sleep", "30000", wait_timeout=0.2)
        said = "run() of module sleep gave up after run()'s wait_timeout of 0.2 s: its job may"
        check(ran.value, None, said + " have been queued, and goes on under an id the client")

    async def main() -> list[ClientTimeout]:
        errors = []
        async with AsyncClient(address(service), timeout=0.3) as abg:
            calls = (
                lambda: abg.get(slow),
                lambda: abg.get_many([done, slow], timeout=1),
                lambda: abg.run("sleep", "30000"),
            )
            for call in calls:
                assert await abg.call("test", timeout=30) == b"Test"  # greeted beforehand
                with pytest.raises(ClientTimeout) as timed_out:
                    await call()
                errors.append(timed_out.value)
        return errors

    got, many, ran = asyncio.run(main())
    check(got, slow, f"get() gave up waiting for job {slow} after the client's timeout of 0.3 s")
    check(many, slow, f"get_many() gave up waiting for job {slow} (the first without a reply)")
    check(ran, None, "run() of module sleep gave up after the client's timeout of 0.3 s: its job")


def test_a_run_that_timed_out_before_sending_says_no_job_was_queued():
    # A listener that accepts and never greets (a service whose loop is blocked): the
    # request was never written, which the timeout of a run() says, its job not queued.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        where = f"127.0.0.1:{listener.getsockname()[1]}"
        unsent = (
            "run() of module echo gave up after run()'s wait_timeout of 0.2 s, before "
            "its request was sent: no job was queued"
        )
        with pytest.raises(ClientTimeout, match=re.escape(unsent)) as ran:
            Client(where).run("echo", "x", wait_timeout=0.2)
        assert ran.value.job is None and not ran.value.sent
        with pytest.raises(ClientTimeout, match=re.escape(unsent)):
            asyncio.run(AsyncClient(where).run("echo", "x", wait_timeout=0.2))


def test_replies_larger_than_one_read(tmp_path, make_service):
    # A reply many times the client's read size arrives whole, over TCP and a Unix socket.
    sock = tmp_path / "bg.sock"
    svc = make_service(f'[[listen]]\nhost = "127.0.0.1"\nport = 0\nunix = "{sock}"\n')
    payload = bytes(range(256)) * 12_000  # about 3 MB
    for where in (address(svc), str(sock)):
        with Client(where, timeout=10) as bg:
            assert bg.call("echo", payload) == payload
            assert bg.requests([b"echo:" + payload, b"test:"]) == [(200, payload), (200, b"Test")]

        async def together(where: str = where) -> list[tuple[int, bytes]]:
            async with AsyncClient(where, timeout=10) as abg:
                return await abg.requests([b"echo:" + payload, b"test:", b"echo:" + payload])

        assert asyncio.run(together()) == [(200, payload), (200, b"Test"), (200, payload)]


def test_async_client_reopens_a_closed_connection_and_survives_a_cancelled_call(make_service):
    svc = make_service("[limits]\nidle_timeout = 0.3\n")
    looks = 0

    def ours_closed() -> bool:  # (each look is a connection of its own: the one open)
        nonlocal looks
        looks += 1
        return bool(svc.stats()["connections"]["open"] == 1)

    async def main() -> list[bytes]:
        async with AsyncClient(address(svc)) as bg:
            slow = asyncio.ensure_future(bg.call("sleep", "200"))
            quick = asyncio.ensure_future(bg.call("echo", "after the slow one"))
            await asyncio.sleep(0.05)
            slow.cancel()  # its reply still comes, and must not be taken for the next one
            got = [await quick]
            # The service closes the idle connection (a sleep of 0.8 s stood here: on a
            # loaded machine the close could come after it).
            await asyncio.to_thread(wait_until, ours_closed)
            got.append(await bg.call("echo", "reopened"))
            return got

    assert asyncio.run(main()) == [b"after the slow one", b"reopened"]
    assert svc.stats()["connections"]["total"] == 3 + looks  # ours twice, and stats' own


@pytest.mark.parametrize(
    ("greeting", "reply", "error"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", b"", "does not speak the framed protocol"),
        (PREFACE, b"OK!\x00\x00\x00\x00", "a reply that answers no request"),
    ],
)
def test_clients_refuse_a_server_of_another_protocol(greeting, reply, error):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(16)
                peer.sendall(greeting)
                if reply:
                    peer.recv(65536)  # the request
                    peer.sendall(reply)  # a status that is no number
                with contextlib.suppress(OSError):  # the client may reset it
                    peer.recv(65536)  # then hold on until the client gives up

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(ServiceDown, match=error), Client(f"127.0.0.1:{port}") as bg:
            bg.call("test")
        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(ServiceDown, match=error):
            asyncio.run(AsyncClient(f"127.0.0.1:{port}", timeout=5).call("test"))


# A datagram handler that writes what it got next to itself.
NOTE = (
    "from pathlib import Path\n\ndef handle_udp(request):\n"
    "    Path(__file__).with_name('note.txt').write_text(request.text)\n"
)


def test_send_over_udp(modules_dir, make_service):
    write_module(modules_dir, "note", NOTE)
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


def test_both_clients_list_jobs_by_module_name_and_tag(service):
    with Client(address(service)) as bg:
        monthly = bg.add("echo", "a", delay=600, name="report", tags=["monthly", "pdf"])
        other = bg.add("test", "b", delay=600, name="report", tags=["monthly"])
        bg.add("echo", "c", delay=600, name="other", tags=["weekly"])
        listed = bg.list("waiting", module="echo", name="report", tag="pdf")
        assert [j["id"] for j in listed["waiting"]] == [monthly]
        assert [j["id"] for j in bg.list(tag="monthly", limit=1, offset=1)["waiting"]] == [other]
        with pytest.raises(ReplyError, match="option module: expected a module name"):
            bg.list(module="e:cho")

    async def main():
        async with AsyncClient(address(service)) as abg:
            return await abg.list("waiting", name="report", tag="monthly")

    assert [j["id"] for j in asyncio.run(main())["waiting"]] == [monthly, other]


def test_every_job_method_takes_the_originals_id_n(service):
    """What a user porting from the original holds: the raw ``id:N`` reply of queue:add."""
    with Client(address(service)) as bg:
        held = bg.request(b"queue:add:sleep:100")[1].decode()  # "id:N", as the original
        assert held.startswith("id:")
        assert bg.check(held) in (0, 1, 2)
        assert bg.status(held)["id"] == int(held[3:])
        assert bg.get(held) == b"slept 100"
        later = bg.add("echo", "after it", after=held)
        assert bg.get(f"id:{later}") == b"after it"
        waiting = f"id:{bg.add('echo', 'x', delay=30)}"
        assert bg.cancel(waiting) == "cancelled"
        assert bg.retry(waiting) == int(waiting[3:])
        assert bg.get(waiting) == b"x"
        with pytest.raises(ValueError):
            bg.get("id:oops")
        assert bg.call("test") == b"Test"  # nothing was sent for the bad id

    async def main() -> bytes:
        async with AsyncClient(address(service)) as abg:
            held = f"id:{await abg.add('echo', 'async')}"
            assert await abg.check(held) in (0, 1, 2)
            with pytest.raises(ValueError):
                await abg.status("id:")
            return await abg.get(held)

    assert asyncio.run(main()) == b"async"


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


def test_add_refuses_wait_naming_run_before_sending(service):
    # add(wait=1) sent queue:add?wait=1: the job ran, its result came back where an id
    # was expected, and add() raised a ReplyError for a job that had been done.
    with Client(address(service)) as bg:
        for wait in (1, True, 0):
            with pytest.raises(ValueError, match=r"takes no wait= option .*run\(module, data"):
                bg.add("echo", "x", wait=wait)
        with pytest.raises(ValueError, match=r"run\(\) takes no wait= option"):
            bg.run("echo", "x", wait=0)
        # add_many too, as PHP's addMany: before any of the batch is sent
        with pytest.raises(ValueError, match=r"add_many\(\) takes no wait= option \(job 1;"):
            bg.add_many([("echo", "first"), ("echo", "x", {"wait": 1})])
        assert bg.run("echo", "ran", priority=1) == b"ran"  # add-and-wait is run()'s

    async def main() -> bytes:
        async with AsyncClient(address(service)) as abg:
            with pytest.raises(ValueError, match=r"run\(module, data"):
                await abg.add("echo", "x", wait=True)
            return await abg.run("echo", "ran too")

    assert asyncio.run(main()) == b"ran too"
    done = Client(address(service)).list("done")["done"]
    assert sorted(job["id"] for job in done) == [1, 2]  # run()'s two: nothing else was sent


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("runs", ["closed after each", "two kept open, in turn"])
def test_one_async_client_serves_successive_event_loops(service, loop, runs):
    # Found by review: the connection the first asyncio.run made was used by the second,
    # its loop closed: the request went out (the job was queued), and the caller got
    # RuntimeError ("attached to a different loop"), no id; every later call too.
    kept = [LOOPS[loop](), LOOPS[loop]()] if runs == "two kept open, in turn" else []

    def run(coro):
        if not kept:
            return asyncio.run(coro) if loop == "asyncio" else uvloop.run(coro)
        kept.append(kept.pop(0))  # the other one
        return kept[-1].run_until_complete(coro)

    bg = AsyncClient(address(service))
    try:
        assert run(bg.call("echo", "first loop")) == b"first loop"
        job = run(bg.add("echo", "second loop"))
        assert isinstance(job, int)
        assert run(bg.get(job)) == b"second loop"
        run(bg.close())  # from a fourth run: the third's connection closed, nothing raised
    finally:
        for each in kept:
            each.close()
    with Client(address(service)) as check:
        assert sum(check.queue_stats()["counts"].values()) == 1  # queued once
    # Each loop's connection was closed for the service when the next loop dropped it.
    wait_until(lambda: service.stats()["connections"]["open"] == 1)  # (stats' own)


def test_at_takes_an_aware_datetime_and_delay_a_timedelta(service):
    # Their str() was sent ("2030-01-01 00:00:00+00:00", "1:00:00"): 400 expected a number.
    at = datetime(2030, 1, 1, tzinfo=UTC)
    with Client(address(service)) as bg:
        assert bg.status(bg.add("echo", "at", at=at))["run_at"] == at.timestamp()
        timed = {"delay": timedelta(hours=1), "timeout": timedelta(seconds=90)}  # any seconds
        delayed = bg.status(bg.add("echo", "delay", **timed))
        assert delayed["run_at"] - delayed["created"] == pytest.approx(3600, abs=1)
        assert delayed["timeout"] == 90
        with pytest.raises(ValueError, match="timezone-aware"):  # local time or UTC?
            bg.add("echo", "naive", at=datetime(2030, 1, 1))
        [many] = bg.add_many([("echo", "many", {"delay": timedelta(minutes=5)})])
        many_status = bg.status(many)
        assert many_status["run_at"] - many_status["created"] == pytest.approx(300, abs=1)

    async def main() -> int:
        async with AsyncClient(address(service)) as abg:
            with pytest.raises(ValueError, match="timezone-aware"):
                await abg.add("echo", "naive", at=datetime(2030, 1, 1))
            berlin = timezone(timedelta(hours=1))  # the same instant, another zone
            return await abg.add("echo", "async", at=datetime(2030, 1, 1, 1, tzinfo=berlin))

    job = asyncio.run(main())
    with Client(address(service)) as bg:
        assert bg.status(job)["run_at"] == at.timestamp()
        assert sum(bg.queue_stats()["counts"].values()) == 4  # no naive one was sent


def test_the_php_clients_tcp_and_udp_address_forms_are_taken(modules_dir, make_service):
    # One $BGSERVICE_ADDRESS for PHP ("tcp://127.0.0.1:12341") and Python: the Python
    # clients and `bgservice -a` refused it (ValueError, exit 2).
    write_module(modules_dir, "note", NOTE)
    svc = make_service()
    host, port = svc.tcp
    note = modules_dir / "note.txt"
    with Client(f"tcp://{host}:{port}") as bg:
        assert bg.call("echo", "over tcp://") == b"over tcp://"
        bg.send("note", "to its host:port over UDP")
        wait_until(lambda: note.exists() and note.read_text() == "to its host:port over UDP")
    Client(address(svc), udp_address=f"udp://{host}:{port}").send("note", "to udp://")
    wait_until(lambda: note.read_text() == "to udp://")

    async def main() -> bytes:
        async with AsyncClient(f"TCP://{host}:{port}") as abg:
            return await abg.call("echo", "async")

    assert asyncio.run(main()) == b"async"
    from tests.test_cli import bg as cli

    assert cli(svc, "ping", address=f"tcp://{host}:{port}").stdout == b"pong\n"
