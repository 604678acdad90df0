"""The datagram transport (UDP and Unix datagram sockets): one datagram, one request,
nothing ever sent back.

``datagram_received`` only checks the peer and queues the datagram; a fixed number of
worker tasks run the modules. The queue is bounded, so a flood costs dropped datagrams
(counted in ``service:stats``), never memory or the TCP clients' turn on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bgservice.access import AccessList
from bgservice.dispatch import Dispatcher
from bgservice.protocol import split_request
from bgservice.request import Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)

Datagram = tuple[bytes, str, str]


class DatagramWorkers:
    """The bounded queue of received datagrams and the tasks that serve them."""

    def __init__(self, dispatcher: Dispatcher, stats: Stats, size: int, workers: int) -> None:
        self.dispatcher = dispatcher
        self.stats = stats
        self.queue: asyncio.Queue[Datagram] = asyncio.Queue(size)
        self.workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._last_drop_log = 0.0
        self._drops_unlogged = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]

    def offer(self, item: Datagram) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats.udp_dropped += 1
            self._drops_unlogged += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 5.0:
                log.warning(
                    "datagram queue full (%d): dropped %d datagrams",
                    self.queue.maxsize,
                    self._drops_unlogged,
                )
                self._last_drop_log, self._drops_unlogged = now, 0

    async def _work(self) -> None:
        while True:
            data, peer, transport = await self.queue.get()
            try:
                module, payload = split_request(data)
                await self.dispatcher.notify(Request(module, payload, transport, peer))
            finally:
                self.queue.task_done()

    async def drain(self, timeout: float) -> None:
        """Serve what is already queued (within ``timeout``), then stop the workers."""
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            log.warning("%d datagrams not served before shutdown", self.queue.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class DatagramEndpoint(asyncio.DatagramProtocol):
    """One UDP or Unix datagram socket."""

    def __init__(self, workers: DatagramWorkers, access: AccessList, transport_name: str) -> None:
        self.workers = workers
        self.access = access
        self.transport_name = transport_name
        self.stats = workers.stats

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.udp_received += 1
        if isinstance(addr, tuple):
            if not self.access.allows(addr[0]):
                self.stats.refused["udp_forbidden"] += 1
                return
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = addr or ""
        self.workers.offer((data, peer, self.transport_name))

    def error_received(self, exc: Exception) -> None:
        log.debug("%s socket error: %s", self.transport_name, exc)
