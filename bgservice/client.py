"""Python clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio), same methods.

Both speak the framed protocol (docs/protocol.md) on one persistent connection, so a
reply's status can never be mistaken for data and a connection serves many calls;
``AsyncClient`` pipelines: concurrent calls share the connection, replies come back in
order. Fire-and-forget ``send`` goes over UDP (or a Unix datagram socket).

Errors: an error reply raises ``ReplyError`` (``.code``, ``.message``); a service that
cannot be reached raises ``ServiceDown``, so the caller can fall back; a reply that does
not come within ``timeout`` seconds raises ``ClientTimeout``. The connection is reopened
once, transparently, when the service had closed it (idle timeout, restart)::

    with Client("127.0.0.1:12341") as bg:
        css = bg.call("less", ".a { width: (1px + 2) }")
        job = bg.add("sleep", "500", priority=5, retries=2)
        print(bg.get(job))
        bg.get("id:7")    # a job id in the original's form is taken too

A bad job id (not ``N`` or ``id:N``) raises ``ValueError`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from typing import Any

from bgservice.client_requests import (
    DEFAULT_ADDRESS,
    ClientTimeout,
    Data,
    JobRef,
    ServiceDown,
    _check,
    _new_id,
    add_request,
    parse_address,
    parse_job_id,
    queue_request,
    request,
)
from bgservice.errors import ReplyError
from bgservice.protocol import PREFACE, ReplyDecoder, framed_request

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncClient",
    "Client",
    "ClientTimeout",
    "JobRef",
    "ReplyError",
    "ServiceDown",
    "parse_job_id",
]

# --- blocking ---------------------------------------------------------------------------


class _Where:
    """Where a client talks to: ``address`` for calls (``host:port`` or a Unix socket
    path), ``udp_address`` for ``send`` (default: the same), ``timeout`` seconds a reply
    may take (None: forever)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = 30.0,
        udp_address: str | None = None,
    ) -> None:
        self.address = address
        self.udp_address = udp_address or address
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        """Set up the connection state (none is open until the first call)."""


class Client(_Where):
    """A blocking client on one persistent framed connection. Not thread-safe: use one per
    thread (connections are cheap for the service)."""

    def _start(self) -> None:
        self._sock: socket.socket | None = None
        self._decoder = ReplyDecoder()
        self._ready: deque[tuple[int, bytes]] = deque()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- calls ---------------------------------------------------------------------------

    def call(self, module: str, data: Data = b"", timeout: float | None = None) -> bytes:
        """Call ``module`` over TCP and return its reply; an error reply raises."""
        return _check(*self.request(request(module, data), timeout))

    def send(self, module: str, data: Data = b"") -> None:
        """Fire and forget over UDP (or a Unix datagram socket): no reply, never raises
        because the service is down (the datagram is simply lost)."""
        family, target = parse_address(self.udp_address)
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(request(module, data), target)
            except OSError:
                pass  # fire-and-forget: a service that is down must not fail the caller

    def ping(self) -> bool:
        return self.call("service", "ping") == b"pong"

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.call("service", "stats")))

    def modules(self) -> list[dict[str, Any]]:
        return list(json.loads(self.call("service", "modules")))

    # --- queue -------------------------------------------------------------------------

    def add(self, module: str, data: Data = b"", **options: Any) -> int:
        """Queue a job; options as docs/queue.md (priority, delay, at, retries, backoff,
        timeout, unique, after). Returns the job's id."""
        return _new_id(_check(*self.request(add_request(module, data, **options))))

    def get(self, job: JobRef, timeout: float | None = None) -> bytes:
        """Wait for job ``job`` and return its result (its error reply raises)."""
        return _check(*self.request(queue_request("get", job), timeout))

    def check(self, job: JobRef) -> int:
        """0 waiting, 1 running, 2 finished (the original's answer)."""
        return int(_check(*self.request(queue_request("check", job))))

    def status(self, job: JobRef) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(queue_request("status", job)))))

    def cancel(self, job: JobRef) -> str:
        """``cancelled`` (it was waiting) or ``cancelling`` (it runs and was asked to stop)."""
        return _check(*self.request(queue_request("cancel", job))).decode()

    def retry(self, job: JobRef) -> int:
        return _new_id(_check(*self.request(queue_request("retry", job))))

    def list(self, state: str | None = None, limit: int | None = None, offset: int = 0) -> Any:
        # The state as an option: the protocol reads options after the command name only,
        # so "list:waiting?limit=5" would be refused.
        request = queue_request("list", None, state=state, limit=limit, offset=offset or None)
        return json.loads(_check(*self.request(request)))

    def queue_stats(self, window: float | None = None) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(queue_request("stats", window=window)))))

    # --- the connection ----------------------------------------------------------------

    def request(self, payload: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """Send one framed request; its (status, body). Reconnects once if the service
        closed the kept connection."""
        for _ in (1, 2):
            reused = self._sock is not None
            sock = self._connect()
            try:
                sock.settimeout(timeout if timeout is not None else self.timeout)
                sock.sendall(framed_request(payload))
                return self._read(sock)
            except TimeoutError:
                self.close()
                raise ClientTimeout(f"no reply from {self.address} in time") from None
            except OSError as exc:
                self.close()
                # Only a kept connection the service had already closed (idle timeout,
                # restart) is retried: the request cannot have run on it.
                if not reused:
                    raise ServiceDown(f"connection to {self.address} lost: {exc}") from None
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        family, target = parse_address(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(min(self.timeout or 5.0, 5.0))
        try:
            sock.connect(target)
            sock.sendall(PREFACE)
            if _read_exact(sock, len(PREFACE)) != PREFACE:
                raise ServiceDown(f"{self.address} does not speak the framed protocol")
        except OSError as exc:
            sock.close()
            raise ServiceDown(f"cannot reach the service at {self.address}: {exc}") from None
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._decoder, self._ready = sock, ReplyDecoder(), deque()
        return sock

    def _read(self, sock: socket.socket) -> tuple[int, bytes]:
        while not self._ready:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("closed by the service")
            self._ready.extend(self._decoder.feed(chunk))
        return self._ready.popleft()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed by the service")
        data += chunk
    return data


# --- asyncio ----------------------------------------------------------------------------


class AsyncClient(_Where):
    """The same methods as ``Client``, awaitable; concurrent calls are pipelined on one
    connection (replies come back in request order, so each waiter gets its own)."""

    def _start(self) -> None:
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            self._reader_task = None
        self._fail_waiting(ServiceDown("client closed"))

    async def call(self, module: str, data: Data = b"", timeout: float | None = None) -> bytes:
        return _check(*await self.request(request(module, data), timeout))

    async def send(self, module: str, data: Data = b"") -> None:
        Client(self.address, udp_address=self.udp_address).send(module, data)  # one sendto

    async def ping(self) -> bool:
        return await self.call("service", "ping") == b"pong"

    async def stats(self) -> dict[str, Any]:
        return dict(json.loads(await self.call("service", "stats")))

    async def modules(self) -> list[dict[str, Any]]:
        return list(json.loads(await self.call("service", "modules")))

    async def add(self, module: str, data: Data = b"", **options: Any) -> int:
        return _new_id(_check(*await self.request(add_request(module, data, **options))))

    async def get(self, job: JobRef, timeout: float | None = None) -> bytes:
        return _check(*await self.request(queue_request("get", job), timeout))

    async def check(self, job: JobRef) -> int:
        return int(_check(*await self.request(queue_request("check", job))))

    async def status(self, job: JobRef) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(queue_request("status", job)))))

    async def cancel(self, job: JobRef) -> str:
        return _check(*await self.request(queue_request("cancel", job))).decode()

    async def retry(self, job: JobRef) -> int:
        return _new_id(_check(*await self.request(queue_request("retry", job))))

    async def list(
        self, state: str | None = None, limit: int | None = None, offset: int = 0
    ) -> Any:
        request = queue_request("list", None, state=state, limit=limit, offset=offset or None)
        return json.loads(_check(*await self.request(request)))

    async def queue_stats(self, window: float | None = None) -> dict[str, Any]:
        return dict(json.loads(_check(*await self.request(queue_request("stats", window=window)))))

    async def request(self, payload: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """Send one framed request and wait for its reply. A request that times out costs
        the connection (later replies would be out of step), which reopens on the next."""
        for _ in (1, 2):
            async with self._lock:  # frames go out whole and in the order of the futures
                reused = self._writer is not None and not self._writer.is_closing()
                writer = await self._connect()
                future = asyncio.get_running_loop().create_future()
                self._waiting.append(future)
                writer.write(framed_request(payload))
            try:
                return await asyncio.wait_for(
                    asyncio.shield(future), timeout if timeout is not None else self.timeout
                )
            except TimeoutError:
                await self.close()
                raise ClientTimeout(f"no reply from {self.address} in time") from None
            except ConnectionResetError:
                if not reused:  # as in Client.request: only a stale kept connection
                    raise ServiceDown(f"connection to {self.address} lost") from None
        raise AssertionError("unreachable")

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        family, target = parse_address(self.address)
        try:
            if family == socket.AF_UNIX:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(target), 5)
            else:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
            writer.write(PREFACE)
            if await asyncio.wait_for(reader.readexactly(len(PREFACE)), 5) != PREFACE:
                raise ServiceDown(f"{self.address} does not speak the framed protocol")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise ServiceDown(f"cannot reach the service at {self.address}: {exc}") from None
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        return writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = ReplyDecoder()
        try:
            while chunk := await reader.read(1 << 20):
                for reply in decoder.feed(chunk):
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except OSError:
            pass
        self._writer = None
        self._fail_waiting(ConnectionResetError("closed by the service"))

    def _fail_waiting(self, exc: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: the waiter raises it itself
