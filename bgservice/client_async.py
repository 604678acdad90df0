"""The asyncio client: ``AsyncClient``, ``bgservice.client.Client``'s methods, awaitable.
Concurrent calls share one framed connection (pipelined: replies come back in request
order, so each waiter gets its own); ``add_many``/``get_many`` write a batch at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from bgservice.client_errors import (
    REFUSAL,
    REFUSAL_BYTES,
    ClientTimeout,
    Refused,
    ReplyTooLarge,
    ServiceDown,
    _check,
    _new_id,
    answered,
    batch_of,
    cut_short,
    lost,
    no_reply,
    refusal,
    unreachable,
    waiting_for,
)
from bgservice.client_requests import (
    Data,
    JobRef,
    JobSpec,
    Payloads,
    Replies,
    Rows,
    Where,
    add_request,
    add_requests,
    check_timeout,
    named_request,
    parse_address,
    parse_job_id,
    poller,
    queue_request,
    request,
    run_request,
    schedule_request,
)
from bgservice.protocol import PREFACE, Reply, ReplyDecoder, framed_request

Waiters = list[asyncio.Future[tuple[int, bytes]]]  # a batch's, one a request


class FramedConnection(asyncio.BufferedProtocol):
    """The client's side of one framed connection: the preface's echo, then replies handed
    to the futures waiting for them, in order, as they arrive (no reader task between).

    A BufferedProtocol, so asyncio reads into one buffer of ours: for a plain Protocol the
    default event loop allocates 256 KiB for every read, which glibc serves with mmap,
    mremap and munmap (strace of a lock-step client: 3 system calls per reply)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, decoder: ReplyDecoder) -> None:
        self.loop = loop  # kept: get_running_loop() is a system call on Python 3.11
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.greeted: asyncio.Future[None] = loop.create_future()
        self.lost = False
        self.retired = False  # a call on it timed out: closed once the others are done
        self.openers = 0  # callers waiting for it to open: the last to give up closes it
        self._head = b""  # the preface's echo, until it is whole
        self._decoder = decoder
        self._buffer = memoryview(bytearray(65536))
        self._poll: select.poll | None = None  # its socket's, for unheard() (not on Windows)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._poll = poller(transport.get_extra_info("socket"))
        transport.write(PREFACE)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self._buffer[:nbytes])
        if not self.greeted.done():
            self._head += data
            if len(self._head) < len(PREFACE):
                return
            head, data = self._head[: len(PREFACE)], self._head[len(PREFACE) :]
            if REFUSAL.match(head):  # the rest comes before the service's close
                self._head = self._head[:REFUSAL_BYTES]
                return
            if head != PREFACE:
                self.greeted.set_exception(ServiceDown("does not speak the framed protocol"))
                self.close()
                return
            self.greeted.set_result(None)
        try:
            replies = self._decoder.feed(data)  # (ReplyTooLarge: its rest would read as replies)
            if len(replies) > len(self.waiting):
                raise ValueError("unasked reply")
        except ReplyTooLarge as exc:  # what came before it answers its requests
            return self.answer(exc.before, exc)
        except ValueError:  # or a status that is not a number: out of step with our requests,
            # so nothing more on it can be trusted (no request is sent again, as after a reset)
            return self.answer((), ServiceDown("the service sent a reply that answers no request"))
        self.answer(replies)
        if self.retired:
            self.retire()

    def eof_received(self) -> bool:
        return False  # the service closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.greeted.done():
            refused = REFUSAL.match(self._head)
            self.greeted.set_exception(
                Refused(self._head) if refused else ConnectionResetError("closed by the service")
            )
            self.greeted.exception()  # retrieved: _open raises its own error
        self.answer((), ConnectionResetError("closed by the service"))

    def answer(self, replies: Sequence[Reply], error: Exception | None = None) -> None:
        """Hand ``replies`` to the first calls waiting on it, in order; given an ``error``,
        the rest get it, and the connection is closed (nothing more on it is trusted)."""
        for reply in replies[: len(self.waiting)]:
            future = self.waiting.popleft()
            if not future.done():  # its caller gave up (cancelled, timed out)
                future.set_result(reply)
        if error is not None:
            self.close()
        while error is not None and self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: the waiter raises it itself

    def close(self) -> None:
        """Close it, from its loop or a later one (``AsyncClient._drop_stale``): there
        asyncio's close only schedules the socket's (and raises once that loop is closed),
        so the socket is shut down first, which ends it for the service now."""
        if self.transport is None or self.lost:
            return
        if not self.loop.is_running():
            with contextlib.suppress(OSError, AttributeError, TypeError):  # uvloop refuses
                self.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        if not self.loop.is_closed():
            self.transport.close()

    def retire(self) -> None:
        """Take no more calls; close once every call on it is answered or gave up."""
        self.retired = True
        if all(future.done() for future in self.waiting):
            self.close()

    @property
    def usable(self) -> bool:
        """Open, not being closed nor closed unheard (a request written now reaches the
        service), its loop running: the caller's (one loop at a time uses a client)."""
        transport = self.transport
        closed = self.lost or self.retired or transport is None or transport.is_closing()
        return not closed and self.loop.is_running() and not self.unheard()

    def unheard(self) -> bool:
        """Readable with no reply awaited: closed by the service while the loop was blocked
        (or sent bytes nobody asked for), not read yet. A request written on it would be lost,
        yet said to have maybe run (a new one takes it, as ``Client._kept``)."""
        return not self.waiting and self._poll is not None and bool(self._poll.poll(0))


class AsyncClient(Where):
    """The same methods as ``Client``, awaitable; concurrent calls are pipelined on one
    connection (replies come back in request order, so each waiter gets its own)."""

    def _start(self) -> None:
        check_timeout(self.timeout)
        self._conn: FramedConnection | None = None
        self._connecting: asyncio.Future[FramedConnection] | None = None
        self._opening: FramedConnection  # the connection _connecting opens

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._drop_stale()
        if self._conn is not None:
            self._conn.answer((), ServiceDown("client closed"))  # (and closes it)
            self._conn = None

    async def call(self, module: str, data: Data = b"", timeout: float | None = None) -> bytes:
        return _check(*await self.request(request(module, data), timeout))

    async def send(self, module: str, data: Data = b"") -> None:  # type: ignore[override]
        Where.send(self, module, data)  # one sendto: nothing to wait for

    async def ping(self) -> bool:
        return await self.call("service", "ping") == b"pong"

    async def stats(self) -> dict[str, Any]:
        return dict(json.loads(await self.call("service", "stats")))

    async def modules(self) -> list[dict[str, Any]]:
        return list(json.loads(await self.call("service", "modules")))

    async def add(self, module: str, data: Data = b"", **options: Any) -> int:
        return _new_id(_check(*await self.request(add_request(module, data, **options))))

    async def get(self, job: JobRef, timeout: float | None = None) -> bytes:
        with waiting_for("get()", timeout, self.timeout, [parse_job_id(job)]):
            return _check(*await self.request(queue_request("get", job), timeout))

    async def run(
        self, module: str, data: Data = b"", wait_timeout: float | None = None, **options: Any
    ) -> bytes:
        """Queue a job and wait for its result in one round trip (``Client.run``)."""
        request = run_request(module, data, **options)
        with waiting_for("run()", wait_timeout, self.timeout, module=module):
            return _check(*await self.request(request, wait_timeout))

    async def add_many(self, jobs: Iterable[JobSpec]) -> list[int]:
        """Queue several jobs in one write (``Client.add_many``, failures part way too)."""
        with batch_of(_new_id) as values:
            return values(await self.requests(add_requests(jobs)))

    async def get_many(self, jobs: Iterable[JobRef], timeout: float | None = None) -> list[bytes]:
        """``get`` for several jobs in one write (``Client.get_many``)."""
        ids = [parse_job_id(job) for job in jobs]
        with batch_of(bytes) as values, waiting_for("get_many()", timeout, self.timeout, ids):
            return values(await self.requests([queue_request("get", j) for j in ids], timeout))

    async def check(self, job: JobRef) -> int:
        return int(_check(*await self.request(queue_request("check", job))))

    async def status(self, job: JobRef) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(queue_request("status", job)))))

    async def cancel(self, job: JobRef) -> str:
        return _check(*await self.request(queue_request("cancel", job))).decode()

    async def retry(self, job: JobRef, dependents: bool = False) -> int:
        request = queue_request("retry", job, dependents=dependents)  # (False: left out)
        return _new_id(_check(*await self.request(request)))

    async def list(
        self, state: str | None = None, limit: int | None = None, offset: int = 0, *,
        module: str | None = None, name: str | None = None, tag: str | None = None,
    ) -> Any:  # fmt: skip
        """A page of jobs per state, filtered by ``module``, ``name``, ``tag`` (``Client.list``)."""
        request = queue_request("list", None, state=state, limit=limit, offset=offset or None,
                                module=module, name=name, tag=tag)  # fmt: skip
        return json.loads(_check(*await self.request(request)))

    async def queue_stats(self, window: float | None = None) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(queue_request("stats", window=window)))))

    # --- schedules (recurring jobs) ---------------------------------------------------

    async def schedules(self) -> Rows:
        """Every schedule, with its last slot fired and its next run."""
        return list(json.loads(_check(*await self.request(b"queue:schedules"))))

    async def schedule(
        self, name: str, module: str, data: Data = b"", **options: Any
    ) -> dict[str, Any]:
        """Add or replace a schedule (``Client.schedule``: its options and reply)."""
        payload = schedule_request(name, module, data, **options)
        return dict(json.loads(_check(*await self.request(payload))))

    async def unschedule(self, name: str) -> None:
        _check(*await self.request(named_request("unschedule", name)))

    async def pause(self, name: str) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(named_request("pause", name)))))

    async def resume(self, name: str) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(named_request("resume", name)))))

    async def fire(self, name: str) -> int:
        """Run the schedule's job now (an ordinary job; its slots are not touched)."""
        return _new_id(_check(*await self.request(named_request("fire", name))))

    async def request(self, payload: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """Send one framed request and wait for its reply."""
        return (await self._exchange([payload], timeout, []))[0]

    async def requests(self, payloads: Payloads, timeout: float | None = None) -> Replies:
        """Send framed requests in one write and wait for their replies (in order). A
        ``ServiceDown`` or ``ClientTimeout`` part way has ``results`` (``Client.requests``):
        as all are written at once, none is None unless the connection failed to open."""
        futures: Waiters = []
        try:
            return await self._exchange(payloads, timeout, futures)
        except (ServiceDown, ClientTimeout) as exc:
            raise cut_short(exc, answered(futures), len(futures), len(payloads)) from None

    async def _exchange(self, payloads: Payloads, timeout: float | None, out: Waiters) -> Replies:
        """Write ``payloads`` and wait for their replies, a future each, put in ``out``
        once written. A connection the service closed while idle is never written to
        (``usable`` sees it first); once written, nothing is sent again (it may have run)."""
        wanted = timeout if timeout is not None else self.timeout
        check_timeout(wanted)  # the call's, or the client's if it was changed since
        if not payloads:
            return []
        conn = self._conn
        if conn is None or not conn.usable:
            conn = await self._connect(wanted)
        assert conn.transport is not None
        futures = out  # the caller's: what was written, should this raise
        futures.extend(conn.loop.create_future() for _ in payloads)
        conn.waiting.extend(futures)  # and the frames go out in the same order, now
        conn.transport.write(b"".join(map(framed_request, payloads)))
        try:
            async with asyncio.timeout(wanted):
                if len(futures) == 1:
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            # Replies come in request order, so later calls would queue behind this one:
            # new calls get a new connection; this one closes once the calls already on
            # it are answered (or have given up too). Its late reply is dropped.
            if conn is self._conn:
                self._conn = None
            conn.retire()
            raise no_reply(self.address) from None
        except ConnectionResetError:
            raise lost(self.address) from None

    async def _connect(self, timeout: float | None) -> FramedConnection:
        """The connection, opened once for all the callers waiting for it. The connect
        takes at most the client's timeout and 5 s, and the caller's ``timeout``: the
        kernel completes it even while the service's loop is blocked, so one that does not
        complete is ``ServiceDown``, the same for every caller. The greeting is waited for
        as a reply is, within each caller's own ``timeout``: none in time is a busy service,
        a ``ClientTimeout`` for that caller alone (the others wait on). Once no caller
        waits for an opening any more, it is dropped."""
        self._drop_stale()
        if self._connecting is None or self._connecting.done():
            self._opening = FramedConnection(asyncio.get_running_loop(), self._reader())
            self._connecting = asyncio.ensure_future(self._open(self._opening))
        opening, conn = self._connecting, self._opening
        conn.openers += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(opening)
        except TimeoutError:
            if conn.transport is None:  # still connecting: as Client, a service down
                raise unreachable(self.address, "connect timed out") from None
            raise ClientTimeout(f"{self.address} accepted but did not greet in time") from None
        finally:
            conn.openers -= 1
            if not conn.openers and not opening.done():  # timed out or cancelled, all
                opening.cancel()  # _open closes it
                if self._connecting is opening:
                    self._connecting = None  # the next call opens a new one

    def _drop_stale(self) -> None:
        """Drop the connection (or opening) of a loop that no longer runs (an earlier
        ``asyncio.run``'s): a request written on it ran, and its reply, for a future of
        that loop, was a RuntimeError here. The running loop opens its own first."""
        if self._conn is not None and not self._conn.loop.is_running():
            self._conn.close()
            self._conn = None
        if self._connecting is not None and not self._opening.loop.is_running():
            self._opening.close()
            self._connecting = None

    async def _open(self, conn: FramedConnection) -> FramedConnection:
        family, target = parse_address(self.address)
        loop = conn.loop
        try:
            async with asyncio.timeout(min(self.timeout or 5.0, 5.0)):
                if family == socket.AF_UNIX:
                    await loop.create_unix_connection(lambda: conn, target)
                else:
                    await loop.create_connection(lambda: conn, *target)
        except (OSError, TimeoutError) as exc:
            conn.close()
            raise unreachable(self.address, exc) from None
        try:
            await conn.greeted  # no bound of its own: each caller waits within its timeout
        except Refused as exc:
            raise refusal(self.address, exc.args[0]) from None
        except ServiceDown as exc:
            raise ServiceDown(f"{self.address} {exc}") from None
        except OSError as exc:  # closed by the service before it greeted
            raise unreachable(self.address, exc) from None
        except BaseException:  # cancelled: no caller waits for it any more
            conn.close()
            raise
        self._conn = conn  # (asyncio and uvloop set TCP_NODELAY on TCP connections)
        return conn
