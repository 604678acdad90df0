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

A module file that is a symlink (``m.py -> ../shared/m.py``) is changed where its link
leads, which the folder's watch does not see: the folders its links lead through are
watched as well (one watch each, not recursive: a target's folder may be a whole source
tree), kept in line with the links at each batch, and an event on a file a link leads to
is handed over as the name of the module linking to it (a link to another file of the
modules folder too). What inotify cannot say (a symlinked folder on the way repointed,
``releases/current``; a target's folder moved, replaced, or made for a dangling link) is
looked for at the folder check. A poll needs none of it: its stat of the module file
follows the link. Where inotify refuses a target's folder, the modules folder is polled
as well. Those watches are decided here, on the loop, and made and removed in that order
by a thread of their own (watches.py: removing one blocks for milliseconds).

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
import errno
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from bgservice.registry import Registry, classify
from bgservice.watches import Watches, started

log = logging.getLogger(__name__)
FOLDER_CHECK = 1.0  # seconds; inotify says nothing of a symlink swap, so a stat it is
POLL = 0.5  # seconds between the polls of the folder, where inotify cannot watch it
MAX_BATCH = 1.6  # seconds a batch may wait for the folder to be quiet (watchfiles' default)
MAX_HOPS = 40  # links followed from one module file (Linux's own bound): a loop ends there


class _Forward(FileSystemEventHandler):
    """Runs in watchdog's thread: keeps only module and helper names (and misnamed ``.py``
    files, which the registry reports once) of the modules folder, and for a file a module's
    symlink leads to, that module's name; hands them over. Every other file of a target's
    folder is dropped here, so a busy source tree costs the loop nothing."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, touch: Callable[[str], None], folder: str,
        linking: Callable[[str], frozenset[str]], lost: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.loop = loop
        self.touch = touch
        self.folder = folder  # as watched: the paths of its events begin so
        self.linking = linking
        self.lost = lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory and event.event_type == "deleted":  # a target's folder, maybe
            self.loop.call_soon_threadsafe(self.lost, os.fsdecode(event.src_path))
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(path) if path else ""
            folder, name = os.path.split(path)
            names = self.linking(path)
            if folder == self.folder and classify(name) is not None:
                names |= {name}
            for name in names:
                self.loop.call_soon_threadsafe(self.touch, name)


@dataclass(eq=False)  # told apart by identity: a folder unwatched, then watched again, is new
class _Target:
    """A folder links lead to, watched (or about to be), as it was when its watch was decided."""

    identity: tuple[int, int]  # (device, inode): another folder under its name is not watched


class Reloader:
    def __init__(self, folder: Path, registry: Registry, debounce_ms: float) -> None:
        self.folder = folder
        self.registry = registry
        self.debounce = debounce_ms / 1000
        self._batch: set[str] = set()  # file names changed since the last batch went
        self._first = 0.0  # when (loop time) the batch's first change came
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._identity: tuple[int, int] | None = None  # the watched folder's (device, inode)
        self._replaced = False
        self._check: asyncio.TimerHandle | None = None
        self._where = ""  # the folder watched: where the modules folder really is
        self._forward: _Forward | None = None
        self._links: dict[str, tuple[str, ...]] = {}  # module file -> files its link leads through
        # Each of those files -> the module files linking through it. Read by watchdog's
        # thread, so never changed, only replaced whole.
        self._targets: dict[str, frozenset[str]] = {}
        self._extra: dict[str, _Target] = {}  # the folders links lead to, watched or to be
        self._watches: Watches | None = None  # makes and removes their watches, in order
        self._stopped = False
        self._polling = False  # the modules folder polled: a link's target needs no watch

    def start(self) -> None:
        if not self.folder.is_dir():
            log.warning("not watching %s: no such folder", self.folder)
            return
        self._where = str(self.folder.resolve())  # (the folder a symlink leads to)
        loop = asyncio.get_running_loop()
        self._forward = _Forward(loop, self._touch, self._where, self._linking, self._lost)
        try:
            observer = self._watch(Observer())
            log.info("watching %s for module changes", self.folder)
        except OSError as exc:  # EMFILE: "inotify instance limit reached"; ENOSPC: watches
            observer = self._watch(PollingObserver(timeout=POLL))
            self._polling = True
            log.warning(
                "cannot watch %s with inotify (%s): polling it every %g s instead (raise "
                "fs.inotify.max_user_instances or max_user_watches to watch it)",
                self.folder, exc.strerror or exc, POLL,
            )  # fmt: skip
        self._watches = Watches(observer, self._forward)
        self._identity = _identity(self.folder)
        # Read by each load after its read: a swap between the check and a load in flight
        # (the rescan's, an edit's) would else load the other release's file.
        self.registry.same_folder = lambda: _identity(self.folder) == self._identity
        self._check = loop.call_later(FOLDER_CHECK, self._check_folder)
        self._rescan()

    def _watch(self, observer: Any) -> Any:
        assert self._forward is not None
        return started(observer, self._forward, self._where)

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
        if not self._replaced:
            self._recheck_links()
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
        if self._replaced or self._stopped:
            # Events of the folder that went, whose names now mean the new one's files; or
            # handed over as the service stopped: a batch would refresh a registry closing.
            return
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
        # Before the registry reads them: a later edit is then seen (what comes before a
        # new watch is made is looked at again once it is: _watched).
        self._follow(batch)
        task = asyncio.get_running_loop().create_task(self._refresh(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, names: set[str]) -> None:
        """Helpers first: a module saved with the helper it needs loads against the new one."""
        for name in sorted(names, key=lambda n: (not n.startswith("_"), n)):
            await self.registry.refresh(name)

    def _linking(self, path: str) -> frozenset[str]:
        return self._targets.get(path, frozenset())  # (in watchdog's thread)

    def _follow(self, names: set[str]) -> None:
        """Where the symlinks among these module files lead now (a link made, removed or
        repointed): watch the folders links lead to, and no more the ones none does."""
        for name in names:
            kind = classify(name)  # (a misnamed file is never loaded: its link, never followed)
            if kind and kind[0] != "misnamed" and (hops := _hops(os.path.join(self._where, name))):
                self._links[name] = hops
            else:
                self._links.pop(name, None)
        targets: dict[str, set[str]] = {}
        for name, hops in self._links.items():
            for hop in hops:
                targets.setdefault(hop, set()).add(name)
        self._targets = {hop: frozenset(linked) for hop, linked in targets.items()}
        self._watch_targets()

    def _watch_targets(self) -> None:
        """Watch the folders links lead to but the modules folder (watched already), and no
        more the others: decided here, made and removed by the watches' thread."""
        wanted = set() if self._polling else {os.path.dirname(hop) for hop in self._targets}
        for folder in [f for f in self._extra if f not in wanted]:
            self._unwatch(folder)
        for folder in sorted(wanted - self._extra.keys() - {self._where}):
            if (identity := _identity(Path(folder))) is None:
                continue  # a dangling link's missing folder: looked for at each check
            target = self._extra[folder] = _Target(identity)
            assert self._watches is not None
            self._watches.watch(folder, functools.partial(self._watched, folder, target))

    def _unwatch(self, folder: str) -> None:
        del self._extra[folder]
        assert self._watches is not None
        self._watches.unwatch(folder)

    def _watched(self, folder: str, target: _Target, error: OSError | None) -> None:
        """The watch decided for ``folder`` made (``error`` None) or not. The modules linking
        there are looked at again: their file may have changed before the watch began (or
        went with its folder, when that is why it failed)."""
        if self._extra.get(folder) is not target:
            return  # unwatched since (and perhaps watched anew): that decision stands
        if error is not None:
            del self._extra[folder]  # (a folder gone is looked for again at each check)
            if error.errno != errno.ENOENT:  # inotify's limits again, as at start
                self._poll_links(error)
        for name in self._linking_into({folder}):
            self._touch(name)

    def _poll_links(self, exc: OSError) -> None:
        # Not the targets' folders: a poll stats every file of one, and a source tree is big.
        if self._polling:
            return
        self._polling = True
        assert self._watches is not None
        self._watches.poll(self._where, POLL)
        log.warning(
            "cannot watch the folders module symlinks lead to with inotify (%s): polling %s "
            "every %g s as well (raise fs.inotify.max_user_instances or max_user_watches to "
            "watch them)", exc.strerror or exc, self.folder, POLL,
        )  # fmt: skip
        self._watch_targets()  # (unwatches them all: the poll covers them)

    def _lost(self, folder: str) -> None:
        if folder in self._extra:  # deleted: watchdog ended its watch (ext4 reuses the inode)
            self._drop_watches({folder})

    def _recheck_links(self) -> None:
        """What inotify cannot say: a link on the way repointed (a symlinked folder in the
        target: ``releases/current``), a target's folder moved or replaced (its watch follows
        the old one) or made. The modules linking there are looked at again, which follows them."""
        if not self._links:
            return  # (the usual folder, without links: nothing to read each second)
        moved = [f for f, target in self._extra.items() if _identity(Path(f)) != target.identity]
        self._drop_watches(set(moved))
        for name, hops in list(self._links.items()):
            if _hops(os.path.join(self._where, name)) != hops:
                self._touch(name)
        self._watch_targets()

    def _drop_watches(self, folders: set[str]) -> None:
        """Unwatch folders that went; the modules linking there, looked at again, are then
        dropped (their target gone) or watched where they lead now."""
        for folder in folders:
            self._unwatch(folder)
        for name in self._linking_into(folders):
            self._touch(name)

    def _linking_into(self, folders: set[str]) -> set[str]:
        linking = [names for hop, names in self._targets.items() if os.path.dirname(hop) in folders]
        return set().union(*linking)

    async def stop(self) -> None:
        self._stopped = True  # (events handed over meanwhile start no batch)
        if self._check is not None:
            self._check.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self._batch.clear()
        if self._watches is not None:  # (every observer: their stop joins threads too)
            await self._watches.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)


def _hops(link: str) -> tuple[str, ...]:
    """The files a module file's symlink leads through, to the one it names in the end (which
    may not exist: a dangling link); each under its folder's real path, which is what a
    watch on that folder reports. Empty for a file that is no link."""
    hops: list[str] = []
    for _ in range(MAX_HOPS):
        try:
            target = os.readlink(link)
        except OSError:  # no link (the file at the end), or nothing there
            break
        path = os.path.join(os.path.dirname(link), target)  # (relative: to the link's folder)
        link = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        hops.append(link)
    return tuple(hops)


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = folder.stat()  # through a symlink: the folder it names now
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
