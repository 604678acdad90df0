"""watchdog thread -> filter + debounce -> registry, handed over with call_soon_threadsafe.

Every kind of event (created, modified, moved, deleted) is reduced to "this file name may
have changed"; the registry then looks at the disk and loads, reloads or drops. An editor's
atomic save arrives as a move onto the module's name, so the move's destination counts
like a write. A short debounce folds the burst of events one save makes into one reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from bgservice.registry import classify

log = logging.getLogger(__name__)


class _Forward(FileSystemEventHandler):
    """Runs in watchdog's thread: keeps only module and helper names, hands them over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, touch: Callable[[str], None]) -> None:
        self.loop = loop
        self.touch = touch

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            name = os.path.basename(os.fsdecode(path)) if path else ""
            if name and classify(name) is not None:
                self.loop.call_soon_threadsafe(self.touch, name)


class Reloader:
    def __init__(
        self,
        folder: Path,
        refresh: Callable[[str], Coroutine[Any, Any, None]],
        debounce_ms: float,
    ) -> None:
        self.folder = folder
        self.refresh = refresh
        self.debounce = debounce_ms / 1000
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._observer: Any = None

    def start(self) -> None:
        if not self.folder.is_dir():
            log.warning("not watching %s: no such folder", self.folder)
            return
        loop = asyncio.get_running_loop()
        self._observer = Observer()
        self._observer.schedule(_Forward(loop, self._touch), str(self.folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        log.info("watching %s for module changes", self.folder)

    def _touch(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(self.debounce, self._fire, name)

    def _fire(self, name: str) -> None:
        self._timers.pop(name, None)
        task = asyncio.get_running_loop().create_task(self.refresh(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._observer is not None:
            self._observer.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._observer.join, 2.0)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
