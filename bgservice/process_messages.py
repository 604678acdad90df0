"""The messages between the service and its worker processes (bgservice.processes and
bgservice.process_main), one frozen dataclass each, and what a call's end means to its
caller (``outcome``, ``death``).

On the wire each is a frame: a u32 big-endian length, then the message pickled. Both ends
are this same package, so pickle is safe here (it never reads a byte from a client).
Every message about a call carries the call's id ``cid``: a late message of a call that
already timed out is recognised and dropped.
"""

from __future__ import annotations

import pickle
import signal
import struct
from dataclasses import dataclass
from typing import IO, Any

from bgservice.errors import HandlerError, ModuleLoadFailed, ReplyError

HEADER = struct.Struct(">I")


# --- service -> worker ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """Run one call of a module. ``source`` is sent only when the worker lacks ``digest``."""

    cid: int
    name: str
    path: str
    digest: str
    source: bytes | None
    module: str  # the request's module name (the same as ``name``, as the client wrote it)
    data: bytes
    transport: str  # the request's Origin value
    peer: str
    # (job id, attempt, checkpoint, where it was added from): a queued run
    job: tuple[int, int, str | None, str | None] | None


@dataclass(frozen=True, slots=True)
class Stop:
    """Unload every module and exit."""


@dataclass(frozen=True, slots=True)
class JobAdded:
    """The answer to ``AddJob``: the new job's id, or an error code and message."""

    jid: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Saved:
    """The answer to ``SaveCheckpoint``: 0 once stored, or an error code and message."""

    code: int
    message: str


# --- worker -> service ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Imported:
    """The worker has imported the version the call sent (and unloaded the one it
    replaces): the call's timeout counts from here, the import was bounded by
    ``[reload] import_timeout`` instead."""

    cid: int


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    """``request.job.save_checkpoint()`` in the worker; the call waits for ``Saved``."""

    cid: int
    value: str


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    logger: str
    text: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """``request.write()`` in the worker: part of the reply, streamed now."""

    cid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Progress:
    cid: int
    done: float
    total: float
    message: str | None


@dataclass(frozen=True, slots=True)
class AddJob:
    """``request.add_job()`` in the worker; the call waits for ``JobAdded``."""

    cid: int
    module: str
    data: bytes
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Returned:
    """The handler returned: its reply."""

    cid: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The handler raised a ServiceError: a reply with its code."""

    cid: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    cid: int
    error: str


@dataclass(frozen=True, slots=True)
class Raised:
    """The handler raised anything else: a 500, its traceback logged by the service."""

    cid: int
    summary: str
    trace: str


ToWorker = Call | Stop | JobAdded | Saved
Ending = Returned | Refused | LoadFailed | Raised  # a call's last message
FromWorker = Log | Imported | Chunk | Progress | AddJob | SaveCheckpoint | Ending


def pack(message: ToWorker | FromWorker) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    return pickle.loads(body)


def read(stream: IO[bytes]) -> Any:
    """The next message from a blocking stream; None at its end."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (length,) = HEADER.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        return None
    return unpack(body)


def outcome(name: str, reply: Ending) -> bytes:
    """A call's last message as its caller sees it: the reply, or the error it raises."""
    if isinstance(reply, Returned):
        return reply.body
    if isinstance(reply, Refused):
        raise ReplyError(reply.code, reply.message)
    if isinstance(reply, LoadFailed):
        raise ModuleLoadFailed(f"Module {name} failed to load in a worker: {reply.error}")
    error = HandlerError(f"Module {name} raised {reply.summary}")
    error.trace = reply.trace  # type: ignore[attr-defined]  # (logged, alerted; sent with -v)
    raise error


def describe(exc: BaseException) -> str:
    """``Type: text`` of a module's exception, even one whose ``__str__`` fails."""
    try:
        text = str(exc)
    except Exception:  # as the traceback module puts it
        text = "<exception str() failed>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__  # (no "X: ")


def death(name: str, code: int) -> str:
    """What a call hears when its worker's process ended with ``code`` (its returncode)."""
    return f"Worker process of module {name} died ({ending(code)})"


def ending(code: int) -> str:
    """``exit code 3`` or ``signal SIGKILL``, from a process's returncode."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
