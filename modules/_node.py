"""The compiler modules' link to a few long-lived node processes (compilers/server.js).

The official compilers (Dart Sass, Less, TypeScript, CoffeeScript, Pug, Terser,
Lightning CSS) are JavaScript. Starting node per request costs 100-400 ms of loading; kept
alive they compile a 10 KB source in milliseconds. So the compiler modules share up to
``$BGSERVICE_COMPILER_PROCESSES`` (2) node processes: the first started by the first
compile, another only when a compile finds every running one busy; one that died is
replaced by the next compile that needs it (the calls in flight in it get a 503); all are
stopped when the last module using them unloads (one whose import failed after
making its ``Compiler`` never counts: ``release``). Requests are JSON lines tagged with an
id, so many compiles can be sent at once and the handlers only ``await``: the event loop
never waits on a compiler. A node process compiles one source at a time, so a compile
goes to an idle process where there is one: a slow compile delays only those sent to its
process after it, and its timeout kills only that process. A compile whose call gives up
first (its caller's timeout, a job's ``timeout=``, a cancel) is still that process's work
until node replies or the compile's own timeout passes, which then kills the process as
for any stuck compile: an endless loop never outlives ``$BGSERVICE_COMPILE_TIMEOUT``.

Settings (environment, read once at the first import; a bad value fails the load of every
compiler module with a message naming the variable): ``$BGSERVICE_COMPILE_TIMEOUT``,
``$BGSERVICE_COMPILER_PROCESSES``, ``$BGSERVICE_COMPILE_MAX_OUTPUT`` (bytes of output a
compile may reply, else ``413``) and ``$BGSERVICE_COMPILER_MAX_RSS`` (MiB a node process may
keep resident after a compile before it is replaced; 0: never).

Where the compilers live: ``$BGSERVICE_COMPILERS`` if set, else the first installed of the
``compilers`` folder beside the modules folder and the one of the bgservice checkout.

What node may do: it runs under its permission model (node 20 and later), reading only
server.js, the compilers' node_modules and the include folders (the modules'
``INCLUDE_DIRS`` and ``$BGSERVICE_INCLUDE_DIRS``), writing nothing, starting no program
and no worker. A node without it runs the compilers unconfined, with a warning.

Options ride in front of the source: data starting with ``?`` is ``?name=value&...:``
followed by the source (query-string encoded, like ``queue:add?priority=5:...``). Data
not starting with ``?`` is all source, as in the original; a source that itself starts
with ``?`` is sent as ``?:SOURCE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import threading
import types
import urllib.parse
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgservice import ReplyError

from . import _env

log = logging.getLogger(__name__)

_problems: list[str] = []  # bad settings: every compiler module's load fails, naming them


def _setting(name: str, default: float, kind: type[int] | type[float], low: float, high: float
             ) -> float:  # fmt: skip
    """``$name`` as a number ``low``-``high`` (unset or empty: ``default``); anything else
    is kept in ``_problems`` (markdown, which imports this file, goes on without them)."""
    value, problem = _env.number(name, default, kind, low, high)
    if problem is not None:
        _problems.append(problem)
    return value


# Seconds a compile may take; one this slow is stuck (pug templates are code, Sass has
# @while), so the process is killed and the next compile starts a new one.
COMPILE_TIMEOUT = _setting("BGSERVICE_COMPILE_TIMEOUT", 20.0, float, 0.001, 86400)
# Node processes at most: each holds the compilers it has loaded and a 64 MB output cache.
PROCESSES = int(_setting("BGSERVICE_COMPILER_PROCESSES", 2, int, 1, 64))
# Bytes of output one compile may reply (413 beyond): node checks it before sending.
MAX_OUTPUT = int(_setting("BGSERVICE_COMPILE_MAX_OUTPUT", 1 << 28, int, 1, 1 << 30))
# MiB a node process may keep resident after a compile (a pathological one leaves it at
# 1-2 GB: V8 keeps the heap it grew); over it, the process finishes what it was sent and
# exits, and the next compile starts a fresh one. 0: never.
MAX_RSS = int(_setting("BGSERVICE_COMPILER_MAX_RSS", 1024, int, 0, 1 << 20)) << 20
# The longest line from node: a reply's JSON without its output (which follows the line as
# it is), an error message of at most 1 Mi characters (server.js) at 6 bytes each included.
STREAM_LIMIT = 8 << 20
BIG = 1 << 18  # JSON this long takes over a millisecond to code: done in a thread
# node ends with the service, however it ends: a service killed (-9, the OOM killer) left
# its compilers behind, and one stuck in a compile's endless loop spun a core for ever.
# setpriv (util-linux, on every Debian and Ubuntu) asks the kernel for a SIGKILL when its
# parent dies, then becomes node; node itself cannot ask (its loop may be stuck).
_SETPRIV = shutil.which("setpriv")
DIE_WITH_US = (_SETPRIV, "--pdeathsig", "KILL") if _SETPRIV else ()
_HERE = Path(__file__).resolve().parent
Future = asyncio.Future[dict[str, Any]]


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
FLAGS = frozenset({"minify", "bare", "pretty", "compress", "mangle"})  # on/off options


def flag(options: dict[str, str], name: str, default: bool) -> bool:
    """An on/off option: 1, true, yes, on or 0, false, no, off (any case); anything else
    is a ``400`` (``html=n`` read as on once let raw HTML through for a client that
    meant off, and ``minify=n`` minified)."""
    if name not in options:
        return default
    word = options[name].lower()
    if word not in _ON + _OFF:
        raise ReplyError(
            400, f"{name}: expected 1/true/yes/on or 0/false/no/off, not {options[name][:40]!r}"
        )
    return word in _ON


def parse(data: bytes, allowed: frozenset[str]) -> tuple[dict[str, str], str]:
    """``?a=1&b=2:SOURCE`` -> ({"a": "1", "b": "2"}, "SOURCE"); anything else is all source."""
    if not data.startswith(b"?"):
        return {}, data.decode("utf-8", "replace")
    head, sep, rest = data[1:].partition(b":")
    if not sep:
        raise ReplyError(400, "options: expected ?name=value&...:SOURCE (a ':' ends them)")
    query = head.decode("utf-8", "replace")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ReplyError(400, "options: expected name=value&name=value") from None
    options = dict(pairs)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ReplyError(
            400, f"unknown option {unknown[0]!r} (options: {', '.join(sorted(allowed))})"
        )
    return options, rest.decode("utf-8", "replace")


def include_root(options: dict[str, str], allowed: list[str]) -> None:
    """Check ``include=FOLDER`` against the module's allow list, in place.

    ``$BGSERVICE_INCLUDE_DIRS`` (os.pathsep-separated) extends the list. The folder is
    compared after resolving symlinks, and server.js keeps every read inside it."""
    if "include" not in options:
        return
    extra = os.environ.get("BGSERVICE_INCLUDE_DIRS", "").split(os.pathsep)
    folders = [*allowed, *filter(None, extra)]
    wanted = os.path.realpath(options.pop("include"))
    if wanted not in {os.path.realpath(f) for f in folders}:
        raise ReplyError(403, f"include folder {wanted} is not in the module's INCLUDE_DIRS")
    options["root"] = wanted


def sources(options: dict[str, str]) -> None:
    """Decode ``sources=JSON`` ({"name": "text", ...}: files a source may @use/@import)."""
    if "sources" not in options:
        return
    try:
        value = json.loads(options["sources"])
    except ValueError as exc:
        raise ReplyError(400, f"sources: not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ReplyError(400, 'sources: expected a JSON object {"name": "text", ...}')
    options["sources"] = value  # type: ignore[assignment]


def find_compilers() -> Path:
    """The compilers folder: ``$BGSERVICE_COMPILERS`` if set (no fallback: a wrong setting
    must show), else the first installed of the two default places."""
    if env := os.environ.get("BGSERVICE_COMPILERS"):
        return Path(env)
    candidates = [_HERE.parent / "compilers"]
    with contextlib.suppress(ImportError):
        import bgservice

        candidates.append(Path(bgservice.__file__).resolve().parent.parent / "compilers")
    for folder in candidates:
        if (folder / "server.js").is_file() and (folder / "node_modules").is_dir():
            return folder
    return next((f for f in candidates if (f / "server.js").is_file()), candidates[0])


# node's permission model: a Pug template is JavaScript, and without it any client that may
# call pug ran programs and wrote files as the service. Its switch is --permission from node
# 22.13 and 23.5, --experimental-permission in 20 and 21: the first that the node found
# takes is used (tried once per node binary). --allow-addons: Lightning CSS is a native
# addon (server.js lets only the compilers' own load). The warnings of these switches are
# turned off: node printed them at every start, each a warning in the log.
PERMISSION = (
    ("--permission", "--allow-addons", "--disable-warning=SecurityWarning"),
    ("--experimental-permission", "--allow-addons", "--disable-warning=SecurityWarning",
     "--disable-warning=ExperimentalWarning"),
)  # fmt: skip
_permission: dict[tuple[str, int, int], tuple[str, ...]] = {}  # by node's path, inode, mtime


async def permission(node: str) -> tuple[str, ...]:
    """The switches that start ``node`` under its permission model, () if it has none (said
    once, as a warning). Keyed by the binary: a node upgraded in place is tried again."""
    key = (node, 0, 0)
    with contextlib.suppress(OSError):
        info = os.stat(node)
        key = (os.path.realpath(node), info.st_ino, info.st_mtime_ns)
    if key not in _permission:
        _permission[key] = await _first_accepted(node)
        if not _permission[key]:
            log.warning("node (%s) has no permission model (node >= 20 has): the compilers run "
                        "unconfined, and a pug or jade template can run programs and write "
                        "files as this service", node)  # fmt: skip
    return _permission[key]


async def _first_accepted(node: str) -> tuple[str, ...]:
    for switches in PERMISSION:
        if await _runs(node, *switches, "-e", "0"):
            return switches
    return ()


async def _runs(node: str, *args: str) -> bool:
    """Whether ``node *args`` exits 0 (an unknown switch: 9), within 20 s."""
    try:
        proc = await asyncio.create_subprocess_exec(
            node, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        return False
    try:
        return await asyncio.wait_for(proc.wait(), 20) == 0
    except TimeoutError:
        return False
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(value: object) -> bytes:
    """str(value) as UTF-8, lone surrogates (an error's JSON from node may carry them: a
    template's ``String.fromCharCode(0xd800)``) as U+FFFD. (Outputs come as UTF-8 already,
    node having replaced them.)"""
    text = str(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


async def _decode(line: bytes) -> tuple[bytes, Any]:
    """(line, its JSON or None); a long line is decoded in a thread."""
    try:
        if len(line) < BIG:
            return line, json.loads(line)
        return line, await asyncio.to_thread(json.loads, line)
    except ValueError:
        return line, None


async def _read_exactly(stream: asyncio.StreamReader, size: int) -> bytes:
    """``stream.readexactly(size)`` in pieces, joined off the event loop: a whole output in
    the stream's buffer paused and resumed the pipe at every chunk past twice its limit, then
    was copied twice on the loop."""
    parts = []
    while size > 0:
        part = await stream.read(min(size, 1 << 20))
        if not part:
            raise asyncio.IncompleteReadError(b"", size)
        parts.append(part)
        size -= len(part)
    if len(parts) == 1:
        return parts[0]
    # In a thread: a large bytes.join copies without the GIL (85 ms for 128 MiB, here).
    return await asyncio.to_thread(b"".join, parts)


@dataclass(eq=False)
class _Sent:
    """A compile sent to a node process, until it replies, dies or passes its deadline."""

    proc: asyncio.subprocess.Process
    module: str  # whose compile (stats): "jade" and "pug" run the same language
    future: Future
    timer: asyncio.TimerHandle


class NodeCompilers:
    """The node processes running server.js, shared by the compiler modules."""

    def __init__(self, size: int = PROCESSES) -> None:
        self.size = size
        self._procs: list[asyncio.subprocess.Process] = []  # running, oldest first
        self._pending: dict[int, _Sent] = {}  # by request id
        self._ids = itertools.count(1)
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts: Counter[str] = Counter()
        self.starts = 0
        # Include folders node may read (real paths): the modules' INCLUDE_DIRS as they load
        # (in the loader's threads, hence the lock), and any other a compile was allowed;
        # and those each running process was started with.
        self._folders: set[str] = set()
        self._folders_lock = threading.Lock()
        self._granted: dict[asyncio.subprocess.Process, frozenset[str] | None] = {}  # None: all

    def allow(self, folders: list[str]) -> None:
        """Let the node processes started from now on read ``folders`` (and below)."""
        with self._folders_lock:
            self._folders.update(os.path.realpath(f) for f in folders)

    def _readable(self, root: str) -> None:
        """A compile reads ``root`` (checked by ``include_root``): the running processes not
        started with it (a module reloaded with another INCLUDE_DIRS, $BGSERVICE_INCLUDE_DIRS
        changed) are retired, and the next one is started with it."""
        self.allow([root])
        for proc in list(self._procs):
            granted = self._granted.get(proc, frozenset())
            if granted is not None and root not in granted:
                self._retire(proc, f"may not read the include folder {root}")

    async def compile(
        self, lang: str, source: str, options: dict[str, Any], module: str | None = None
    ) -> bytes:
        """The compiled output, or ReplyError: 400 (the source), 413 (the output's size),
        5xx (the compiler). ``module`` (default ``lang``) is whose stats count it."""
        module = module or lang
        self.counts[f"{module}_calls"] += 1
        try:
            reply = await self._compile(lang, source, options, module)
            if not reply.get("ok"):
                raise ReplyError(int(reply.get("status", 500)), _utf8(reply.get("error")).decode())
        except ReplyError:
            self.counts[f"{module}_errors"] += 1
            raise
        output: bytes = reply["output"]
        return output

    async def _compile(
        self, lang: str, source: str, options: dict[str, Any], module: str
    ) -> dict[str, Any]:
        rid = next(self._ids)
        message = {"id": rid, "lang": lang, "source": source, "options": options,
                   "max_output": MAX_OUTPUT}  # fmt: skip
        big = len(source) >= BIG
        text = await asyncio.to_thread(json.dumps, message) if big else json.dumps(message)
        line = text.encode() + b"\n"
        proc = await self._running(options.get("root"))
        assert proc.stdin is not None
        loop = asyncio.get_running_loop()
        future: Future = loop.create_future()
        timer = loop.call_later(COMPILE_TIMEOUT, self._overdue, rid, lang)
        sent = self._pending[rid] = _Sent(proc, module, future, timer)
        future.add_done_callback(lambda _: self._settled(rid, sent))
        try:
            if proc.stdin.is_closing():
                raise ConnectionResetError("closed")
            proc.stdin.write(line)
            await proc.stdin.drain()
        # uvloop raises RuntimeError ("the handler is closed") for a pipe of a process that
        # exited at once (a broken node): the same 503 as a broken pipe.
        except (ConnectionError, RuntimeError):
            if not future.done():
                future.set_exception(ReplyError(503, f"{lang}: the compiler process died; retry"))
        # Shielded: a call that gives up (cancelled) leaves its compile running in node, still
        # counted as that process's work, and still killed with it at its deadline.
        return await asyncio.shield(future)

    def _settled(self, rid: int, sent: _Sent) -> None:
        self._pending.pop(rid, None)
        sent.timer.cancel()
        if not sent.future.cancelled():
            sent.future.exception()  # retrieved: one whose call gave up has nobody to see it

    def _overdue(self, rid: int, lang: str) -> None:
        """A compile still running at its deadline: its process is killed (node cannot stop a
        compile), which fails every other compile in it with 503."""
        sent = self._pending.get(rid)
        if sent is None or sent.future.done():
            return
        log.warning("%s compile still running after %g s: killing node", lang, COMPILE_TIMEOUT)
        sent.future.set_exception(
            ReplyError(504, f"{lang}: compile took over {COMPILE_TIMEOUT:g} s")
        )
        self._kill(sent.proc)

    async def _running(self, root: str | None) -> asyncio.subprocess.Process:
        """An idle process, a new one if none is and there is room, else the least busy; one
        that may read ``root``, the include folder of the compile, if any."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            self._procs = [p for p in self._procs if p.returncode is None]
            if root is not None:
                self._readable(root)
            load = Counter(sent.proc for sent in self._pending.values())
            least = min(self._procs, key=lambda p: load[p], default=None)
            if least is None or (load[least] and len(self._procs) < self.size):
                least = await self._start()
                self._procs.append(least)
            return least

    async def _start(self) -> asyncio.subprocess.Process:
        node = shutil.which("node")
        if node is None:
            raise ReplyError(503, "node is not installed: install Node.js >= 20.19")
        folder = find_compilers()
        if not (folder / "server.js").is_file():
            raise ReplyError(503, f"compilers not found: set BGSERVICE_COMPILERS (tried {folder})")
        if not (folder / "node_modules").is_dir():
            install = f"npm ci --prefix {folder}"
            raise ReplyError(503, f"compilers not installed: install with: {install}")
        switches = await permission(node)
        server = os.path.realpath(folder / "server.js")  # what node reads, symlinks resolved
        folders = self._include_folders()
        if switches:
            reads = (server, os.path.realpath(folder / "node_modules"), *folders)
            switches += tuple(f"--allow-fs-read={path}" for path in reads)
        proc = await asyncio.create_subprocess_exec(
            *DIE_WITH_US,
            node,
            *switches,
            server,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
            cwd=str(folder),
            # A session of its own: a terminal's Ctrl-C signals its whole process group,
            # and node, in the service's, died at once with the compiles in flight (a
            # queued compile failed for good) instead of finishing within the stop's
            # shutdown_grace. The service ends it (its stdin closed at unload; killed with
            # the service: --pdeathsig above, else its stdin's end).
            start_new_session=True,
        )
        self.starts += 1
        self._granted[proc] = frozenset(folders) if switches else None
        confined = "permission model" if switches else "unconfined"
        log.info("compiler process started: node %s (pid %d, %s)", server, proc.pid, confined)
        for coro in (self._read_replies(proc), self._read_stderr(proc)):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return proc

    def _include_folders(self) -> list[str]:
        """Every include folder allowed so far, $BGSERVICE_INCLUDE_DIRS's as it is now too."""
        extra = os.environ.get("BGSERVICE_INCLUDE_DIRS", "").split(os.pathsep)
        self.allow(list(filter(None, extra)))
        with self._folders_lock:
            return sorted(self._folders)

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                decoded = await _decode(line)
                size = decoded[1].get("size") if isinstance(decoded[1], dict) else None
                if isinstance(size, int):  # the output follows its line, as it is
                    decoded[1]["output"] = await _read_exactly(proc.stdout, size)
                self._resolve(proc, decoded)
        except asyncio.IncompleteReadError:
            pass  # it died in the middle of an output: as if before it
        except ValueError as exc:  # a line longer than STREAM_LIMIT: not server.js's
            log.error("compiler process sent an unreadable reply (%s): restarting it", exc)
            self._kill(proc)
        code = await proc.wait()
        self._granted.pop(proc, None)
        if code != 0:
            log.warning("compiler process %d exited with code %d", proc.pid, code)
        self._fail_pending(proc, code)

    def _resolve(self, proc: asyncio.subprocess.Process, decoded: Any) -> None:
        try:
            reply = decoded[1]
            sent = self._pending.get(reply["id"])
        except (KeyError, TypeError):
            log.warning("node wrote something else than a reply: %r", decoded[0][:200])
            return
        if sent is not None and not sent.future.done():
            sent.future.set_result(reply)
        rss = reply.get("rss")
        if MAX_RSS and isinstance(rss, int) and rss > MAX_RSS and proc in self._procs:
            self._retire(proc, f"keeps {rss >> 20} MiB resident (BGSERVICE_COMPILER_MAX_RSS is"
                               f" {MAX_RSS >> 20})")  # fmt: skip

    def _retire(self, proc: asyncio.subprocess.Process, why: str) -> None:
        """No more compiles to ``proc``; its stdin closed, it exits once it has replied to
        those already sent (server.js), and the next compile starts a fresh process."""
        log.info("compiler process %d %s: replacing it", proc.pid, why)
        self._procs.remove(proc)
        if proc.stdin is not None:
            proc.stdin.close()

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.warning("node: %s", line.decode("utf-8", "replace").rstrip())

    def _fail_pending(self, proc: asyncio.subprocess.Process, code: int) -> None:
        error = ReplyError(503, f"the compiler process died (exit code {code}); retry")
        for sent in list(self._pending.values()):
            if sent.proc is proc and not sent.future.done():
                sent.future.set_exception(error)

    def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc in self._procs:  # no compile goes to it, even before it exits
            self._procs.remove(proc)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self) -> None:
        """Close each node's stdin (it exits), kill one that lingers, wait for the readers."""
        procs, self._procs = self._procs, []
        await asyncio.gather(*(self._stop(p) for p in procs if p.returncode is None))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            self._kill(proc)
            await proc.wait()
        log.info("compiler process %d stopped", proc.pid)

    def stats(self, module: str) -> dict[str, Any]:
        pids = [p.pid for p in self._procs if p.returncode is None]
        return {
            "compiles": self.counts[f"{module}_calls"],
            "errors": self.counts[f"{module}_errors"],  # any error reply: 4xx and 5xx
            "node_pid": pids[0] if pids else None,  # the oldest
            "node_pids": pids,
            "node_starts": self.starts,
            # this module's compiles in node, those whose call gave up included
            "in_flight": sum(sent.module == module for sent in self._pending.values()),
        }


_shared = NodeCompilers()
# The Compilers made and not released yet. Modules import in the loader's threads, several
# at once at start, while release runs on the loop: the set is changed under a lock.
_users: set[Compiler] = set()
_users_lock = threading.Lock()


def acquire(user: Compiler, include_dirs: list[str] | None = None) -> NodeCompilers:
    """The shared processes, for ``user`` to keep; pair with ``await release(user)`` in
    its module's unload. Its ``include_dirs`` are folders node may read from now on."""
    with _users_lock:
        _users.add(user)
    _shared.allow(include_dirs or [])
    return _shared


async def release(user: Compiler) -> None:
    """Stop the processes once no loaded module uses them. Users are kept, not counted:
    the new version of a module acquires before the old one releases, which keeps the
    processes up across a reload; and a module whose import failed after its Compiler
    was made (an exception further down its file, a bad declaration) is never unloaded,
    so its Compiler is dropped here instead, found out by ``serving`` (a count taken
    for it kept node up until the service stopped). A version replaced or removed, its
    unload still to come, goes with them: node answers what it was sent before it exits
    (``stop``), and one started by a later compile of it is stopped by its own release."""
    with _users_lock:
        _users.discard(user)
        _users.difference_update([u for u in _users if not u.serving()])
        last = not _users
    if last:
        await _shared.stop()


def _importing() -> tuple[str, weakref.ref[types.ModuleType]] | None:
    """The name and module whose top-level code is making a Compiler (the first caller
    outside this file); None when it is not the module of that name in sys.modules."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals is globals():
        frame = frame.f_back
    name = frame.f_globals.get("__name__", "")
    module = sys.modules.get(name)
    if module is None or vars(module) is not frame.f_globals:
        return None
    return name, weakref.ref(module)


class Compiler:
    """One compiler module: its TCP handler, unload hook and ``stats()``.

    A module file names its language, the options it takes and, if it takes ``include=``,
    the folders a request may read, then exports the three methods::

        compiler = _node.Compiler("less", {"filename", "minify", "sources", "include"},
                                  INCLUDE_DIRS)
        handle_tcp, unload, stats = compiler.handle_tcp, compiler.unload, compiler.stats

    ``module`` names the module in its stats where it is not the language (``jade``).
    A bad setting (see the top of this file) fails the module's load here, named.
    """

    def __init__(
        self,
        lang: str,
        options: set[str],
        include_dirs: list[str] | None = None,
        module: str | None = None,
    ) -> None:
        if _problems:
            raise ValueError("; ".join(_problems))
        self.lang = lang
        self.module = module or lang
        self.options = frozenset(options)
        self.include_dirs = include_dirs
        self._home = _importing()
        self.compilers = acquire(self, include_dirs)

    def serving(self) -> bool:
        """Whether its module is the one loaded under its name (or still importing). The
        registry takes a module whose import failed out of sys.modules (the last good
        version, if any, goes back), and a replaced or removed one's unload comes."""
        if self._home is None:  # (made elsewhere: kept until released)
            return True
        name, module = self._home
        return (loaded := module()) is not None and sys.modules.get(name) is loaded

    async def handle_tcp(self, request: Any) -> bytes:
        options, source = parse(request.data, self.options)
        for name in FLAGS.intersection(options):  # checked here, as "1" or "0" for node
            options[name] = "1" if flag(options, name, False) else "0"
        if "sources" in self.options:
            sources(options)
        if self.include_dirs is not None:
            include_root(options, self.include_dirs)
        return await self.compilers.compile(self.lang, source, options, self.module)

    async def unload(self) -> None:
        await release(self)

    def stats(self) -> dict[str, Any]:
        return self.compilers.stats(self.module)
