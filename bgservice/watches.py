"""The watches of the folders module symlinks lead to, made and removed off the event loop.

watchdog's ``unschedule`` joins the watch's emitter thread (some 8 ms measured) and its
``schedule`` starts one: the loop must wait for neither. Both run on one thread of their
own, one at a time, in the order the loop decided them: run by a pool (or by the loop and
a thread), a folder's schedule could land before the unschedule decided before it, which
then removed the watch wanted. The loop keeps what is watched (it decides, then submits);
this thread alone keeps what watchdog hands back, and says on the loop when a watch is
made or could not be. Stopping drops the changes not begun (no watch is wanted any more),
stops the observers there too (their ``stop`` joins every emitter) and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from watchdog.events import FileSystemEventHandler
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)
THREAD = "bgservice-watches"


def started(observer: Any, handler: FileSystemEventHandler, folder: str) -> Any:
    """``observer`` watching ``folder`` (its own files, not its subfolders'), started; its
    threads are daemons."""
    observer.schedule(handler, folder, recursive=False)
    observer.daemon = True
    observer.start()
    return observer


class Watches:
    """Folders watched by ``observer`` besides the one it was started on, and polls."""

    def __init__(self, observer: Any, handler: FileSystemEventHandler) -> None:
        self._loop = asyncio.get_running_loop()
        self._observers = [observer]  # and the polls (the thread's from then on)
        self._handler = handler
        self._made: dict[str, Any] = {}  # folder -> the watch watchdog made (the thread's)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD)
        self._closed = False

    def watch(self, folder: str, then: Callable[[OSError | None], None]) -> None:
        """Watch ``folder``; ``then`` is called on the loop once it is (None) or could not
        be (the error: the folder gone since, inotify's limits)."""
        self._submit(self._schedule, folder, then)

    def unwatch(self, folder: str) -> None:
        self._submit(self._unschedule, folder)

    def poll(self, folder: str, every: float) -> None:
        """Poll ``folder`` as well: a stat of each of its files every ``every`` seconds."""
        self._submit(self._poll, folder, every)

    async def close(self) -> None:
        self._closed = True  # what is queued does nothing now, and nothing more is told
        closing = self._thread.submit(self._guarded, self._stop_observers)
        self._thread.shutdown(wait=False)
        await asyncio.wrap_future(closing)
        await self._loop.run_in_executor(None, self._thread.shutdown)  # (it is ending: join it)

    # --- the loop's side ------------------------------------------------------------------

    def _submit(self, change: Callable[..., None], *args: Any) -> None:
        if not self._closed:  # (a watchdog event handed over as the service stopped)
            self._thread.submit(self._apply, change, *args)

    def _answer(self, then: Callable[[OSError | None], None], error: OSError | None) -> None:
        if not self._closed:  # (the reloader stopped: its state is no longer kept)
            then(error)

    # --- the thread -------------------------------------------------------------------

    def _apply(self, change: Callable[..., None], *args: Any) -> None:
        if not self._closed:  # else dropped: the service stops, no watch is wanted any more
            self._guarded(change, *args)

    def _guarded(self, change: Callable[..., None], *args: Any) -> None:
        try:
            change(*args)
        except Exception:  # a future nobody reads would swallow it: a bug, said
            log.exception("watch change %s%r failed", change.__name__, args)

    def _schedule(self, folder: str, then: Callable[[OSError | None], None]) -> None:
        try:
            self._made[folder] = self._observers[0].schedule(self._handler, folder, recursive=False)
        except OSError as exc:
            self._tell(then, exc)
            return
        log.debug("watching %s, where module symlinks lead (in thread %s)", folder, _name())
        self._tell(then, None)

    def _unschedule(self, folder: str) -> None:
        watch = self._made.pop(folder, None)
        if watch is None:
            return  # its schedule failed: nothing to undo
        self._observers[0].unschedule(watch)  # (joins the watch's emitter thread)
        log.debug("no longer watching %s (in thread %s)", folder, _name())

    def _poll(self, folder: str, every: float) -> None:
        self._observers.append(started(PollingObserver(timeout=every), self._handler, folder))

    def _stop_observers(self) -> None:
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(2.0)

    def _tell(self, then: Callable[[OSError | None], None], error: OSError | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._answer, then, error)
        except RuntimeError:  # the loop closed: the service stopped without closing this
            pass


def _name() -> str:
    return threading.current_thread().name
