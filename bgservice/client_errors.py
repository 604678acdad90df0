"""The errors the Python clients raise, and how what comes back becomes a value or one of
them: an error reply, the service's refusal of a connection, a reply longer than the
client takes, a batch cut short, a timeout that says what it waited for. No I/O.

``bgservice.client`` exports the public ones (users import them from there); the ones
that lived in ``bgservice.client_requests`` before are importable from there too."""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from bgservice.errors import ReplyError
from bgservice.protocol import OK, Reply, ReplyDecoder

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")


class ServiceDown(ConnectionError):
    """The service cannot be reached (not running, wrong address, connection lost).
    ``results``: what a batch it cut short knows (``cut_short``); None from a single call."""

    results: list[Any] | None = None


class ClientTimeout(TimeoutError):
    """No reply within the client's timeout. ``results`` as ``ServiceDown``'s; ``job``: the
    id of the job ``get`` waited for (``get_many``: the first without a reply), else None;
    ``sent``: the request had been written (it may have run) when the time ran out."""

    results: list[Any] | None = None
    job: int | None = None
    sent = False


CutShort = ServiceDown | ClientTimeout


def no_reply(address: str) -> ClientTimeout:
    """The ``ClientTimeout`` of a request written whose reply did not come in time."""
    exc = ClientTimeout(f"no reply from {address} in time")
    exc.sent = True
    return exc


def unreachable(address: str, why: object) -> ServiceDown:
    """A connection that could not be made, or was closed before the service greeted."""
    return ServiceDown(f"cannot reach the service at {address}: {why}")


def lost(address: str, why: object = None) -> ServiceDown:
    """A connection lost once the request was written: it may have run (not sent again)."""
    said = f"connection to {address} lost after the request was sent (it may have run)"
    return ServiceDown(said if why is None else f"{said}: {why}")


class ReplyTooLarge(ServiceDown):
    """A reply longer than the client's ``max_reply_bytes`` (``.size``, ``.limit``): a peer
    that is no bgservice (a wrong port), or a module's reply beyond what the caller takes.
    Its connection is closed: the rest of that reply would be read as the next one's.
    (``before``: the replies read with it, before it, which answer their requests.)"""

    size = limit = 0
    before: Sequence[Reply] = ()


def too_large(address: str, size: int, limit: int, before: list[Reply]) -> ReplyTooLarge:
    # (Made from its message alone, as cut_short makes a batch's error again.)
    exc = ReplyTooLarge(
        f"{address} sent a reply of {size} bytes, more than max_reply_bytes={limit}: "
        "the connection is closed (the request may have run)"
    )
    exc.size, exc.limit, exc.before = size, limit, before
    return exc


class DatagramTooLarge(ValueError):
    """``send``: ``MODULE:DATA`` is more than one datagram to ``address`` carries (the
    kernel's "message too long"): it could never be sent, the service up or down."""

    def __init__(self, module: str, size: int, address: str) -> None:
        carries = f"more than one datagram to {address} carries"
        self.reason = f'{module}:DATA is {size} bytes, {carries} (the kernel\'s "message too long")'
        super().__init__(f"send(): {self.reason}: use call() or add()")


class BatchError(ReplyError):
    """Some requests of a batch (``add_many``, ``get_many``) had an error reply. The
    others were served: ``results`` holds, in request order, each one's value or its
    ``ReplyError``; ``code`` and the message are the first failure's."""

    def __init__(self, results: list[Any]) -> None:
        first = next(r for r in results if isinstance(r, ReplyError))
        failed = sum(isinstance(r, ReplyError) for r in results)
        super().__init__(first.code, f"{failed} of {len(results)} failed, first: {first}")
        self.results = results


class Refused(Exception):
    """The service's refusal of a connection, as read; ``_open`` raises ``refusal()``."""


# A new connection the service refuses (403 not in allow, 503 too many connections or
# shutting down) gets the reason ("503: Too many connections", stream.sniffer) instead of
# the greeting, and is closed: read to that close (at most REFUSAL_BYTES), it is the
# error to raise, not a wrong greeting.
REFUSAL = re.compile(rb"[45][0-9]{2}:")
REFUSAL_BYTES = 1024


def refusal(address: str, reply: bytes) -> ReplyError | ServiceDown:
    """The exception for the service's refusal ``reply``: a 5xx is a service that cannot
    serve now (``ServiceDown``: the caller's fallback applies), a 4xx a refusal of this
    client (``ReplyError`` with its code)."""
    status, reason = int(reply[:3]), reply[4:].decode(errors="replace").strip()
    message = f"{address} refused the connection: {status} {reason}"
    return ServiceDown(message) if status >= 500 else ReplyError(status, message)


# --- replies --------------------------------------------------------------------------

_REPLY_HEAD = struct.Struct(">3sI")  # a framed reply's status and body length (protocol.py)


class ReplyReader(ReplyDecoder):
    """A ``ReplyDecoder`` that takes no reply longer than ``limit`` bytes: ``ReplyTooLarge``
    as soon as a reply's header says more, before its body is held (a peer that is no
    bgservice, found on a wrong port, could otherwise make a client read without end).

    Each ``feed`` is one read of the socket (64 KiB at most), so checking the unfinished
    reply's header after each is enough: what is held stays within ``limit`` and one read."""

    def __init__(self, limit: int, address: str) -> None:
        super().__init__()
        self.limit, self.address = limit, address

    def feed(self, data: bytes) -> list[Reply]:
        replies = super().feed(data)
        if len(data) > self.limit:  # else none that ended in it can be over (its header was
            for n, (_, body) in enumerate(replies):  # checked as it began, or it began here)
                self._check(len(body), replies[:n])
        held = self._buf  # the unfinished reply (ReplyDecoder's own: its header read here)
        if len(held) >= _REPLY_HEAD.size:
            self._check(_REPLY_HEAD.unpack_from(held)[1], replies)
        return replies

    def _check(self, size: int, before: list[Reply]) -> None:
        if size > self.limit:
            raise too_large(self.address, size, self.limit, before)


# The service's 503 to a request its stop cut or came after it began, also as "Shutting
# down: job 7 is still queued" (docs/protocol.md): the service going away, not an error.
STOPPING = b"Shutting down"


def _check(status: int, body: bytes) -> bytes:
    if status != OK:
        error = ReplyError(status, body.decode("utf-8", "replace"))
        if status == 503 and body.partition(b": ")[0] == STOPPING:  # (the reply: its cause)
            why = f"the service is shutting down ({status} {error})"
            raise ServiceDown(f"{why}: the request may have run") from error
        raise error
    return body


def _new_id(reply: bytes) -> int:
    """The id in a ``queue:add`` or ``queue:retry`` reply (``id:N``), as an int."""
    if not reply.startswith(b"id:"):
        raise ReplyError(500, f"unexpected reply to queue:add: {reply[:80]!r}")
    return int(reply[3:])


# --- timeouts that say what they waited for -------------------------------------------


@contextlib.contextmanager
def waiting_for(
    call: str,
    given: float | None,
    default: float | None,
    jobs: Sequence[int] = (),
    module: str | None = None,
) -> Iterator[None]:
    """A ``ClientTimeout`` out of the block says what ``call`` waited for and which timeout
    ran out, the call's own (``given``) or the client's (``default``): "no reply in time"
    alone read as a service that hung, for a job still running. ``get()`` and
    ``get_many()`` name the job (``.job``: of a batch, the first without a reply); ``run()``
    (of ``module``) has no id until its result comes: it says whether its job was queued."""
    try:
        yield
    except ClientTimeout as exc:
        seconds = default if given is None else given
        own = "timeout" if module is None else "wait_timeout"
        whose = "the client's timeout" if given is None else f"{call}'s {own}"
        if seconds is not None:  # to the millisecond (the CLI passes what is left of -t)
            seconds = round(seconds, 3) or seconds
        limit = "no timeout" if seconds is None else f"{whose} of {seconds:g} s"
        exc.args = (f"{exc}: {_waited(exc, call, limit, jobs, module)}",)
        raise


def _waited(
    exc: ClientTimeout, call: str, limit: str, jobs: Sequence[int], module: str | None
) -> str:
    """What ``waiting_for`` adds to the message (and ``exc.job``, for a job's id)."""
    if module is not None:
        gave_up = f"{call} of module {module} gave up after {limit}"
        if not exc.sent:  # (no greeting in time, or the service took none of the request)
            return f"{gave_up}, before its request was sent: no job was queued"
        told = "goes on under an id the client was not told (add() then get() keeps the id)"
        return f"{gave_up}: its job may have been queued, and {told}"
    exc.job = jobs[_first_unanswered(exc)]
    first = " (the first without a reply)" if len(jobs) > 1 else ""
    return f"{call} gave up waiting for job {exc.job}{first} after {limit} (the job goes on)"


def _first_unanswered(exc: CutShort) -> int:
    """The index of a batch's first request without a reply (``cut_short``'s results)."""
    results = exc.results or []
    return next((n for n, r in enumerate(results) if r is exc or r is None), 0)


# --- batches --------------------------------------------------------------------------


def batch(replies: list[Reply], value: Callable[[bytes], T]) -> list[T]:
    """Each reply's ``value``, in order; ``BatchError`` if any was an error reply, or
    ``ServiceDown`` if the stop cut any (``.results``: it for each of those, as unanswered)."""
    results: list[Any] = [_outcome(reply, value) for reply in replies]
    if down := next((r for r in results if isinstance(r, ServiceDown)), None):
        down.results = [down if isinstance(r, ServiceDown) else r for r in results]
        raise down
    if any(isinstance(r, ReplyError) for r in results):
        raise BatchError(results)
    return results


@contextlib.contextmanager
def batch_of(value: Callable[[bytes], T]) -> Iterator[Callable[[list[Reply]], list[T]]]:
    """``with batch_of(value) as values: return values(self.requests(...))``: ``batch``,
    and a ``ServiceDown`` or ``ClientTimeout`` that cut the requests short gets, in its
    ``results``, the values of the replies that came (ids, not ``(200, b"id:7")``)."""
    try:
        yield lambda replies: batch(replies, value)
    except (ServiceDown, ClientTimeout) as exc:
        if exc.results is not None:  # a reply the stop cut is as one that did not come
            known = [_outcome(r, value) if isinstance(r, tuple) else r for r in exc.results]
            exc.results = [exc if isinstance(r, ServiceDown) else r for r in known]
        raise


def cut_short(exc: CutShort, replies: list[Reply], sent: int, total: int) -> CutShort:
    """``exc`` again, for a batch of ``total`` requests it cut short once ``replies``
    had come and ``sent`` were written (those answered among them). Its ``results``, in
    request order, as the PHP client's getResults(): each reply that came; the exception
    itself for one sent without a reply (it may have run: a job may be queued, so it is
    not to be sent again blindly); None for one never sent (safe to send again)."""
    unanswered, unsent = sent - len(replies), total - sent
    summary = [f"{len(replies)} answered"]
    if unanswered:
        summary.append(f"{unanswered} sent without a reply (they may have run)")
    if unsent:
        summary.append(f"{unsent} not sent")
    what = ", ".join(summary)
    again = type(exc)(f"{exc}; a batch of {total} cut short: {what} (.results has each)")
    vars(again).update(vars(exc))  # what it carries (ReplyTooLarge's size, a timeout's sent)
    again.results = [*replies, *[again] * unanswered, *[None] * unsent]
    return again


def answered(futures: Iterable[asyncio.Future[Reply]]) -> list[Reply]:
    """The replies that came to an ``AsyncClient`` batch: a prefix, as they come in request
    order (the futures after it failed with the connection, or a timeout cancelled them)."""
    replies: list[Reply] = []
    for future in futures:
        if not future.done() or future.cancelled() or future.exception() is not None:
            break
        replies.append(future.result())
    return replies


def _outcome(reply: Reply, value: Callable[[bytes], T]) -> T | ReplyError | ServiceDown:
    """A reply's value, or the ``ReplyError`` of an error reply (or of one ``value``
    cannot read), or the ``ServiceDown`` of one the service's stop cut."""
    try:
        return value(_check(*reply))
    except (ReplyError, ServiceDown) as exc:
        return exc
