"""The asyncio client: ``AsyncClient``, the same methods as ``bgservice.client.Client``,
awaitable. Concurrent calls share one framed connection (pipelined: replies come back in
request order, so each waiter gets its own); ``add_many``/``get_many`` write a whole
batch at once."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Iterable
from typing import Any

from bgservice.client_requests import (
    ClientTimeout,
    Data,
    JobRef,
    JobSpec,
    Payloads,
    Replies,
    Rows,
    ServiceDown,
    Where,
    _check,
    _new_id,
    add_request,
    add_requests,
    batch,
    named_request,
    parse_address,
    queue_request,
    request,
    schedule_request,
)
from bgservice.protocol import PREFACE, ReplyDecoder, framed_request


class AsyncClient(Where):
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
        return _check(*await self.request(queue_request("get", job), timeout))

    async def run(
        self, module: str, data: Data = b"", wait_timeout: float | None = None, **options: Any
    ) -> bytes:
        """Queue a job and wait for its result in one round trip (``Client.run``)."""
        request = add_request(module, data, wait=True, **options)
        return _check(*await self.request(request, wait_timeout))

    async def add_many(self, jobs: Iterable[JobSpec]) -> list[int]:
        """Queue several jobs in one write (``Client.add_many``)."""
        return batch(await self.requests(add_requests(jobs)), _new_id)

    async def get_many(self, jobs: Iterable[JobRef], timeout: float | None = None) -> list[bytes]:
        """``get`` for several jobs in one write (``Client.get_many``)."""
        payloads = [queue_request("get", j) for j in jobs]
        return batch(await self.requests(payloads, timeout), bytes)

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

    # --- schedules (recurring jobs) ---------------------------------------------------

    async def schedules(self) -> Rows:
        """Every schedule, with its last slot fired and its next run."""
        return list(json.loads(_check(*await self.request(b"queue:schedules"))))

    async def schedule(
        self, name: str, module: str, data: Data = b"", **options: Any
    ) -> dict[str, Any]:
        """Add or replace a schedule: ``cron="0 3 * * *"`` or ``every=SECONDS``, and
        ``tz``, ``missed`` ("once"/"skip"), ``paused``, job options (priority, retries,
        backoff, timeout). Returns it as ``schedules()`` lists it."""
        return dict(
            json.loads(_check(*await self.request(schedule_request(name, module, data, **options))))
        )

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
        return (await self.requests([payload], timeout))[0]

    async def requests(self, payloads: Payloads, timeout: float | None = None) -> Replies:
        """Send framed requests in one write and wait for their replies (in order). A
        request that times out costs the connection (later replies would be out of
        step), which reopens on the next."""
        if not payloads:
            return []
        for _ in (1, 2):
            async with self._lock:  # frames go out whole and in the order of the futures
                reused = self._writer is not None and not self._writer.is_closing()
                writer = await self._connect()
                loop = asyncio.get_running_loop()
                futures = [loop.create_future() for _ in payloads]
                self._waiting.extend(futures)
                writer.write(b"".join(map(framed_request, payloads)))
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*map(asyncio.shield, futures)),
                    timeout if timeout is not None else self.timeout,
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
