"""A worker process for ``EXECUTION = "process"`` modules (``python -m bgservice.worker_main``).

It imports modules itself, from the exact source the service validated, and runs one call
at a time. It speaks to the service over its stdin/stdout in frames of a u32 big-endian
length and a pickle; anything a module prints goes to stderr, never into the frames.
Messages in: ``call``, ``stop``, and ``job_added`` (the answer to ``add_job``). Out:
``ok``, ``error``, ``raised``, ``load_failed``, and while a call runs ``chunk``,
``progress`` and ``add_job`` (a module fanning out; the call waits for the answer), and
at any time ``log``: a module's log records, which the service logs as its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

from bgservice.errors import ReplyError, ServiceError
from bgservice.registry import ModuleLoadError, ModuleVersion, import_module_file, install_package
from bgservice.request import Request, to_bytes

HEADER = struct.Struct(">I")


def pack(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def _read(stream: IO[bytes]) -> tuple[Any, ...] | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (length,) = HEADER.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        return None
    message: tuple[Any, ...] = pickle.loads(body)
    return message


class _Progress:
    """``request.job`` in a worker: progress goes to the service; cancel is not seen here."""

    cancelled = False

    def __init__(self, job_id: int, attempt: int, send: Any, cid: int) -> None:
        self.id, self.attempt, self._send, self._cid = job_id, attempt, send, cid

    def progress(self, done: float, total: float = 100, message: str | None = None) -> None:
        self._send(("progress", self._cid, float(done), float(total), message))


class _WorkerRequest(Request):
    """A request in a worker: ``add_job`` asks the service, which owns the queue."""

    _worker: Worker
    _cid: int

    def add_job(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        return self._worker.add_job(self._cid, module, to_bytes(data), options)

    async def add_job_async(self, module: str, data: str | bytes = b"", **options: Any) -> int:
        return self.add_job(module, data, **options)


class _ForwardLogs(logging.Handler):
    """Log records go to the service, which writes them where its own lines go."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self._send(("log", record.levelno, record.name, f"[worker {os.getpid()}] {text}"))
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

    def send(self, message: tuple[Any, ...]) -> None:
        frame = pack(message)
        with self.lock:
            self.out.write(frame)
            self.out.flush()

    def _version(self, name: str, path: str, digest: str, source: bytes | None) -> ModuleVersion:
        current = self.modules.get(name)
        if current is not None and current.digest == digest:
            return current
        if source is None:
            raise ModuleLoadError("the service sent no source for a version this worker lacks")
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

    def call(self, message: tuple[Any, ...]) -> None:
        (_, cid, name, path, digest, source, kind, module, data, transport, peer, job) = message
        try:
            version = self._version(name, path, digest, source)
        except ModuleLoadError as exc:
            self.send(("load_failed", cid, str(exc)))
            return
        handler = version.udp if kind == "udp" else version.tcp
        request = _WorkerRequest(module, data, transport, peer)
        request._worker, request._cid = self, cid
        request._sink = lambda chunk: self.send(("chunk", cid, chunk))
        if job is not None:
            request.job = _Progress(job[0], job[1], self.send, cid)  # type: ignore[assignment]
        try:
            if handler is None:
                raise ModuleLoadError(f"no {kind} handler")
            result = handler.fn(request)
            if asyncio.iscoroutine(result):
                result = self.loop.run_until_complete(result)
            self.send(("ok", cid, to_bytes(result)))
        except ServiceError as exc:
            self.send(("error", cid, exc.code, exc.message))
        except BaseException as exc:  # SystemExit from a module must not end the worker
            text = "".join(traceback.format_exception(exc))
            self.send(("raised", cid, f"{type(exc).__name__}: {exc}", text))

    def add_job(self, cid: int, module: str, data: bytes, options: dict[str, Any]) -> int:
        """Ask the service to queue a job; wait for its id (or its error reply)."""
        self.send(("add_job", cid, module, data, options))
        answer = _read(self.inp)
        if answer is None or answer[0] != "job_added":
            raise SystemExit(0)  # the service went away or stopped us
        _, jid, code, message = answer
        if code:
            raise ReplyError(code, message)
        return int(jid)

    def stop(self) -> None:
        for version in self.modules.values():
            self._unload(version)


def main() -> None:
    # Ctrl-C in a terminal signals the whole process group; the service decides when
    # workers stop, so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # print() in a module lands on stderr, not in the protocol
    folder = Path(sys.argv[1])
    install_package(folder)
    stream = sys.stdin.buffer
    worker = Worker(folder, out, stream)
    logging.basicConfig(level=logging.INFO, handlers=[_ForwardLogs(worker.send)], force=True)
    while (message := _read(stream)) is not None:
        if message[0] == "stop":
            break
        worker.call(message)
    worker.stop()


if __name__ == "__main__":
    main()
