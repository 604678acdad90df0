"""A worker process for ``EXECUTION = "process"`` modules (``python -m bgservice.process_main``).

It imports modules itself, from the exact source the service validated, and runs one call
at a time. It speaks to the service over the pipes it was started with as stdin/stdout, in
the messages of bgservice.process_messages, moved to descriptors of their own that no
program it runs inherits: its stdin is /dev/null, and anything a module prints goes to
stderr, never into the frames.
In: ``Call``, ``Stop``, and ``JobAdded`` (the answer to ``AddJob``). Out: ``Imported``
when a call's version is imported, one of ``Returned``, ``Refused``, ``Raised``,
``LoadFailed`` per call, and while a call runs ``Chunk``, ``Progress`` and ``AddJob`` (a
module fanning out; the call waits for the answer), and at any time ``Log``: a module's
log records, which the service logs as its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import IO, Any

from bgservice import process_messages as msg
from bgservice.errors import ReplyError, ServiceError
from bgservice.origin import Origin
from bgservice.registry import (
    PACKAGE,
    ModuleLoadError,
    ModuleVersion,
    import_module_file,
    install_package,
)
from bgservice.request import Request, check_checkpoint, check_progress, reply_bytes, to_bytes

Send = Any  # Worker.send: (message) -> None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Progress:
    """``request.job`` in a worker: progress and checkpoints go to the service; cancel is
    not seen here."""

    cancelled = False

    def __init__(
        self, worker: Worker, job: tuple[int, int, str | None, str | None], cid: int
    ) -> None:
        self.id, self.attempt, self.checkpoint, self.source = job
        self._worker, self._cid = worker, cid

    def progress(self, done: float, total: float = 100, message: str | None = None) -> None:
        # Checked here, so the handler gets the ValueError (as in the service's threads).
        done, total, text = check_progress(done, total, message)
        self._worker.send(msg.Progress(self._cid, done, total, text))

    def save_checkpoint(self, value: str) -> Awaitable[None] | None:
        """Blocks until the service has stored it. From an ``async def`` handler (on the
        worker's loop) it returns an awaitable too, already done, as the docs have it:
        ``await request.job.save_checkpoint(text)``."""
        self._worker.save_checkpoint(self._cid, value)
        self.checkpoint = value
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a def handler, or a thread of the module's own
            return None
        done = loop.create_future()
        done.set_result(None)
        return done


class _WorkerRequest(Request):
    """A request in a worker: ``add_job`` asks the service, which owns the queue."""

    def __init__(self, worker: Worker, call: msg.Call) -> None:
        super().__init__(
            call.module,
            call.data,
            Origin(call.transport),
            call.peer,
            sink=lambda chunk: worker.send(msg.Chunk(call.cid, chunk)),
        )
        self._worker = worker
        self._cid = call.cid
        if call.job is not None:
            self.job = _Progress(worker, call.job, call.cid)  # type: ignore[assignment]

    def add_job(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        return self._worker.add_job(self._cid, module, to_bytes(data), options)

    async def add_job_async(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        return self.add_job(module, data, **options)


class _ForwardLogs(logging.Handler):
    """Log records go to the service, which writes them where its own lines go."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send
        # The bare message (and traceback): the service's lines say level and logger.
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self._send(msg.Log(record.levelno, record.name, f"[worker {os.getpid()}] {text}"))
        except Exception:
            self.handleError(record)


class Worker:
    def __init__(self, folder: Path, out: IO[bytes], inp: IO[bytes]) -> None:
        self.folder = folder
        self.out = out
        self.inp = inp
        self.lock = threading.Lock()  # handlers may write from threads of their own
        self.modules: dict[str, ModuleVersion] = {}
        self.loop = asyncio.new_event_loop()

    def send(self, message: msg.FromWorker) -> None:
        frame = msg.pack(message)
        with self.lock:
            self.out.write(frame)
            self.out.flush()

    def _version(self, name: str, path: str, digest: str, source: bytes | None) -> ModuleVersion:
        """The module's version to run: the one imported already when the service sends no
        source, else a fresh import of ``source``. The service sends it for every new
        version, also one of the same source, re-imported because a helper changed."""
        current = self.modules.get(name)
        if source is None:
            if current is not None and current.digest == digest:
                return current
            raise ModuleLoadError("the service sent no source for a version this worker lacks")
        forget_helpers()
        version = import_module_file(name, Path(path), source)
        self.modules[name] = version
        if current is not None:
            self._unload(current)
        return version

    def _unload(self, version: ModuleVersion) -> None:
        if version.unload is None:
            return
        try:
            result = version.unload()
            if asyncio.iscoroutine(result):
                self.loop.run_until_complete(result)
        except Exception:
            traceback.print_exc()

    def call(self, call: msg.Call) -> None:
        cid = call.cid
        try:
            version = self._version(call.name, call.path, call.digest, call.source)
        except ModuleLoadError as exc:
            self.send(msg.LoadFailed(cid, str(exc)))
            return
        if call.source is not None:
            self.send(msg.Imported(cid))  # the call's timeout starts now
        request = _WorkerRequest(self, call)
        handler = version.udp if request.origin.is_datagram else version.tcp
        try:
            if handler is None:
                raise ModuleLoadError(f"no {request.origin.handler} handler")
            result = handler.fn(request)
            if inspect.iscoroutine(result):  # (asyncio's takes generators too, on 3.11)
                result = self.loop.run_until_complete(result)
            self.send(msg.Returned(cid, reply_bytes(call.module, result)))
        except ServiceError as exc:
            self.send(msg.Refused(cid, exc.code, exc.message))
        except BaseException as exc:  # SystemExit from a module must not end the worker
            text = "".join(traceback.format_exception(exc))
            self.send(msg.Raised(cid, msg.describe(exc), text))

    def add_job(self, cid: int, module: str, data: bytes, options: dict[str, Any]) -> int:
        """Ask the service to queue a job; wait for its id (or its error reply)."""
        self.send(msg.AddJob(cid, module, data, options))
        answer = msg.read(self.inp)
        if not isinstance(answer, msg.JobAdded):
            raise SystemExit(0)  # the service went away or stopped us
        if answer.code:
            raise ReplyError(answer.code, answer.message)
        return answer.jid

    def save_checkpoint(self, cid: int, value: str) -> None:
        """Send a checkpoint to the service; wait until it is stored (or its error). The
        same exceptions as in the service's own threads: TypeError for a value that is not
        text, ValueError over ``[queue] max_checkpoint_bytes`` (which the service checks)."""
        check_checkpoint(value, sys.maxsize)
        self.send(msg.SaveCheckpoint(cid, value))
        answer = msg.read(self.inp)
        if not isinstance(answer, msg.Saved):
            raise SystemExit(0)  # the service went away or stopped us
        if answer.code == 400:  # refused as a value (the type was checked here)
            raise ValueError(answer.message)
        if answer.code:
            raise ReplyError(answer.code, answer.message)

    def stop(self) -> None:
        for version in self.modules.values():
            self._unload(version)


def _die_with(service: int) -> None:
    """End this worker when the service ends, even killed (SIGKILL) with a call running:
    no one else would ever stop the call. Linux signals it; elsewhere a thread watches."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        watched = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        watched = False
    if not watched:
        threading.Thread(target=_watch, args=(service,), daemon=True).start()
    if os.getppid() != service:  # it ended before we were watching
        os._exit(1)


_guard: subprocess.Popen[bytes] | None = None  # (kept: not reaped, not warned of, at exit)


def guard_group(fd: int) -> None:
    """Start the guard of this worker's process group: a shell that reads ``fd``, a pipe
    only the service writes to, and kills the group (itself included) when the pipe ends,
    that is when the service does. The kernel kills a worker whose service was killed
    (_die_with), but not the programs its calls started: they ran on, outside systemd's
    cgroup clean-up. A shell, not a thread of this worker: a module's C code holding the
    GIL would hold a thread back. (Without /bin/sh: no guard, as before.)"""
    global _guard
    try:
        _guard = subprocess.Popen(
            ["/bin/sh", "-c", "cat > /dev/null; kill -KILL 0"],
            stdin=fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        pass
    finally:
        os.close(fd)


def _watch(service: int) -> None:
    while os.getppid() == service:
        time.sleep(1)
    os._exit(1)


def forget_helpers() -> None:
    """Drop the helpers (``_NAME.py``) imported so far, as the service's registry does when
    one changes: the module about to be imported gets each from the disk again, never a
    stale copy. (A worker serves one module, so nothing else here still uses them.)"""
    package = sys.modules.get(PACKAGE)
    for qualname in [n for n in sys.modules if n.startswith(f"{PACKAGE}._")]:
        del sys.modules[qualname]
        if package is not None:  # ``from . import _x`` would take the attribute back
            package.__dict__.pop(qualname.partition(".")[2], None)


def _unheeded(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM in a worker: the service decides when workers stop."""


def main() -> None:
    _die_with(int(sys.argv[2]))
    if len(sys.argv) > 3:
        guard_group(int(sys.argv[3]))
    # Ctrl-C in a terminal signals the whole process group, and systemd's default stop
    # (KillMode=control-group) sends SIGTERM to every process of the unit: the service
    # decides when workers stop (it lets calls in flight finish), so they ignore both.
    # With a handler that does nothing, not SIG_IGN: an ignored signal stays ignored
    # across exec, and the programs a module runs could not be terminated.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _unheeded)
        signal.siginterrupt(signum, False)  # a blocking call goes on, as it did ignored
    # The protocol's pipes move to descriptors no program a module runs inherits (os.dup
    # makes them non-inheritable): a child reading its stdin ate the service's messages.
    stream = os.fdopen(os.dup(0), "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # print() in a module lands on stderr, not in the protocol,
    # a line at a time: block-buffered, it waited for the worker's exit (a kill lost it)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    folder = Path(sys.argv[1])
    install_package(folder)
    worker = Worker(folder, out, stream)
    logging.basicConfig(level=logging.INFO, handlers=[_ForwardLogs(worker.send)], force=True)
    while isinstance(message := msg.read(stream), msg.Call):
        worker.call(message)
    worker.stop()


if __name__ == "__main__":
    main()
