"""The datagram transport (UDP and Unix datagram sockets): one datagram, one request,
nothing ever sent back.

``datagram_received`` only checks the peer and queues the datagram; a fixed number of
serving tasks (``[limits] udp_workers``) run the modules. The queue is bounded, so a flood
costs dropped datagrams (counted in ``service:stats``), never memory or the TCP clients'
turn on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from bgservice.access import AccessList
from bgservice.dispatch import Dispatcher
from bgservice.origin import Origin
from bgservice.protocol import split_request
from bgservice.request import JobAdder, Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)

Datagram = tuple[bytes, str, Origin]  # (bytes, peer, where it came from)


class DatagramQueue:
    """The bounded queue of received datagrams and the tasks that serve them.

    The hot path is kept lean (it runs once per datagram): a plain deque instead of
    ``asyncio.Queue``, a future per *idle* task only, and tasks that serve what is
    queued back to back, yielding to the loop every ``BATCH`` datagrams so that a flood of
    handlers that never suspend cannot hold the loop away from TCP clients.
    """

    BATCH = 16

    def __init__(
        self, dispatcher: Dispatcher, stats: Stats, jobs: JobAdder, size: int, tasks: int
    ) -> None:
        self.dispatcher = dispatcher
        self.stats = stats
        self.jobs = jobs  # what handlers' add_job() adds to
        self.maxsize = size
        self.ntasks = tasks
        self.pending: deque[Datagram] = deque()
        self.active = 0  # datagrams being served (at most ``tasks``)
        self._idle: list[asyncio.Future[None]] = []  # one per task waiting for work
        self._emptied: asyncio.Future[None] | None = None  # set by drain()
        self._tasks: list[asyncio.Task[None]] = []
        self._names: dict[bytes, str] = {}  # raw module head -> cleaned name
        self._last_drop_log = 0.0
        self._drops_unlogged = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.ntasks)]

    def offer(self, item: Datagram) -> None:
        pending = self.pending
        if len(pending) >= self.maxsize:
            self._drop()
            return
        pending.append(item)
        idle = self._idle
        while idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _drop(self) -> None:
        self.stats.udp_dropped += 1
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 5.0:
            log.warning(
                "datagram queue full (%d): dropped %d datagrams",
                self.maxsize,
                self._drops_unlogged,
            )
            self._last_drop_log, self._drops_unlogged = now, 0

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self.pending
        notify = self.dispatcher.notify
        batch = self.BATCH
        names = self._names
        jobs = self.jobs
        served = 0
        while True:
            if not pending:
                served = 0
                if self.active == 0 and self._emptied is not None and not self._emptied.done():
                    self._emptied.set_result(None)
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter  # offer() skips the waiter if cancelled (drain)
                continue
            data, peer, origin = pending.popleft()
            self.active += 1
            try:
                head, _, payload = data.partition(b":")
                module = names.get(head)
                if module is None:
                    module = self._name(data)
                await notify(Request(module, payload, origin, peer, loop=loop, jobs=jobs))
            except Exception:  # notify logs a module's errors itself; this is a bug of ours
                log.exception("internal error serving a %s datagram from %s", origin.value, peer)
            finally:
                self.active -= 1
            served += 1
            if served >= batch:  # let the loop read sockets and serve TCP in between
                served = 0
                await asyncio.sleep(0)

    def _name(self, data: bytes) -> str:
        """The module name of a datagram (``split_request``'s), remembered per raw head:
        clients send to a handful of modules, and the regex is the costly part."""
        module = split_request(data)[0]
        if len(self._names) >= 256:  # junk heads cannot grow it without bound
            self._names.clear()
        self._names[data.partition(b":")[0]] = module
        return module

    async def drain(self, timeout: float) -> None:
        """Serve what is already queued (within ``timeout``), then stop the serving tasks."""
        if self.pending or self.active:
            self._emptied = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), timeout)
            except TimeoutError:
                log.warning("%d datagrams not served before shutdown", len(self.pending))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class DatagramEndpoint(asyncio.DatagramProtocol):
    """One UDP or Unix datagram socket."""

    def __init__(self, queue: DatagramQueue, access: AccessList, origin: Origin) -> None:
        self.queue = queue
        self.access = access
        self.origin = origin
        self.stats = queue.stats

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.udp_received += 1
        if isinstance(addr, tuple):
            if not self.access.allows(addr[0]):
                self.stats.refused["udp_forbidden"] += 1
                return
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = addr or ""
        self.queue.offer((data, peer, self.origin))

    def error_received(self, exc: Exception) -> None:
        log.debug("%s socket error: %s", self.origin.value, exc)
