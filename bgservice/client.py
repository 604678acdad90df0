"""Python clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio), same methods.

Both speak the framed protocol (docs/protocol.md) on one persistent connection, so a
reply's status can never be mistaken for data and a connection serves many calls;
``AsyncClient`` pipelines: concurrent calls share the connection, replies come back in
order. Fire-and-forget ``send`` goes over UDP (or a Unix datagram socket).

Errors: an error reply raises ``ReplyError`` (``.code``, ``.message``); a service that
cannot be reached raises ``ServiceDown``, so the caller can fall back; a reply that does
not come within ``timeout`` seconds (or a new connection's greeting: a service whose loop
is blocked still accepts) raises ``ClientTimeout`` (``.job``: the job ``get`` waited
for); one longer than ``max_reply_bytes`` (64 MiB), ``ReplyTooLarge``. The connection is
reopened once, transparently, when the service had closed it (idle timeout, restart)::

    with Client("127.0.0.1:12341") as bg:
        css = bg.call("less", ".a { width: (1px + 2) }")
        job = bg.add("sleep", "500", priority=5, retries=2)
        print(bg.get(job))
        bg.get("id:7")    # a job id in the original's form is taken too

A bad job id (not ``N`` or ``id:N``) or module name (not ``[A-Za-z0-9_-]+``) raises
``ValueError`` before anything is sent.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
from collections import deque
from collections.abc import Iterable
from typing import Any

from bgservice.client_async import AsyncClient
from bgservice.client_errors import (
    REFUSAL,
    REFUSAL_BYTES,
    BatchError,
    ClientTimeout,
    DatagramTooLarge,
    ReplyTooLarge,
    ServiceDown,
    _check,
    _new_id,
    batch_of,
    cut_short,
    lost,
    no_reply,
    refusal,
    unreachable,
    waiting_for,
)
from bgservice.client_requests import (
    DEFAULT_ADDRESS,
    KERNEL_TIMEOUTS,
    MAX_REPLY_BYTES,
    MAX_TIMEOUT,
    Data,
    JobRef,
    JobSpec,
    Payloads,
    Replies,
    Rows,
    Where,
    add_request,
    add_requests,
    check_timeout,
    named_request,
    parse_address,
    parse_job_id,
    poller,
    queue_request,
    request,
    run_request,
    schedule_request,
    timeval,
)
from bgservice.errors import ReplyError
from bgservice.protocol import PREFACE, framed_request

__all__ = [
    "DEFAULT_ADDRESS",
    "MAX_REPLY_BYTES",
    "MAX_TIMEOUT",
    "AsyncClient",
    "BatchError",
    "Client",
    "ClientTimeout",
    "DatagramTooLarge",
    "JobRef",
    "ReplyError",
    "ReplyTooLarge",
    "ServiceDown",
    "parse_job_id",
]

# --- blocking ---------------------------------------------------------------------------

# Pipelined requests a blocking client writes before it reads their replies: the
# service's default [limits] max_pipeline, up to which it keeps reading a connection.
WINDOW = 64

# Most a read takes at once. Under glibc's mmap threshold (128 KiB): CPython allocates the
# whole size for every recv, and a larger one came from mmap, shrunk with mremap and freed
# with munmap: three system calls and page faults per reply, about half of a lock-step
# producer's CPU (strace; docs/benchmarks.md).
RECV_SIZE = 65536


class Client(Where):
    """A blocking client on one persistent framed connection. Not thread-safe: use one per
    thread (connections are cheap for the service)."""

    def _start(self) -> None:
        check_timeout(self.timeout)  # ValueError: none is at most a week (MAX_TIMEOUT)
        self._sock: socket.socket | None = None
        self._timeout: float | None = None  # the timeout the open connection has
        self._decoder = self._reader()
        self._ready: deque[tuple[int, bytes]] = deque()
        self._poll: select.poll | None = None  # the open connection's, for _kept
        self._written = False  # _exchange got as far as writing: what it sent may have run

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- calls ---------------------------------------------------------------------------

    def call(self, module: str, data: Data = b"", timeout: float | None = None) -> bytes:
        """Call ``module`` over TCP and return its reply; an error reply raises."""
        return _check(*self.request(request(module, data), timeout))

    def ping(self) -> bool:
        return self.call("service", "ping") == b"pong"

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.call("service", "stats")))

    def modules(self) -> list[dict[str, Any]]:
        return list(json.loads(self.call("service", "modules")))

    # --- queue -------------------------------------------------------------------------

    def add(self, module: str, data: Data = b"", **options: Any) -> int:
        """Queue a job; options as docs/queue.md (priority, delay, at, retries, backoff,
        timeout, unique, after, name, tags; no wait: ``run``). Returns the job's id."""
        return _new_id(_check(*self.request(add_request(module, data, **options))))

    def get(self, job: JobRef, timeout: float | None = None) -> bytes:
        """Wait for job ``job`` and return its result (its error reply raises)."""
        with waiting_for("get()", timeout, self.timeout, [parse_job_id(job)]):
            return _check(*self.request(queue_request("get", job), timeout))

    def run(
        self, module: str, data: Data = b"", wait_timeout: float | None = None, **options: Any
    ) -> bytes:
        """Queue a job and wait for its result, in one round trip (``queue:add?wait=1``):
        the job is stored before it runs, as with ``add``, and its error reply raises.
        ``wait_timeout`` is how long to wait for the reply (the client's timeout if None);
        ``timeout=`` among the options is the job's own, as for ``add``."""
        payload = run_request(module, data, **options)
        with waiting_for("run()", wait_timeout, self.timeout, module=module):
            return _check(*self.request(payload, wait_timeout))

    def add_many(self, jobs: Iterable[JobSpec]) -> list[int]:
        """Queue several jobs, pipelined: (module, data) or (module, data, options) each;
        their ids in order. If some were refused, ``BatchError`` (its ``results`` has the
        ids of the others, which were queued). If the connection fails part way, the
        ``ServiceDown`` or ``ClientTimeout`` has ``results`` too (``requests``), with ids."""
        with batch_of(_new_id) as values:
            return values(self.requests(add_requests(jobs)))

    def get_many(self, jobs: Iterable[JobRef], timeout: float | None = None) -> list[bytes]:
        """``get`` for several jobs, pipelined; their results in order (``BatchError`` if
        some ended in an error reply: ``results`` has the others; a failure part way has
        ``results`` too, as ``add_many``'s)."""
        ids = [parse_job_id(job) for job in jobs]
        with batch_of(bytes) as values, waiting_for("get_many()", timeout, self.timeout, ids):
            return values(self.requests([queue_request("get", j) for j in ids], timeout))

    def check(self, job: JobRef) -> int:
        """0 waiting, 1 running, 2 finished (the original's answer)."""
        return int(_check(*self.request(queue_request("check", job))))

    def status(self, job: JobRef) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(queue_request("status", job)))))

    def cancel(self, job: JobRef) -> str:
        """``cancelled`` (it was waiting) or ``cancelling`` (it runs and was asked to stop)."""
        return _check(*self.request(queue_request("cancel", job))).decode()

    def retry(self, job: JobRef, dependents: bool = False) -> int:
        return _new_id(_check(*self.request(queue_request("retry", job, dependents=dependents))))

    def list(self, state: str | None = None, limit: int | None = None, offset: int = 0, *,
             module: str | None = None, name: str | None = None,
             tag: str | None = None) -> Any:  # fmt: skip
        """A page of jobs per state (docs/queue.md), only those of ``module``, ``name`` and
        ``tag`` given. The state as an option: "list:waiting?limit=5" would be refused."""
        request = queue_request("list", None, state=state, limit=limit, offset=offset or None,
                                module=module, name=name, tag=tag)  # fmt: skip
        return json.loads(_check(*self.request(request)))

    def queue_stats(self, window: float | None = None) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(queue_request("stats", window=window)))))

    # --- schedules (recurring jobs) ---------------------------------------------------

    def schedules(self) -> Rows:
        """Every schedule, with its last slot fired and its next run."""
        return list(json.loads(_check(*self.request(b"queue:schedules"))))

    def schedule(self, name: str, module: str, data: Data = b"", **options: Any) -> dict[str, Any]:
        """Add or replace a schedule: ``cron="0 3 * * *"`` or ``every=SECONDS``, and
        ``tz``, ``missed`` ("once"/"skip"), ``paused``, job options (priority, retries,
        backoff, timeout). Returns it as ``schedules()`` lists it."""
        payload = schedule_request(name, module, data, **options)
        return dict(json.loads(_check(*self.request(payload))))

    def unschedule(self, name: str) -> None:
        _check(*self.request(named_request("unschedule", name)))

    def pause(self, name: str) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(named_request("pause", name)))))

    def resume(self, name: str) -> dict[str, Any]:
        return dict(json.loads(_check(*self.request(named_request("resume", name)))))

    def fire(self, name: str) -> int:
        """Run the schedule's job now (an ordinary job; its slots are not touched)."""
        return _new_id(_check(*self.request(named_request("fire", name))))

    # --- the connection ----------------------------------------------------------------

    def requests(self, payloads: Payloads, timeout: float | None = None) -> Replies:
        """Several framed requests, pipelined: written WINDOW at a time (one ``sendall``),
        then their replies read, so neither side's buffers fill up waiting for the other.
        The service serves them concurrently and replies in order.

        A ``ServiceDown`` or ``ClientTimeout`` part way keeps what is known: its ``results``
        has each request's (status, body) if it came, the exception itself if it was sent
        without a reply (it may have run), None if it was never sent (``cut_short``)."""
        replies: Replies = []
        for start in range(0, len(payloads), WINDOW):
            chunk = payloads[start : start + WINDOW]
            frames = b"".join(map(framed_request, chunk))
            try:
                self._exchange(frames, len(chunk), timeout, replies)
            except (ServiceDown, ClientTimeout) as exc:
                sent = start + len(chunk) if self._written else start
                raise cut_short(exc, replies, sent, len(payloads)) from None
        return replies

    def request(self, payload: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """Send one framed request; its (status, body)."""
        return self._exchange(framed_request(payload), 1, timeout, [])[0]

    def _exchange(self, frames: bytes, count: int, timeout: float | None, out: Replies) -> Replies:
        """Write ``frames`` and read ``count`` replies onto ``out`` (each as it comes: a
        batch cut short keeps it). A kept connection the service has closed meanwhile
        (idle timeout, restart) is seen before anything is written, and replaced; once
        the frames are written nothing is sent again (it may have run)."""
        self._written = False
        wanted = timeout if timeout is not None else self.timeout
        check_timeout(wanted)  # the call's, or the client's if it was changed since
        sock = self._connect(wanted)
        try:
            if wanted != self._timeout:  # a system call or two: only when it changes
                self._set_timeout(sock, wanted)
            self._written = True  # (sendall may send a part before it fails)
            sock.sendall(frames)
        except (TimeoutError, BlockingIOError):  # the service takes nothing: busy, not down
            self.close()
            raise ClientTimeout(f"{self.address} took none of the request in time") from None
        except OSError as exc:
            self.close()
            raise ServiceDown(f"cannot send to {self.address}: {exc}") from None
        except BaseException:  # cut midway (^C, a signal handler's exception): the rest
            self.close()  # of the request would begin the next call's, and run with it
            raise
        known = len(out)
        try:
            self._read(sock, count, out)
            return out
        except ReplyTooLarge as exc:  # (a ServiceDown, an OSError: not "connection lost" below)
            out.extend(exc.before[: count - len(out) + known])  # read with it: they answer theirs
            self.close()  # the rest of it would be read as the next reply
            raise
        except ValueError:  # that, or a status that is no number: no framed reply
            del out[known:]  # none of these replies can be trusted to answer its request
            self.close()  # nothing on it can be trusted; nothing is sent again
            raise ServiceDown(f"{self.address} sent a reply that answers no request") from None
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO ran out (EAGAIN)
            self.close()
            raise no_reply(self.address) from None
        except OSError as exc:
            self.close()
            raise lost(self.address, exc) from None
        except BaseException:  # cut before its replies were read: they would answer the
            self.close()  # next call's requests
            raise

    def _kept(self, sock: socket.socket) -> bool:
        """The kept connection is still good: nothing to read on it (a poll that does
        not wait, as urllib3 checks before reuse: 0.7 us, where a MSG_PEEK recv that
        raises costs 3). Readable means EOF (the service closed it while idle) or bytes
        no request asked for: either way it is replaced."""
        if self._poll is None:  # Windows: no poll()
            return not select.select([sock], [], [], 0)[0]
        return not self._poll.poll(0)

    def _connect(self, timeout: float | None) -> socket.socket:
        """The kept connection, or a new one. Connecting takes at most ``timeout`` and 5 s:
        the kernel completes it even while the service's loop is blocked, so one that does
        not complete is a service down. The greeting is waited for as a reply is: none
        within ``timeout`` is a busy service (``ClientTimeout``), not a down one."""
        if self._sock is not None:
            if not self._ready and self._kept(self._sock):
                return self._sock
            self.close()
        family, target = parse_address(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._open(sock, target, timeout)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._set_timeout(sock, self.timeout)
        except BaseException:  # whatever it is (^C, a failed setsockopt): no socket left open
            sock.close()
            raise
        self._sock, self._decoder, self._ready = sock, self._reader(), deque()
        self._poll = poller(sock)
        return sock

    def _open(self, sock: socket.socket, target: Any, timeout: float | None) -> None:
        """Connect ``sock`` and wait for the greeting (for ``_connect``, which closes it
        if this raises)."""
        try:
            sock.settimeout(min(timeout or 5.0, 5.0))
            sock.connect(target)
        except OSError as exc:
            raise unreachable(self.address, exc) from None
        try:
            sock.settimeout(timeout)
            sock.sendall(PREFACE)
            head = _read_exact(sock, len(PREFACE))
            if REFUSAL.match(head):  # refused (403, 503): the reason, up to the close
                with contextlib.suppress(OSError):  # a reset or a timeout: what came is it
                    while len(head) < REFUSAL_BYTES and (more := sock.recv(REFUSAL_BYTES)):
                        head += more
                raise refusal(self.address, head[:REFUSAL_BYTES])
            if head != PREFACE:
                raise ServiceDown(f"{self.address} does not speak the framed protocol")
        except TimeoutError:  # (0, which made the socket non-blocking, is refused)
            raise ClientTimeout(f"{self.address} accepted but did not greet in time") from None
        except ServiceDown:  # said already (a ConnectionError: not wrapped again below)
            raise
        except OSError as exc:
            raise unreachable(self.address, exc) from None

    def _set_timeout(self, sock: socket.socket, timeout: float | None) -> None:
        self._timeout = timeout
        if not KERNEL_TIMEOUTS:
            sock.settimeout(timeout)
            return
        sock.settimeout(None)  # blocking: the kernel times out each send and recv
        value = timeval(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def _read(self, sock: socket.socket, count: int, out: Replies) -> None:
        """``count`` replies onto ``out``, each as it comes; ``ValueError`` for bytes that
        are no framed reply, or a reply no request asked for."""
        for _ in range(count):
            while not self._ready:
                chunk = sock.recv(RECV_SIZE)
                if not chunk:
                    raise ConnectionResetError("closed by the service")
                self._ready.extend(self._decoder.feed(chunk))
            out.append(self._ready.popleft())
        if self._ready:  # more replies than requests: out of step with the service
            raise ValueError("unasked reply")


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed by the service")
        data += chunk
    return data
