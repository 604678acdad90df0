"""The datagram transport (UDP and Unix datagram sockets): one datagram, one request,
nothing ever sent back.

``datagram_received`` checks the peer and hands the datagram to ``DatagramQueue``, which
serves it at once when its handler needs no wait, else in one of at most
``[limits] udp_workers`` tasks, queueing the rest. The queue is bounded, so a flood costs
dropped datagrams (counted in ``service:stats``), never memory or the TCP clients' turn on
the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from bgservice import eager
from bgservice.access import AccessList
from bgservice.cancelling import cancel_all
from bgservice.dispatch import Dispatcher
from bgservice.logs import Sparse
from bgservice.origin import Origin
from bgservice.protocol import split_request
from bgservice.request import JobAdder, Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)

Datagram = tuple[bytes, str, Origin]  # (bytes, peer, where it came from)


class DatagramQueue:
    """Received datagrams: served at once when their handler needs no wait, a bounded
    queue for the rest.

    A datagram whose handler finishes in its first step (logging, counting: most) is served
    inside ``datagram_received``, with no task and no queue (Dispatcher.notify): at 100,000
    datagrams a second, a task and a queue hop each cost more than the handler. One that
    waits (a ``def`` handler in the thread pool, an ``await``) goes on in a task; at most
    ``tasks`` (``[limits] udp_workers``) wait at once. Meanwhile new datagrams queue, up to
    ``size`` (beyond it they are dropped and counted), and are served as the waiting ones
    finish, ``BATCH`` per loop turn, so that a backlog cannot hold the loop away from TCP.
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
        self.waiting: set[asyncio.Task[None]] = set()  # handlers that wait, in tasks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog_soon = False  # a turn to serve the backlog is scheduled
        self._emptied: asyncio.Future[None] | None = None  # set by drain()
        self._drops = Sparse(5.0)  # a log line at most every 5 s

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def offer(self, item: Datagram) -> None:
        if self.pending or len(self.waiting) >= self.ntasks:
            if len(self.pending) >= self.maxsize:
                self._drop()
            else:
                self.pending.append(item)
            return
        self._serve(item)

    def _serve(self, item: Datagram) -> None:
        data, peer, origin = item
        module, payload = split_request(data)
        loop = self._loop
        assert loop is not None, "DatagramQueue.start() not called"
        request = Request(module, payload, origin, peer, loop=loop, jobs=self.jobs)
        # Served now, unless it waits: as a stream's request is (bgservice.eager), in a
        # context of its own, with a current task for asyncio.timeout and the like.
        done, task = eager.start_call(self.dispatcher.notify, request, loop.create_task, loop)
        if not done:
            self.waiting.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.waiting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error serving a datagram", exc_info=task.exception())
        self._serve_backlog_soon()

    def _serve_backlog_soon(self) -> None:
        if self._backlog_soon or self._loop is None:
            return
        if self.pending:
            self._backlog_soon = True
            self._loop.call_soon(self._serve_backlog)
        elif not self.waiting and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def _serve_backlog(self) -> None:
        self._backlog_soon = False
        pending = self.pending
        for _ in range(self.BATCH):
            if not pending or len(self.waiting) >= self.ntasks:
                break
            self._serve(pending.popleft())
        self._serve_backlog_soon()

    def _drop(self) -> None:
        self.stats.udp_dropped += 1
        if dropped := self._drops.tick(time.monotonic()):
            log.warning("datagram queue full (%d): dropped %d datagrams", self.maxsize, dropped)

    async def drain(self, timeout: float) -> None:
        """Serve what is already queued (within ``timeout``), then cancel what still runs."""
        if self.pending or self.waiting:
            self._emptied = asyncio.get_running_loop().create_future()
            self._serve_backlog_soon()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), timeout)
            except TimeoutError:  # both kinds: the running ones' handlers are cut short
                log.warning("%d datagrams not served before shutdown (%d queued, %d cut while"
                            " running)", len(self.pending) + len(self.waiting),
                            len(self.pending), len(self.waiting))  # fmt: skip
        self.pending.clear()
        await cancel_all(self.waiting, "datagram handlers")  # (again, if one loses it)


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
            if self.access.networks is not None and not self.access.allows(addr[0]):
                self.stats.refused["udp_forbidden"] += 1
                return
            peer = f"{addr[0]}:{addr[1]}"
        else:
            peer = addr or ""
        self.queue.offer((data, peer, self.origin))

    def error_received(self, exc: Exception) -> None:
        log.debug("%s socket error: %s", self.origin.value, exc)
