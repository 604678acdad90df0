"""bgservice.client when the connection fails: a request written is never sent again, one
call's timeout is its own, a service that never greets costs each caller its timeout once
(a busy service, not a down one), a Unix stream address has no datagram twin for
``send``, and a message no datagram can carry is refused rather than lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import struct
import threading
import time

import pytest
import uvloop

from bgservice.client import (
    AsyncClient,
    Client,
    ClientTimeout,
    ReplyError,
    ReplyTooLarge,
    ServiceDown,
)
from bgservice.protocol import PREFACE, framed_reply
from tests.conftest import HOG, wait_until, write_module
from tests.test_client import address, free_port


class FakeService:
    """A server on a free port that hands each connection to ``serve``, one at a time."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                peer, _ = self.listener.accept()
            except OSError:
                return
            with peer:
                self.serve(peer)

    def serve(self, peer: socket.socket) -> None:
        raise NotImplementedError


class DropsTheSecond(FakeService):
    """A framed server that answers a connection's first request, then reads the second
    and closes without a reply (a service killed while running it). Counts what it got."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        super().__init__()

    def serve(self, peer: socket.socket) -> None:
        peer.recv(len(PREFACE))
        peer.sendall(PREFACE)
        for answer in (True, False):
            data = peer.recv(65536)
            if not data:
                break
            self.got.append(data)
            if answer:
                peer.sendall(framed_reply(200, b"ok"))

    def close(self) -> None:
        self.listener.close()


def test_a_request_the_service_received_is_not_sent_again():
    # The old clients took any drop of a kept connection for an idle close and sent the
    # request again on a new one: a queue:add stored twice.
    server = DropsTheSecond()
    with Client(server.address) as bg:
        assert bg.call("echo", "first") == b"ok"
        with pytest.raises(ServiceDown, match="may have run"):
            bg.call("echo", "second")
    assert len(server.got) == 2

    async def main() -> None:
        async with AsyncClient(server.address) as abg:
            assert await abg.call("echo", "first") == b"ok"
            with pytest.raises(ServiceDown, match="may have run"):
                await abg.call("echo", "second")

    asyncio.run(main())
    assert len(server.got) == 4
    server.close()


def test_a_kept_connection_closed_while_idle_is_replaced_before_writing(make_service):
    svc = make_service("[limits]\nidle_timeout = 0.2\n")
    looks = 0

    def ours_closed() -> bool:  # (each look is a connection of its own: the one open)
        nonlocal looks
        looks += 1
        return bool(svc.stats()["connections"]["open"] == 1)

    with Client(address(svc)) as bg:
        assert bg.call("test") == b"Test"
        wait_until(ours_closed)  # the service closed the idle connection (a sleep of 0.6 s
        # stood here: on a loaded machine the close could come after it)
        assert bg.call("echo", "on a new one") == b"on a new one"
    assert svc.stats()["connections"]["total"] == 3 + looks  # ours twice, and stats' own


def test_an_async_call_that_times_out_leaves_the_others_be(service):
    async def main() -> list[object]:
        async with AsyncClient(address(service)) as bg:
            short = bg.call("sleep", "2000", timeout=0.2)
            slow = [bg.call("sleep", "600") for _ in range(3)]
            results: list[object] = [*await asyncio.gather(short, *slow, return_exceptions=True)]
            results.append(await bg.call("test"))  # a new connection, not behind the sleep
            return results

    results = asyncio.run(main())
    assert isinstance(results[0], ClientTimeout)
    assert results[1:] == [b"slept 600"] * 3 + [b"Test"]


def test_a_service_that_never_greets_costs_the_timeout_once():
    # Accepts, never answers the preface. Four calls waiting together give up together,
    # after the client's timeout (the old AsyncClient: 5 s each, one after another). It
    # connected: a service too busy to greet, a ClientTimeout (it was ServiceDown).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        where = f"127.0.0.1:{listener.getsockname()[1]}"

        async def main() -> tuple[list[str], bytes, bool]:
            bg = AsyncClient(where, timeout=0.5)
            ended: list[str] = []

            async def one(name: str, timeout: float | None = None) -> None:
                with pytest.raises(ClientTimeout, match="greet"):
                    await bg.call("test", timeout=timeout)
                ended.append(name)

            # Before the four, a call of a longer timeout on the same client: the four give
            # up at the client's timeout, before it (one loop's timers fire in the order
            # they are due, however slow the machine); at some fixed 5 s each, after it.
            await asyncio.gather(one("long", 2.0), *(one(f"short {n}") for n in range(4)))
            # All on one opening: the listener has that one connection, and no other.
            peer = listener.accept()[0]
            listener.setblocking(False)
            try:
                listener.accept()[0].close()
                another = True
            except BlockingIOError:
                another = False
            # Nobody waits for that opening any more: it is closed, not left hanging.
            with peer:
                peer.settimeout(5)
                read = asyncio.to_thread(lambda: peer.recv(16) + peer.recv(16))
                return ended, await read, another

        ended, read, another = asyncio.run(main())
        assert sorted(ended[:4]) == [f"short {n}" for n in range(4)] and ended[4] == "long"
        assert not another
        assert read == PREFACE  # then the end of the stream: the client closed it
        # Connected, but no greeting in time: a service too busy to answer (its loop
        # blocked), not one that is down (it was ServiceDown, after 5 s at most). It did
        # wait its timeout for the greeting (a lower bound: what the code guarantees).
        started = time.monotonic()
        with pytest.raises(ClientTimeout, match="greet"):
            Client(where, timeout=0.5).call("test")
        assert time.monotonic() - started > 0.4


def test_send_to_a_unix_stream_address_needs_a_datagram_address(tmp_path, make_service):
    stream, dgram = tmp_path / "bg.sock", tmp_path / "bg.dgram"
    svc = make_service(f'[[listen]]\nunix = "{stream}"\nunix_dgram = "{dgram}"\n')
    with pytest.raises(ValueError, match="udp_address"):
        Client(str(stream)).send("test", "lost before")
    with Client(str(stream), udp_address=str(dgram)) as bg:
        bg.send("test", "arrives")
        assert bg.call("test") == b"Test"
    svc.wait_for_log("arrives")


def test_send_takes_the_php_clients_udg_form(tmp_path, make_service):
    # Client(udp_address="udg:///path") sent to a path "udg:///path": lost, silently.
    stream, dgram = tmp_path / "bg.sock", tmp_path / "bg.dgram"
    svc = make_service(f'[[listen]]\nunix = "{stream}"\nunix_dgram = "{dgram}"\n')
    Client(f"unix://{stream}", udp_address=f"udg://{dgram}").send("test", "udg arrives")
    svc.wait_for_log("udg arrives")


def test_an_async_client_waits_for_a_busy_services_greeting(modules_dir, make_service):
    """A service whose loop is blocked still accepts, and greets once the loop is free.
    Each caller sharing the opening waits for the greeting within its own timeout: a
    short one is a ClientTimeout for that caller alone (it was ServiceDown, for every
    caller, after 5 s), the others get their replies on the one connection."""
    write_module(modules_dir, "hog", HOG)
    svc = make_service()
    with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(address(svc), 30) as busy:
        hog = pool.submit(busy.call, "hog", "7")
        wait_until((modules_dir / "hog.started").exists)

        async def main() -> list[object]:
            async with AsyncClient(address(svc), timeout=30) as bg:
                short = bg.call("test", timeout=1)
                patient = [bg.call("echo", str(i)) for i in range(3)]
                got = await asyncio.gather(short, *patient, return_exceptions=True)
                return [*got, await bg.call("test")]

        results = asyncio.run(main())
        assert hog.result(timeout=30) == b"done"
    assert isinstance(results[0], ClientTimeout) and "greet" in str(results[0]), results
    assert results[1:] == [b"0", b"1", b"2", b"Test"]
    assert svc.stats()["connections"]["total"] == 3  # the hog's, ours (shared), stats'


def test_send_refuses_a_message_no_datagram_can_carry(tmp_path, make_service):
    # Client.send swallowed the kernel's EMSGSIZE: a 100 KB message was lost unseen.
    # Refusing it is no exception to "never raises because the service is down": it
    # could never be sent, up or down.
    down = f"127.0.0.1:{free_port()}"
    big = "x" * 100_000
    with pytest.raises(ValueError, match="more than one datagram"):
        Client(down).send("echo", big)
    with pytest.raises(ValueError, match="more than one datagram"):
        asyncio.run(AsyncClient(down).send("echo", big))
    Client(down).send("echo", "x" * 65_502)  # echo: and 65,502 bytes: the most UDP takes
    dgram = tmp_path / "bg.dgram"  # a Unix datagram's limit is the kernel's too
    make_service(f'[[listen]]\nunix_dgram = "{dgram}"\n')
    with pytest.raises(ValueError, match="more than one datagram"):
        Client(str(tmp_path / "bg.sock"), udp_address=str(dgram)).send("echo", "x" * 2**22)


WEEK = 7 * 24 * 3600.0  # the longest timeout a client takes (MAX_TIMEOUT)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_timeout_past_a_week_is_refused_at_construction(service):
    # Client(addr, timeout=1e10).call() raised OverflowError from settimeout (not a
    # documented error) and left its socket open; AsyncClient took it.
    where = address(service)
    for bad in (1e10, WEEK + 1, -1.0, float("nan"), float("inf")):
        for cls in (Client, AsyncClient):
            with pytest.raises(ValueError, match="604800 seconds"):
                cls(where, timeout=bad)
    before = _open_fds()
    with Client(where, timeout=WEEK) as bg:
        assert bg.call("test") == b"Test"
        with pytest.raises(ValueError, match="604800 seconds"):
            bg.call("test", timeout=1e10)  # a call's own, too
        bg.close()
        bg.timeout = 1e10  # changed since: refused before a socket is made
        with pytest.raises(ValueError, match="604800 seconds"):
            bg.call("test")
    assert _open_fds() == before

    async def both() -> None:
        async with AsyncClient(where, timeout=WEEK) as abg:
            assert await abg.call("test") == b"Test"
            with pytest.raises(ValueError, match="604800 seconds"):
                await abg.call("test", timeout=1e10)

    asyncio.run(both())


def test_a_timeout_of_0_is_refused_before_anything_is_sent(service):
    # call(timeout=0) got its reply from Client (the kernel's least timeout: a quick call
    # beat it) and ClientTimeout from AsyncClient once the request was out; PHP and the
    # CLI refuse 0. Refused by both now, the client's at construction, a call's unsent.
    where = address(service)
    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match="above 0"):
            cls(where, timeout=0)
    with Client(where) as bg:
        with pytest.raises(ValueError, match="above 0"):
            bg.call("echo", "sync", timeout=0)
        with pytest.raises(ValueError, match="above 0"):
            bg.run("echo", "sync", wait_timeout=0.0)

    async def main() -> None:
        async with AsyncClient(where) as abg:
            with pytest.raises(ValueError, match="above 0"):
                await abg.call("echo", "async", timeout=0)
            with pytest.raises(ValueError, match="above 0"):
                await abg.run("echo", "async", wait_timeout=0)

    asyncio.run(main())
    with Client(where) as bg:
        assert sum(bg.queue_stats()["counts"].values()) == 0  # no run() was sent
        assert bg.stats()["modules"].get("echo") is None  # nor any call


# A call that runs until the service's stop cuts it; its file says it started.
STARTED_THEN_SLEEPS = """
import asyncio
from pathlib import Path

async def handle_tcp(request):
    Path(__file__).with_name(request.text + ".started").touch()
    await asyncio.sleep(5)
    return "slept"
"""


def test_a_request_a_graceful_stop_cuts_is_service_down(modules_dir, make_service):
    # A call still running when shutdown_grace ends, and a request that comes during it,
    # are answered "503: Shutting down", a get of a job the stop puts back "503: Shutting
    # down: job N is still queued": the clients raised ReplyError 503, which the caller's
    # ServiceDown fallback (docs/clients.md: "shutting down") did not catch.
    write_module(modules_dir, "slow", STARTED_THEN_SLEEPS)
    svc = make_service("[limits]\nshutdown_grace = 3\n")
    where = address(svc)
    with Client(where) as bg:
        job = bg.add("slow", "job")
    stopping = threading.Event()

    def sync_call() -> object:
        with Client(where) as bg, pytest.raises(ServiceDown) as down:
            bg.call("slow", "sync")
        return down.value

    async def async_requests() -> list[object]:
        async with AsyncClient(where) as abg:
            await abg.ping()  # open: the two below are written in this order, at once
            cut = [
                asyncio.ensure_future(abg.get(job)),
                asyncio.ensure_future(abg.call("slow", "async")),
            ]
            await asyncio.to_thread(stopping.wait)  # the connection is kept for the call
            during = [abg.add("echo", "late"), abg.add_many([("echo", "a"), ("echo", "b")])]
            return await asyncio.gather(*during, *cut, return_exceptions=True)

    with concurrent.futures.ThreadPoolExecutor() as pool:
        sync = pool.submit(sync_call)
        asynchronous = pool.submit(asyncio.run, async_requests())
        for name in ("job", "sync", "async"):  # (the get was read before the async call)
            wait_until((modules_dir / f"{name}.started").exists)
        svc.signal(signal.SIGTERM)
        try:
            svc.wait_for_log("calls in flight, up to")  # the stop began: requests refused
        finally:
            stopping.set()
        errors = [sync.result(timeout=30), *asynchronous.result(timeout=30)]
    assert svc.wait() == 0
    assert len(errors) == 5 and all(isinstance(error, ServiceDown) for error in errors), errors
    for error in errors:
        assert "the service is shutting down (503 Shutting down" in str(error)
        assert str(error).endswith("): the request may have run")
        assert isinstance(error.__cause__, ReplyError) and error.__cause__.code == 503
    assert errors[3].__cause__.message == f"Shutting down: job {job} is still queued"
    batch = errors[2]  # add_many's: .results says which the stop cut (it: may have run)
    assert batch.results == [batch, batch]


def test_no_socket_is_left_open_when_the_greeting_is_interrupted(service, monkeypatch):
    # A ^C (or any error but an OSError) while greeting left the new socket open.
    import bgservice.client

    def interrupted(sock: socket.socket, n: int) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(bgservice.client, "_read_exact", interrupted)
    before = _open_fds()
    bg = Client(address(service))
    with pytest.raises(KeyboardInterrupt) as info:  # it keeps the frames, and their locals
        bg.call("test")
    assert _open_fds() == before, info


class Interrupted(Exception):
    """What a signal handler raises in the middle of a call (as ^C raises KeyboardInterrupt)."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


@pytest.fixture
def alarm():
    """``alarm(seconds)``: the call running then is interrupted by ``Interrupted``."""
    old = signal.signal(signal.SIGALRM, _interrupt)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def stopped(svc):
    """The service's process stopped (SIGSTOP): it reads nothing until the block ends."""
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)


def test_a_call_interrupted_while_waiting_does_not_give_its_reply_to_the_next(service, alarm):
    # The connection was kept: the next call read the interrupted one's reply
    # ("slept 1000" for sleep:1500), and the one after raised ServiceDown.
    with Client(address(service)) as bg:
        alarm(0.3)
        with pytest.raises(Interrupted):
            bg.call("sleep", "1000")
        assert bg.call("sleep", "1500") == b"slept 1500"
        assert bg.call("echo", "next") == b"next"


def test_a_call_interrupted_while_writing_sends_no_half_request(service, alarm):
    # The half-written request stayed on the kept connection, and the next one completed
    # it: the service ran one request of 3.9 MB of the first and 4.5 MB of the second.
    with Client(address(service)) as bg:
        assert bg.call("test") == b"Test"  # connected
        with stopped(service):
            alarm(0.5)
            with pytest.raises(Interrupted):
                bg.call("echo", b"A" * (8 << 20))  # more than the socket buffers take
        assert bg.call("echo", b"B" * (1 << 20)) == b"B" * (1 << 20)


def test_a_write_that_takes_too_long_is_a_timeout_not_a_service_down(service):
    # Every OSError of sendall was ServiceDown, the kernel's send timeout (EAGAIN) too:
    # the CLI exited 3 (down) for a busy service, not 4 (timeout).
    with Client(address(service), timeout=1) as bg:
        assert bg.call("test") == b"Test"
        with stopped(service), pytest.raises(ClientTimeout, match="took none of the request"):
            bg.call("echo", b"x" * (16 << 20))
        assert bg.call("test") == b"Test"  # a new connection


@pytest.mark.parametrize("data", [5, [104, 105], 10**7, None])
def test_data_that_is_not_text_or_bytes_is_refused_before_it_is_sent(service, data):
    # bytes(data) took it: 5 became five NUL bytes, [104, 105] b"hi", 10**7 ten megabytes.
    with Client(address(service)) as bg:
        for call in (bg.call, bg.add, bg.send):
            with pytest.raises(ValueError, match="data must be str or bytes, not"):
                call("echo", data)
        assert "echo" not in bg.stats()["modules"]  # nothing was sent


@pytest.mark.parametrize("module", [b"echo", "rec\udcfford", "\ud800"])
def test_a_module_name_that_is_not_utf8_text_is_refused_before_it_is_sent(service, module):
    # A bytes name was an AttributeError, one with lone surrogates (a shell argument that
    # is not UTF-8) a UnicodeEncodeError; the docs promise ValueError, nothing sent.
    with Client(address(service)) as bg:
        for call in (bg.call, bg.add, bg.send, bg.run, lambda m, d: bg.add_many([(m, d)])):
            with pytest.raises(ValueError, match="module"):
                call(module, "x")
        with pytest.raises(ValueError, match="module"):
            bg.schedule("nightly", module, "x", every=60)
        with pytest.raises(ValueError, match="module"):
            asyncio.run(AsyncClient(address(service)).call(module, "x"))
        assert bg.stats()["requests"] == 0  # counted once served: none before this one


def test_send_over_a_unix_datagram_socket_never_waits(tmp_path, make_service):
    # The kernel queues 10 unread datagrams on a Unix datagram socket: the 11th send to a
    # busy service waited as long as it was busy, for ever to one that hung.
    dgram = tmp_path / "bg.dgram"
    svc = make_service(f'[[listen]]\nunix_dgram = "{dgram}"\n')
    bg = Client(str(tmp_path / "bg.sock"), udp_address=str(dgram))
    sent: list[int] = []

    def send_many() -> None:
        for i in range(200):
            bg.send("log", f"message {i}")
            sent.append(i)

    with stopped(svc):
        sender = threading.Thread(target=send_many, daemon=True)
        sender.start()
        sender.join(30)
        assert not sender.is_alive() and len(sent) == 200, len(sent)


class Refuses(FakeService):
    """Refuses every connection as the service does (bgservice.stream.sniffer): the
    reason at once, in the one-shot form, then the end of its side."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__()

    def serve(self, peer: socket.socket) -> None:
        peer.sendall(self.reply)
        peer.shutdown(socket.SHUT_WR)
        while peer.recv(65536):  # read until the client closes: no reset
            pass


def test_a_connection_refused_with_403_is_a_reply_error_saying_so():
    # The first 4 bytes of "403: Forbidden" were taken for a wrong greeting: "does not
    # speak the framed protocol", a ServiceDown that the caller's fallback hid.
    server = Refuses(b"403: Forbidden")
    with Client(server.address, timeout=5) as bg, pytest.raises(ReplyError) as refused:
        bg.call("echo", "x")
    assert refused.value.code == 403
    assert str(refused.value) == f"{server.address} refused the connection: 403 Forbidden"

    async def main() -> None:
        async with AsyncClient(server.address, timeout=5) as abg:
            with pytest.raises(ReplyError) as again:
                await abg.call("echo", "x")
            assert again.value.code == 403 and "403 Forbidden" in str(again.value)

    asyncio.run(main())
    server.listener.close()


def test_a_connection_over_max_connections_is_a_service_down_saying_503(make_service):
    svc = make_service("[limits]\nmax_connections = 1\n")
    with Client(address(svc), timeout=5) as held:
        assert held.call("test") == b"Test"  # the one connection the service takes
        with Client(address(svc), timeout=5) as bg, pytest.raises(ServiceDown) as full:
            bg.call("test")
        assert "refused the connection: 503 Too many connections" in str(full.value)

        async def main() -> None:
            async with AsyncClient(address(svc), timeout=5) as abg:
                with pytest.raises(ServiceDown, match="503 Too many connections"):
                    await abg.call("test")

        asyncio.run(main())


# Each read by the service as another module's name, or as none: a colon ends the name
# (what follows becomes the data), and it drops any other character.
MISREAD_NAMES = ["echo:x", "ec ho", "e.cho", "\u00e9cho", "echo\n", ""]


@pytest.mark.parametrize("module", MISREAD_NAMES)
def test_a_module_name_the_service_would_read_otherwise_is_refused(
    modules_dir, make_service, module
):
    # call("echo:x", "DATA") sent echo:x:DATA: module echo, called with "x:DATA", a silent
    # wrong call ("ec ho", "e.cho" and "\u00e9cho" called echo too).
    write_module(modules_dir, "my_echo-2", "def handle_tcp(request):\n    return request.data\n")
    service = make_service()
    rule = "is not one the service can take: a module name is one or more of A-Z a-z 0-9 _ -"
    with Client(address(service)) as bg:
        for call in (bg.call, bg.add, bg.send, bg.run, lambda m, d: bg.add_many([(m, d)])):
            with pytest.raises(ValueError, match=rule):
                call(module, "DATA")
        with pytest.raises(ValueError, match=rule):
            bg.schedule("nightly", module, "DATA", every=60)

        async def each() -> None:
            async with AsyncClient(address(service)) as abg:
                many = lambda m, d: abg.add_many([("echo", "ok"), (m, d)])  # noqa: E731
                for call in (abg.call, abg.add, abg.send, abg.run, many):
                    with pytest.raises(ValueError, match=rule):
                        await call(module, "DATA")
                with pytest.raises(ValueError, match=rule):
                    await abg.schedule("nightly", module, "DATA", every=60)

        asyncio.run(each())
        assert bg.stats()["requests"] == 0  # counted once served: none before this one
        assert bg.call("echo", "x:DATA") == b"x:DATA"  # a colon in the data: as meant
        assert bg.call("my_echo-2", "a name of each kind") == b"a name of each kind"


class HugeReply(FakeService):
    """Greets as the service does, then answers the request with a reply whose header says
    4 GiB less a byte, sends a megabyte of it and waits: a peer that is no bgservice (a
    wrong port) or a broken one. ``closed`` is set once the client has closed it."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        super().__init__()

    def serve(self, peer: socket.socket) -> None:
        peer.recv(len(PREFACE))
        peer.sendall(PREFACE)
        peer.recv(65536)
        with contextlib.suppress(OSError):
            peer.sendall(b"200" + struct.pack(">I", 2**32 - 1) + b"x" * (1 << 20))
            while peer.recv(65536):  # until the client closes
                pass
        self.closed.set()


def test_a_reply_longer_than_max_reply_bytes_is_refused_and_its_connection_closed():
    # A peer could make a client read without end (a wrong port, a broken peer): it read
    # until the timeout, a reply's length at a time, holding all of it.
    server = HugeReply()
    said = f"{server.address} sent a reply of 4294967295 bytes, more than max_reply_bytes=67108864"
    with Client(server.address, timeout=10) as bg:
        with pytest.raises(ReplyTooLarge) as big:
            bg.call("echo", "x")
        assert server.closed.wait(10)  # its framing lost: closed at once, not kept
    assert (big.value.size, big.value.limit) == (2**32 - 1, 64 << 20) and said in str(big.value)
    assert isinstance(big.value, ServiceDown)  # the caller's fallback takes it
    server.closed.clear()

    async def main() -> None:
        async with AsyncClient(server.address, timeout=10) as abg:
            with pytest.raises(ReplyTooLarge, match=re.escape(said)):
                await abg.call("echo", "x")
            assert await asyncio.to_thread(server.closed.wait, 10)

    asyncio.run(main())
    assert server.closed.wait(10)
    server.listener.close()


def test_max_reply_bytes_bounds_a_services_replies(service):
    small = 1000
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_reply_bytes"):
            Client(address(service), max_reply_bytes=bad)
    with Client(address(service), max_reply_bytes=small) as bg:
        assert bg.call("echo", "x" * small) == b"x" * small  # up to it
        with pytest.raises(ReplyTooLarge, match="1001 bytes, more than max_reply_bytes=1000"):
            bg.call("echo", "x" * (small + 1))
        assert bg.call("echo", "next") == b"next"  # on a new connection, in step
        with pytest.raises(ReplyTooLarge) as cut:  # one read: the reply before it is kept
            bg.requests([b"echo:before", b"echo:" + b"x" * 5000, b"echo:after"])
        assert cut.value.results == [(200, b"before"), cut.value, cut.value]

    async def main() -> ReplyTooLarge:
        async with AsyncClient(address(service), max_reply_bytes=small) as abg:
            with pytest.raises(ReplyTooLarge, match="5000 bytes"):
                await abg.call("echo", "x" * 5000)
            assert await abg.call("echo", "next") == b"next"
            with pytest.raises(ReplyTooLarge) as cut:
                await abg.requests([b"echo:before", b"echo:" + b"x" * 5000, b"echo:after"])
            return cut.value

    error = asyncio.run(main())
    assert error.results == [(200, b"before"), error, error]


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_an_async_call_after_the_service_restarted_while_the_loop_was_blocked(make_service, run):
    # The kept connection's close came while the loop was blocked (a module's sync call,
    # a long computation): the next call wrote on it before the loop heard, and raised
    # ServiceDown "it may have run" for a request the service never read.
    port = free_port()
    svc = make_service(f'[[listen]]\nhost = "127.0.0.1"\nport = {port}\n')

    async def main() -> list[object]:
        async with AsyncClient(f"127.0.0.1:{port}") as abg:
            first = await abg.add("echo", "before")
            svc.proc.kill()  # the loop blocked from here: nothing awaited until the call
            svc.proc.wait()
            svc.start()  # (the same database: the job added before is there)
            return [first, await abg.add("echo", "after the restart"), await abg.call("test")]

    first, again, called = run(main())
    assert called == b"Test"
    with Client(f"127.0.0.1:{port}") as bg:
        assert bg.get_many([first, again]) == [b"before", b"after the restart"]
        assert sum(bg.queue_stats()["counts"].values()) == 2  # queued once each


def test_an_async_connection_closed_while_idle_and_the_loop_blocked_is_replaced(make_service):
    svc = make_service("[limits]\nidle_timeout = 0.2\n")

    async def main() -> bytes:
        async with AsyncClient(address(svc)) as abg:
            assert await abg.call("test") == b"Test"
            # The loop blocked until the service closed ours (the one open is stats' own).
            wait_until(lambda: svc.stats()["connections"]["open"] == 1)
            return await abg.call("echo", "on a new connection")

    assert asyncio.run(main()) == b"on a new connection"
