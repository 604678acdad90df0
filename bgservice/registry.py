"""The modules folder -> name -> loaded module, swapped atomically, last good version kept.

Reloading follows Erlang rather than ``importlib.reload``: a changed file is imported into a
fresh module object (off the event loop), and only an import that succeeds replaces the old
version. Calls already running keep the old one; its unload hook runs once the last ends. A
file that fails to import leaves the last good version serving and records the error, which
a module that never loaded answers with.

Files (``declarations.classify``): ``NAME.py`` is module ``NAME``, ``_NAME.py`` a helper that
modules import with ``from . import _NAME`` (package ``bgservice_modules``); others ignored.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import time
import types
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgservice.declarations import (
    Handler,
    ModuleLoadError,
    call_from,
    classify,
    declarations,
    describe_failure,
    handler,
    load_warnings,
    misnamed_file_warning,
    queue_from,
    reserved_name_warning,
    serves,
)
from bgservice.events import MODULE_FAILED, MODULE_RELOADED, MODULE_REMOVED, Events
from bgservice.porting import original_hooks_problem
from bgservice.threads import CallThreads, ThreadsExhausted
from bgservice.unloading import run_unload

log = logging.getLogger(__name__)
Module = types.ModuleType

PACKAGE = "bgservice_modules"
# Threads imports run on: start-up's imports run this many at once; one stuck in an import
# that never returns keeps its thread, and once all are stuck loads are refused. Not a
# setting: each stuck thread is lost until it returns or the service restarts, so a higher
# bound would only put off the restart that reclaims them (docs/modules.md, Hot reload).
LOADERS = 9


@dataclass(eq=False)
class ModuleVersion:
    """One successful import of a module file."""

    name: str
    path: Path
    module: types.ModuleType
    digest: str
    tcp: Handler | None
    udp: Handler | None
    unload: Callable[[], Any] | None
    stats: Callable[[], Any] | None
    accepts: frozenset[str]
    timeout: float | None
    execution: str
    processes: int | None = None
    queue_from: frozenset[str] | None = None  # QUEUE_FROM: who may queue its jobs
    call_from: frozenset[str] | None = None  # CALL_FROM: who may call it directly
    source: bytes = b""
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    retired: bool = False
    _on_idle: Callable[[ModuleVersion], None] | None = field(default=None, repr=False)

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.active == 0 and self.retired:
            self._idle()

    def retire(self, on_idle: Callable[[ModuleVersion], None]) -> None:
        """No new calls get this version; ``on_idle`` runs once no call uses it (now, maybe)."""
        self.retired = True
        self._on_idle = on_idle
        if self.active == 0:
            self._idle()

    def _idle(self) -> None:
        on_idle, self._on_idle = self._on_idle, None
        if on_idle is not None:
            on_idle(self)


@dataclass(eq=False)
class ModuleEntry:
    """A module name's state: its serving version (if any) and its last load error."""

    name: str
    version: ModuleVersion | None = None
    error: str | None = None
    error_at: float | None = None
    tried: tuple[str | None, int | None] | None = None  # bytes last imported: _load
    reloads: int = 0
    failures: int = 0

    @property
    def state(self) -> str:
        return "failed" if self.version is None else "stale" if self.error else "loaded"


class _FreshLoader(importlib.machinery.SourceFileLoader):
    """Compiles from source every time: ``__pycache__`` (whole-second mtime, size) goes stale."""

    preset: bytes | None = None  # the exact source to compile (worker processes)

    def get_code(self, fullname: str) -> types.CodeType:
        source = self.preset if self.preset is not None else self.get_data(self.path)
        self.source = source
        self.digest = hashlib.sha256(source).hexdigest()
        return compile(source, self.path, "exec", dont_inherit=True)


class _HelperFinder(importlib.abc.MetaPathFinder):
    """Finds ``bgservice_modules.NAME`` in the modules folder, with the fresh loader."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(
        self, fullname: str, path: Any, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, rest = fullname.partition(".")
        if prefix != PACKAGE or not rest or "." in rest:
            return None
        file = self.folder / f"{rest}.py"
        if not file.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, file, loader=_FreshLoader(fullname, str(file))
        )


def install_package(folder: Path) -> None:
    """Make ``bgservice_modules`` (the modules folder) importable, helpers included."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _HelperFinder)]
    sys.meta_path.insert(0, _HelperFinder(folder))
    package = types.ModuleType(PACKAGE, "Modules loaded by bgservice.")
    package.__path__ = [str(folder)]
    package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    sys.modules[PACKAGE] = package


def import_module_file(name: str, path: Path, source: bytes | None = None) -> ModuleVersion:
    """Import ``path`` (or ``source`` as if it were that file) into a fresh module object.

    Runs in the loader thread, or in a worker process given the source the service
    validated, so a broken save on disk never reaches a worker."""
    qualname = f"{PACKAGE}.{name}"
    loader = _FreshLoader(qualname, str(path))
    loader.preset = source
    spec = importlib.util.spec_from_file_location(qualname, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(qualname)
    # In sys.modules while it runs, as an import (dataclasses, pickle look); undone if it fails.
    sys.modules[qualname] = module
    try:
        loader.exec_module(module)
        if problem := original_hooks_problem(vars(module)):  # ignored, they mislead
            raise ModuleLoadError(problem)
        tcp, udp = handler(module, "handle_tcp"), handler(module, "handle_udp")
        unload = getattr(module, "unload", None)
        accepts, timeout, execution, processes = declarations(module, tcp, udp)
        sources, callers = queue_from(module), call_from(module)
    except ModuleLoadError as exc:
        _restore(qualname, module, previous)
        raise ModuleLoadError(f"{path.name}: {exc}") from None
    except BaseException as exc:  # SystemExit at import time must not stop the service
        _restore(qualname, module, previous)
        raise ModuleLoadError(describe_failure(exc, path)) from None
    return ModuleVersion(
        name=name, path=path, module=module, digest=loader.digest, tcp=tcp, udp=udp,
        unload=unload if callable(unload) else None,
        stats=stats if callable(stats := getattr(module, "stats", None)) else None,
        accepts=accepts, timeout=timeout, execution=execution, processes=processes,
        queue_from=sources, call_from=callers, source=loader.source,
    )  # fmt: skip


def _restore(qualname: str, failed: Module | None, previous: Module | None) -> None:
    if sys.modules.get(qualname) is not failed:
        return  # an import that failed late (past import_timeout) must not undo a newer one
    if previous is None:
        sys.modules.pop(qualname, None)
    else:
        sys.modules[qualname] = previous


def _read(path: Path) -> tuple[bytes | None, str | None, int | None]:  # and digest, mtime
    try:
        mtime = path.stat().st_mtime_ns
        return (source := path.read_bytes()), hashlib.sha256(source).hexdigest(), mtime
    except OSError:
        return None, None, None  # (gone, unreadable: the import says why)


class Registry:
    """Module name -> ``ModuleEntry``. Loads run in threads, one at a time but at start."""

    def __init__(self, folder: Path, events: Events, import_timeout: float = 30.0,
                 builtins: Collection[str] = ()) -> None:  # fmt: skip
        self.folder = folder.resolve()
        self.builtins = frozenset(builtins)  # request names the service answers itself
        self._events = events
        # An import running longer is given up; its daemon thread (LOADERS) holds up no exit.
        self.import_timeout = import_timeout
        self._loader = CallThreads(LOADERS, spare=0, name="bgservice-loader")
        self._entries: dict[str, ModuleEntry] = {}
        self._helpers: dict[str, str | None] = {}  # helper name -> digest of its file, as seen
        self._misnamed: set[str] = set()  # files logged as "not a module name"
        self._lock = asyncio.Lock()
        self._unloads: set[asyncio.Task[None]] = set()
        self._new = logging.INFO  # how the load of a module not loaded before is logged
        # False once the folder was replaced (reloader.py): its files are another release's.
        self.same_folder: Callable[[], bool] = lambda: True
        install_package(self.folder)

    def get(self, name: str) -> ModuleEntry | None:
        return self._entries.get(name)

    def __iter__(self) -> Iterator[ModuleEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    async def load_all(self) -> None:
        if not self.folder.is_dir():
            log.warning("modules folder %s does not exist; no modules loaded", self.folder)
            return
        self._new = logging.DEBUG  # each line, when the server's table lists them all next
        async with self._lock:
            found = [(path, classify(path.name)) for path in sorted(self.folder.iterdir())]
            self._helpers = {k[1]: _read(p)[1] for p, k in found if k and k[0] == "helper"}
            for path in (p for p, k in found if k and k[0] == "misnamed"):
                self._misnamed_seen(path.name)
            modules = [k[1] for p, k in found if k and k[0] == "module" and p.is_file()]
            await self._load_at_once(modules)
        self._new = logging.INFO

    async def _load_at_once(self, names: list[str]) -> None:
        """As many imports at a time as the loader has threads not stuck (all stuck: one, to
        be refused): hung ones cost ``import_timeout`` once before listening, not once each."""
        waiting, running = names[::-1], set[asyncio.Future[None]]()
        while waiting or running:
            while waiting and (not running or len(running) < LOADERS - self._loader.stuck):
                running.add(asyncio.ensure_future(self._load(waiting.pop())))
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # (the service's own error, not a module's: raised, as it was)

    async def refresh(self, filename: str) -> None:
        """Bring one file's module in line with the disk: load, reload or drop it."""
        kind = classify(filename)
        if kind is None:
            return
        async with self._lock:
            if kind[0] == "misnamed":
                self._misnamed_seen(filename)
            elif kind[0] == "helper":
                await self._helper_changed(kind[1])
            elif (self.folder / filename).is_file():
                await self._load(kind[1])
            elif self.same_folder():  # (gone from another folder under its name: not gone)
                self._drop(kind[1])

    def _misnamed_seen(self, filename: str) -> None:
        # Said once per name: else a module saved under a typo'd name just answered 400.
        if filename not in self._misnamed and (self.folder / filename).is_file():
            self._misnamed.add(filename)
            log.info(misnamed_file_warning(filename))

    async def _helper_changed(self, helper: str) -> None:
        # Unchanged bytes (a touch, the rescan after start) do nothing; created or deleted count.
        digest = (await asyncio.to_thread(_read, self.folder / f"{helper}.py"))[1]
        if digest == self._helpers.get(helper):
            return
        self._helpers[helper] = digest
        # Any module may import any helper, directly or through another helper: drop every
        # cached helper and re-import every module, so none keeps a stale copy.
        package = sys.modules.get(PACKAGE)
        for qualname in [n for n in list(sys.modules) if n.startswith(f"{PACKAGE}._")]:
            del sys.modules[qualname]
            # ``from . import _x`` takes the package's attribute when it exists, without
            # importing: drop it too, or modules would get the stale helper back.
            if package is not None:
                package.__dict__.pop(qualname.partition(".")[2], None)
        log.info("helper %s changed: reloading every module", helper)
        for name in [e.name for e in self if e.version is not None or e.error]:
            await self._load(name, force=True)

    async def _load(self, name: str, force: bool = False) -> None:
        path = self.folder / f"{name}.py"
        # A tiny read on the loop's threads, never behind a stuck import; these bytes import.
        source, digest, mtime = await asyncio.get_running_loop().run_in_executor(None, _read, path)
        if not self.same_folder():  # replaced while it was read
            return
        # A new module's entry goes in once its first import has ended (loaded, or failed):
        # meanwhile "Unknown request", not a 502 "failed to load: None" (a CI flake).
        entry = self._entries.get(name) or ModuleEntry(name)
        # Bytes loaded, or failed and untouched since (the rescan made a failure two): skip.
        if not force and name in self._entries and entry.tried in ((digest, None), (digest, mtime)):
            return
        try:
            version = await self._import(name, path, source)
            old = entry.version
            serves(path.name, bool(version.tcp or version.udp), bool(old and (old.tcp or old.udp)))
        except ModuleLoadError as exc:
            entry.error, entry.error_at, entry.tried = str(exc), time.time(), (digest, mtime)
            entry.failures += 1
            self._entries[name] = entry
            keeps = " (the last good version keeps serving)" if entry.version else ""
            log.error("module %s failed to load: %s%s", name, exc, keeps)
            self._events.emit(MODULE_FAILED, name=name, error=str(exc))
            return
        old, entry.version, entry.error, entry.error_at = entry.version, version, None, None
        entry.tried = (version.digest, None)
        self._entries[name] = entry
        if old is None:
            log.log(self._new, "module %s loaded", name)
            if name in self.builtins:  # execution.RESERVED: over TCP, UDP or as a queued job
                log.warning(reserved_name_warning(name))
        else:
            entry.reloads += 1
            log.info("module %s reloaded", name)
            self._retire(old)
            self._events.emit(MODULE_RELOADED, name=name)
        for warning in load_warnings(name, version.module):
            log.warning(warning)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        sys.modules.pop(f"{PACKAGE}.{name}", None)
        if entry is not None:
            log.info("module %s removed", name)
            self._events.emit(MODULE_REMOVED, name=name)
            if entry.version is not None:
                self._retire(entry.version)

    def _retire(self, version: ModuleVersion) -> None:
        version.retire(self._start_unload)
        # Loaded at start-up, it was frozen with the rest (server.py): never collected so (its
        # functions and globals make a cycle). Unfrozen, the next full collection frees it.
        gc.unfreeze()

    def _start_unload(self, version: ModuleVersion) -> None:
        if version.unload is None:
            return
        # Off the loader: a hook that blocked held up every later load (unloading.py).
        hook = run_unload(version.name, version.unload, self.import_timeout)
        task = asyncio.get_running_loop().create_task(hook)
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _import(self, name: str, path: Path, source: bytes | None) -> ModuleVersion:
        try:
            future = self._loader.submit(import_module_file, name, path, source)
        except ThreadsExhausted:
            raise ModuleLoadError(
                f"refused: all {LOADERS} loader threads are stuck in imports still "
                "running past [reload] import_timeout; restart the service to load again"
            ) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.import_timeout)
        except TimeoutError:
            self._loader.abandon(future)
            entry = self._entries.get(name)  # its half-made module leaves sys.modules
            qualname, last = f"{PACKAGE}.{name}", entry and entry.version
            _restore(qualname, sys.modules.get(qualname), last.module if last else None)
            raise ModuleLoadError(
                f"import did not finish within {self.import_timeout:g} s ([reload] "
                "import_timeout); it goes on in a thread of its own, its result unused"
            ) from None

    async def close(self, grace: float) -> None:
        """Retire every version (running their unload hooks) and wait for the hooks."""
        for entry in self._entries.values():
            if entry.version is not None:
                self._retire(entry.version)
        if self._unloads:
            await asyncio.wait(set(self._unloads), timeout=max(grace, 0.1))
        self._loader.shutdown(wait=False, cancel_futures=True)
