"""watchdog thread -> filter + debounce -> registry, handed over with call_soon_threadsafe.

Every kind of event (created, modified, moved, deleted) is reduced to "this file name may
have changed"; the registry then looks at the disk and loads, reloads or drops. An editor's
atomic save arrives as a move onto the module's name, so the move's destination counts
like a write. A short debounce folds the burst of events one save makes into one reload.

The watch (and the registry) holds the folder found at start. A folder moved or deleted,
or replaced by another under its name (``mv modules.new modules``, a symlink swap as deploy
tools make), is noticed by a check every ``FOLDER_CHECK`` seconds: that is logged, and
reloads stop until the service restarts (docs/modules.md, Hot reload).
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
FOLDER_CHECK = 1.0  # seconds; inotify says nothing of a symlink swap, so a stat it is


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
        self._identity: tuple[int, int] | None = None  # the watched folder's (device, inode)
        self._replaced = False
        self._check: asyncio.TimerHandle | None = None

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
        self._identity = _identity(self.folder)
        self._check = loop.call_later(FOLDER_CHECK, self._check_folder)

    def _check_folder(self) -> None:
        replaced = _identity(self.folder) != self._identity
        if replaced and not self._replaced:
            log.warning(
                "modules folder %s was moved, deleted or replaced: reloads stopped (the "
                "service still serves the modules it has); restart it to load the folder "
                "now there", self.folder,
            )  # fmt: skip
        elif self._replaced and not replaced:
            log.info("modules folder %s is back: reloads resume", self.folder)
        self._replaced = replaced
        self._check = asyncio.get_running_loop().call_later(FOLDER_CHECK, self._check_folder)

    def _touch(self, name: str) -> None:
        if self._replaced:
            return  # events of the folder that went, whose names now mean the new one's files
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
        if self._check is not None:
            self._check.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._observer is not None:
            self._observer.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._observer.join, 2.0)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = folder.stat()  # through a symlink: the folder it names now
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
