"""The datagram transport (UDP and Unix datagram sockets): one datagram, one request,
nothing ever sent back.

``datagram_received`` checks the peer and hands the datagram to ``DatagramQueue``, which
serves it at once when its handler needs no wait, else in one of at most
``[limits] udp_workers`` tasks, queueing the rest by module. The queue is bounded, so a
flood costs dropped datagrams (counted in ``service:stats``), never memory or the TCP
clients' turn on the loop; and one module's backlog costs that module's datagrams, not
every other's.
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
from bgservice.origin import Origin, peer_address
from bgservice.protocol import split_request
from bgservice.request import JobAdder, Request
from bgservice.stats import Stats

log = logging.getLogger(__name__)

Datagram = tuple[str, bytes, str, Origin]  # (module, data, peer, where it came from)

# What the event loop (uvloop) reads of one datagram: of a longer one (possible on a Unix
# datagram socket, whose sender may raise SO_SNDBUF) only this much arrives, cut with no
# sign. A datagram this long is refused rather than served cut.
READ_SIZE = 256_000


class DatagramQueue:
    """Received datagrams: served at once when their handler needs no wait, queued by
    module for the rest.

    A datagram whose handler finishes in its first step (logging, counting: most) is served
    inside ``datagram_received``, with no task and no queue (Dispatcher.notify): at 100,000
    datagrams a second, a task and a queue hop each cost more than the handler. One that
    waits (a ``def`` handler in the thread pool, an ``await``) goes on in a task; at most
    ``tasks`` (``[limits] udp_workers``) wait at once. Its module is then one that waits:
    while the tasks are taken its new datagrams queue, up to ``size`` in all, and are
    served as tasks finish, a module at a time in turn, ``BATCH`` per loop turn (so that a
    backlog cannot hold the loop away from TCP). A module whose last datagram needed no
    wait is still served at once, so a slow module's backlog delays only itself (up to
    ``2 * tasks`` tasks in all, should such a module begin to wait); a module's datagrams
    are always served in the order they came. When the queue is full, the newest datagram
    of the module with the most queued is dropped (the one that just came if that is its
    own module): a flood of one module drops its own datagrams.
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
        self.pending: dict[str, deque[Datagram]] = {}  # by module, in turn (oldest first)
        self.queued = 0
        self.waits: set[str] = set()  # modules whose last datagram needed a task
        self.waiting: set[asyncio.Task[None]] = set()  # handlers that wait, in tasks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog_soon = False  # a turn to serve the backlog is scheduled
        self._emptied: asyncio.Future[None] | None = None  # set by drain()
        self._drops = Sparse(5.0, self._dropped)  # a log line at most every 5 s

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def offer(self, data: bytes, peer: str, origin: Origin) -> None:
        module, payload = split_request(data)
        item = (module, payload, peer, origin)
        if module not in self.pending and self._may_start(module):
            self._serve(item)
        elif self.queued < self.maxsize:
            self._queue(item)
        else:
            longest = max(self.pending, key=lambda m: len(self.pending[m]))
            self._drop()
            if longest != module:  # room for it: the flooding module's newest goes
                self._remove_newest(longest)
                self._queue(item)

    def _may_start(self, module: str) -> bool:
        running = len(self.waiting)
        return running < self.ntasks or (module not in self.waits and running < 2 * self.ntasks)

    def _queue(self, item: Datagram) -> None:
        queue = self.pending.get(item[0])
        if queue is None:
            queue = self.pending[item[0]] = deque()
        queue.append(item)
        self.queued += 1

    def _remove_newest(self, module: str) -> None:
        queue = self.pending[module]
        queue.pop()
        self.queued -= 1
        if not queue:
            del self.pending[module]

    def _serve(self, item: Datagram) -> None:
        module, payload, peer, origin = item
        loop = self._loop
        assert loop is not None, "DatagramQueue.start() not called"
        request = Request(module, payload, origin, peer, loop=loop, jobs=self.jobs)
        # Served now, unless it waits: as a stream's request is (bgservice.eager), in a
        # context of its own, with a current task for asyncio.timeout and the like.
        done, task = eager.start_call(self.dispatcher.notify, request, loop.create_task, loop)
        if done:
            self.waits.discard(module)
        else:
            self.waits.add(module)
            self.waiting.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.waiting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error serving a datagram", exc_info=task.exception())
        self._serve_backlog_soon()

    def _serve_backlog_soon(self) -> None:
        """A turn to serve the backlog, if a queued datagram may start now. (Otherwise
        the next task to finish asks again: a turn each loop iteration while every task
        was taken kept a core busy for as long as the backlog lasted.)"""
        if self._backlog_soon or self._loop is None:
            return
        if any(self._may_start(module) for module in self.pending):
            self._backlog_soon = True
            self._loop.call_soon(self._serve_backlog)
        elif not self.waiting and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def _serve_backlog(self) -> None:
        self._backlog_soon = False
        served, progress = 0, True
        while served < self.BATCH and progress:
            progress = False
            for module in list(self.pending):  # one datagram of each module in turn
                if served == self.BATCH:
                    break
                if not self._may_start(module):
                    continue
                queue = self.pending.pop(module)
                item = queue.popleft()
                self.queued -= 1
                if queue:
                    self.pending[module] = queue  # to the back of the turn
                self._serve(item)
                served += 1
                progress = True
        self._serve_backlog_soon()

    def _drop(self) -> None:
        self.stats.udp_dropped += 1
        if dropped := self._drops.tick(time.monotonic()):
            self._dropped(dropped)

    def _dropped(self, count: int) -> None:
        longest = max(self.pending, key=lambda m: len(self.pending[m]), default=None)
        log.warning("datagram queue full (%d): dropped %d datagrams%s", self.maxsize, count,
                    f" (most queued: module {longest!r})" if longest else "")  # fmt: skip

    async def drain(self, timeout: float) -> None:
        """Serve what is already queued (within ``timeout``), then cancel what still runs."""
        if self.pending or self.waiting:
            self._emptied = asyncio.get_running_loop().create_future()
            self._serve_backlog_soon()
            try:
                await asyncio.wait_for(asyncio.shield(self._emptied), timeout)
            except TimeoutError:  # both kinds: the running ones' handlers are cut short
                log.warning("%d datagrams not served before shutdown (%d queued, %d cut while"
                            " running)", self.queued + len(self.waiting),
                            self.queued, len(self.waiting))  # fmt: skip
        self.pending.clear()
        self.queued = 0
        await cancel_all(self.waiting, "datagram handlers")  # (again, if one loses it)


class DatagramEndpoint(asyncio.DatagramProtocol):
    """One UDP or Unix datagram socket."""

    def __init__(self, queue: DatagramQueue, access: AccessList, origin: Origin) -> None:
        self.queue = queue
        self.access = access
        self.origin = origin
        self.stats = queue.stats
        self._too_large = Sparse(60.0)  # a flood of them: a line a minute

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.udp_received += 1
        if isinstance(addr, tuple):
            if self.access.networks is not None and not self.access.allows(addr[0]):
                self.stats.refused["udp_forbidden"] += 1
                return
            peer = peer_address(addr[0], addr[1])
        elif isinstance(addr, bytes):  # an abstract Unix address, NUL-padded: "@name"
            peer = "@" + addr[1:].rstrip(b"\0").decode("utf-8", "backslashreplace")
        else:
            peer = addr or ""
        if len(data) >= READ_SIZE:
            self.stats.refused["datagram_too_large"] += 1
            if self._too_large.tick(time.monotonic()):
                log.warning("refused a datagram from %s of %d bytes or more: what is past "
                            "them was lost (the most one read holds)",
                            peer or "an unbound socket", READ_SIZE)  # fmt: skip
            return
        self.queue.offer(data, peer, self.origin)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s socket error: %s", self.origin.value, exc)
