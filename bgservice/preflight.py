"""``bgservice serve --check``: what a start with these settings would refuse or fail to
load, found without starting, as ``nginx -t`` or ``sshd -t`` do before a restart.

serve itself has already read the configuration (the file and the options, every key
checked) and the modules folder when this runs. Here: each module is imported as the
service imports it (its top level runs, its declarations are checked), all at once within
the service's import timeout, what they print going to stderr; the log file, the queue
database's folder and the Unix sockets' folders must be writable where they are named
(nothing is created or opened), a socket's path short enough for its address. Nothing
listens, no job runs, Redis is not connected to: a port in use or Redis away still fails
the start itself. (Permissions are asked with ``os.access``: as root, every path passes.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from bgservice.config import Listener, Settings
from bgservice.config_checks import redact_url
from bgservice.declarations import (
    ModuleLoadError,
    classify,
    load_warnings,
    misnamed_file_warning,
    reserved_name_warning,
)
from bgservice.errors import ConfigError
from bgservice.execution import RESERVED
from bgservice.http.tokens import Tokens
from bgservice.queue.sqlite_schema import ROOM, free_bytes, lock_path
from bgservice.registry import PACKAGE, import_module_file, install_package

UNIX_PATH_MAX = 107  # bytes of a Unix socket's path on Linux (sun_path, less its NUL)


def warnings(settings: Settings, loaded: list[str]) -> list[str]:
    """What a start would warn of but run with (as ``nginx -t``'s ``[warn]`` lines)."""
    # Worded as the start logs them (declarations.py), so the two never drift apart.
    found = [misnamed_file_warning(path.name) for path in sorted(settings.modules.iterdir())
             if (kind := classify(path.name)) and kind[0] == "misnamed"]  # fmt: skip
    found += [reserved_name_warning(name) for name in loaded if name in RESERVED]
    for name in loaded:  # (the module imported: in sys.modules, as at a start)
        found += load_warnings(name, sys.modules[f"{PACKAGE}.{name}"])
    if settings.alerts.module and settings.alerts.module not in loaded:
        found.append(f"[alerts] module {settings.alerts.module!r} is not among the modules")
    found += [f"schedule {s.name}: module {s.module!r} is not among the modules"
              for s in settings.schedules if s.module not in loaded]  # fmt: skip
    if settings.queue.backend == "sqlite":
        found += _room(settings.db)
    return found


def _room(db: Path) -> list[str]:
    """A device nearly full: a start may fail on it, and commits will (503) once it fills."""
    free = free_bytes(db)
    if free is None or free >= ROOM:
        return []
    return [f"the device holding the queue database {db} has {free} bytes free (less than "
            f"{ROOM // 1024} KiB): the start may fail on it, and new jobs are refused (503) "
            "once it fills; free some space there"]  # fmt: skip


def problems(settings: Settings, log_named: str) -> tuple[list[str], list[str]]:
    """(the modules that import, what a start would fail on or a module fail to load)."""
    found: list[str] = []
    if settings.log_file is not None:
        found += _writable(settings.log_file, log_named)
    if settings.queue.backend == "sqlite":
        found += _database(settings.db)
    for listener in settings.listeners:
        found += [problem for path in (listener.unix, listener.unix_dgram) if path
                  for problem in _socket_path(Path(path))]  # fmt: skip
    if settings.http.enabled:
        try:  # (a secret shared by [http] token and a named token: found where both are)
            Tokens.configured_in(settings.http.token, settings.http.tokens)
        except ConfigError as exc:
            found.append(str(exc))
    # What modules print as they import goes to stderr: stdout is the summary's. Once around
    # all the imports: sys.stdout is the process's, not a thread's.
    with contextlib.redirect_stdout(sys.stderr):
        loaded, failed = _import_all(settings.modules, settings.reload_import_timeout)
    return loaded, found + failed


def summary(settings: Settings, config: Path | None, loaded: list[str]) -> list[str]:
    """What the start would run with, for the person who asked."""
    listeners = "; ".join(_listener(lst) for lst in settings.listeners) or "none"
    queue = settings.queue
    where = settings.db if queue.backend == "sqlite" else redact_url(settings.redis.url)
    return [
        f"bgservice: configuration OK ({config or 'built-in defaults'})",
        f"  listeners: {listeners}",
        f"  allow:     {', '.join(map(str, settings.allow)) or 'none'} (off loopback)",
        f"  modules:   {settings.modules}: {', '.join(loaded) or 'none'}",
        f"  queue:     {queue.backend} at {where}, {queue.workers} workers",
        f"  http:      {_http(settings)}",
    ]


def _listener(listener: Listener) -> str:
    parts = []
    if listener.port is not None and (listener.tcp or listener.udp):
        kinds = "+".join(k for k, on in (("TCP", listener.tcp), ("UDP", listener.udp)) if on)
        host = f"[{listener.host}]" if ":" in (listener.host or "") else listener.host
        parts.append(f"{kinds} {host}:{listener.port}")
    if listener.unix:
        parts.append(f"unix:{listener.unix}")
    if listener.unix_dgram:
        parts.append(f"unix datagram:{listener.unix_dgram}")
    return ", ".join(parts)


def _http(settings: Settings) -> str:
    http = settings.http
    return f"{http.host}:{http.port}" if http.enabled else "off"


def _writable(path: Path, named: str) -> list[str]:
    """A file the service will append to: writable if it exists, else its nearest
    existing folder must let the service make it (and the folders between)."""
    if path.exists():
        if not path.is_file():
            return [f"{named} {path}: not a file"]
        return [] if os.access(path, os.W_OK) else [f"{named} {path}: not writable"]
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return [f"{named} {path}: cannot be made in {folder} (not a writable folder)"]
    return []


def _database(db: Path) -> list[str]:
    """The queue's database: the file writable if it exists (SQLite would open it read-only,
    and the start refuses that); its folder writable, even where the file or the lock file
    exist: SQLite makes its -wal and -shm there (the file's, where ``db`` is a link), and
    without them cannot write a file it may write."""
    found = _writable(db, "the queue database")
    lock = lock_path(db)  # (beside the file itself)
    if found or not lock.parent.is_dir():
        return found + _writable(lock, "its lock file")
    if not os.access(lock.parent, os.W_OK | os.X_OK):
        return [f"the queue database {db}: its folder {lock.parent} is not writable (SQLite "
                "makes the database's -wal and -shm files there)"]  # fmt: skip
    return _writable(lock, "its lock file")


def _socket_path(path: Path) -> list[str]:
    """A Unix socket the start would make: its address must fit (listeners.py), its
    folder exist and take it."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        return [f"unix:{path}: the path is {len(os.fsencode(path))} bytes, longer than a Unix "
                f"socket address holds (at most {UNIX_PATH_MAX} bytes on Linux)"]  # fmt: skip
    folder = path.absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return [f"unix:{path}: its folder {folder} is not a writable folder"]
    return []


def _import_all(folder: Path, timeout: float) -> tuple[list[str], list[str]]:
    """Every module imported at once, one ``timeout`` for them all: one at a time, each hung
    import cost a whole ``import_timeout`` before the check answered. Different modules
    import safely in parallel (the import lock is per module), as at start (registry.py)."""
    install_package(folder)  # (helpers: ``from . import _x``)
    started = [(name, path, _start_import(name, path)) for name, path in _modules(folder)]
    deadline = time.monotonic() + timeout
    loaded, failed = [], []
    for name, path, (thread, outcome) in started:  # (in the folder's order, whichever ends first)
        thread.join(max(deadline - time.monotonic(), 0.0))
        if not (ended := outcome[:1]):
            failed.append(f"module {name}: {path.name}: still importing after {timeout:g} s "
                          "([reload] import_timeout)")  # fmt: skip
        elif ended[0] is None:
            loaded.append(name)
        else:
            failed.append(f"module {name}: {ended[0]}")
    return loaded, failed


def _modules(folder: Path) -> list[tuple[str, Path]]:
    found = [(path, classify(path.name)) for path in sorted(folder.iterdir())]
    return [(kind[1], path) for path, kind in found
            if kind and kind[0] == "module" and path.is_file()]  # fmt: skip


def _start_import(name: str, path: Path) -> tuple[threading.Thread, list[str | None]]:
    """A load of ``path`` started in a daemon thread, as the service's loader imports: a
    module hung at import must not hang the check. Its list gets the error the load would
    log, or None, once the import has ended."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            import_module_file(name, path)
            outcome.append(None)
        except ModuleLoadError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=run, name=f"check {name}", daemon=True)
    thread.start()
    return thread, outcome
