"""The threads synchronous (``def``) handlers run in, and what a stuck one costs.

Python cannot stop a thread: a ``def`` handler that outlives its timeout keeps its thread
until it returns, perhaps never. ``ThreadPoolExecutor`` would then lose that thread for
good (after ``threads`` hung calls every ``def`` module answers 504), and interpreter
shutdown would join it for ever (SIGTERM never ends the process). So this pool:

- runs ``size`` threads for calls, made as they are needed;
- counts a thread whose call was given up on (``abandon``) as stuck, and starts a
  replacement, up to ``spare`` extra threads in all; a stuck thread that returns serves
  again, and the pool shrinks back to ``size``;
- once every thread it may have is stuck, refuses new calls at once (``ThreadsExhausted``,
  a 503 naming the cause) instead of queueing them behind threads that never come back;
- makes daemon threads, which interpreter shutdown does not wait for.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class ThreadsExhausted(Exception):
    """Every thread the pool may have is stuck in a call given up on."""


class Escaped(Exception):
    """What a call let out that its awaiter must not get as it is, as an ordinary error:
    ``StopIteration`` (an asyncio future refuses it: the awaiter never heard, and the
    loop stopped) and what is no ``Exception`` (``SystemExit`` from a module's
    ``sys.exit()``: raised out of the awaiting task, it stopped the service). ``error``
    is what it raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


@dataclass(eq=False)
class _Call:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    abandoned: bool = False  # its caller gave up (timed out): its thread counts as stuck
    thread: threading.Thread | None = None  # the thread running it

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            ordinary = isinstance(exc, Exception) and not isinstance(exc, StopIteration)
            self.future.set_exception(exc if ordinary else Escaped(exc))
        else:
            self.future.set_result(result)


class CallThreads(Executor):
    """An executor of daemon threads that replaces stuck ones, up to ``spare`` more."""

    def __init__(self, size: int, spare: int, name: str = "bgservice-call") -> None:
        self.size = size
        self.spare = spare
        self.name = name
        self._work: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._running: dict[Future[Any], _Call] = {}
        self._idle = 0  # threads waiting for work that no submit has counted on yet
        self._stuck = 0
        self._closed = False
        self._made = 0

    # --- Executor -----------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a call: the thread pool is shut down")
            if self._stuck >= self.size + self.spare:
                raise ThreadsExhausted(
                    f"No free thread: {self._stuck} handler threads are stuck past their timeout"
                )
            call = _Call(Future(), fn, args, kwargs)
            self._work.put(call)
            if self._idle:
                self._idle -= 1
            elif len(self._threads) - self._stuck < self.size and (
                len(self._threads) < self.size + self.spare  # stuck ones count: the bound
            ):
                self._start_thread()
            return call.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    call = self._work.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    call.future.cancel()
        for _ in threads:
            self._work.put(None)
        if wait:  # for every thread but the stuck ones, which may never return
            for thread in threads:
                if thread not in self._stuck_threads():
                    thread.join()

    # --- stuck calls --------------------------------------------------------------------

    def abandon(self, future: Future[Any]) -> bool:
        """The caller gave up on ``future`` (its timeout). A call still waiting is cancelled
        (False); a running one leaves its thread stuck, replaced while the bound allows
        (True)."""
        if future.cancel():
            return False
        with self._lock:
            call = self._running.get(future)
            if call is None or call.abandoned:
                return False
            call.abandoned = True
            self._stuck += 1
            if not self._closed and len(self._threads) < self.size + self.spare:
                self._start_thread()
        return True

    @property
    def stuck(self) -> int:
        return self._stuck

    def stats(self) -> dict[str, int]:
        """For ``service:stats``: threads for calls, busy now, stuck, and the bound."""
        with self._lock:
            return {
                "size": self.size,
                "busy": len(self._running),
                "stuck": self._stuck,
                "stuck_limit": self.spare,
            }

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    # --- the threads --------------------------------------------------------------------

    def _start_thread(self) -> None:
        """With the lock held."""
        self._made += 1
        thread = threading.Thread(target=self._serve, name=f"{self.name}_{self._made}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _serve(self) -> None:
        while True:
            call = self._work.get()
            if call is None:
                break
            with self._lock:
                call.thread = threading.current_thread()
                self._running[call.future] = call
            call.run()
            with self._lock:
                del self._running[call.future]
                if call.abandoned:
                    self._stuck -= 1
                    # (a handler runs through Context.run: its own name is the first argument's)
                    ran = call.args[0] if call.args and callable(call.args[0]) else call.fn
                    log.warning(
                        "a handler thread stuck in %s returned after all (%d still stuck)",
                        getattr(ran, "__module__", None) or "?",
                        self._stuck,
                    )
                    del ran
                if self._closed or len(self._threads) - self._stuck > self.size:
                    break  # a replacement no longer needed
                self._idle += 1
            # Not held while the thread waits for its next call: the call holds its handler
            # (a module's version, replaced since, then never collected, nor what it holds)
            # and its arguments and result.
            del call
        with self._lock:
            self._threads.discard(threading.current_thread())

    def _stuck_threads(self) -> set[threading.Thread | None]:
        with self._lock:
            return {c.thread for c in self._running.values() if c.abandoned}
