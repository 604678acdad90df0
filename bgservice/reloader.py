"""watchdog thread -> filter + batch -> registry, handed over with call_soon_threadsafe.

Every kind of event (created, modified, moved, deleted) is reduced to "this file name may
have changed"; the registry then looks at the disk and loads, reloads or drops. An editor's
atomic save arrives as a move onto the module's name, so the move's destination counts
like a write. The names changed go to the registry in one batch once the folder has been
quiet for the debounce (so the burst of events one save makes is one reload, and a deploy
that writes a module and the helper it needs is one batch, the helper first), or at the
latest ``MAX_BATCH`` after the batch's first change (a file written again and again).

The watch starts once the modules found at start are loaded: a rescan then hands the
registry every name on disk and every name it holds, so what changed meanwhile (a deploy
copying files while the service started) is not missed; the registry loads only what
differs from what it has. A symlinked folder is watched where it leads (inotify does not
follow the link).

The watch (and the registry) holds the folder found at start. A folder moved or deleted,
or replaced by another under its name (``mv modules.new modules``, a symlink swap as deploy
tools make), is noticed by a check every ``FOLDER_CHECK`` seconds: that is logged, and
reloads stop until the service restarts (docs/modules.md, Hot reload).

inotify has limits shared by every process of a user (``fs.inotify.max_user_instances``,
128 by default, which a host running many services or containers reaches): when the watch
cannot be made, the folder is polled instead (watchdog's ``PollingObserver``, a stat of
its files every ``POLL`` seconds), said once in the log; the service starts either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from bgservice.registry import Registry, classify

log = logging.getLogger(__name__)
FOLDER_CHECK = 1.0  # seconds; inotify says nothing of a symlink swap, so a stat it is
POLL = 0.5  # seconds between the polls of the folder, where inotify cannot watch it
MAX_BATCH = 1.6  # seconds a batch may wait for the folder to be quiet (watchfiles' default)


class _Forward(FileSystemEventHandler):
    """Runs in watchdog's thread: keeps only module and helper names (and misnamed ``.py``
    files, which the registry reports once), hands them over."""

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
    def __init__(self, folder: Path, registry: Registry, debounce_ms: float) -> None:
        self.folder = folder
        self.registry = registry
        self.debounce = debounce_ms / 1000
        self._batch: set[str] = set()  # file names changed since the last batch went
        self._first = 0.0  # when (loop time) the batch's first change came
        self._timer: asyncio.TimerHandle | None = None
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
        try:
            self._observer = self._watch(Observer(), loop)
            log.info("watching %s for module changes", self.folder)
        except OSError as exc:  # EMFILE: "inotify instance limit reached"; ENOSPC: watches
            self._observer = self._watch(PollingObserver(timeout=POLL), loop)
            log.warning(
                "cannot watch %s with inotify (%s): polling it every %g s instead (raise "
                "fs.inotify.max_user_instances or max_user_watches to watch it)",
                self.folder, exc.strerror or exc, POLL,
            )  # fmt: skip
        self._identity = _identity(self.folder)
        self._check = loop.call_later(FOLDER_CHECK, self._check_folder)
        self._rescan()

    def _watch(self, observer: Any, loop: asyncio.AbstractEventLoop) -> Any:
        where = str(self.folder.resolve())  # (the folder a symlink leads to)
        observer.schedule(_Forward(loop, self._touch), where, recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def _check_folder(self) -> None:
        was, self._replaced = self._replaced, _identity(self.folder) != self._identity
        if self._replaced and not was:
            log.warning(
                "modules folder %s was moved, deleted or replaced: reloads stopped (the "
                "service still serves the modules it has); restart it to load the folder "
                "now there", self.folder,
            )  # fmt: skip
        elif was and not self._replaced:
            log.info("modules folder %s is back: reloads resume", self.folder)
            self._rescan()  # (what changed while it was away; _touch needs _replaced clear)
        self._check = asyncio.get_running_loop().call_later(FOLDER_CHECK, self._check_folder)

    def _rescan(self) -> None:
        """Every name on disk and every name the registry holds, to be brought in line."""
        try:
            names = {path.name for path in self.folder.iterdir() if classify(path.name)}
        except OSError as exc:
            log.warning("cannot list %s: %s", self.folder, exc)
            return
        for name in names | {f"{entry.name}.py" for entry in self.registry}:
            self._touch(name)

    def _touch(self, name: str) -> None:
        if self._replaced:
            return  # events of the folder that went, whose names now mean the new one's files
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._batch:
            self._first = now
        self._batch.add(name)
        if self._timer is not None:
            self._timer.cancel()
        due = min(now + self.debounce, self._first + max(MAX_BATCH, self.debounce))
        self._timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        batch, self._batch = self._batch, set()
        if _identity(self.folder) != self._identity:  # replaced since: its names are not ours
            return
        task = asyncio.get_running_loop().create_task(self._refresh(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, names: set[str]) -> None:
        """Helpers first: a module saved with the helper it needs loads against the new one."""
        for name in sorted(names, key=lambda n: (not n.startswith("_"), n)):
            await self.registry.refresh(name)

    async def stop(self) -> None:
        if self._check is not None:
            self._check.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._batch.clear()
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
